"""EDM's two U-Net families: SongUNet (DDPM++ / NCSN++, Song et al. 2021) and DhariwalUNet (ADM, Dhariwal & Nichol
2021). Module names and registration order reproduce EDM's, so EDM's state dicts load strictly in both directions.

Both take `(x, noise_labels, class_labels, augment_labels=None)`: x (N, C, H, W), noise_labels (N,) or (1,) (the
preconditioner's c_noise), class_labels (N or 1, label_dim) or None, augment_labels (N, augment_dim) or None.
`encode` takes the same arguments and returns the bottleneck features that `forward` passes from encoder to decoder.
"""

import math

import torch
from torch.nn.functional import silu

from dmd.edm.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


def _drop_labels(labels, batch_size, p):
    """Zero whole label rows with probability p (classifier-free-guidance style label dropout)."""
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _decode(dec, x, emb, skips):
    """Run one decoder block, first concatenating the matching encoder output when the block expects more channels."""
    if x.shape[1] != dec.in_channels:
        x = torch.cat([x, skips.pop()], dim=1)
    return dec(x, emb)


# What both U-Nets share: a mapping network (c_noise and labels -> embedding), an encoder down to the bottleneck and a
# decoder back up. `encode` stops at the bottleneck (DMD2's GAN head reads it) without changing EDM's forward.
class _UNet(torch.nn.Module):
    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._mapping(x, noise_labels, class_labels, augment_labels)
        x, skips = self._encoder(x, emb)
        return self._decoder(x, emb, skips)

    def encode(self, x, noise_labels, class_labels, augment_labels=None):
        """Return the bottleneck features (N, C', H', W'): the encoder's output, the first decoder block's input."""
        emb = self._mapping(x, noise_labels, class_labels, augment_labels)
        return self._encoder(x, emb)[0]

    def forward_with_bottleneck(self, x, noise_labels, class_labels, augment_labels=None):
        """Return (forward's output, the bottleneck features) of one pass: the encoder in the caller's grad mode, the
        decoder without autograd, for a frozen network whose output is a target and whose features get a gradient."""
        emb = self._mapping(x, noise_labels, class_labels, augment_labels)
        h, skips = self._encoder(x, emb)
        with torch.no_grad():
            return self._decoder(h, emb, skips), h


# DDPM++ and NCSN++ U-Net of "Score-Based Generative Modeling through Stochastic Differential Equations". The output
# is accumulated on an auxiliary path ('aux') that every decoder level with an output head adds to.
class SongUNet(_UNet):
    def __init__(
        self,
        img_resolution,  # Image resolution at input and output.
        in_channels,  # Image channels at input.
        out_channels,  # Image channels at output.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        augment_dim=0,  # Width of the augmentation labels, 0 = no augmentation conditioning.
        model_channels=128,  # Base channel count.
        channel_mult=(1, 2, 2, 2),  # Channel multiplier per resolution level.
        channel_mult_emb=4,  # Embedding width as a multiple of model_channels.
        num_blocks=4,  # Residual blocks per resolution level.
        attn_resolutions=(16,),  # Resolutions whose blocks get self-attention.
        dropout=0.10,  # Dropout probability inside the residual blocks.
        label_dropout=0,  # Probability of zeroing a sample's class label during training.
        embedding_type="positional",  # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise=1,  # Noise-embedding width as a multiple of model_channels (1 DDPM++, 2 NCSN++).
        encoder_type="standard",  # Encoder: 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type="standard",  # Decoder: 'standard' (both) or 'skip'.
        resample_filter=(1, 1),  # FIR taps for up/down: (1, 1) (DDPM++) or (1, 3, 3, 1) (NCSN++).
    ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', not {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', not {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', not {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping: c_noise, class labels and augmentation labels -> one embedding per sample.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. caux tracks the width of the auxiliary image path of the 'skip' and 'residual' encoders.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder. Only the last block of a level at an attention resolution attends; every level of the 'skip'
        # decoder (and level 0 always) adds an output head to the auxiliary path.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            deepest = level == len(channel_mult) - 1
            if deepest:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and not deepest:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _mapping(self, x, noise_labels, class_labels, augment_labels):
        """Return the per-sample embedding (N, emb_channels) of c_noise, class and augmentation labels."""
        # The embedding's halves are swapped to [sin, cos], the layout DDPM++ was trained with.
        emb = self.map_noise(noise_labels)  # (N, noise_channels) as [cos, sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, x.shape[0], self.label_dropout)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def _encoder(self, x, emb):
        """Run the encoder on x; return the bottleneck x and the skips the decoder consumes."""
        # aux starts as the input image and feeds the 'skip' / 'residual' side paths.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def _decoder(self, x, emb, skips):
        """Run the decoder from the bottleneck x; return the output image (N, out_channels, H, W)."""
        # aux now accumulates the output heads, upsampled from level to level.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                x = _decode(block, x, emb, skips)
        return aux


# ADM U-Net of "Diffusion Models Beat GANs on Image Synthesis": adaptive group-norm scale/shift, 64-channel attention
# heads, attention in every block at the attention resolutions, and a single output head.
class DhariwalUNet(_UNet):
    def __init__(
        self,
        img_resolution,  # Image resolution at input and output.
        in_channels,  # Image channels at input.
        out_channels,  # Image channels at output.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        augment_dim=0,  # Width of the augmentation labels, 0 = no augmentation conditioning.
        model_channels=192,  # Base channel count.
        channel_mult=(1, 2, 3, 4),  # Channel multiplier per resolution level.
        channel_mult_emb=4,  # Embedding width as a multiple of model_channels.
        num_blocks=3,  # Residual blocks per resolution level.
        attn_resolutions=(32, 16, 8),  # Resolutions whose blocks get self-attention.
        dropout=0.10,  # Dropout probability inside the residual blocks.
        label_dropout=0,  # Probability of zeroing a sample's class label during training.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping: c_noise and augmentation labels -> embedding; class labels join after the two layers.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            init_label = dict(init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            self.map_label = Linear(label_dim, emb_channels, bias=False, **init_label)

        # Encoder; every module's output is a skip.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _mapping(self, x, noise_labels, class_labels, augment_labels):
        """Return the per-sample embedding (N, emb_channels) of c_noise, augmentation and class labels."""
        # No [sin, cos] swap and no label scaling here, unlike SongUNet.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, x.shape[0], self.label_dropout)
            emb = emb + self.map_label(labels)
        return silu(emb)

    def _encoder(self, x, emb):
        """Run the encoder on x; return the bottleneck x and the skips (every encoder module's output)."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return x, skips

    def _decoder(self, x, emb, skips):
        """Run the decoder from the bottleneck x; return the output image (N, out_channels, H, W)."""
        for block in self.dec.values():
            x = _decode(block, x, emb, skips)
        return self.out_conv(silu(self.out_norm(x)))
