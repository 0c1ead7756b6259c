"""EDM's preconditioners: wrap a U-Net F into a denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

All four keep EDM's interface `net(x, sigma, class_labels=None, force_fp32=False, **model_kwargs)` and attributes
(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, round_sigma, model, ...), so EDM's
pickled teachers and samplers drop in. Each also keeps `init_kwargs`, a plain dict of its constructor kwargs from
which `build_network` rebuilds the same architecture. `PRECONDITIONERS` also holds EDM2's `Precond`
(dmd.edm2.networks), so that one registry builds, copies and bounds the networks of both families.
"""

import copy
import math
import numbers
import reprlib

import torch

from dmd.denoiser import Denoiser, plain_kwargs
from dmd.edm.unets import DhariwalUNet, SongUNet
from dmd.edm2.networks import Precond

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# Shared machinery of the four preconditioners: label handling, the compute dtype, building the U-Net and the
# preconditioned forward pass. Subclasses supply scalings(sigma) -> (c_skip, c_out, c_in, c_noise).
class Preconditioner(Denoiser):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim,  # Number of class labels, 0 = unconditional.
        use_fp16,  # Run the U-Net in float16 (CUDA only, as in EDM)?
        use_bf16,  # Run the U-Net in bfloat16 (any device; takes precedence over use_fp16)?
        model_type,  # U-Net class name, a key of MODEL_TYPES.
        model_out_channels,  # Output channels of the U-Net (2x img_channels for iDDPM's learned variance).
        precond_kwargs,  # The subclass's own constructor kwargs, recorded in init_kwargs.
        model_kwargs,  # Remaining kwargs, passed to the U-Net.
    ):
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type '{model_type}'; expected one of {sorted(MODEL_TYPES)}")
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.compute_dtype = None  # A run's override of the U-Net dtype (dmd train --precision); None: as above.
        head = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16)
        kwargs = dict(**head, **precond_kwargs, model_type=model_type, use_bf16=use_bf16, **model_kwargs)
        self._init_kwargs = plain_kwargs(kwargs)
        unet_kwargs = {name: self._init_kwargs[name] for name in model_kwargs}
        self.model = MODEL_TYPES[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=model_out_channels,
            label_dim=label_dim,
            **unet_kwargs,
        )

    @property
    def init_kwargs(self):
        """Return a copy of the constructor kwargs as a plain, JSON-serialisable dict."""
        return copy.deepcopy(self._init_kwargs)

    def round_sigma(self, sigma):
        """Return sigma as a tensor (only iDDPM restricts sigma to a discrete set)."""
        return torch.as_tensor(sigma)

    def model_dtype(self, x, force_fp32=False):
        """Return the dtype the U-Net runs in for input x."""
        if force_fp32:
            return torch.float32
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.use_bf16:
            return torch.bfloat16
        if self.use_fp16 and x.device.type == "cuda":
            return torch.float16
        return torch.float32

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        # The U-Net alone runs in `dtype`; input, scalings and output stay float32 (bf16 the way DMD2 runs it).
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return self._output(x, c_skip, c_out, F_x, dtype)

    def forward_with_bottleneck(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Return (D(x; sigma), the bottleneck features (N, C', H', W') in float32) of one U-Net pass, equal to
        forward's and bottleneck's: the features in the caller's grad mode, D without autograd. DMD2's GAN on the
        frozen teacher's features (--gan-features teacher) reads both off the DM loss's one pass of mu_real."""
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x, h = self.model.forward_with_bottleneck(
            (c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs
        )
        h = h.to(torch.float32)  # with its gradient: outside no_grad
        with torch.no_grad():
            return self._output(x, c_skip, c_out, F_x, dtype), h

    def _output(self, x, c_skip, c_out, F_x, dtype):
        """D_x = c_skip x + c_out F_x in float32, from the U-Net's output F_x, which must be in its compute dtype."""
        if F_x.dtype != dtype:
            raise RuntimeError(f"{type(self.model).__name__} returned {F_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * F_x[:, : self.img_channels].to(torch.float32)

    def bottleneck(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Return the U-Net's bottleneck features (N, C', H', W') in float32 for the call net(x, sigma, ...) would make.

        The input goes through the same c_in, c_noise, label handling and compute dtype as in `forward` (the
        preconditioner tests compare this against the encoder's output captured inside a forward call).
        """
        x, sigma, class_labels, dtype = self._unet_inputs(x, sigma, class_labels, force_fp32)
        _, _, c_in, c_noise = self.scalings(sigma)
        h = self.model.encode((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return h.to(torch.float32)

    @property
    def backbone(self):
        """The U-Net (`model`, as its authors name it)."""
        return self.model


# EDM's own preconditioning (Karras et al. 2022, Table 1): unit-variance input and training target for every sigma.
class EDMPrecond(Preconditioner):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 on CUDA?
        sigma_min=0,  # Lowest supported noise level.
        sigma_max=float("inf"),  # Highest supported noise level.
        sigma_data=0.5,  # Standard deviation of the data.
        model_type="DhariwalUNet",  # U-Net class name.
        use_bf16=False,  # Run the U-Net in bfloat16 (not in EDM)?
        **model_kwargs,  # Passed to the U-Net.
    ):
        own = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, img_channels, own, model_kwargs
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        """Return (c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1)."""
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# Variance-preserving preconditioning (DDPM / VP-SDE of Song et al. 2021) with the linear beta schedule; F predicts
# the noise. The sigma range is computed in float32 exactly as EDM does (0.0009765625 and 152.16697692871094).
class VPPrecond(Preconditioner):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 on CUDA?
        beta_d=19.9,  # Extent of the noise schedule, beta(1) - beta(0).
        beta_min=0.1,  # Initial slope of the noise schedule, beta(0).
        M=1000,  # Number of discretisation steps of the original DDPM; c_noise spans [0, M - 1].
        epsilon_t=1e-5,  # Smallest diffusion time t.
        model_type="SongUNet",  # U-Net class name.
        use_bf16=False,  # Run the U-Net in bfloat16 (not in EDM)?
        **model_kwargs,  # Passed to the U-Net.
    ):
        own = dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t)
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, img_channels, own, model_kwargs
        )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Float32 on the CPU whatever the default device, so the constants never depend on where the net is built.
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1, dtype=torch.float32, device="cpu")))

    def sigma(self, t):
        """Return sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Return the diffusion time t at which sigma(t) = sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma):
        """Return (c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1)."""
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


# Variance-exploding preconditioning (SMLD / VE-SDE of Song et al. 2021); F predicts the scaled score.
class VEPrecond(Preconditioner):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 on CUDA?
        sigma_min=0.02,  # Lowest supported noise level.
        sigma_max=100,  # Highest supported noise level.
        model_type="SongUNet",  # U-Net class name.
        use_bf16=False,  # Run the U-Net in bfloat16 (not in EDM)?
        **model_kwargs,  # Passed to the U-Net.
    ):
        own = dict(sigma_min=sigma_min, sigma_max=sigma_max)
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, img_channels, own, model_kwargs
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma):
        """Return (c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1)."""
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


# Improved DDPM preconditioning (Nichol & Dhariwal 2021, cosine schedule). Noise levels live on the discrete table
# u[0..M] (u[M] = 0, u[0] = sigma_max), stored as a persistent buffer; c_noise is the DDPM step index. The U-Net
# predicts 2x img_channels (noise and variance); only the noise half is used.
class iDDPMPrecond(Preconditioner):
    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Image channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Run the U-Net in float16 on CUDA?
        C_1=0.001,  # Lower bound on alpha_bar(j - 1) / alpha_bar(j), which caps the step sizes.
        C_2=0.008,  # Offset s of the cosine schedule.
        M=1000,  # Number of discretisation steps.
        model_type="DhariwalUNet",  # U-Net class name.
        use_bf16=False,  # Run the U-Net in bfloat16 (not in EDM)?
        **model_kwargs,  # Passed to the U-Net.
    ):
        own = dict(C_1=C_1, C_2=C_2, M=M)
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, img_channels * 2, own, model_kwargs
        )
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The table is built backwards from u[M] = 0, in float32 on the CPU like EDM's (one 0-d sin per step).
        alpha_bar = [self.alpha_bar(j) for j in range(M + 1)]
        u = torch.zeros(M + 1, device="cpu")
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar[j - 1] / alpha_bar[j]).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j):
        """Return the cosine schedule's alpha_bar(j) = sin^2(pi/2 * j / M / (C_2 + 1)), in float32."""
        j = torch.as_tensor(j, device="cpu")
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest entry of u (or return that entry's index), keeping sigma's shape."""
        sigma = torch.as_tensor(sigma)
        distance = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        index = distance.argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def scalings(self, sigma):
        """Return (c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1)."""
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise


# Every network class we build, by the class name its pickles and our checkpoints record: EDM's four and EDM2's.
PRECONDITIONERS = {
    "EDMPrecond": EDMPrecond,
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "Precond": Precond,
}


# Sane ranges of the constructor kwargs that size a network or run a Python loop, checked before a network is built
# from a file: wide enough for every EDM and EDM2 configuration (ImageNet-64 ADM: 192 channels, 4 levels of 3 blocks,
# 1000 classes; EDM2-XXL: 448 channels, 64-channel heads), narrow enough that no file makes a constructor loop or
# allocate without end. EDM2 leaves channel_mult_noise and channel_mult_emb None to derive them from channel_mult.
_COUNT_LIMITS = {
    "img_resolution": (1, 4096),
    "img_channels": (1, 64),
    "label_dim": (0, 100_000),
    "augment_dim": (0, 1024),
    "model_channels": (1, 4096),
    "channel_mult_emb": (1, 64),
    "channel_mult_noise": (1, 64),
    "num_blocks": (1, 8),
    "M": (1, 10_000),  # iDDPMPrecond builds its table u[0..M] in a Python loop of M steps
    "logvar_channels": (1, 4096),
    "channels_per_head": (1, 4096),
}
_DERIVED_IF_NONE = {"channel_mult_noise", "channel_mult_emb"}
_LIST_LIMITS = {"channel_mult": (1, 8, 1, 64), "attn_resolutions": (0, 64, 1, 4096)}  # (entries, entry range)


def check_init_kwargs(init_kwargs):
    """Raise ValueError naming the first constructor kwarg outside its sane range (_COUNT_LIMITS, _LIST_LIMITS);
    resample_filter must be 1 to 16 numbers and img_resolution a power of two, as EDM's and EDM2's datasets are."""

    def count(name, value, low, high):
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high):
            raise ValueError(f"'{name}' must be an integer from {low} to {high}, not {reprlib.repr(value)}")

    for name, (low, high) in _COUNT_LIMITS.items():
        if name in init_kwargs and not (name in _DERIVED_IF_NONE and init_kwargs[name] is None):
            count(name, init_kwargs[name], low, high)
    for name, (shortest, longest, low, high) in _LIST_LIMITS.items():
        value = init_kwargs.get(name, [low] * shortest)
        if not (isinstance(value, (list, tuple)) and shortest <= len(value) <= longest):
            raise ValueError(f"'{name}' must be a list of {shortest} to {longest} entries, not {reprlib.repr(value)}")
        for entry in value:
            count(name, entry, low, high)
    taps = init_kwargs.get("resample_filter", [1, 1])
    numbers_only = isinstance(taps, (list, tuple)) and all(isinstance(t, numbers.Real) for t in taps)
    if not (numbers_only and 1 <= len(taps) <= 16):
        raise ValueError(f"'resample_filter' must be a list of 1 to 16 numbers, not {reprlib.repr(taps)}")
    resolution = init_kwargs.get("img_resolution", 1)
    if resolution & (resolution - 1):
        raise ValueError(f"'img_resolution' must be a power of two, not {resolution}")


def build_network(class_name, init_kwargs):
    """Build a fresh preconditioned network from its class name and init_kwargs."""
    if class_name not in PRECONDITIONERS:
        raise ValueError(f"unknown network class '{class_name}'; expected one of {sorted(PRECONDITIONERS)}")
    return PRECONDITIONERS[class_name](**init_kwargs)


def set_compute_dtype(net, dtype):
    """Run the U-Net of `net` in `dtype` (torch.float32 or torch.bfloat16) whatever its pickle's use_fp16/use_bf16;
    the weights stay float32 (master weights), the preconditioning and output float32."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"compute dtype must be float32 or bfloat16, not {dtype}")
    net.compute_dtype = dtype
    return net


def copy_network(net):
    """Return an independent copy of net (same architecture and weights, on net's device, in net's mode)."""
    clone = build_network(type(net).__name__, net.init_kwargs)
    clone.load_state_dict(net.state_dict())
    clone.compute_dtype = net.compute_dtype
    if hasattr(net, "encoder_info"):  # EDM2: the space it runs in (pixels, or VAE latents)
        clone.encoder_info = net.encoder_info
    device = next(net.parameters()).device
    return clone.to(device).train(net.training)
