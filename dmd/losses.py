"""The losses of DMD (Yin et al., CVPR 2024): distribution matching, LPIPS regression and fake-score denoising.

Each loss is a small callable that returns per-sample values of shape (N,); the training loop reduces them with
`.mean()`, scales, clips and steps. All randomness comes from torch's global RNG of the tensors' device, or from an
optional `generator`, so a run that restores the RNG state reproduces its draws exactly.
"""

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

LPIPS_RESOLUTION = 224  # Both regression images are upsampled to this size, as the port, CM and CTM do.


def _per_sample_mean(x):
    """Mean over every axis but the first: (N, ...) -> (N,)."""
    return x.flatten(1).mean(dim=1)


def _broadcast(v, x):
    """Reshape per-sample values (N,) to (N, 1, 1, ...) so they broadcast against x (N, C, H, W)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------------
# The discretised noise levels of DMD: a Karras et al. (2022) grid of T sigmas, ascending with the index.


class KarrasGrid:
    """The T noise levels DMD draws from, a Karras et al. (2022) grid ascending from sigma_min to sigma_max.

    sigmas[i] = (a + i / (T - 1) (b - a))^rho with a = sigma_min^(1/rho), b = sigma_max^(1/rho), so index 0 is
    sigma_min and index T - 1 is sigma_max (EDM's sampler walks the same kind of grid downwards).
    `KarrasGrid(T=1000, sigma_min=0.002, sigma_max=80, rho=7)` holds the table `sigmas` (T,) float32, on the CPU
    until `to(device)`; T < 2 or not 0 < sigma_min < sigma_max raises ValueError. `sample_index(n, lo, hi)` draws
    indices uniformly from [floor(lo T), floor(hi T)), and `sigma(index)` looks their levels up.
    """

    def __init__(
        self,
        T: int = 1000,  # Number of noise levels.
        sigma_min: float = 0.002,  # Smallest noise level, at index 0.
        sigma_max: float = 80.0,  # Largest noise level, at index T - 1.
        rho: float = 7.0,  # Karras schedule exponent.
    ) -> None:
        if T < 2:
            raise ValueError(f"KarrasGrid needs T >= 2 noise levels, got {T}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"KarrasGrid needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.T = int(T)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)
        # Evaluate in float64 so the endpoints are exact after the cast to float32.
        i = torch.arange(self.T, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        self.sigmas = ((lo + i / (self.T - 1) * (hi - lo)) ** self.rho).to(torch.float32)  # (T,)

    def to(self, device: Union[str, torch.device]) -> "KarrasGrid":
        """Move the sigma table to `device`; returns self."""
        self.sigmas = self.sigmas.to(device)
        return self

    def index_range(self, lo: float = 0.0, hi: float = 1.0) -> Tuple[int, int]:
        """Integer index bounds [floor(lo * T), floor(hi * T)) of the fractions lo < hi in [0, 1]."""
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"index fractions must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        # Round to 6 decimals before the floor so that e.g. 0.29 * 100 = 28.999999999999996 gives 29, not 28.
        return math.floor(round(lo * self.T, 6)), math.floor(round(hi * self.T, 6))

    def sample_index(
        self,
        n: int,
        lo: float = 0.0,
        hi: float = 1.0,
        device: Union[str, torch.device, None] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Draw n indices uniformly from [floor(lo * T), floor(hi * T)); (n,) int64 on `device`."""
        first, stop = self.index_range(lo, hi)
        if stop <= first:
            raise ValueError(f"index range [{lo}, {hi}) of a {self.T}-level grid holds no integer")
        return torch.randint(first, stop, (n,), device=device, generator=generator)

    def sigma(self, index: torch.Tensor) -> torch.Tensor:
        """Look up the noise levels of integer indices; float32 on the indices' device."""
        return self.sigmas.to(index.device)[index]


# ----------------------------------------------------------------------------------------------------------------------
# Distribution matching (paper Eqs. 7-8): the generator moves along the difference of the fake and real scores.


def distribution_matching_grad(x: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 8 on (N, C, H, W) tensors: (p_fake - p_real) / mean_{C,H,W}|x - p_real|, NaN/inf mapped to finite."""
    # w (N, 1, 1, 1) normalises the step per sample; where w == 0 the 0/0 entries become 0 and the x/0 entries become
    # +-float max (torch.nan_to_num's defaults, as in DMD2), so the loss is then inf and the loop skips the step.
    w = (x - p_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_fake - p_real) / w)


class DistributionMatchingLoss:
    """DMD's distribution-matching loss of generated images, per sample (paper Eqs. 7-8).

    `DistributionMatchingLoss(mu_real, mu_fake, grid, t_min=0.02, t_max=0.98)`; t_min and t_max outside
    0 <= t_min < t_max <= 1 raise ValueError. Called on generated images x (N, C, H, W) (with one-hot class labels or
    None, and an optional torch.Generator for the draws), it noises them at grid levels with index uniform in
    [t_min T, t_max T), runs both denoisers without gradients, and returns (loss (N,), aux). The loss is
    0.5 ||x - sg(x - grad)||^2 averaged over C, H, W, with grad = `distribution_matching_grad(x, p_real, p_fake)`,
    so its gradient reaches x only and equals grad / (C H W). aux holds x_t, sigma and its grid index t, p_real,
    p_fake and the per-sample grad_norm, for logging and f-distill's weights (dmd/fdistill.py). With bottleneck=True,
    mu_real's pass also returns its bottleneck features at x_t with the gradient of x_t to x (mu_real's
    forward_with_bottleneck), aux["h_real"] (N, C', H', W'): DMD2's GAN on the teacher's features reads them there,
    as FastGen shares one teacher forward between the DM target and the GAN, instead of a second encoder pass.
    """

    def __init__(
        self,
        mu_real: Callable[..., torch.Tensor],  # Frozen teacher denoiser, net(x, sigma, class_labels) -> D(x; sigma).
        mu_fake: Callable[..., torch.Tensor],  # Fake-score denoiser of the generator's distribution, same interface.
        grid: KarrasGrid,  # KarrasGrid the noise level is drawn from.
        t_min: float = 0.02,  # Lower bound of the index as a fraction of T (DreamFusion-style range).
        t_max: float = 0.98,  # Upper bound (exclusive) of the index as a fraction of T.
        bottleneck: bool = False,  # Also return mu_real's bottleneck features at x_t, with x's gradient.
    ) -> None:
        grid.index_range(t_min, t_max)  # Validates the fractions now rather than at the first step.
        self.mu_real = mu_real
        self.mu_fake = mu_fake
        self.grid = grid
        self.t_min = t_min
        self.t_max = t_max
        self.bottleneck = bottleneck

    def __call__(
        self,
        x: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return loss_dm per sample (N,) for generated images x (N, C, H, W) and a dict of logging tensors."""
        t = self.grid.sample_index(x.shape[0], self.t_min, self.t_max, device=x.device, generator=generator)
        sigma = self.grid.sigma(t)  # (N,)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t = x.detach() + _broadcast(sigma, x) * eps
        features = {}
        if self.bottleneck:  # x_t's values to the bit, with x's gradient; mu_real's output comes without autograd
            p_real, features["h_real"] = self.mu_real.forward_with_bottleneck(x - x.detach() + x_t, sigma, class_labels)
        with torch.no_grad():
            if not self.bottleneck:
                p_real = self.mu_real(x_t, sigma, class_labels)
            p_real = p_real.to(x.dtype)
            p_fake = self.mu_fake(x_t, sigma, class_labels).to(x.dtype)
            grad = distribution_matching_grad(x.detach(), p_real, p_fake)
            target = x.detach() - grad
        # 0.5 * ||x - sg(x - grad)||^2 averaged over C, H, W: the loop's loss.mean() is the mean over all elements,
        # so d loss.mean() / dx = grad / x.numel().
        loss = 0.5 * _per_sample_mean((x - target) ** 2)
        aux = dict(
            x_t=x_t,  # (N, C, H, W) noised generator samples.
            sigma=sigma,  # (N,) their noise levels.
            t=t,  # (N,) the levels' grid indices.
            p_real=p_real,  # (N, C, H, W) mu_real(x_t).
            p_fake=p_fake,  # (N, C, H, W) mu_fake(x_t).
            grad_norm=grad.flatten(1).norm(dim=1),  # (N,) L2 norm of each sample's distribution-matching gradient.
            **features,  # h_real (N, C', H', W'): mu_real's bottleneck features at x_t, with bottleneck=True.
        )
        return loss, aux


# ----------------------------------------------------------------------------------------------------------------------
# Regression onto teacher ODE pairs with LPIPS (paper Eq. 9), both images at 224 x 224.


class RegressionLoss:
    """DMD's regression loss (paper Eq. 9): the LPIPS distance of G(z_ref) to the teacher's output y_ref, per sample.

    `RegressionLoss(lpips)` takes the distance, e.g. `dmd.lpips.LPIPS`, a callable of two image batches on EDM's
    [-1, 1] scale. Called on x_ref = G(z_ref) and y_ref (N, C, H, W), it upsamples both bilinearly to 224 x 224 (y_ref
    in x_ref's dtype) and returns lpips(x_ref, y_ref) as (N,).
    """

    def __init__(
        self,
        lpips: Callable[..., torch.Tensor],  # (x0, x1) -> (N,) perceptual distance, e.g. dmd.lpips.LPIPS.
    ) -> None:
        self.lpips = lpips

    def __call__(self, x_ref: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
        """Return LPIPS(G(z_ref), y_ref) per sample (N,) after bilinear upsampling of both to 224 x 224."""
        size = (LPIPS_RESOLUTION, LPIPS_RESOLUTION)
        x_ref = F.interpolate(x_ref, size=size, mode="bilinear", align_corners=False)
        y_ref = F.interpolate(y_ref.to(x_ref.dtype), size=size, mode="bilinear", align_corners=False)
        return self.lpips(x_ref, y_ref).reshape(-1)


class MSERegressionLoss:
    """Mean squared error of G(z_ref) to y_ref at native resolution: the demo's CPU stand-in for LPIPS.

    `MSERegressionLoss()` takes no arguments; called like `RegressionLoss` on (N, C, H, W) images, it returns (N,).
    """

    def __call__(self, x_ref: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
        """Return mean over C, H, W of (x_ref - y_ref)^2 per sample (N,)."""
        return _per_sample_mean((x_ref - y_ref.to(x_ref.dtype)) ** 2)


# ----------------------------------------------------------------------------------------------------------------------
# Fake-score denoising: mu_fake learns the score of the generator's current distribution with EDM's weighted loss.


class FakeScoreLoss:
    """EDM's weighted denoising loss of the fake score mu_fake on generated images, per sample.

    `FakeScoreLoss(grid, sigma_sampling="karras")` draws sigma from the whole grid (index uniform, as DMD2), or with
    "lognormal" ln(sigma) ~ N(P_mean, P_std^2) as EDM trains (SiD's choice); another value raises ValueError. Called
    as `loss(mu_fake, x0, class_labels=None, generator=None)` on generated images x0 (N, C, H, W), it returns
    lambda(sigma) ||mu_fake(x0 + sigma eps; sigma) - x0||^2 averaged over C, H, W, as (N,), with EDM's weight
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. x0 is detached: only mu_fake gets gradients.
    """

    def __init__(
        self,
        grid: KarrasGrid,  # KarrasGrid for sigma_sampling='karras'.
        sigma_sampling: str = "karras",  # 'karras': index uniform over the whole grid (DMD2); 'lognormal': EDM's (SiD).
        P_mean: float = -1.2,  # Mean of ln(sigma) for 'lognormal'.
        P_std: float = 1.2,  # Standard deviation of ln(sigma) for 'lognormal'.
        sigma_data: float = 0.5,  # Data standard deviation in EDM's weight lambda(sigma).
    ) -> None:
        if sigma_sampling not in ("karras", "lognormal"):
            raise ValueError(f"sigma_sampling must be 'karras' or 'lognormal', got {sigma_sampling!r}")
        self.grid = grid
        self.sigma_sampling = sigma_sampling
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(
        self, n: int, device: Union[str, torch.device, None] = None, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Draw n training noise levels (n,) float32."""
        if self.sigma_sampling == "karras":
            return self.grid.sigma(self.grid.sample_index(n, device=device, generator=generator))
        rnd_normal = torch.randn(n, device=device, generator=generator)
        return (self.P_mean + self.P_std * rnd_normal).exp()

    def __call__(
        self,
        mu_fake: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Return EDM's weighted denoising loss of mu_fake on generated images x0 (N, C, H, W), per sample (N,)."""
        x0 = x0.detach()
        sigma = self.sample_sigma(x0.shape[0], device=x0.device, generator=generator)  # (N,)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        D_x = mu_fake(x0 + _broadcast(sigma, x0) * eps, sigma, class_labels)
        weight = (
            1 / sigma**2 + 1 / self.sigma_data**2
        )  # lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
        return weight * _per_sample_mean((D_x - x0) ** 2)
