"""The losses of DMD (Yin et al., CVPR 2024): distribution matching, LPIPS regression and fake-score denoising.

Each loss is a small callable that returns per-sample values of shape (N,); the training loop reduces them with
`.mean()`, scales, clips and steps. All randomness comes from torch's global RNG of the tensors' device, or from an
optional `generator`, so a run that restores the RNG state reproduces its draws exactly.
"""

import math

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
    def __init__(
        self,
        T=1000,  # Number of noise levels.
        sigma_min=0.002,  # Smallest noise level, at index 0.
        sigma_max=80.0,  # Largest noise level, at index T - 1.
        rho=7.0,  # Karras schedule exponent.
    ):
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

    def to(self, device):
        """Move the sigma table to `device`; returns self."""
        self.sigmas = self.sigmas.to(device)
        return self

    def index_range(self, lo=0.0, hi=1.0):
        """Integer index bounds [floor(lo * T), floor(hi * T)) of the fractions lo < hi in [0, 1]."""
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"index fractions must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        # Round to 6 decimals before the floor so that e.g. 0.29 * 100 = 28.999999999999996 gives 29, not 28.
        return math.floor(round(lo * self.T, 6)), math.floor(round(hi * self.T, 6))

    def sample_index(self, n, lo=0.0, hi=1.0, device=None, generator=None):
        """Draw n indices uniformly from [floor(lo * T), floor(hi * T)); (n,) int64 on `device`."""
        first, stop = self.index_range(lo, hi)
        if stop <= first:
            raise ValueError(f"index range [{lo}, {hi}) of a {self.T}-level grid holds no integer")
        return torch.randint(first, stop, (n,), device=device, generator=generator)

    def sigma(self, index):
        """Look up the noise levels of integer indices; float32 on the indices' device."""
        return self.sigmas.to(index.device)[index]


# ----------------------------------------------------------------------------------------------------------------------
# Distribution matching (paper Eqs. 7-8): the generator moves along the difference of the fake and real scores.


def distribution_matching_grad(x, p_real, p_fake):
    """Paper Eq. 8 on (N, C, H, W) tensors: (p_fake - p_real) / mean_{C,H,W}|x - p_real|, NaN/inf mapped to finite."""
    # w (N, 1, 1, 1) normalises the step per sample; where w == 0 the 0/0 entries become 0 and the x/0 entries become
    # +-float max (torch.nan_to_num's defaults, as in DMD2), so the loss is then inf and the loop skips the step.
    w = (x - p_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_fake - p_real) / w)


class DistributionMatchingLoss:
    def __init__(
        self,
        mu_real,  # Frozen teacher denoiser, net(x, sigma, class_labels) -> D(x; sigma).
        mu_fake,  # Fake-score denoiser of the generator's distribution, same interface.
        grid,  # KarrasGrid the noise level is drawn from.
        t_min=0.02,  # Lower bound of the index as a fraction of T (DreamFusion-style range).
        t_max=0.98,  # Upper bound (exclusive) of the index as a fraction of T.
    ):
        grid.index_range(t_min, t_max)  # Validates the fractions now rather than at the first step.
        self.mu_real = mu_real
        self.mu_fake = mu_fake
        self.grid = grid
        self.t_min = t_min
        self.t_max = t_max

    def __call__(self, x, class_labels=None, generator=None):
        """Return loss_dm per sample (N,) for generated images x (N, C, H, W) and a dict of logging tensors."""
        t = self.grid.sample_index(x.shape[0], self.t_min, self.t_max, device=x.device, generator=generator)
        sigma = self.grid.sigma(t)  # (N,)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t = x.detach() + _broadcast(sigma, x) * eps
        with torch.no_grad():
            p_real = self.mu_real(x_t, sigma, class_labels).to(x.dtype)
            p_fake = self.mu_fake(x_t, sigma, class_labels).to(x.dtype)
            grad = distribution_matching_grad(x.detach(), p_real, p_fake)
            target = x.detach() - grad
        # 0.5 * ||x - sg(x - grad)||^2 averaged over C, H, W: the loop's loss.mean() is the mean over all elements,
        # so d loss.mean() / dx = grad / x.numel().
        loss = 0.5 * _per_sample_mean((x - target) ** 2)
        aux = dict(
            x_t=x_t,  # (N, C, H, W) noised generator samples.
            sigma=sigma,  # (N,) their noise levels.
            p_real=p_real,  # (N, C, H, W) mu_real(x_t).
            p_fake=p_fake,  # (N, C, H, W) mu_fake(x_t).
            grad_norm=grad.flatten(1).norm(dim=1),  # (N,) L2 norm of each sample's distribution-matching gradient.
        )
        return loss, aux


# ----------------------------------------------------------------------------------------------------------------------
# Regression onto teacher ODE pairs with LPIPS (paper Eq. 9), both images at 224 x 224.


class RegressionLoss:
    def __init__(
        self,
        lpips,  # Callable (x0, x1) -> (N,) perceptual distance of [-1, 1] images, e.g. dmd.lpips.LPIPS.
    ):
        self.lpips = lpips

    def __call__(self, x_ref, y_ref):
        """Return LPIPS(G(z_ref), y_ref) per sample (N,) after bilinear upsampling of both to 224 x 224."""
        size = (LPIPS_RESOLUTION, LPIPS_RESOLUTION)
        x_ref = F.interpolate(x_ref, size=size, mode="bilinear", align_corners=False)
        y_ref = F.interpolate(y_ref.to(x_ref.dtype), size=size, mode="bilinear", align_corners=False)
        return self.lpips(x_ref, y_ref).reshape(-1)


class MSERegressionLoss:
    """Mean squared error of G(z_ref) to y_ref at native resolution: the demo's CPU stand-in for LPIPS."""

    def __call__(self, x_ref, y_ref):
        """Return mean over C, H, W of (x_ref - y_ref)^2 per sample (N,)."""
        return _per_sample_mean((x_ref - y_ref.to(x_ref.dtype)) ** 2)


# ----------------------------------------------------------------------------------------------------------------------
# Fake-score denoising: mu_fake learns the score of the generator's current distribution with EDM's weighted loss.


class FakeScoreLoss:
    def __init__(
        self,
        grid,  # KarrasGrid for sigma_sampling='karras'.
        sigma_sampling="karras",  # 'karras': index uniform over the whole grid (DMD2); 'lognormal': EDM's (SiD).
        P_mean=-1.2,  # Mean of ln(sigma) for 'lognormal'.
        P_std=1.2,  # Standard deviation of ln(sigma) for 'lognormal'.
        sigma_data=0.5,  # Data standard deviation in EDM's weight lambda(sigma).
    ):
        if sigma_sampling not in ("karras", "lognormal"):
            raise ValueError(f"sigma_sampling must be 'karras' or 'lognormal', got {sigma_sampling!r}")
        self.grid = grid
        self.sigma_sampling = sigma_sampling
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n, device=None, generator=None):
        """Draw n training noise levels (n,) float32."""
        if self.sigma_sampling == "karras":
            return self.grid.sigma(self.grid.sample_index(n, device=device, generator=generator))
        rnd_normal = torch.randn(n, device=device, generator=generator)
        return (self.P_mean + self.P_std * rnd_normal).exp()

    def __call__(self, mu_fake, x0, class_labels=None, generator=None):
        """Return EDM's weighted denoising loss of mu_fake on generated images x0 (N, C, H, W), per sample (N,)."""
        x0 = x0.detach()
        sigma = self.sample_sigma(x0.shape[0], device=x0.device, generator=generator)  # (N,)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        D_x = mu_fake(x0 + _broadcast(sigma, x0) * eps, sigma, class_labels)
        weight = (
            1 / sigma**2 + 1 / self.sigma_data**2
        )  # lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
        return weight * _per_sample_mean((D_x - x0) ** 2)
