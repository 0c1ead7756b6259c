"""Building blocks of EDM's U-Nets: layers whose parameters, buffers and names match EDM's state dicts.

Every layer keeps its parameters in float32 and casts them to the input's dtype in `forward`, so one set of weights
serves float32, float16 and bfloat16 passes alike (the preconditioner picks the dtype).
"""

import math

import torch
from torch.nn.functional import silu


def weight_init(shape, mode, fan_in, fan_out):
    """Draw a tensor of `shape` with a Xavier or Kaiming initialisation, uniform or normal."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode '{mode}'")


# Fully connected layer, x @ W^T + b.
class Linear(torch.nn.Module):
    def __init__(
        self,
        in_features,  # Input width.
        out_features,  # Output width.
        bias=True,  # Learn an additive bias?
        init_mode="kaiming_normal",  # Distribution of the initial weights, see weight_init().
        init_weight=1,  # Multiplier on the initial weights.
        init_bias=0,  # Multiplier on the initial bias (0 starts it at zero).
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


# 2D convolution with optional 2x up- or downsampling through a separable FIR filter. With kernel=0 the layer has no
# weights and only resamples (the weightless skips and aux paths of the U-Nets).
class Conv2d(torch.nn.Module):
    def __init__(
        self,
        in_channels,  # Input channels.
        out_channels,  # Output channels (must equal in_channels when kernel=0).
        kernel,  # Square kernel size; 0 means no convolution at all.
        bias=True,  # Learn an additive bias (only when kernel > 0)?
        up=False,  # Upsample 2x before (or fused with) the convolution?
        down=False,  # Downsample 2x before (or fused with) the convolution?
        resample_filter=(1, 1),  # 1D taps of the resampling filter; (1, 1) gives nearest up / box down.
        fused_resample=False,  # Merge resampling and convolution into one pass at the higher resolution?
        init_mode="kaiming_normal",  # Distribution of the initial weights, see weight_init().
        init_weight=1,  # Multiplier on the initial weights.
        init_bias=0,  # Multiplier on the initial bias.
    ):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = None
        self.bias = None
        if kernel:
            self.weight = torch.nn.Parameter(
                weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight
            )
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        # Separable 2D filter outer(f, f) normalised to unit DC gain, (1, 1, L, L); only stored when it is used.
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in = x.shape[1]

        if self.fused_resample and self.up and w is not None:
            # Zero-stuffing transposed filter (gain 4 keeps the mean), then the conv; padding split between the two.
            x = torch.nn.functional.conv_transpose2d(
                x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0)
            )
            x = torch.nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # The conv at full resolution with the filter's padding added, then a strided filter pass without any.
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = torch.nn.functional.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = torch.nn.functional.conv_transpose2d(
                    x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad
                )
            if self.down:
                x = torch.nn.functional.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


# Group normalisation whose group count shrinks for narrow layers so that every group keeps a few channels.
class GroupNorm(torch.nn.Module):
    def __init__(
        self,
        num_channels,  # Channels to normalise.
        num_groups=32,  # Upper bound on the number of groups.
        min_channels_per_group=4,  # Fewest channels a group may hold; caps groups at num_channels // this.
        eps=1e-5,  # Added to the variance (EDM: 1e-6 in SongUNet, 1e-5 in DhariwalUNet).
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)


# Transformer-style sinusoidal embedding of a scalar per sample: (N,) -> (N, C) laid out as [cos, sin].
class PositionalEmbedding(torch.nn.Module):
    def __init__(
        self,
        num_channels,  # Output width C; C/2 frequencies.
        max_positions=10000,  # The slowest frequency is 1/max_positions (or just above it without endpoint).
        endpoint=False,  # Let the last of the C/2 exponents reach exactly 1 (SongUNet) or stop short of it (ADM)?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponent  # f_i = (1/max_positions)^(i / (C/2 - endpoint))
        x = torch.outer(x, freqs.to(x.dtype))  # (N, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)


# Random Fourier features of a scalar per sample: (N,) -> (N, C) laid out as [cos, sin]. The frequencies are drawn
# once and stored as a persistent buffer, so a trained network must load them.
class FourierEmbedding(torch.nn.Module):
    def __init__(
        self,
        num_channels,  # Output width C; C/2 random frequencies.
        scale=16,  # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))  # (N, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)


# Residual U-Net block conditioned on an embedding, optionally resampling 2x and ending in multi-head self-attention.
# q, k and v come from one 1x1 conv whose output channels are interleaved per channel: channel (head*C/heads + c)*3
# + j holds q, k or v (j = 0, 1, 2) of channel c of that head, not three stacked blocks.
class UNetBlock(torch.nn.Module):
    def __init__(
        self,
        in_channels,  # Input channels.
        out_channels,  # Output channels.
        emb_channels,  # Width of the conditioning embedding.
        up=False,  # Upsample 2x in conv0 and the skip?
        down=False,  # Downsample 2x in conv0 and the skip?
        attention=False,  # Append self-attention after the residual part?
        num_heads=None,  # Attention heads; None derives them as out_channels // channels_per_head.
        channels_per_head=64,  # Channels per head when num_heads is None (below 64 channels ADM gets no attention).
        dropout=0,  # Dropout probability before conv1, active in training mode only.
        skip_scale=1,  # Multiplier after each residual sum (sqrt(0.5) in SongUNet).
        eps=1e-5,  # GroupNorm epsilon.
        resample_filter=(1, 1),  # FIR taps for up/down, see Conv2d.
        resample_proj=False,  # Give a same-width resampling skip a 1x1 conv (True) or make it weightless (False)?
        adaptive_scale=True,  # Embedding gives scale and shift after norm1 (ADM) or a bias before it (SongUNet)?
        init=None,  # Init kwargs of conv0, affine and the skip; None means the layer defaults.
        init_zero=None,  # Init kwargs of conv1 and proj, which start (near) zero; None means all-zero weights.
        init_attn=None,  # Init kwargs of qkv; None means the same as init.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if num_heads is None:
            num_heads = out_channels // channels_per_head
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        init = init if init is not None else {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        init_attn = init_attn if init_attn is not None else init

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)  # (N or 1, out or 2*out, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            # (N*heads, C/heads, 3, H*W) -> three (N*heads, C/heads, H*W) tensors, thanks to the interleaved layout.
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            weights = attention_weights(q, k)  # (N*heads, H*W queries, H*W keys)
            a = torch.einsum("nqk,nck->ncq", weights, v)  # (N*heads, C/heads, H*W)
            x = self.proj(a.reshape(n, c, h, w)).add_(x)
            x = x * self.skip_scale
        return x


def attention_weights(q, k):
    """Softmax over keys of q.k / sqrt(channels) in float32, cast back to q's dtype; q, k are (N, C, L)."""
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), k.to(torch.float32) / math.sqrt(k.shape[1]))
    return logits.softmax(dim=2).to(q.dtype)
