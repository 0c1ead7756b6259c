"""EDM2's network: EDM2's reference outputs (fixtures pickled and computed by EDM2 itself), the training-mode forward
with forced weight normalisation, the bottleneck DMD2's GAN head reads, compute dtypes, and the interface it shares
with EDM's networks."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd.edm import load_network
from dmd.edm.persistence import read_network_pickle, stub_state_dict
from dmd.edm.precond import build_network, check_init_kwargs, copy_network, set_compute_dtype
from dmd.edm2 import Precond
from dmd.edm2.layers import mp_silu, mp_sum

FIXTURES = Path(__file__).parent / "fixtures"
EDM2 = FIXTURES / "edm2"
NAMES = ["edm2_img_cond", "edm2_img_guide", "edm2_latent_cond"]
MANIFEST = json.loads((EDM2 / "manifest.json").read_text())
TINY = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def inputs(ref):
    return tuple(torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))


def relative_error(out, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return np.abs(np.asarray(out.detach(), dtype=np.float64) - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module", params=NAMES)
def reference(request):
    """An EDM2 fixture network loaded through dmd's safe loader, with EDM2's reference numbers for it."""
    return request.param, load_network(EDM2 / f"{request.param}.pkl"), dict(np.load(EDM2 / f"{request.param}.npz"))


def float32_copy(net):
    """A float32 copy of a loaded network, built the way students are (dmd.build.student_copy)."""
    student = build_network(type(net).__name__, net.init_kwargs)
    student.load_state_dict(net.state_dict())
    return student


# EDM2's own numbers.


def test_fixture_loads_as_pickled(reference):
    name, net, _ = reference
    kwargs = dict(MANIFEST["networks"][name]["network_kwargs"])
    del kwargs["class_name"]
    assert type(net) is Precond and net.init_kwargs.items() >= kwargs.items()
    state_dict = stub_state_dict(read_network_pickle(EDM2 / f"{name}.pkl")["ema"])
    assert list(net.state_dict()) == list(state_dict)  # EDM2's keys, in EDM2's order
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state_dict.items())
    assert {t.dtype for t in net.state_dict().values()} == {torch.float16}  # as stored, as EDM2 samples them
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_fixture_outputs(reference):
    _, net, ref = reference
    with torch.no_grad():
        D_x, logvar = net(*inputs(ref), return_logvar=True)
        assert torch.equal(net(*inputs(ref)), D_x)
    assert D_x.dtype == logvar.dtype == torch.float32 and logvar.shape == (4, 1, 1, 1)
    assert relative_error(D_x, ref["D"]) < 1e-5
    assert relative_error(logvar, ref["logvar"]) < 1e-5


@pytest.mark.parametrize("name", ["edm2_img_cond", "edm2_img_guide"])
def test_fixture_sweep(name):
    # The sweep's inputs are not in EDM2's .npz: they are the EDM fixture's x_sweep (the same x, sigmas and noise as
    # EDM's fixtures, which is why `x` is identical in both). The latent network's 4-channel sweep inputs are lost.
    net, ref = load_network(EDM2 / f"{name}.pkl"), np.load(EDM2 / f"{name}.npz")
    x_sweep = np.load(FIXTURES / "edm_ddpmpp_cond.npz")["x_sweep"]
    labels = torch.from_numpy(ref["labels"])
    with torch.no_grad():
        for x, sigma, D_x in zip(x_sweep, ref["sweep_sigmas"], ref["sweep_D"]):
            assert relative_error(net(torch.from_numpy(x), torch.tensor(sigma), labels), D_x) < 1e-5


def test_training_forward_normalises_weights_in_place(reference):
    # EDM2 trains in float32: each MPConv overwrites its weight with normalize(weight) before using it (forced weight
    # normalisation), and the output's gradient reaches the zero-initialised gains.
    _, net, ref = reference
    student = float32_copy(net).train()
    weight = student.get_parameter(str(ref["train_weight_name"]))
    assert torch.equal(weight, torch.from_numpy(ref["train_weight_before"]))
    D_x = student(*inputs(ref))
    (D_x**2).mean().backward()
    assert relative_error(D_x, ref["train_D"]) < 1e-5
    assert relative_error(weight, ref["train_weight_after"]) < 1e-6
    assert relative_error(student.unet.out_gain.grad, ref["train_grad_out_gain"]) < 1e-5
    rms = weight.detach().flatten(1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=2e-4)  # unit magnitude per output channel

    before = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        student.eval()(*inputs(ref))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # eval mode leaves them be


def test_float32_copy_differs_from_float16_by_the_gain_rounding():
    # Only the gains act in their own dtype (EDM2 casts every weight to float32 first); a float32 copy of a float16
    # network therefore moves by the rounding of gain / sqrt(fan_in) to float16, 2.4e-4 at most.
    net = load_network(EDM2 / "edm2_img_cond.pkl")
    ref = np.load(EDM2 / "edm2_img_cond.npz")
    with torch.no_grad():
        error = relative_error(float32_copy(net).eval()(*inputs(ref)), ref["D"])
    assert 1e-6 < error < 1e-3


# The bottleneck DMD2's GAN head reads.


def encoder_by_hand(net, x, sigma, labels):
    """The encoder's output at the lowest resolution, from the U-Net's modules and EDM2's formulas written out."""
    unet = net.unet
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_in, c_noise = 1 / (net.sigma_data**2 + sigma**2).sqrt(), sigma.flatten().log() / 4
    emb = unet.emb_noise(unet.emb_fourier(c_noise))
    emb = mp_silu(mp_sum(emb, unet.emb_label(labels * math.sqrt(net.label_dim)), t=0.5))
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    h = unet.enc["8x8_conv"](h)
    for name in ("8x8_block0", "4x4_down", "4x4_block0"):
        h = unet.enc[name](h, emb)
    return h


def forward_capturing_bottleneck(net, *args):
    """Run net(*args); return the input of the U-Net's first decoder block, the bottleneck, as it was."""
    seen = []
    handle = net.unet.dec["4x4_in0"].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        net(*args)
    handle.remove()
    return seen[0]


def test_one_pass_gives_forward_and_bottleneck():
    from test_precond import assert_one_pass_is_forward_and_bottleneck

    net = float32_copy(load_network(EDM2 / "edm2_img_cond.pkl")).eval()
    assert_one_pass_is_forward_and_bottleneck(net, *inputs(np.load(EDM2 / "edm2_img_cond.npz")))
    set_compute_dtype(net, torch.bfloat16)  # the features' cast to float32 keeps their gradient
    assert_one_pass_is_forward_and_bottleneck(net, *inputs(np.load(EDM2 / "edm2_img_cond.npz")))


def test_bottleneck_is_the_encoder_output_of_forward():
    net = float32_copy(load_network(EDM2 / "edm2_img_cond.pkl")).eval()
    x, sigma, labels = inputs(np.load(EDM2 / "edm2_img_cond.npz"))
    with torch.no_grad():
        h = net.bottleneck(x, sigma, labels)
        by_hand = encoder_by_hand(net, x, sigma, labels)
    assert h.shape == (4, 32, 4, 4) and h.shape[1:] == net.bottleneck_shape() and h.dtype == torch.float32
    torch.testing.assert_close(h, by_hand, rtol=1e-6, atol=1e-6)
    assert torch.equal(h, forward_capturing_bottleneck(net, x, sigma, labels))
    assert torch.equal(net.bottleneck(x, torch.tensor(2.5), labels), forward_capturing_bottleneck(net, x, 2.5, labels))
    assert (net.bottleneck(x, sigma * 2, labels) - h).abs().max() > 1e-3  # c_in and c_noise follow sigma


def test_bottleneck_shape_of_both_families():
    # The interface DMD2's GAN head is sized from, without a forward pass.
    for net in (load_network(FIXTURES / "edm_ddpmpp_cond.pkl"), load_network(EDM2 / "edm2_latent_cond.pkl")):
        x = torch.zeros(2, net.img_channels, net.img_resolution, net.img_resolution)
        with torch.no_grad():
            assert net.bottleneck(x, torch.tensor(1.0)).shape[1:] == net.bottleneck_shape()


# Dtypes, labels and the shared interface.


def test_bf16_compute_dtype():
    net = float32_copy(load_network(EDM2 / "edm2_img_cond.pkl")).eval()
    x, sigma, labels = inputs(np.load(EDM2 / "edm2_img_cond.npz"))
    seen = []
    net.unet.enc["8x8_conv"].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.no_grad():
        fp32 = net(x, sigma, labels)
        bf16 = set_compute_dtype(net, torch.bfloat16)(x, sigma, labels)
        forced = net(x, sigma, labels, force_fp32=True)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert bf16.dtype == torch.float32 and torch.equal(forced, fp32)
    assert 0 < relative_error(bf16, fp32.numpy()) < 5e-2


def test_use_fp16_runs_float32_on_the_cpu():
    net = load_network(EDM2 / "edm2_img_cond.pkl")
    assert net.use_fp16 and net.model_dtype(torch.zeros(1)) == torch.float32


def test_missing_labels_are_zero_rows():
    net = float32_copy(load_network(EDM2 / "edm2_img_cond.pkl")).eval()
    x, sigma, _ = inputs(np.load(EDM2 / "edm2_img_cond.npz"))
    with torch.no_grad():
        assert torch.equal(net(x, sigma), net(x, sigma, torch.zeros(4, 10)))


def test_unconditional_network_ignores_labels():
    net = build_network("Precond", dict(TINY, label_dim=0, channels_per_head=8)).eval()
    assert net.unet.emb_label is None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([1.0, 2.0])), net(x, torch.tensor([1.0, 2.0]), torch.eye(10)[:2]))


def test_init_kwargs_rebuild_and_copy():
    net = load_network(EDM2 / "edm2_img_cond.pkl")
    assert json.loads(json.dumps(net.init_kwargs)) == net.init_kwargs
    check_init_kwargs(net.init_kwargs)
    clone = copy_network(net)
    assert type(clone) is Precond and clone.init_kwargs == net.init_kwargs and not clone.training
    assert all(torch.equal(a.float(), b) for a, b in zip(net.state_dict().values(), clone.state_dict().values()))
    assert not hasattr(net, "sigma_min") and not hasattr(net, "round_sigma")  # EDM2 declares no sigma range


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_channels=10**6), "'model_channels' must be an integer from 1 to 4096"),
        (dict(logvar_channels=10**9), "'logvar_channels'"),
        (dict(channels_per_head=0), "'channels_per_head'"),
        (dict(channel_mult_emb=10**5), "'channel_mult_emb'"),
    ],
)
def test_absurd_kwargs_are_refused_before_building(change, message):
    kwargs = dict(MANIFEST["networks"]["edm2_img_cond"]["network_kwargs"], channel_mult_noise=None)
    del kwargs["class_name"]
    check_init_kwargs(kwargs)  # EDM2 leaves channel_mult_noise None to derive it
    with pytest.raises(ValueError, match=message):
        check_init_kwargs(dict(kwargs, **change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(label_balance=2), "'label_balance' must be a number from 0 to 1"),
        (dict(res_balance="x"), "'res_balance' must be a number"),
        (dict(clip_act=-1), "'clip_act' must be a positive number or None"),
        (dict(resample_filter=[1, 2, 1]), "even number of taps"),
    ],
)
def test_bad_block_kwargs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Precond(**TINY, label_dim=0, **change)
