"""The generator of DMD and DMD2: G(z, c) = D_G(sigma_G * z; sigma_G, c) in one step (sigma_G = 80, EDM's sigma_max),
or in N steps over a fixed list of noise levels sigma_0 > sigma_1 > ... (DMD2's multi-step generator, for EDM
networks a list of sigmas such as 80, 1.5):

    x_0 = sigma_0 z,    x0_k = D_G(x_k; sigma_k, c),    x_{k+1} = x0_k + sigma_{k+1} eps_k  (fresh eps_k ~ N(0, I)),

and the sample is the last x0. Training uses DMD2's backward simulation: G's input at level k is made by the current
G itself, without gradients, from pure noise through levels 0..k-1, so G trains on the inputs it meets at sampling.
"""

import math
from typing import Callable, Optional, Sequence

import torch

SIGMA_G = 80.0
MAX_LEVELS = 16  # a generator of more levels than this is not a few-step generator; a longer list is refused
# The highest noise level accepted from anywhere. EDM-family networks are trained up to sigma 80 (EDM, EDM2), 100 (VE)
# or ~152 (VP); EDMPrecond declares no upper bound of its own, and at 1e308 the input sigma z overflows float32.
MAX_SIGMA = 1e4

# The files `train` writes and `DMDGenerator` reads: inference snapshots and full training states (torch.save dicts).
SNAPSHOT_FORMAT = "dmd-snapshot"
STATE_FORMAT = "dmd-training-state"
FORMAT_VERSION = 2  # 2: training states record the global batch and the teacher and pair fingerprints


class SigmaError(ValueError):
    """A list of generator noise levels that cannot be sampled; the message names where the list came from."""


def check_sigmas(sigmas, where, net=None):
    """Return `sigmas` as a list of floats if it is a usable generator noise list, else raise SigmaError naming `where`.

    Usable: 1 to MAX_LEVELS real numbers (not bools or strings), finite, positive, strictly decreasing, and, where the
    network `net` declares a range (EDM's sigma_min / sigma_max), inside it. Every list that enters the package (the
    flags, snapshots, training states, DMDGenerator) goes through here, so a NaN, inf or 1e308 level never reaches a
    network as a black image or an hours-long loop.
    """
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence):
        raise SigmaError(f"{where}: the noise levels are a {type(sigmas).__name__}, not a list of numbers")
    if not 1 <= len(sigmas) <= MAX_LEVELS:
        raise SigmaError(f"{where}: {len(sigmas)} noise levels; a generator has 1 to {MAX_LEVELS}")
    values = []
    for s in sigmas:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or isinstance(s, complex):
            raise SigmaError(f"{where}: the noise level {str(s)[:40]!r} is not a number")
        values.append(float(s))
    shown = ", ".join(f"{s:g}" for s in values)
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise SigmaError(f"{where}: noise levels must be finite and positive, not [{shown}]")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise SigmaError(f"{where}: noise levels must be strictly decreasing, e.g. 80,1.5, not [{shown}]")
    if values[0] > MAX_SIGMA:
        raise SigmaError(
            f"{where}: noise level {values[0]:g} is above {MAX_SIGMA:g}, far beyond any EDM-family network"
        )
    lo, hi = float(getattr(net, "sigma_min", 0) or 0), float(getattr(net, "sigma_max", math.inf))
    if not all(lo <= s <= hi for s in values):
        raise SigmaError(f"{where}: noise levels [{shown}] leave the network's range [{lo:g}, {hi:g}]")
    return values


def denoise_at(net, x, sigma, class_labels=None):
    """D(x; sigma, c) with one noise level for the whole batch x (N, C, H, W)."""
    return net(x, torch.full((x.shape[0],), float(sigma), device=x.device), class_labels)


def one_step(
    net: Callable[..., torch.Tensor],
    z: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    sigma: float = SIGMA_G,
) -> torch.Tensor:
    """Map unscaled noise z ~ N(0, I) of shape (N, C, H, W) to images with one denoiser call at `sigma`."""
    return denoise_at(net, z * sigma, sigma, class_labels)


def simulate_input(
    net: Callable[..., torch.Tensor],
    z: torch.Tensor,
    class_labels: Optional[torch.Tensor],
    sigmas: Sequence[float],
    k: int,
    noise: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Return G's input at level k, made by backward simulation without gradients.

    sigma_0 z is run through levels 0..k-1 by `net`, re-noised with noise(level) ~ N(0, I) shaped like z after each
    level. At k = 0 it is sigma_0 z, the one-step input.
    """
    x = z * sigmas[0]
    with torch.no_grad():
        for level in range(k):
            x = denoise_at(net, x, sigmas[level], class_labels) + sigmas[level + 1] * noise(level)
    return x


def sample(
    net: Callable[..., torch.Tensor],
    z: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    sigmas: Sequence[float] = (SIGMA_G,),
    noise: Optional[Callable[[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Return the N-step generator's images from unscaled noise z (N, C, H, W), one denoiser call per sigma.

    noise(level) gives the fresh N(0, I) noise after each level but the last (None: torch.randn_like). One sigma is
    `one_step`.
    """
    noise = noise if noise is not None else (lambda level: torch.randn_like(z))
    last = len(sigmas) - 1
    return denoise_at(net, simulate_input(net, z, class_labels, sigmas, last, noise), sigmas[last], class_labels)
