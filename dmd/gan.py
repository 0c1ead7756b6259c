"""DMD2's GAN (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): a
discriminator head on the fake score's bottleneck, trained on real images against the generator's.

The discriminator f(x) = head(mu_fake.bottleneck(x + sigma eps, sigma, c)) sees every image, real or generated,
noised "diffusion-GAN" style at a sigma of the DM loss's Karras grid, index uniform in [0, max_index). Its losses are
the non-saturating ones: softplus(f(fake)) + softplus(-f(real)) trains head + mu_fake in the fake-score step (images
detached), softplus(-f(G(z))) trains G in the generator step (mu_fake and head frozen). Each loss returns per-sample
values (N,); the loop reduces, weights (DMD2: 1e-2 and 3e-3), clips and steps, with the head's parameters in mu_fake's
optimizer. NVIDIA FastGen's measured runs read the frozen teacher's bottleneck instead (--gan-features teacher): the
features are then computed without gradient in the discriminator step, so only the head trains there.
"""

import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from dmd.losses import KarrasGrid


def _num_groups(channels, max_groups=32, min_channels_per_group=4):
    """Groups of the head's GroupNorm: 32 where the width allows (DMD2's), else fewer, each of >= 4 channels as in
    EDM's GroupNorm, and always a divisor of the channels. (At 1 x 1, a group of one channel would normalise to 0.)"""
    limit = max(1, min(max_groups, channels // min_channels_per_group))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


# DMD2's classifier head on a (N, C, R, R) bottleneck, C kept throughout. At R = 8 (CIFAR-10 DDPM++, ImageNet-64 ADM):
# conv 4x4 / 2 (8 -> 4), GroupNorm, SiLU, conv 4x4 / 4 (4 -> 1), GroupNorm, SiLU, conv 1x1 -> one logit. Larger R
# gets one more 4x4 / 2 conv per halving down to 4; smaller R replaces the 4x4 / 4 conv by an R x R / R one.
class DiscriminatorHead(torch.nn.Module):
    """DMD2's discriminator head: one logit per image from the fake score's bottleneck features (N, C, R, R).

    `DiscriminatorHead(channels, resolution)` stacks convs (each with GroupNorm and SiLU) that keep the C channels
    down to 1 x 1, then a 1 x 1 conv to one logit; values below 1 raise ValueError. `for_network(mu_fake)` sizes it
    from an EDM preconditioner's U-Net without a forward pass. Called on features h (N, C, R, R), it returns logits
    (N,), computed in float32.
    """

    def __init__(
        self,
        channels: int,  # Bottleneck width C (256 for CIFAR-10 DDPM++, 768 for ImageNet-64 ADM).
        resolution: int,  # Bottleneck resolution R (8 for both).
    ) -> None:
        if channels < 1 or resolution < 1:
            raise ValueError(f"DiscriminatorHead needs channels and resolution >= 1, got {channels} and {resolution}")
        super().__init__()
        self.channels = channels
        self.resolution = resolution
        layers = []
        r = resolution
        while r > 4:
            layers += self._stage(torch.nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1))
            r = (r - 2) // 2 + 1
        layers += self._stage(torch.nn.Conv2d(channels, channels, kernel_size=r, stride=r))  # r x r -> 1 x 1
        layers.append(torch.nn.Conv2d(channels, 1, kernel_size=1))
        self.layers = torch.nn.Sequential(*layers)

    @classmethod
    def for_network(cls, net: torch.nn.Module) -> "DiscriminatorHead":
        """The head for a preconditioned EDM or EDM2 network's bottleneck, sized from its architecture (no forward
        pass): the input of its first decoder block, e.g. 256 x 8 x 8 (CIFAR-10 DDPM++), 768 x 8 x 8 (EDM2-S img64)."""
        channels, resolution, _ = net.bottleneck_shape()
        return cls(channels, resolution)

    def _stage(self, conv):
        return [conv, torch.nn.GroupNorm(_num_groups(self.channels), self.channels), torch.nn.SiLU()]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Bottleneck features (N, C, R, R) -> logits (N,)."""
        return self.layers(h.to(torch.float32)).flatten()


def discriminator_loss(logits_fake, logits_real):
    """softplus(f(fake)) + softplus(-f(real)) per sample (N,), for logits of N fake and N real images."""
    if logits_fake.shape != logits_real.shape:
        raise ValueError(f"fake logits {tuple(logits_fake.shape)} and real logits {tuple(logits_real.shape)} differ")
    return F.softplus(logits_fake) + F.softplus(-logits_real)


def generator_gan_loss(logits_fake):
    """softplus(-f(fake)) per sample (N,): the non-saturating generator loss."""
    return F.softplus(-logits_fake)


@contextlib.contextmanager
def frozen(*modules):
    """Switch off requires_grad of every parameter of `modules` inside the block, then restore each flag.

    Autograd decides at forward time which tensors need a gradient, so an output computed inside the block passes
    gradients on to its inputs but never into these parameters, even when backward runs after the block.
    """
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _cat_labels(c_fake, c_real):
    """One-hot labels of the fake and the real batch stacked (2N, label_dim), or None for an unconditional pair."""
    if (c_fake is None) != (c_real is None):
        raise ValueError("give class labels for both the generated and the real images, or for neither")
    return None if c_fake is None else torch.cat([c_fake, c_real.to(c_fake.dtype)])


# The two GAN losses of DMD2 on one discriminator: `discriminator` for the fake-score step, `generator` for G's step.
class GANLoss:
    """DMD2's two non-saturating GAN losses on one diffusion-GAN discriminator f(x) = head(features.bottleneck(x_t)).

    `GANLoss(features, head, grid, max_index=1000, train_features=True)`: `features` is mu_fake (DMD2), whose encoder
    the discriminator step trains too, or the frozen teacher (FastGen; train_features False: its features are
    computed without gradient there). Every image, real or generated, is noised to x_t at a grid level with index
    uniform in [0, max_index); a max_index outside [1, T] raises ValueError. `discriminator(x_fake, c_fake, x_real,
    c_real)` returns softplus(f(fake)) + softplus(-f(real)) per pair (N,), for the fake-score step: both batches are
    detached, so only the head (and a trained feature network) gets gradients. `generator(x_fake, c_fake)` returns
    softplus(-f(G(z))) (N,) for G's step, with the features and the head frozen; given `features` and `sigma` (the
    bottleneck of the DM loss's noised samples, FastGen's choice) the head reads them instead. Each returns a dict
    of logging tensors too. Labels are one-hot (N, label_dim) or None; a torch.Generator (`generator=`) and `rows`,
    `n` (see `noised`) control the draws.
    """

    def __init__(
        self,
        features: torch.nn.Module,  # Preconditioner, not DDP-wrapped: .bottleneck(x, sigma, c) -> features.
        head: DiscriminatorHead,  # DiscriminatorHead of the features' bottleneck width and resolution.
        grid: KarrasGrid,  # KarrasGrid of the DM loss; the diffusion-GAN sigmas are its levels.
        max_index: int = 1000,  # Sigma indices are drawn uniformly from [0, max_index) (DMD2: 1000, the whole grid).
        train_features: bool = True,  # The discriminator step trains the feature network (DMD2's mu_fake) too.
    ) -> None:
        if not 1 <= max_index <= grid.T:
            raise ValueError(
                f"diffusion-GAN max_index must be in [1, {grid.T}] for a {grid.T}-level grid, got {max_index}"
            )
        self.features = features
        self.head = head
        self.grid = grid
        self.max_index = int(max_index)
        self.train_features = train_features

    def noised(
        self,
        x: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        rows: Optional[slice] = None,
        n: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x + sigma eps at grid sigmas: (x_t (N, C, H, W), sigma (N,)). With `rows` and `n`, x holds rows `rows` of
        a global batch of n images, and the draws are made for all n and sliced, so every process (and one process
        with the whole batch) draws the same noise for the same image."""
        rows, n = (slice(0, x.shape[0]), x.shape[0]) if rows is None else (rows, n)
        t = self.grid.sample_index(n, 0.0, self.max_index / self.grid.T, device=x.device, generator=generator)
        eps = torch.randn((n, *x.shape[1:]), device=x.device, dtype=x.dtype, generator=generator)
        sigma = self.grid.sigma(t)[rows]  # (N,)
        return x + sigma.reshape(-1, 1, 1, 1).to(x.dtype) * eps[rows], sigma

    def logits(
        self,
        x: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        rows: Optional[slice] = None,
        n: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noise images x (N, C, H, W) at grid sigmas and return the discriminator's logits (N,) and the sigmas (N,)."""
        x_t, sigma = self.noised(x, generator, rows, n)
        return self.at(x_t, sigma, class_labels), sigma

    def at(self, x_t: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The discriminator's logits (N,) of images x_t (N, C, H, W) already noised at sigma (N,)."""
        return self.head(self.features.bottleneck(x_t, sigma, class_labels))

    def discriminator(
        self,
        x_fake: torch.Tensor,
        c_fake: Optional[torch.Tensor],
        x_real: torch.Tensor,
        c_real: Optional[torch.Tensor],
        generator: Optional[torch.Generator] = None,
        rows: Optional[slice] = None,
        n: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return the discriminator loss per (fake, real) pair (N,) and logging tensors, for N generated and N real
        images with their one-hot labels (or None). Both batches are detached: gradients reach only the head and, if
        it trains, the feature network.
        `rows`, `n`: the batches are these rows of global batches of n (see `noised`); fake images draw first.
        """
        if x_fake.shape != x_real.shape:
            raise ValueError(f"generated images {tuple(x_fake.shape)} and real images {tuple(x_real.shape)} differ")
        fake_t, sigma_fake = self.noised(x_fake.detach(), generator, rows, n)
        real_t, sigma_real = self.noised(x_real.detach().to(x_fake.dtype), generator, rows, n)
        k = x_fake.shape[0]  # one encoder pass for both batches (2N, C, H, W)
        sigma = torch.cat([sigma_fake, sigma_real])
        with contextlib.nullcontext() if self.train_features else torch.no_grad():
            h = self.features.bottleneck(torch.cat([fake_t, real_t]), sigma, _cat_labels(c_fake, c_real))
        logits = self.head(h)
        aux = dict(logits_fake=logits[:k].detach(), logits_real=logits[k:].detach(), sigma=sigma)
        return discriminator_loss(logits[:k], logits[k:]), aux

    def generator(
        self,
        x_fake: torch.Tensor,
        c_fake: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        rows: Optional[slice] = None,
        n: Optional[int] = None,
        features: Optional[torch.Tensor] = None,
        sigma: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return the generator's GAN loss per sample (N,) and logging tensors. The features and the head are frozen
        while the loss is built, so its backward reaches x_fake (and G) and leaves no gradient in them. With
        `features` (N, C', H', W'), the feature network's bottleneck of x_fake noised at `sigma` (N,) computed with
        x_fake's gradient, the head reads them: no noise is drawn and no encoder runs."""
        with frozen(self.features, self.head):
            if features is None:
                logits, sigma = self.logits(x_fake, c_fake, generator, rows, n)
            else:
                logits = self.head(features)
        return generator_gan_loss(logits), dict(logits_fake=logits.detach(), sigma=sigma)
