"""The generator of dmd.generator: one step, the N-step sampler over a sigma list, and backward simulation."""

import re
from pathlib import Path

import pytest
import torch

from dmd.edm.persistence import load_network
from dmd.edm.sampler import StackedRandomGenerator
from dmd.generate import DMDGenerator
from dmd.generator import SigmaError, check_sigmas, denoise_at, one_step, sample, simulate_input
from dmd.utils.common import one_hot

PKL = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"


def fixture_inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 8, 8, generator=g)
    return z, one_hot(torch.randint(10, (n,), generator=g), 10)


def test_backward_simulation_at_level_zero_is_the_one_step_input():
    net = load_network(PKL)
    z, c = fixture_inputs()
    for sigmas in ((80.0,), (80.0, 1.5), (80.0, 10.0, 2.0, 0.5)):
        x = simulate_input(net, z, c, sigmas, 0, noise=lambda level: 1 / 0)  # level 0 draws no noise
        assert torch.equal(x, z * 80.0)
        with torch.no_grad():
            assert torch.equal(denoise_at(net, x, sigmas[0], c), one_step(net, z, c))


def test_n_step_sampler_equals_the_steps_composed_by_hand():
    net = load_network(PKL)
    z, c = fixture_inputs()
    sigmas = (80.0, 10.0, 2.0, 0.5)
    eps = [torch.randn(z.shape, generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    with torch.no_grad():
        x0 = net(80.0 * z, torch.full((4,), 80.0), c)  # x0 = D(sigma_0 z; sigma_0)
        for k, sigma in enumerate(sigmas[1:]):  # re-noise to the next level with fresh noise, denoise there
            x0 = net(x0 + sigma * eps[k], torch.full((4,), sigma), c)
        out = sample(net, z, c, sigmas, noise=lambda level: eps[level])
        inputs = [simulate_input(net, z, c, sigmas, k, noise=lambda level: eps[level]) for k in range(4)]
    torch.testing.assert_close(out, x0, rtol=0, atol=0)
    # Backward simulation at level k is the sampler's input to its k-th denoiser call.
    with torch.no_grad():
        torch.testing.assert_close(denoise_at(net, inputs[3], 0.5, c), out, rtol=0, atol=0)
        for k in range(3):
            expected = denoise_at(net, inputs[k], sigmas[k], c) + sigmas[k + 1] * eps[k]
            torch.testing.assert_close(inputs[k + 1], expected, rtol=0, atol=0)
    assert not torch.equal(out, one_step(net, z, c))


def test_backward_simulation_keeps_no_graph():
    net = load_network(PKL).requires_grad_(True)
    z, c = fixture_inputs()
    x = simulate_input(net, z, c, (80.0, 1.5), 1, noise=lambda level: torch.zeros_like(z))
    assert not x.requires_grad  # G's training input carries no gradient into the earlier levels


def test_dmd_generator_samples_with_the_snapshots_sigma_list_per_seed(tmp_path):
    from dmd.checkpoint import save_snapshot

    net = load_network(PKL)
    path = tmp_path / "two-step.pt"
    save_snapshot(path, net, generator_sigmas=(80.0, 1.5), step=3, config={})
    generator = DMDGenerator(path, device="cpu")
    assert generator.sigmas == [80.0, 1.5] and generator.sigma_G == 80.0
    seeds = [3, 5, 8]
    images = generator.generate_batch(seeds=seeds, class_ids=[1, 2, 3])
    # By hand: each seed's stream draws the latent, the label (overridden), then the noise between the levels.
    rnd = StackedRandomGenerator("cpu", seeds)
    z = rnd.randn([3, 3, 8, 8])
    rnd.randint(10, size=[3])
    eps = rnd.randn_like(z)
    with torch.no_grad():
        expected = sample(net, z, one_hot(torch.tensor([1, 2, 3]), 10), (80.0, 1.5), noise=lambda level: eps)
    torch.testing.assert_close(images, expected.clamp(-1, 1), rtol=0, atol=0)
    # The same seed gives the same image in another batch; the one-step override gives the one-step images.
    torch.testing.assert_close(generator.generate_batch(seeds=[5], class_ids=2), images[1:2], rtol=0, atol=1e-5)
    one = DMDGenerator(path, device="cpu", sigma_G=80.0).generate_batch(seeds=seeds, class_ids=[1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(one, one_step(net, z, one_hot(torch.tensor([1, 2, 3]), 10)).clamp(-1, 1))


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([float("nan")], "finite and positive"),
        ([float("inf")], "finite and positive"),
        ([1e308], "above 10000"),
        ([80.0, -1.0], "finite and positive"),
        ([1.5, 80.0], "strictly decreasing"),
        ([80.0, 80.0], "strictly decreasing"),
        ([], "0 noise levels"),
        (list(range(100, 0, -1)), "100 noise levels"),
        ("80", "a str, not a list"),
        ([True], "not a number"),
        (["80"], "not a number"),
        ({"a": 1}, "a dict, not a list"),
    ],
)
def test_check_sigmas_refuses_what_cannot_be_sampled(sigmas, message):
    with pytest.raises(SigmaError, match=re.escape(message)) as info:
        check_sigmas(sigmas, "somewhere")
    assert str(info.value).startswith("somewhere: ") and "\n" not in str(info.value)


def test_check_sigmas_keeps_a_network_inside_its_range():
    assert check_sigmas((80, 1.5), "x") == [80.0, 1.5]
    net = load_network(Path(__file__).parent / "fixtures" / "vp_ddpmpp_cond.pkl")  # VP: sigma in [~0.001, ~152]
    assert check_sigmas([80.0], "x", net) == [80.0]
    with pytest.raises(SigmaError, match=r"leave the network's range \[0\.00\d+, 15\d\.\d+\]"):
        check_sigmas([500.0], "x", net)
