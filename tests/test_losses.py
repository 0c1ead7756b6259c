"""Tests of dmd.losses: the Karras grid, the distribution-matching gradient, the fake-score and regression losses,
and the analytic teacher check (DMD on a Gaussian mixture whose exact denoiser is known in closed form)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmd.losses import (
    DistributionMatchingLoss,
    FakeScoreLoss,
    KarrasGrid,
    MSERegressionLoss,
    RegressionLoss,
    distribution_matching_grad,
)

# ----------------------------------------------------------------------------------------------------------------------
# Karras grid.


def test_karras_grid_endpoints_monotonic_and_formula():
    grid = KarrasGrid()
    s = grid.sigmas
    assert s.shape == (1000,) and s.dtype == torch.float32
    assert s[0].item() == pytest.approx(0.002, rel=1e-6)
    assert s[-1].item() == pytest.approx(80.0, rel=1e-6)
    assert bool((s[1:] > s[:-1]).all())
    for i in (1, 500, 998):
        ref = (0.002 ** (1 / 7) + i / 999 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
        assert s[i].item() == pytest.approx(ref, rel=1e-6)


def test_karras_grid_index_range_and_rounding():
    grid = KarrasGrid()
    t = grid.sample_index(200_000, 0.02, 0.98)
    assert t.dtype == torch.int64
    assert t.min().item() == 20 and t.max().item() == 979
    assert KarrasGrid(T=100).index_range(0.29, 1.0) == (29, 100)  # 0.29 * 100 is 28.999999999999996 in floats.
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        grid.sample_index(4, 0.5, 0.5)
    with pytest.raises(ValueError, match="holds no integer"):
        KarrasGrid(T=10).sample_index(4, 0.01, 0.05)


def test_karras_grid_seeded_draws_repeat():
    grid = KarrasGrid()
    a = grid.sample_index(16, generator=torch.Generator().manual_seed(3))
    b = grid.sample_index(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(grid.sigma(a), grid.sigmas[a])


# ----------------------------------------------------------------------------------------------------------------------
# Distribution-matching gradient and loss.


def test_distribution_matching_grad_matches_hand_computation():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])  # (2, 1, 2, 2)
    p_real = torch.tensor([[[[0.0, -0.5], [0.5, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    p_fake = torch.tensor([[[[0.5, 0.5], [-0.5, 1.0]]], [[[0.2, 0.7], [0.2, -0.3]]]])
    grad = distribution_matching_grad(x, p_real, p_fake)
    # Sample 0: w = (1 + 0.5 + 0 + 1) / 4 = 0.625.
    ref0 = torch.tensor([[[0.5, 1.0], [-1.0, 0.0]]]) / 0.625
    torch.testing.assert_close(grad[0], ref0)
    # Sample 1: x == p_real, so w = 0; 0/0 -> 0 and +-0.5/0 -> +-float32 max, all finite.
    assert bool(torch.isfinite(grad).all())
    big = torch.finfo(torch.float32).max
    torch.testing.assert_close(grad[1], torch.tensor([[[0.0, big], [0.0, -big]]]))


class _Affine(nn.Module):
    """A stand-in denoiser D(x; sigma) = a x + b / (1 + sigma) that records whether autograd was on."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = b
        self.grad_enabled = []

    def forward(self, x, sigma, class_labels=None):
        self.grad_enabled.append(torch.is_grad_enabled())
        shift = self.b / (1 + sigma.reshape(-1, 1, 1, 1))
        if class_labels is not None:
            shift = shift + class_labels.sum(dim=1).reshape(-1, 1, 1, 1)
        return self.a * x + shift


def test_distribution_matching_loss_gradient_is_grad_over_numel():
    grid = KarrasGrid()
    mu_real, mu_fake = _Affine(0.5, 0.3), _Affine(0.9, -0.2)
    loss_fn = DistributionMatchingLoss(mu_real, mu_fake, grid)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    labels = torch.eye(5)[:, :2]
    loss, aux = loss_fn(x, labels)
    assert loss.shape == (5,)
    assert mu_real.grad_enabled == [False] and mu_fake.grad_enabled == [False]
    # aux holds what the loss used: the noised x at grid sigmas inside [0.02 T, 0.98 T) and both predictions.
    assert bool(torch.isin(aux["sigma"], grid.sigmas[20:980]).all())
    eps = (aux["x_t"] - x.detach()) / aux["sigma"].reshape(-1, 1, 1, 1)
    assert abs(eps.std().item() - 1) < 0.25
    shift = 0.3 / (1 + aux["sigma"]) + labels.sum(dim=1)
    torch.testing.assert_close(aux["p_real"], 0.5 * aux["x_t"] + shift.reshape(-1, 1, 1, 1))
    grad = distribution_matching_grad(x.detach(), aux["p_real"], aux["p_fake"])
    torch.testing.assert_close(aux["grad_norm"], grad.flatten(1).norm(dim=1))
    # The loop's loss.mean() is the paper's 0.5 * mse over all elements, and its gradient is grad / numel.
    torch.testing.assert_close(loss.mean(), 0.5 * (grad**2).mean())
    loss.mean().backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_distribution_matching_loss_repeats_with_seed_and_generator():
    loss_fn = DistributionMatchingLoss(_Affine(0.5, 0.3), _Affine(0.9, -0.2), KarrasGrid())
    x = torch.randn(4, 2, 3, 3)
    torch.manual_seed(7)
    a, _ = loss_fn(x)
    torch.manual_seed(7)
    b, _ = loss_fn(x)
    c, _ = loss_fn(x, generator=torch.Generator().manual_seed(7))
    d, _ = loss_fn(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, loss_fn(x)[0])


def test_distribution_matching_loss_validates_range():
    with pytest.raises(ValueError, match="lo=0.9, hi=0.1"):
        DistributionMatchingLoss(_Affine(1, 0), _Affine(1, 0), KarrasGrid(), t_min=0.9, t_max=0.1)


# ----------------------------------------------------------------------------------------------------------------------
# Fake-score loss.


@pytest.mark.parametrize("sigma_sampling", ["karras", "lognormal"])
def test_fake_score_loss_matches_direct_computation(sigma_sampling):
    grid = KarrasGrid()
    loss_fn = FakeScoreLoss(grid, sigma_sampling=sigma_sampling)
    mu_fake = _Affine(0.7, 0.4)
    x0 = torch.randn(6, 3, 4, 4, requires_grad=True)
    torch.manual_seed(11)
    loss = loss_fn(mu_fake, x0)
    torch.manual_seed(11)
    if sigma_sampling == "karras":
        sigma = grid.sigmas[torch.randint(0, 1000, (6,))]
    else:
        sigma = (-1.2 + 1.2 * torch.randn(6)).exp()
    eps = torch.randn(6, 3, 4, 4)
    s = sigma.reshape(-1, 1, 1, 1)
    D_x = 0.7 * (x0.detach() + s * eps) + 0.4 / (1 + s)
    ref = ((1 / s**2 + 1 / 0.5**2) * (D_x - x0.detach()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, ref)
    loss.mean().backward()
    assert x0.grad is None and mu_fake.a.grad is not None  # x0 is a stop-gradient target; only mu_fake learns.


class _PointMassDenoiser(nn.Module):
    """Exact denoiser of the point mass at c: E[x0 | x_t] = c for every x_t and sigma."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, sigma, class_labels=None):
        return self.c.expand_as(x)


@pytest.mark.parametrize("sigma_sampling", ["karras", "lognormal"])
def test_fake_score_loss_vanishes_for_exact_denoiser(sigma_sampling):
    loss_fn = FakeScoreLoss(KarrasGrid(), sigma_sampling=sigma_sampling)
    c = torch.randn(1, 3, 4, 4)
    x0 = c.expand(8, -1, -1, -1)
    assert torch.equal(loss_fn(_PointMassDenoiser(c), x0), torch.zeros(8))
    # The identity is a wrong denoiser: its error is sigma * eps, so each sample's loss is positive.
    assert bool((loss_fn(_Affine(1.0, 0.0), x0) > 0).all())


def test_fake_score_loss_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="'karras' or 'lognormal'"):
        FakeScoreLoss(KarrasGrid(), sigma_sampling="uniform")


# ----------------------------------------------------------------------------------------------------------------------
# Regression loss.


def test_regression_loss_upsamples_both_images_to_224():
    seen = []

    def lpips(a, b):
        seen.append((a.shape, b.shape))
        return ((a - b) ** 2).mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)  # LPIPS-like (N, 1, 1, 1) output

    x, y = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    d = RegressionLoss(lpips)(x, y)
    assert seen == [((3, 3, 224, 224), (3, 3, 224, 224))]
    up = [F.interpolate(v, size=(224, 224), mode="bilinear", align_corners=False) for v in (x, y)]
    torch.testing.assert_close(d, ((up[0] - up[1]) ** 2).mean(dim=(1, 2, 3)))
    assert d.shape == (3,)


def test_mse_regression_loss_is_the_per_sample_mean_square():
    x, y = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0], x[1] = 4.0, 0.5  # sample 0: one pixel off by 4; sample 1: every pixel off by 0.5
    torch.testing.assert_close(MSERegressionLoss()(x, y), torch.tensor([1.0, 0.25]))


# ----------------------------------------------------------------------------------------------------------------------
# Analytic teacher check: the data are a 2-D mixture of three Gaussians, stored as (N, 2, 1, 1) images, so the teacher
# is the exact EDM denoiser D(x; sigma) = E[x0 | x0 + sigma * eps = x]. For component k with mean m_k, variance s^2
# and weight pi_k: responsibility r_k(x) ~ pi_k N(x; m_k, (s^2 + sigma^2) I), E[x0 | x, k] = m_k + s^2 (x - m_k) /
# (s^2 + sigma^2), and D is the responsibility-weighted sum of the E[x0 | x, k].

MODE_MEANS = torch.tensor([[0.8, 0.0], [-0.4, 0.69], [-0.4, -0.69]])  # (K, 2) on a circle of radius 0.8.
MODE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MODE_STD = 0.15


class MixtureDenoiser(nn.Module):
    """The exact denoiser of the Gaussian mixture, with EDM's call signature."""

    def forward(self, x, sigma, class_labels=None):
        x2 = x.flatten(1)  # (N, 2)
        var = MODE_STD**2 + sigma.reshape(-1, 1) ** 2  # (N, 1) variance of each noised component
        d2 = ((x2[:, None, :] - MODE_MEANS[None]) ** 2).sum(dim=-1)  # (N, K)
        r = (MODE_WEIGHTS.log() - 0.5 * d2 / var - var.log()).softmax(dim=1)  # (N, K); log N in 2-D has -log var
        post = MODE_MEANS + (MODE_STD**2 / var)[..., None] * (x2[:, None, :] - MODE_MEANS)  # (N, K, 2)
        return (r[..., None] * post).sum(dim=1).reshape(x.shape)


def _mlp(n_in, n_out, width=64):
    layers = [nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class MLPDenoiser(nn.Module):
    """Fake score: an MLP F with EDM's preconditioning, D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.F = _mlp(3, 2)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1)
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        x2 = x.flatten(1)
        F_x = self.F(torch.cat([c_in * x2, c_noise], dim=1))
        return (c_skip * x2 + c_out * F_x).reshape(x.shape)


class MLPGenerator(nn.Module):
    """One-step generator G(z): 2-D noise (N, 2) -> 2-D samples as (N, 2, 1, 1) images."""

    def __init__(self):
        super().__init__()
        self.net = _mlp(2, 2)

    def forward(self, z):
        return self.net(z).reshape(-1, 2, 1, 1)


def _sample_mixture(n, generator):
    k = torch.multinomial(MODE_WEIGHTS, n, replacement=True, generator=generator)
    return (MODE_MEANS[k] + MODE_STD * torch.randn(n, 2, generator=generator)).reshape(n, 2, 1, 1)


def _sliced_wasserstein(a, b, directions):
    """Sliced 2-Wasserstein distance of equal-size samples (N, 2, 1, 1) along fixed unit directions (2, P)."""
    pa = (a.flatten(1) @ directions).sort(dim=0).values
    pb = (b.flatten(1) @ directions).sort(dim=0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def _mode_fractions(x):
    """Fraction of samples (N, 2, 1, 1) whose nearest mixture mean is each mode; (K,)."""
    nearest = torch.cdist(x.flatten(1), MODE_MEANS).argmin(dim=1)
    return torch.bincount(nearest, minlength=len(MODE_MEANS)).float() / len(x)


@pytest.fixture
def mixture_eval():
    """Fixed evaluation noise, reference samples of the mixture and projection directions."""
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(2000, 2, generator=g)
    ref = _sample_mixture(2000, g)
    angle = torch.rand(64, generator=g) * math.pi
    return z, ref, torch.stack([angle.cos(), angle.sin()])


def _train_dmd_on_mixture(seed, z_eval, steps=2000, batch=512, lr=2e-3):
    """Distil the exact mixture teacher into an MLP generator with DMD; return its samples of z_eval (N, 2, 1, 1)."""
    torch.manual_seed(seed)
    G, mu_fake, grid = MLPGenerator(), MLPDenoiser(), KarrasGrid()
    dm_loss = DistributionMatchingLoss(MixtureDenoiser(), mu_fake, grid)
    fake_loss = FakeScoreLoss(grid, sigma_sampling="lognormal")
    opt_G = torch.optim.AdamW(G.parameters(), lr=lr, weight_decay=0.01)
    opt_fake = torch.optim.AdamW(mu_fake.parameters(), lr=2 * lr, weight_decay=0.01)
    decay = [torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.05, 1 - i / steps)) for opt in (opt_G, opt_fake)]
    with torch.no_grad():
        x_start = G(z_eval)

    # mu_fake starts as a denoiser of G's initial samples, as the paper's copy of the teacher starts near them.
    for _ in range(200):
        opt_fake.zero_grad()
        fake_loss(mu_fake, G(torch.randn(batch, 2))).mean().backward()
        opt_fake.step()
    for _ in range(steps):
        loss, _ = dm_loss(G(torch.randn(batch, 2)))
        opt_G.zero_grad()
        loss.mean().backward()
        opt_G.step()
        opt_fake.zero_grad()
        fake_loss(mu_fake, G(torch.randn(batch, 2))).mean().backward()
        opt_fake.step()
        for scheduler in decay:
            scheduler.step()
    with torch.no_grad():
        return x_start, G(z_eval)


def test_analytic_teacher_dmd_covers_all_modes(mixture_eval):
    # The GAN-like game is chaotic: one run's end point moves with the CPU's instruction set (float sums are ordered
    # differently), between sliced W2 0.055 and 0.14 over 6 seeds x 3 capability levels. So the claim is checked on
    # three seeds, by statistics with margins set by what the claim means, not by one run's number: a generator that
    # matches the mixture is far closer to it than at the start (the median of three has 0.12 at worst against
    # start / 3 = 0.19) and than one collapsed onto a single mode (about 0.7); every run covers every mode
    # (smallest weight 0.2; a dropped mode gets < 0.02); the mean mode weights over the runs are within 0.1 of the
    # truth (worst single run seen: 0.076 off).
    z_eval, ref, directions = mixture_eval
    g = torch.Generator().manual_seed(99)
    collapsed = (MODE_MEANS[1] + MODE_STD * torch.randn(len(ref), 2, generator=g)).reshape(ref.shape)
    w2_collapsed = _sliced_wasserstein(collapsed, ref, directions)
    starts, ends, fractions = [], [], []
    for seed in range(3):
        x_start, x = _train_dmd_on_mixture(seed, z_eval)
        starts.append(_sliced_wasserstein(x_start, ref, directions))
        ends.append(_sliced_wasserstein(x, ref, directions))
        fractions.append(_mode_fractions(x))
        print(f"DMD seed {seed}: sliced W2 {starts[-1]:.4f} -> {ends[-1]:.4f}, mode fractions {fractions[-1].tolist()}")
    median_start, median_end = sorted(starts)[1], sorted(ends)[1]
    assert median_end < median_start / 3 and median_end < w2_collapsed / 3
    assert all(bool((f > 0.1).all()) for f in fractions)
    torch.testing.assert_close(torch.stack(fractions).mean(dim=0), MODE_WEIGHTS, atol=0.1, rtol=0)


def test_analytic_teacher_regression_only_misses_modes(mixture_eval):
    z_eval, ref, directions = mixture_eval
    torch.manual_seed(0)
    G = MLPGenerator()
    # Sixteen pairs whose teacher outputs all lie in mode 1: regression can only reproduce what the pairs show.
    g = torch.Generator().manual_seed(5)
    z_ref = torch.randn(16, 2, generator=g)
    y_ref = (MODE_MEANS[1] + MODE_STD * torch.randn(16, 2, generator=g)).reshape(16, 2, 1, 1)
    opt = torch.optim.AdamW(G.parameters(), lr=2e-3, weight_decay=0.01)
    with torch.no_grad():
        start = _sliced_wasserstein(G(z_eval), ref, directions)
    for _ in range(500):
        opt.zero_grad()
        F.mse_loss(G(z_ref), y_ref).backward()
        opt.step()
    with torch.no_grad():
        x = G(z_eval)
    end = _sliced_wasserstein(x, ref, directions)
    fractions = _mode_fractions(x)
    print(f"regression only: sliced W2 {start:.4f} -> {end:.4f}, mode fractions {fractions.tolist()}")
    assert fractions[0] < 0.1 and fractions[2] < 0.1
    assert end > start / 2
