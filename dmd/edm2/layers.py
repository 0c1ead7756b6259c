"""EDM2's magnitude-preserving building blocks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"; equation numbers are the paper's). Names, parameters and buffers match EDM2's state dicts.

Every operation keeps the expected magnitude of its output at that of its input, so EDM2's U-Net needs no
normalisation layers and no weight decay: its weights are normalised at every use, and in training mode also
overwritten with their normalised values (forced weight normalisation).
"""

import math

import torch


def normalize(x, dim=None, eps=1e-4):
    """Scale x to unit magnitude (root mean square 1) over `dim` (default: all but the first); the norm runs in fp32."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # eps + ||x|| / sqrt(entries per norm)
    return x / norm.to(x.dtype)


def resample(x, f=(1, 1), mode="keep"):
    """Up- or downsample x (N, C, H, W) 2x by the separable FIR filter `f` (even length), or return it as it is."""
    if mode == "keep":
        return x
    if mode not in ("up", "down"):
        raise ValueError(f"resample mode must be 'keep', 'up' or 'down', not {mode!r}")
    f = torch.as_tensor(f, dtype=torch.float32)
    f = f / f.sum()
    f = torch.outer(f, f)[None, None].to(x.device, x.dtype)  # (1, 1, L, L), unit DC gain
    pad, c = (f.shape[-1] - 1) // 2, x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    return torch.nn.functional.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)


def mp_silu(x):
    """Magnitude-preserving SiLU (Eq. 81): silu(x) / 0.596, 0.596 being silu's output magnitude for unit input."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving sum (Eq. 88): lerp(a, b, t) rescaled to unit magnitude for independent unit a, b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation (Eq. 103): a weighted (1 - t), b weighted t, the whole at unit magnitude."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    C = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    w_a = C / math.sqrt(n_a) * (1 - t)
    w_b = C / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


# Magnitude-preserving Fourier features of a scalar per sample (Eq. 75): (N,) -> (N, C), sqrt(2) cos(2 pi (f x + p))
# with random frequencies f and phases p, drawn once and stored as persistent buffers.
class MPFourier(torch.nn.Module):
    def __init__(
        self,
        num_channels,  # Output width C.
        bandwidth=1,  # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))  # (N, C)
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


# Magnitude-preserving convolution (kernel [kh, kw]) or fully connected layer (kernel []) (Eq. 47) with forced weight
# normalisation (Eq. 66). The stored weight w (out, in, *kernel) is used as normalize(w) * gain / sqrt(fan_in).
class MPConv(torch.nn.Module):
    # Forced weight normalisation inside every training-mode forward, as EDM2 trains. A loop that runs several
    # forwards before one backward (DMD2's fake-score step) turns it off and calls `normalize_weight_` after each
    # optimizer step instead: the same stored weights at every forward, without in-place writes autograd refuses.
    force_normalization = True

    def __init__(
        self,
        in_channels,  # Input channels (fan-in per kernel tap).
        out_channels,  # Output channels.
        kernel,  # [] for a fully connected layer, [kh, kw] for a convolution (odd sizes, 'same' padding).
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training and self.force_normalization:
            # Forced weight normalisation: the stored weight itself becomes unit-magnitude per output channel, so
            # gradient steps cannot grow it. A float32 weight is `w` itself, so w is then normalised twice below,
            # exactly as in EDM2's training.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))  # magnitude-preserving scaling by 1 / sqrt(fan_in)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

    def normalize_weight_(self):
        """Forced weight normalisation outside a forward: the stored weight := normalize(weight), in place."""
        with torch.no_grad():
            self.weight.copy_(normalize(self.weight.to(torch.float32)))
