from pathlib import Path

import numpy as np
import pytest
import torch

from dmd.edm.persistence import load_network
from dmd.edm.precond import build_network
from dmd.edm.sampler import GuidedDenoiser, StackedRandomGenerator, check_guide, check_schedule, edm_sampler
from dmd.utils.common import one_hot, to_uint8

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["edm_ddpmpp_cond", "vp_ddpmpp_cond"]
EDM2_NAMES = ["edm2_img_cond", "edm2_img_guide", "edm2_latent_cond"]


# Passes calls through to a denoiser and records what the sampler hands it: x and a 0-d sigma in float64 as EDM's
# sampler passes them, float32 as EDM2's does.
class Recording:
    def __init__(self, net, dtype=torch.float64):
        self.net = net
        self.dtype = dtype
        self.sigmas = []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None):
        assert x.dtype == self.dtype and sigma.dtype == self.dtype and sigma.ndim == 0
        self.sigmas.append(sigma.item())
        return self.net(x, sigma, class_labels)


# The exact denoiser of a point mass at mu: D(x; sigma) = mu. The ODE's trajectories are then straight lines to mu.
class PointMass:
    sigma_min, sigma_max = 0.002, 80

    def __init__(self, mu):
        self.mu = mu

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        return self.mu.expand_as(x).to(torch.float32)


# The same without EDM's interface (no sigma range, no round_sigma), as EDM2's networks are.
class PointMass2:
    def __init__(self, mu):
        self.mu = mu

    def __call__(self, x, sigma, class_labels=None):
        return self.mu.expand_as(x).to(torch.float32)


@pytest.fixture(scope="module")
def nets():
    return {name: load_network(FIXTURES / f"{name}.pkl") for name in NAMES}


@pytest.fixture(scope="module")
def edm2_nets():
    return {name: load_network(FIXTURES / "edm2" / f"{name}.pkl") for name in EDM2_NAMES}


def _draw(net, seeds):
    """Latents, class indices and the generator stack, drawn per seed in generate.py's order."""
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_idx = rnd.randint(net.label_dim, size=[len(seeds)])
    return latents, class_idx, rnd


@pytest.mark.parametrize("name", NAMES)
def test_seeded_draws_match_edm(nets, name):
    ref = np.load(FIXTURES / f"{name}.npz")
    latents, class_idx, _ = _draw(nets[name], ref["sampler_seeds"].tolist())
    # Bit-exact where torch's vectorised normal sampler runs (AVX2 and up, as where EDM made the fixture); its scalar
    # fallback (ATEN_CPU_CAPABILITY=default) rounds the Box-Muller transform differently, by up to 9.2e-7 measured.
    # Another seed, stream or draw order would differ by O(1).
    torch.testing.assert_close(latents, torch.from_numpy(ref["sampler_latents"]), rtol=0, atol=2e-6)
    assert torch.equal(class_idx, torch.from_numpy(ref["sampler_class_idx"]).long())
    assert torch.equal(one_hot(class_idx, 10), torch.from_numpy(ref["sampler_labels"]))


def test_stacked_generator_rows_follow_their_seeds():
    full = StackedRandomGenerator("cpu", [0, 1, 2, 3]).randn([4, 5])
    assert torch.equal(StackedRandomGenerator("cpu", [2, 3]).randn([2, 5]), full[2:])
    assert torch.equal(StackedRandomGenerator("cpu", [2**32 + 1]).randn([1, 5]), full[1:2])  # seed % 2**32
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert StackedRandomGenerator("cpu", [0, 1]).randn_like(x).dtype == torch.float64
    with pytest.raises(ValueError, match="3 rows from a generator stack of 2 seeds"):
        StackedRandomGenerator("cpu", [0, 1]).randint(10, size=[3])


@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_edm(nets, name):
    ref = np.load(FIXTURES / f"{name}.npz")
    latents, class_idx, rnd = _draw(nets[name], ref["sampler_seeds"].tolist())
    draws = []

    def randn_like(x):
        draws.append(x.shape)
        return rnd.randn_like(x)

    net = Recording(nets[name])
    num_steps = int(ref["sampler_num_steps"])
    out = edm_sampler(net, latents, one_hot(class_idx, net.label_dim), randn_like=randn_like, num_steps=num_steps)

    assert out.dtype == torch.float64
    assert len(draws) == num_steps  # one noise draw per step although S_churn = 0
    assert len(net.sigmas) == 2 * num_steps - 1 == len(ref["sampler_call_sigmas"])
    np.testing.assert_allclose(net.sigmas, ref["sampler_call_sigmas"], rtol=1e-12, atol=0)
    error = (out - torch.from_numpy(ref["sampler_out"])).abs().max().item()
    assert error <= 1e-4 * np.abs(ref["sampler_out"]).max()
    levels = np.abs(to_uint8(out).astype(int) - ref["sampler_uint8"].astype(int))
    assert levels.max() <= 1


def test_images_do_not_depend_on_batching(nets):
    net = nets["edm_ddpmpp_cond"]
    kwargs = dict(num_steps=4, S_churn=20)  # churn, so the per-step noise reaches the images

    def sample(seeds):
        latents, class_idx, rnd = _draw(net, seeds)
        return edm_sampler(net, latents, one_hot(class_idx, 10), randn_like=rnd.randn_like, **kwargs)

    together = sample([0, 1, 2, 3])
    apart = torch.cat([sample([0, 1]), sample([2, 3])])
    assert (together - apart).abs().max() <= 1e-5 * together.abs().max()  # float32 GEMMs vary with batch size
    latents, class_idx, rnd = _draw(net, [0, 1, 2, 3])
    without_churn = edm_sampler(net, latents, one_hot(class_idx, 10), num_steps=4)
    assert (together - without_churn).abs().max() > 1e-2


@pytest.mark.parametrize("S_churn", [0, 30])
def test_point_mass_is_reached_exactly(S_churn):
    # Euler is exact on straight lines, so the last step (to t_N = 0) lands on mu whatever the noise injected.
    mu = torch.tensor([0.25, -0.5]).reshape(1, 2, 1, 1)
    latents = torch.randn(3, 2, 4, 4)
    out = edm_sampler(PointMass(mu), latents, num_steps=7, S_churn=S_churn)
    assert out.shape == latents.shape and (out - mu.double()).abs().max() <= 1e-12


def test_sigma_range_is_clamped_to_the_network():
    net = PointMass(torch.zeros(1, 1, 1, 1))
    net.sigma_min, net.sigma_max = 0.01, 10.0
    recording = Recording(net)
    edm_sampler(recording, torch.randn(1, 1, 2, 2), num_steps=5, sigma_min=0.002, sigma_max=80)
    assert len(recording.sigmas) == 9
    assert recording.sigmas[0] == pytest.approx(10.0, rel=1e-12)
    assert recording.sigmas[-1] == pytest.approx(0.01, rel=1e-12)
    assert recording.sigmas[1:-1:2] == recording.sigmas[2::2]  # the Heun call at t_{i+1} and the next Euler call


def test_schedules_that_cannot_run_are_refused_and_the_range_is_clamped_as_edm_does():
    """sigma_min at or above sigma_max sampled upwards in noise (make-pairs wrote such pairs), and one step divided
    by zero in the time steps; both are ValueErrors naming the flags. A range inside the net's is kept, one beyond
    it is clamped to it, as EDM clamps."""
    edm, vp = load_network(FIXTURES / "edm_ddpmpp_cond.pkl"), load_network(FIXTURES / "vp_ddpmpp_cond.pkl")
    assert check_schedule(edm, 18, 0.002, 80, 7) == (0.002, 80)
    assert check_schedule(vp, 18, 0.0001, 500, 7) == (vp.sigma_min, vp.sigma_max)
    latents = torch.zeros(1, edm.img_channels, edm.img_resolution, edm.img_resolution)
    cases = [
        (dict(sigma_min=100), r"--sigma-min 100 must be positive and below --sigma-max 80$"),
        (dict(sigma_min=0), r"--sigma-min 0 must be positive"),
        (dict(num_steps=1), r"--steps must be an integer of at least 2, got 1"),
        (dict(rho=0), r"--rho must be positive, got 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            edm_sampler(edm, latents, torch.eye(10)[:1], **kwargs)
    with pytest.raises(ValueError, match=r"within the network's range \[0.00\d+, 152.\d+\] \(they give \[200, 152"):
        check_schedule(vp, 18, 200, 300, 7)


# EDM2's networks and guidance.


def _edm2_sample(net, ref, **kwargs):
    """EDM2's generate_images.py for seeds 0-3 in 8 steps: latents, then labels, drawn per seed."""
    latents, class_idx, rnd = _draw(net, [0, 1, 2, 3])
    torch.testing.assert_close(latents, torch.from_numpy(ref["sampler_latents"]), rtol=0, atol=2e-6)  # as EDM's
    assert torch.equal(class_idx, torch.from_numpy(ref["sampler_class_idx"]))
    return edm_sampler(net, latents, one_hot(class_idx, net.label_dim), randn_like=rnd.randn_like, **kwargs)


@pytest.mark.parametrize("name", EDM2_NAMES)
def test_sampler_matches_edm2(edm2_nets, name):
    ref = np.load(FIXTURES / "edm2" / f"{name}.npz")
    net = Recording(edm2_nets[name], dtype=torch.float32)
    out = _edm2_sample(net, ref, num_steps=8)
    assert out.dtype == torch.float32 and len(net.sigmas) == 15
    assert net.sigmas[0] == pytest.approx(80, rel=1e-6) and net.sigmas[-1] == pytest.approx(0.002, rel=1e-6)
    assert (out - torch.from_numpy(ref["sampler_out"])).abs().max() <= 1e-4 * np.abs(ref["sampler_out"]).max()


def test_guided_sampler_matches_edm2(edm2_nets):
    ref = np.load(FIXTURES / "edm2" / "edm2_img_cond.npz")
    net, guide = edm2_nets["edm2_img_cond"], edm2_nets["edm2_img_guide"]
    out = _edm2_sample(net, ref, num_steps=8, guide=guide, guidance=float(ref["guidance"]))
    assert (out - torch.from_numpy(ref["guided_out"])).abs().max() <= 1e-4 * np.abs(ref["guided_out"]).max()
    unguided = torch.from_numpy(ref["sampler_out"])
    assert (out - unguided).abs().max() > 1e-2 * unguided.abs().max()  # the guide moves the samples


# Counts the calls of a network it passes through.
class Counting(Recording):
    def __init__(self, net):
        super().__init__(net, dtype=None)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma)
        return self.net(x, sigma, class_labels)


def test_guidance_one_is_the_teacher_alone(edm2_nets):
    net, guide = edm2_nets["edm2_img_cond"], Counting(edm2_nets["edm2_img_guide"])
    ref = np.load(FIXTURES / "edm2" / "edm2_img_cond.npz")
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    with torch.no_grad():
        assert torch.equal(GuidedDenoiser(net, guide, 1)(x, sigma, labels), net(x, sigma, labels))
    assert torch.equal(_edm2_sample(net, ref, num_steps=4, guide=guide), _edm2_sample(net, ref, num_steps=4))
    assert guide.sigmas == []


def test_guided_denoiser_is_edm2s_lerp(edm2_nets):
    net, guide = edm2_nets["edm2_img_cond"], edm2_nets["edm2_img_guide"]
    ref = np.load(FIXTURES / "edm2" / "edm2_img_cond.npz")
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    with torch.no_grad():
        D_x, D_guide = net(x, sigma, labels), guide(x, sigma, labels)
        guided = GuidedDenoiser(net, guide, 1.7)
        torch.testing.assert_close(guided(x, sigma, labels), D_guide + 1.7 * (D_x - D_guide))
        assert torch.equal(GuidedDenoiser(net, guide, 0)(x, sigma, labels), D_guide)
    assert (guided.img_resolution, guided.img_channels, guided.label_dim, guided.sigma_data) == (8, 3, 10, 0.5)
    assert not hasattr(guided, "round_sigma") and not hasattr(guided, "sigma_min")  # EDM2's interface, as the net's


def test_guided_one_pass_is_the_guided_output_and_the_teachers_features(edm2_nets):
    net, guide = edm2_nets["edm2_img_cond"], Counting(edm2_nets["edm2_img_guide"])
    ref = np.load(FIXTURES / "edm2" / "edm2_img_cond.npz")
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    guided = GuidedDenoiser(net, guide, 1.7)
    x = x.clone().requires_grad_(True)
    D, h = guided.forward_with_bottleneck(x, sigma, labels)
    with torch.no_grad():
        assert torch.equal(D, guided(x, sigma, labels)) and torch.equal(h, net.bottleneck(x, sigma, labels))
    assert not D.requires_grad and h.requires_grad and len(guide.sigmas) == 2  # the guide ran once in each call
    D, h = GuidedDenoiser(net, guide, 1).forward_with_bottleneck(x, sigma, labels)
    assert len(guide.sigmas) == 2 and torch.equal(D, net(x, sigma, labels).detach())


def test_guided_edm_teacher_keeps_edms_sampler(nets):
    edm, vp = nets["edm_ddpmpp_cond"], nets["vp_ddpmpp_cond"]
    guided = GuidedDenoiser(edm, vp, 2.0)
    assert (guided.sigma_min, guided.sigma_max, guided.round_sigma) == (vp.sigma_min, vp.sigma_max, edm.round_sigma)
    latents, class_idx, _ = _draw(edm, [0, 1])
    plain = edm_sampler(edm, latents, one_hot(class_idx, 10), num_steps=3)
    assert torch.equal(edm_sampler(GuidedDenoiser(edm, vp, 1), latents, one_hot(class_idx, 10), num_steps=3), plain)
    assert plain.dtype == torch.float64


def check_guide_classes(net, label_dim):
    """check_guide(net, a guide shaped like net with `label_dim` classes)."""
    guide = type("Guide", (), dict(img_resolution=net.img_resolution, img_channels=net.img_channels))()
    guide.label_dim = label_dim
    check_guide(net, guide)


def test_guides_that_do_not_fit_are_refused(edm2_nets):
    net, latent = edm2_nets["edm2_img_cond"], edm2_nets["edm2_latent_cond"]
    tiny = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1)
    uncond = build_network("Precond", dict(tiny, label_dim=0, attn_resolutions=[4], channels_per_head=8))
    GuidedDenoiser(net, uncond, 1.5)  # an unconditional guide: classifier-free guidance
    cases = [
        (net, latent, 1.5, r"works on 8x8x4 images, the network on 8x8x3"),
        (uncond, net, 1.5, r"guiding network is conditional \(10 classes\) but the network is unconditional"),
        (net, net, float("nan"), r"--guidance must be a finite number"),
    ]
    for teacher, guide, weight, message in cases:
        with pytest.raises(ValueError, match=message):
            GuidedDenoiser(teacher, guide, weight)
    with pytest.raises(ValueError, match=r"has 1000 classes, the network 10"):
        check_guide_classes(net, 1000)
    with pytest.raises(ValueError, match=r"--guidance 2 needs a guiding network"):
        edm_sampler(net, torch.zeros(1, 3, 8, 8), guidance=2)


@pytest.mark.parametrize("S_churn", [0, 30])
def test_edm2_sampling_conventions(S_churn):
    # A network without EDM's interface gets EDM2's sampler: 32 steps by default, float32, no clamping to a range,
    # and noise drawn only on the steps that churn (EDM draws it on every step).
    mu = torch.tensor([0.25, -0.5]).reshape(1, 2, 1, 1)
    net, draws = Recording(PointMass2(mu), dtype=torch.float32), []

    def randn_like(x):
        draws.append(x.dtype)
        return torch.randn_like(x)

    out = edm_sampler(net, torch.randn(3, 2, 4, 4), randn_like=randn_like, S_churn=S_churn, S_min=0.05, S_max=50)
    assert out.dtype == torch.float32 and len(net.sigmas) == 63 and net.sigmas[0] == pytest.approx(80, rel=1e-6)
    churned = sum(0.05 <= t <= 50 for t in net.sigmas[1::2])  # the Heun calls sit at t_1 ... t_31; t_0 = 80 > 50
    assert draws == [torch.float32] * (churned if S_churn else 0)
    assert (out - mu).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="--S-churn must be non-negative"):
        edm_sampler(net, torch.randn(1, 2, 4, 4), S_churn=-1)
