"""EDM's sampler (Karras et al. 2022, Algorithm 2) and its per-seed random generator, reproducing generate.py."""

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch


# One torch.Generator per image, so an image's noise depends only on its seed, not on the batch it was drawn in.
class StackedRandomGenerator:
    """Draw a batch of random tensors whose row i comes from its own torch.Generator, seeded with seeds[i].

    `StackedRandomGenerator(device, seeds)` makes one generator per seed on `device`; `randn`, `randn_like` and
    `randint` then take the shape of the whole batch, (len(seeds), ...), and refuse (ValueError) any other number of
    rows. Drawn in EDM's order (latent, label, then `edm_sampler`'s noise via `randn_like`), an image is the sample
    EDM's generate.py makes for its seed on the same device type, whatever batch it is in.
    """

    def __init__(
        self,
        device: Union[str, torch.device],  # Device of the generators; CUDA generators give other numbers than CPU ones.
        seeds: Iterable[int],  # One seed per image; each generator is seeded with seed % 2**32.
    ) -> None:
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Draw standard normals of shape `size` = (N, ...), row i from generator i."""
        return torch.stack([torch.randn(self._row(size), generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Draw standard normals shaped, typed and placed like x."""
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args: int, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Draw integers as torch.randint(*args) does, shape `size` = (N, ...), row i from generator i."""
        return torch.stack([torch.randint(*args, size=self._row(size), generator=g, **kwargs) for g in self.generators])

    def _row(self, size):
        if size[0] != len(self.generators):
            raise ValueError(f"asked for {size[0]} rows from a generator stack of {len(self.generators)} seeds")
        return size[1:]


def check_schedule(net, num_steps, sigma_min, sigma_max, rho):
    """Return the sampler's (sigma_min, sigma_max) clamped to the network's range, as EDM clamps them; ValueError
    if the schedule cannot run (fewer than 2 steps divide by zero in the time steps; sigma_min at or above sigma_max
    would sample upwards in noise)."""
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"--steps must be an integer of at least 2, got {num_steps}")
    if not rho > 0:
        raise ValueError(f"--rho must be positive, got {rho}")
    low, high = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    if not 0 < low < high:
        message = f"--sigma-min {sigma_min} must be positive and below --sigma-max {sigma_max}"
        if (low, high) != (sigma_min, sigma_max):
            message += (
                f" within the network's range [{net.sigma_min:g}, {net.sigma_max:g}] (they give [{low:g}, {high:g}])"
            )
        raise ValueError(message)
    return low, high


def edm_sampler(
    net: torch.nn.Module,  # Denoiser D(x; sigma, class_labels) with sigma_min, sigma_max and round_sigma.
    latents: torch.Tensor,  # Unit-variance noise, (N, C, H, W).
    class_labels: Optional[torch.Tensor] = None,  # One-hot labels (N, label_dim), or None.
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,  # Churn noise shaped like its input.
    num_steps: int = 18,  # Time steps N; the sampler makes 2N - 1 denoiser calls.
    sigma_min: float = 0.002,  # Lowest noise level, raised to net.sigma_min if needed.
    sigma_max: float = 80,  # Highest noise level, lowered to net.sigma_max if needed.
    rho: float = 7,  # Exponent of the time-step spacing.
    S_churn: float = 0,  # Total noise injected over the run (0 = deterministic).
    S_min: float = 0,  # Lowest t_i that gets churn.
    S_max: float = float("inf"),  # Highest t_i that gets churn.
    S_noise: float = 1,  # Scale of the injected noise.
) -> torch.Tensor:
    """Integrate the probability-flow ODE with Heun steps (plus optional churn) from latents; return float64 images.

    EDM's Algorithm 2 (Karras et al. 2022), as EDM's generate.py runs it: `num_steps` noise levels from sigma_max down
    to sigma_min, evenly spaced in sigma^(1/rho), then 0; an Euler step to each next level with Heun's correction on
    all but the last (2 * num_steps - 1 calls of `net`); S_churn > 0 adds the stochastic churn. The defaults are EDM's
    deterministic sampler (18 steps, 35 calls). `randn_like` is called once per step even without churn, so with a
    `StackedRandomGenerator(...).randn_like` that also drew the latents and labels, every image is EDM's sample for
    its seed (on the same device type). Returns (N, C, H, W) float64, not clipped.

    Example:
        net = load_network("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        rnd = StackedRandomGenerator("cpu", seeds=range(8))
        latents = rnd.randn([8, net.img_channels, net.img_resolution, net.img_resolution])
        labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[8])]  # one-hot, drawn as EDM does
        images = edm_sampler(net, latents, labels, randn_like=rnd.randn_like)  # EDM's images of seeds 0-7
    """
    sigma_min, sigma_max = check_schedule(net, num_steps, sigma_min, sigma_max, rho)

    # Time steps t_0 > ... > t_{N-1} evenly spaced in sigma^(1/rho), snapped by round_sigma, then t_N = 0.
    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros_like(t[:1])])

    x_next = latents.to(torch.float64) * t[0]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):  # t_cur, t_next: 0-d float64
        x_cur = x_next

        # Churn: raise the noise level to t_hat. randn_like runs even when gamma = 0, keeping the seed stream as EDM's.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's second-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
