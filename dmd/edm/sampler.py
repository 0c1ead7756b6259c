"""EDM's sampler (Karras et al. 2022, Algorithm 2) and its per-seed random generator, reproducing EDM's generate.py
for EDM networks and EDM2's generate_images.py for EDM2 networks, and the guided denoiser of EDM2's sampler
(classifier-free guidance, Ho & Salimans 2022; autoguidance, Karras et al. 2024)."""

import math
import numbers
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

EDM_STEPS = 18  # EDM's default num_steps (35 network calls), deterministic CIFAR-10 / FFHQ sampling
EDM2_STEPS = 32  # EDM2's default num_steps (63 network calls), used for all of its reported FIDs


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
    """Return the sampler's (sigma_min, sigma_max) clamped to the network's range where it declares one (EDM's
    sigma_min / sigma_max; EDM2's networks declare none), as EDM clamps them; ValueError if the schedule cannot run
    (fewer than 2 steps divide by zero in the time steps; sigma_min at or above sigma_max would sample upwards in
    noise)."""
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"--steps must be an integer of at least 2, got {num_steps}")
    if not rho > 0:
        raise ValueError(f"--rho must be positive, got {rho}")
    net_min, net_max = getattr(net, "sigma_min", 0), getattr(net, "sigma_max", math.inf)
    low, high = max(sigma_min, net_min), min(sigma_max, net_max)
    if not 0 < low < high:
        message = f"--sigma-min {sigma_min} must be positive and below --sigma-max {sigma_max}"
        if (low, high) != (sigma_min, sigma_max):
            message += f" within the network's range [{net_min:g}, {net_max:g}] (they give [{low:g}, {high:g}])"
        raise ValueError(message)
    return low, high


def follows_edm(net):
    """Whether `net` has EDM's sampling interface (round_sigma and a sigma range), so that `edm_sampler` reproduces
    EDM's generate.py for it; without one (EDM2's networks) it reproduces EDM2's generate_images.py."""
    return callable(getattr(net, "round_sigma", None))


def check_guide(net, guide):
    """Raise ValueError unless `guide` can guide `net`: the same resolution and channels, and either the same classes
    (autoguidance by a smaller or shorter-trained network) or none (classifier-free guidance, unconditional guide)."""

    def shape(n):
        return f"{n.img_resolution}x{n.img_resolution}x{n.img_channels}"

    if (guide.img_resolution, guide.img_channels) != (net.img_resolution, net.img_channels):
        raise ValueError(
            f"the guiding network works on {shape(guide)} images, the network on {shape(net)}; they must match"
        )
    if guide.label_dim not in (0, net.label_dim):
        if net.label_dim == 0:
            raise ValueError(
                f"the guiding network is conditional ({guide.label_dim} classes) but the network is unconditional; "
                "an unconditional network needs an unconditional guide"
            )
        raise ValueError(
            f"the guiding network has {guide.label_dim} classes, the network {net.label_dim}; a guide must have the "
            "network's classes (autoguidance) or none (classifier-free guidance)"
        )


# A teacher guided by a second network, called as the teacher is: D_w = D_guide + w (D - D_guide), EDM2's
# `gnet(x).lerp(net(x), w)`. w = 1 is the teacher alone, w > 1 pushes away from the guide: classifier-free guidance
# when the guide is the unconditional model, autoguidance when it is a smaller or less trained conditional one.
class GuidedDenoiser(torch.nn.Module):
    """The guided denoiser D_w(x; sigma, c) = D_guide(x; sigma, c) + w (D(x; sigma, c) - D_guide(x; sigma, c)).

    `GuidedDenoiser(net, guide, weight)` checks the pair (`check_guide`) and a finite weight (ValueError), and holds
    both networks as submodules. Called like a network, `(x, sigma, class_labels=None, **kwargs)`, it returns D_w in
    float32; at weight 1 it calls `net` alone and returns its output unchanged. It has the teacher's interface:
    img_resolution, img_channels, label_dim, and sigma_data, sigma_min, sigma_max (the range both networks accept)
    and round_sigma where the teacher has them (EDM's networks do, EDM2's do not).
    """

    def __init__(
        self,
        net: torch.nn.Module,  # The teacher D.
        guide: torch.nn.Module,  # The guiding network D_guide.
        weight: float,  # Guidance weight w (EDM2's `guidance`): 1 = no guidance.
    ) -> None:
        check_guide(net, guide)
        if isinstance(weight, bool) or not (isinstance(weight, numbers.Real) and math.isfinite(weight)):
            raise ValueError(f"--guidance must be a finite number, not {str(weight)[:40]}")
        super().__init__()
        self.net = net
        self.guide = guide
        self.weight = float(weight)
        self.img_resolution = net.img_resolution
        self.img_channels = net.img_channels
        self.label_dim = net.label_dim
        if hasattr(net, "sigma_data"):
            self.sigma_data = net.sigma_data
        if follows_edm(net):  # EDM's interface, so that edm_sampler treats the pair as it treats the teacher
            self.sigma_min = max(net.sigma_min, getattr(guide, "sigma_min", 0))
            self.sigma_max = min(net.sigma_max, getattr(guide, "sigma_max", math.inf))
            self.round_sigma = net.round_sigma

    def forward(self, x, sigma, class_labels=None, **kwargs):
        D_x = self.net(x, sigma, class_labels, **kwargs)
        if self.weight == 1:
            return D_x
        return self.guide(x, sigma, class_labels, **kwargs).lerp(D_x, self.weight)

    def forward_with_bottleneck(self, x, sigma, class_labels=None, **kwargs):
        """Return (D_w(x; sigma), the teacher's bottleneck features) of one teacher pass (the teacher's
        forward_with_bottleneck) and one guide pass: the features in the caller's grad mode, D_w without autograd."""
        D_x, h = self.net.forward_with_bottleneck(x, sigma, class_labels, **kwargs)
        if self.weight != 1:
            with torch.no_grad():
                D_x = self.guide(x, sigma, class_labels, **kwargs).lerp(D_x, self.weight)
        return D_x, h


def default_steps(net):
    """The sampler steps `net`'s authors sample with: EDM's 18 (35 calls), EDM2's 32 (63 calls)."""
    return EDM_STEPS if follows_edm(net) else EDM2_STEPS


def load_guided(net, guide=None, guidance=1.0, *, cache_dir=None, device="cpu"):
    """The teacher of --guide-network / --guidance: `net` itself (no guide), or GuidedDenoiser(net, guiding network,
    guidance) with the network at `guide` (path or URL, loaded safely, frozen, in eval mode); and the guide file's
    sha256 (None without one). ValueError naming the flag if the guide cannot load or cannot guide `net`, or if a
    guidance other than 1 has no guide."""
    from dmd.edm.persistence import NetworkLoadError, load_network, network_fingerprint
    from dmd.utils.download import DownloadError

    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
        raise ValueError(f"--guidance must be a finite number, not {str(guidance)[:40]}")
    if guide is None:
        if guidance != 1:
            raise ValueError(f"--guidance {guidance} needs a guiding network: give --guide-network")
        return net, None
    try:
        guide_net = load_network(guide, cache_dir=cache_dir, device=device)
        sha256 = network_fingerprint(guide, cache_dir=cache_dir)
    except (OSError, NetworkLoadError, DownloadError) as e:
        raise ValueError(f"--guide-network: cannot load a guiding network from {guide} ({e})") from e
    try:
        return GuidedDenoiser(net, guide_net, guidance), sha256
    except ValueError as e:
        raise ValueError(f"--guide-network {guide}: {e}") from e


def edm_sampler(
    net: torch.nn.Module,  # Denoiser D(x; sigma, class_labels): an EDM or EDM2 network, or a GuidedDenoiser.
    latents: torch.Tensor,  # Unit-variance noise, (N, C, H, W).
    class_labels: Optional[torch.Tensor] = None,  # One-hot labels (N, label_dim), or None.
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,  # Churn noise shaped like its input.
    num_steps: Optional[int] = None,  # Time steps N (2N - 1 denoiser calls); None = 18 (EDM) or 32 (EDM2).
    sigma_min: float = 0.002,  # Lowest noise level, raised to net.sigma_min if needed.
    sigma_max: float = 80,  # Highest noise level, lowered to net.sigma_max if needed.
    rho: float = 7,  # Exponent of the time-step spacing.
    S_churn: float = 0,  # Total noise injected over the run (0 = deterministic).
    S_min: float = 0,  # Lowest t_i that gets churn.
    S_max: float = float("inf"),  # Highest t_i that gets churn.
    S_noise: float = 1,  # Scale of the injected noise.
    guide: Optional[torch.nn.Module] = None,  # Guiding network (EDM2's gnet); None = no guidance.
    guidance: float = 1,  # Guidance weight w: every call is D_guide + w (D - D_guide); 1 calls `net` alone.
) -> torch.Tensor:
    """Integrate the probability-flow ODE with Heun steps (plus optional churn) from latents; return the images.

    EDM's Algorithm 2 (Karras et al. 2022): `num_steps` noise levels from sigma_max down to sigma_min, evenly spaced
    in sigma^(1/rho), then 0; an Euler step to each next level with Heun's correction on all but the last
    (2 * num_steps - 1 calls of `net`); S_churn > 0 adds the stochastic churn. With `guide`, every call is the
    `GuidedDenoiser(net, guide, guidance)`. Each network family gets its authors' sampler, seed for seed:

    - EDM's networks (with round_sigma and a sigma range): EDM's generate.py. The range is clamped to the
      network's, the levels snapped by round_sigma, the arithmetic float64, and `randn_like` is called once per
      step even without churn. Default 18 steps (35 calls). Returns (N, C, H, W) float64.
    - EDM2's networks (no sigma range): EDM2's generate_images.py. No clamping or rounding, float32 arithmetic,
      and `randn_like` called only on the steps that churn. Default 32 steps (63 calls), EDM2's choice for all of
      its FIDs. Returns (N, C, H, W) float32.

    So with a `StackedRandomGenerator(...).randn_like` that also drew the latents and labels, every image is the
    sample EDM's or EDM2's own code makes for its seed (on the same device type). The output is not clipped.

    Example:
        net = load_network("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        rnd = StackedRandomGenerator("cpu", seeds=range(8))
        latents = rnd.randn([8, net.img_channels, net.img_resolution, net.img_resolution])
        labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[8])]  # one-hot, drawn as EDM does
        images = edm_sampler(net, latents, labels, randn_like=rnd.randn_like)  # EDM's images of seeds 0-7
    """
    if guide is not None:
        net = GuidedDenoiser(net, guide, guidance)
    elif guidance != 1:
        raise ValueError(f"--guidance {guidance} needs a guiding network")
    if not S_churn >= 0:
        raise ValueError(f"--S-churn must be non-negative, got {S_churn}")
    edm = follows_edm(net)
    num_steps = (EDM_STEPS if edm else EDM2_STEPS) if num_steps is None else num_steps
    sigma_min, sigma_max = check_schedule(net, num_steps, sigma_min, sigma_max, rho)
    dtype = torch.float64 if edm else torch.float32
    round_sigma = net.round_sigma if edm else torch.as_tensor

    # Time steps t_0 > ... > t_{N-1} evenly spaced in sigma^(1/rho), snapped by round_sigma, then t_N = 0.
    i = torch.arange(num_steps, dtype=dtype, device=latents.device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([round_sigma(t), torch.zeros_like(t[:1])])

    x_next = latents.to(dtype) * t[0]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):  # t_cur, t_next: 0-d, in dtype
        x_cur = x_next

        # Churn: raise the noise level to t_hat. EDM calls randn_like even when gamma = 0, EDM2 only when it churns;
        # each is followed, to keep the seed streams as theirs.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur
        if edm or gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(dtype)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's second-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(dtype)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
