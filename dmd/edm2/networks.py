"""EDM2's network (Karras et al. 2024, Figure 21): the magnitude-preserving U-Net and its preconditioner with the
uncertainty head. Constructor arguments, module names and registration order are EDM2's, so the weights of EDM2's
pickles (`training.networks_edm2.Precond`) load strictly.

`Precond` keeps EDM2's interface, `net(x, sigma, class_labels=None, force_fp32=False, return_logvar=False)`, with no
sigma_min, sigma_max or round_sigma (EDM2 has none), and the interface every dmd network shares: img_resolution,
img_channels, label_dim, sigma_data, init_kwargs (plain JSON, from which `dmd.edm.build_network("Precond", ...)`
rebuilds it), compute_dtype (a run's bf16 override, see `dmd.edm.precond.set_compute_dtype`), and `bottleneck`, the
features DMD2's GAN head reads.
"""

import copy
import math
import numbers

import torch

from dmd.denoiser import Denoiser, plain_kwargs
from dmd.edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


def _check_fraction(name, value):
    """Raise ValueError unless value is a real number in [0, 1] (a balance of two branches, a dropout rate)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= 1):
        raise ValueError(f"'{name}' must be a number from 0 to 1, not {str(value)[:40]}")


# U-Net block, encoder ('enc') or decoder ('dec') flavour, with optional 2x resampling and self-attention. The main
# branch is resampled (and on the encoder path projected where the width changes, then pixel-normalised); the residual
# branch is two 3x3 convs modulated by the embedding; the two meet in an mp_sum, as does the attention.
class Block(torch.nn.Module):
    def __init__(
        self,
        in_channels,  # Input channels.
        out_channels,  # Output channels.
        emb_channels,  # Width of the conditioning embedding.
        flavor="enc",  # 'enc': skip conv and pixel norm on the main branch first; 'dec': skip conv at the merge.
        resample_mode="keep",  # 'keep', 'up' or 'down' (2x, on the main branch before anything else).
        resample_filter=(1, 1),  # FIR taps of the resampling filter (even length).
        attention=False,  # Append self-attention?
        channels_per_head=64,  # Channels per attention head.
        dropout=0,  # Dropout probability before conv_res1, in training mode only.
        res_balance=0.3,  # Weight of the residual branch against the main branch (0 = main only).
        attn_balance=0.3,  # Weight of the attention output against its input.
        clip_act=256,  # Clip output activations to [-clip_act, clip_act]; None = no clipping.
    ):
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', not {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', not {resample_mode!r}")
        if len(resample_filter) % 2:
            raise ValueError(f"'resample_filter' must have an even number of taps, not {len(resample_filter)}")
        for name, value in dict(dropout=dropout, res_balance=res_balance, attn_balance=attn_balance).items():
            _check_fraction(name, value)
        if clip_act is not None and (
            isinstance(clip_act, bool) or not (isinstance(clip_act, numbers.Real) and clip_act > 0)
        ):
            raise ValueError(f"'clip_act' must be a positive number or None, not {str(clip_act)[:40]}")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, scaled per channel by c = 1 + emb_gain * linear(emb).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (N, out_channels)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Merge the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention. qkv's output channels are laid out as (heads, C/heads, 3): q, k and v of one channel sit
        # side by side. Each is pixel-normalised over its head's channels before the dot products.
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])  # (N, heads, C/heads, 3, HW)
            q, k, v = normalize(y, dim=2).unbind(3)  # each (N, heads, C/heads, HW)
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


# EDM2's U-Net. Embedding: Fourier features of c_noise through a linear layer, mp_sum'ed with the class embedding,
# then mp_silu. The input gets a constant channel of ones. Encoder '{r}x{r}_conv' / '_down' / '_block{i}', decoder
# '{r}x{r}_in0' (attention), '_in1' / '_up' / '_block{i}' with mp_cat skips, then out_conv scaled by out_gain.
class UNet(torch.nn.Module):
    def __init__(
        self,
        img_resolution,  # Image resolution at input and output.
        img_channels,  # Image channels at input and output.
        label_dim,  # Number of class labels, 0 = unconditional.
        model_channels=192,  # Base channel count.
        channel_mult=(1, 2, 3, 4),  # Channel multiplier per resolution level.
        channel_mult_noise=None,  # Noise-embedding width / model_channels; None = channel_mult[0].
        channel_mult_emb=None,  # Embedding width / model_channels; None = max(channel_mult).
        num_blocks=3,  # Blocks per resolution level.
        attn_resolutions=(16, 8),  # Resolutions whose blocks attend.
        label_balance=0.5,  # Weight of the class embedding against the noise embedding.
        concat_balance=0.5,  # Weight of the main path against the skip in the decoder's concatenations.
        **block_kwargs,  # Passed to every Block.
    ):
        _check_fraction("label_balance", label_balance)
        _check_fraction("concat_balance", concat_balance)
        super().__init__()
        cblock = [model_channels * mult for mult in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder; the input has one extra channel of ones.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=attention, **block_kwargs
                )

        # Decoder; each '_block{i}' takes the matching encoder output, concatenated.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attention = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=attention, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self._embedding(noise_labels, class_labels)
        x, skips = self._encoder(x, emb)
        return self._decoder(x, emb, skips)

    def encode(self, x, noise_labels, class_labels):
        """Return the bottleneck features (N, C', H', W'): the encoder's output at the lowest resolution, which is
        the input of the first decoder block ('{r}x{r}_in0')."""
        return self._encoder(x, self._embedding(noise_labels, class_labels))[0]

    def forward_with_bottleneck(self, x, noise_labels, class_labels):
        """Return (forward's output, the bottleneck features) of one pass: the encoder in the caller's grad mode, the
        decoder without autograd, for a frozen network whose output is a target and whose features get a gradient."""
        emb = self._embedding(noise_labels, class_labels)
        h, skips = self._encoder(x, emb)
        with torch.no_grad():
            return self._decoder(h, emb, skips), h

    def _embedding(self, noise_labels, class_labels):
        """Return the embedding (N, emb_channels) of c_noise (N,) and the class labels (N or 1, label_dim) or None."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def _encoder(self, x, emb):
        """Run the encoder on x; return the bottleneck x and the outputs of every encoder module (the skips)."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, Block) else block(x)
            skips.append(x)
        return x, skips

    def _decoder(self, x, emb, skips):
        """Run the decoder from the bottleneck x, consuming the skips; return the output (N, img_channels, H, W)."""
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


# EDM2's preconditioning (EDM's, Karras et al. 2022, with c_noise = ln(sigma) / 4) around the U-Net, and the
# uncertainty head u(sigma) of EDM2's loss (Eq. 21), returned with return_logvar=True.
class Precond(Denoiser):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels (3 for pixels, 4 for Stable Diffusion VAE latents).
        label_dim,  # Number of class labels, 0 = unconditional.
        use_fp16=True,  # Run the U-Net in float16 on CUDA?
        sigma_data=0.5,  # Standard deviation of the data.
        logvar_channels=128,  # Width of the uncertainty head's Fourier features.
        **unet_kwargs,  # Passed to the U-Net.
    ):
        super().__init__()
        kwargs = dict(
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=label_dim,
            use_fp16=use_fp16,
            sigma_data=sigma_data,
            logvar_channels=logvar_channels,
            **unet_kwargs,
        )
        self._init_kwargs = plain_kwargs(kwargs)  # as checkpoints store them and build_network reads them back
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.compute_dtype = None  # A run's override of the U-Net dtype (dmd train --precision); None: as above.
        self.encoder_info = None  # EncoderInfo of the pickle's 'encoder', set by dmd.edm.load_network.
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def init_kwargs(self):
        """Return a copy of the constructor kwargs as a plain, JSON-serialisable dict."""
        return copy.deepcopy(self._init_kwargs)

    def as_student_(self):
        """Prepare this network to be trained by DMD: forced weight normalisation moves from inside every forward to
        `normalize_weights_`, which the loop calls now and after each optimizer step (DMD2's fake-score step runs
        several forwards before one backward, and a forward's in-place write would break it), and the uncertainty
        head, which DMD's losses never use, is frozen (DDP would wait for its gradients). Return self."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.force_normalization = False
        self.logvar_linear.requires_grad_(False)
        self.normalize_weights_()
        return self

    def normalize_weights_(self):
        """EDM2's forced weight normalisation of every MPConv weight, in place (see as_student_)."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_weight_()

    def model_dtype(self, x, force_fp32=False):
        """Return the dtype the U-Net runs in for input x: EDM2's rule (float16 on CUDA with use_fp16, else float32)
        unless force_fp32 or a run's compute_dtype says otherwise."""
        if force_fp32:
            return torch.float32
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.use_fp16 and x.device.type == "cuda":
            return torch.float16
        return torch.float32

    def scalings(self, sigma):
        """Return (c_skip, c_out, c_in) for sigma of shape (N, 1, 1, 1), and c_noise of shape (N,)."""
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        # The U-Net alone runs in `dtype`; input, scalings, output and the uncertainty head stay float32.
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)  # u(sigma), (N, 1, 1, 1)
            return D_x, logvar
        return D_x

    def forward_with_bottleneck(self, x, sigma, class_labels=None, force_fp32=False, **unet_kwargs):
        """Return (D(x; sigma), the bottleneck features (N, C', H', W') in float32) of one U-Net pass, equal to
        forward's and bottleneck's: the features in the caller's grad mode, D without autograd (see EDM's)."""
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x, h = self.unet.forward_with_bottleneck((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        h = h.to(torch.float32)  # with its gradient: outside no_grad
        with torch.no_grad():
            return c_skip * x + c_out * F_x.to(torch.float32), h

    def bottleneck(self, x, sigma, class_labels=None, force_fp32=False, **unet_kwargs):
        """Return the U-Net's bottleneck features (N, C', H', W') in float32 for the call net(x, sigma, ...) would make:
        the encoder's output at the lowest resolution, from c_in x and c_noise = ln(sigma) / 4 as in `forward`."""
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        _, _, c_in, c_noise = self.scalings(sigma)
        return self.unet.encode((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs).to(torch.float32)

    @property
    def backbone(self):
        """The U-Net (`unet`, as its authors name it)."""
        return self.unet
