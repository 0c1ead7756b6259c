"""LPIPS (Zhang et al., CVPR 2018): the VGG-16 perceptual distance with the v0.1 learned linear heads.

Written without torchvision. The VGG-16 `features` stack keeps torchvision's module indices, so the state dict of
torchvision's ImageNet `vgg16` loads into it directly, and the heads read the LPIPS repository's `weights/v0.1/vgg.pth`.
"""

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_VGG_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"

# VGG-16 (configuration "D") up to relu5_3: output channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS's input scaling of [-1, 1] images: (x - shift) / scale per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # Added to the channel norm in the unit normalisation of features.


class LPIPSWeightsError(ValueError):
    """A weight file lacks the expected keys or holds tensors of the wrong shape."""


def _vgg16_features():
    """Build VGG-16's convolutional stack through relu5_3, indexed as torchvision's `vgg16().features`."""
    layers, in_channels = [], 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            # In place: a conv's backward needs its input, not its output, so the ReLU may overwrite it (one
            # activation-sized tensor less per layer; benchmarks/lpips_step.py).
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def _resolve(source, default_url, cache_dir):
    """Return a local path for a weight file given as a path, a URL, or None (the public default URL)."""
    source = default_url if source is None else source
    if "://" in str(source):
        from dmd.utils.download import open_url

        return open_url(str(source), cache_dir=cache_dir)
    return Path(source)


def _load_checked(path, expected):
    """Load a state dict with weights_only=True and return {key: tensor} for `expected` {key: shape}, or raise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"LPIPS weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LPIPSWeightsError(f"{path}: cannot read as a torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise LPIPSWeightsError(f"{path}: missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in expected.items() if state[k].shape != shape]
    if wrong:
        raise LPIPSWeightsError(f"{path}: wrong shapes: {'; '.join(wrong[:4])}")
    return {k: state[k] for k in expected}


class _UnitNormalize(torch.autograd.Function):
    """phi = f / (||f||_C + eps) for features f (N, C, H, W), the `lpips` package's formula, with its backward written
    out: g / (||f|| + eps) - phi <g, phi>_C / ||f||. Why by hand (benchmarks/lpips_step.py): the norm as
    sqrt(sum f^2) over C runs 4-7x faster on the CPU than vector_norm's reduction over dim 1, whose gradient
    autograd would otherwise need (sqrt's is inf at a zero vector); and the backward makes three feature-sized passes
    where autograd's chain through the norm and the quotient made eight. Where a feature vector is 0 (after a ReLU
    it can be) <g, phi>_C / ||f|| is 0/0 and taken as 0, the limit vector_norm's gradient also takes.
    """

    @staticmethod
    def forward(ctx, f):
        norm = f.square().sum(dim=1, keepdim=True).sqrt()  # (N, 1, H, W)
        denom = norm + NORM_EPS
        phi = f / denom
        ctx.save_for_backward(phi, norm, denom)
        return phi

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        phi, norm, denom = ctx.saved_tensors
        along = (g * phi).sum(dim=1, keepdim=True).div_(norm).nan_to_num_(0.0)  # (N, 1, H, W)
        return torch.addcmul(g / denom, phi, along, value=-1)


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS distance d(x0, x1) = sum_l mean_{h,w} w_l . (phi_l(x0) - phi_l(x1))^2 of unit-normalised VGG features phi_l.


class LPIPS(nn.Module):
    def __init__(
        self,
        vgg_weights=None,  # torchvision vgg16 state dict: path or URL; None = torchvision's ImageNet weights.
        lin_weights=None,  # LPIPS v0.1 linear heads: path or URL; None = the LPIPS repository's vgg.pth.
        cache_dir=None,  # Download cache for URLs (dmd.utils.download.open_url).
        pretrained=True,  # False: random weights (tests), no files read.
    ):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))
        self.features = _vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        if pretrained:
            self.load_vgg(_resolve(vgg_weights, VGG16_URL, cache_dir))
            self.load_heads(_resolve(lin_weights, LPIPS_VGG_URL, cache_dir))
        else:
            self._init_random()
        self.compute_dtype = torch.float32  # torch.bfloat16 runs the VGG stack in bf16 (dmd train --precision bf16)
        self.requires_grad_(False)
        self.eval()

    def _init_random(self, seed=0):
        """Random weights whose activations keep their scale through the stack; non-negative heads as in LPIPS.

        Drawn from their own seeded generator, so every process (DDP ranks, runs to compare) gets the same metric.
        """
        g = torch.Generator().manual_seed(seed)
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=g)
                nn.init.zeros_(layer.bias)
        for head in self.heads:
            nn.init.uniform_(head.weight, 0.0, 2.0 / head.in_channels, generator=g)

    def load_vgg(self, path):
        """Load the `features.*` tensors of a torchvision vgg16 state dict file (other keys are ignored)."""
        own = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        state = _load_checked(path, {k: v.shape for k, v in own.items()})
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})

    def load_heads(self, path):
        """Load the five 1x1 heads from a file in the LPIPS repository's layout (`lin{k}.model.1.weight`)."""
        keys = [f"lin{k}.model.1.weight" for k in range(len(TAP_CHANNELS))]
        state = _load_checked(path, {key: head.weight.shape for key, head in zip(keys, self.heads)})
        self.heads.load_state_dict({f"{i}.weight": state[key] for i, key in enumerate(keys)})

    def tap_features(self, x):
        """Unit-normalised VGG features (N, C_l, H_l, W_l) at the five taps of images x (N, 3, H, W) in [-1, 1].

        The VGG stack runs in `compute_dtype` (bf16 under autocast if set), the normalisation in float32.
        """
        h = (x - self.shift) / self.scale
        phi = []
        bf16 = self.compute_dtype == torch.bfloat16
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            for i, layer in enumerate(self.features):
                h = layer(h)
                if i in TAPS:
                    phi.append(_UnitNormalize.apply(h.float()))
        return phi

    def forward(self, x0, x1):
        """Return the LPIPS distance (N,) between images x0 and x1 (N, 3, H, W) in [-1, 1].

        Where x1 needs no gradient (the regression target y_ref), its features are computed without autograd, so
        only x0's pass keeps activations and gets a backward.
        """
        phi0 = self.tap_features(x0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x1.requires_grad):
            phi1 = self.tap_features(x1)
        # Sum the squared differences over space first (N, C_l), then weigh the channels by the head's w_l / (H_l W_l):
        # the same sum in another order, where a head applied at every pixel costs a 1x1 convolution forward and
        # backward over the features. mse_loss squares the difference in one pass, and its backward in one.
        return sum(
            F.mse_loss(f0, f1, reduction="none").sum(dim=(2, 3)) @ (head.weight.flatten() / (f0.shape[2] * f0.shape[3]))
            for f0, f1, head in zip(phi0, phi1, self.heads)
        )
