"""Preconditioners: EDM's reference outputs (fixtures pickled by EDM itself), the preconditioning formulas, EDM's
constants, label and sigma handling, compute dtypes, and rebuilding networks from init_kwargs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_layers import randomize_

from dmd.edm import load_network
from dmd.edm.precond import (
    PRECONDITIONERS,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    build_network,
    copy_network,
    iDDPMPrecond,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1, dropout=0.13)
SONG = dict(TINY, model_type="SongUNet", attn_resolutions=[4])
ADM = dict(TINY, model_type="DhariwalUNet", model_channels=64, attn_resolutions=[4])  # 64+ channels to attend
KINDS = {
    "edm-ddpmpp": ("EDMPrecond", dict(SONG, label_dim=10, augment_dim=9)),
    "edm-ncsnpp": (
        "EDMPrecond",
        dict(
            SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
        ),
    ),
    "edm-skip": ("EDMPrecond", dict(SONG, label_dim=10, encoder_type="skip", decoder_type="skip")),
    "edm-adm": ("EDMPrecond", dict(ADM, label_dim=10)),
    "vp-uncond": ("VPPrecond", dict(SONG)),
    "ve": ("VEPrecond", dict(SONG, label_dim=10)),
    "iddpm": ("iDDPMPrecond", dict(ADM, label_dim=10)),
}


def tiny(kind, **overrides):
    """Build a tiny network of KINDS[kind] with random weights, in eval mode."""
    class_name, init_kwargs = KINDS[kind]
    return randomize_(build_network(class_name, dict(init_kwargs, **overrides))).eval()


def inputs(net, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    labels = torch.eye(net.label_dim)[torch.arange(n) % net.label_dim] if net.label_dim else None
    return x, torch.tensor([0.002, 0.35, 4.0, 80.0][:n]), labels


# EDM's own numbers.


@pytest.fixture(scope="module", params=["edm_ddpmpp_cond", "vp_ddpmpp_cond"])
def reference(request):
    """A fixture network loaded through dmd's safe loader, with EDM's reference numbers for it."""
    net = load_network(FIXTURES / f"{request.param}.pkl")
    return net, dict(np.load(FIXTURES / f"{request.param}.npz"))


def assert_matches(out, ref):
    ref = np.asarray(ref)
    err = np.abs(np.asarray(out, dtype=np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"relative error {err:.2e}"


def test_fixture_state_dict_keys(reference):
    net, ref = reference
    assert list(net.state_dict()) == list(ref["state_dict_keys"])
    assert not net.training


def test_fixture_outputs(reference):
    net, ref = reference
    t = {k: torch.from_numpy(v) for k, v in ref.items() if v.dtype != object and v.dtype.kind != "U"}
    with torch.no_grad():
        assert_matches(net(t["x"], t["sigma"], t["labels"]), ref["out"])
        assert_matches(net(t["x"], t["sigma"], None), ref["out_nolabel"])
        assert_matches(net(t["x"], t["sigma"], t["labels"], augment_labels=t["augment_labels"]), ref["out_aug"])
        sweep = [net(x, sigma, t["labels"]) for x, sigma in zip(t["x_sweep"], t["sigma_sweep"])]  # 0-d float64 sigma
        assert_matches(torch.stack(sweep), ref["out_sweep"])
        sigma = t["onestep_sigma"]
        assert_matches(net(sigma * t["onestep_z"], sigma, t["labels"]), ref["onestep_out"])
    rounded = net.round_sigma(t["round_sigma_in"])
    assert rounded.dtype == t["round_sigma_in"].dtype
    assert_matches(rounded, ref["round_sigma_out"])
    assert net.sigma_min == float(ref["net_sigma_min"]) and net.sigma_max == float(ref["net_sigma_max"])


# Preconditioning formulas and constants.


def scalings(net, sigma):
    """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1, written out independently in float64."""
    s = sigma.double()
    if isinstance(net, EDMPrecond):
        sd = net.sigma_data
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt(), s.log() / 4
    if isinstance(net, VPPrecond):
        t = ((0.1**2 + 2 * 19.9 * torch.log1p(s**2)).sqrt() - 0.1) / 19.9
        return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), 999 * t
    if isinstance(net, VEPrecond):
        return torch.ones_like(s), s, torch.ones_like(s), (s / 2).log()
    j = (s[:, None] - net.u.double()[None]).abs().argmin(dim=1)
    return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), (999 - j).double()


@pytest.mark.parametrize("kind", ["edm-ddpmpp", "vp-uncond", "ve", "iddpm"])
def test_forward_is_the_preconditioned_model(kind):
    net = tiny(kind)
    x, sigma, labels = inputs(net)
    c_skip, c_out, c_in, c_noise = (c.float() for c in scalings(net, sigma))
    with torch.no_grad():
        F_x = net.model(c_in.reshape(-1, 1, 1, 1) * x, c_noise, labels)[:, : net.img_channels]
        D_x = net(x, sigma, labels)
    assert_matches(D_x, c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * F_x)


def test_edm_denoiser_becomes_identity_as_sigma_vanishes():
    net = tiny("edm-ddpmpp")
    x, _, labels = inputs(net)
    c_skip, c_out, _, _ = scalings(net, torch.tensor([1e-6]))
    assert abs(c_skip.item() - 1) < 1e-11 and abs(c_out.item()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.full((4,), 1e-6), labels), x, rtol=0, atol=1e-5)


def test_vp_constants_are_float32_like_edm():
    net = tiny("vp-uncond")
    assert net.sigma_min == 0.0009765625 and net.sigma_max == 152.16697692871094
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)
    torch.testing.assert_close(net.round_sigma(torch.tensor([0.1234])), torch.tensor([0.1234]), rtol=0, atol=0)


def test_ve_constants():
    net = tiny("ve")
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)


def test_iddpm_table_and_round_sigma():
    net = tiny("iddpm")
    u = net.u
    assert u.shape == (1001,) and u[1000] == 0 and (u[1:] < u[:-1]).all()
    assert abs(net.sigma_min - 0.0064223) < 1e-6 and abs(net.sigma_max - 20291.17) < 0.01
    assert net.sigma_min == float(u[999]) and net.sigma_max == float(u[0])
    assert "u" in net.state_dict()
    sigma = torch.tensor([[0.002, 0.5], [3.0, 80.0]], dtype=torch.float64)
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    assert rounded.shape == sigma.shape and rounded.dtype == torch.float64 and index.dtype == torch.int64
    brute = (sigma.reshape(-1, 1) - u.double()[None]).abs().argmin(dim=1).reshape(2, 2)
    assert torch.equal(index, brute)
    torch.testing.assert_close(rounded, u[brute].double())
    assert torch.equal(net.round_sigma(rounded), rounded)  # values on the table stay put
    assert net.round_sigma(torch.tensor(0.002)).shape == ()


def test_iddpm_uses_only_the_first_half_of_the_output():
    net = tiny("iddpm")
    assert net.model.out_conv.weight.shape[0] == 6
    x, sigma, labels = inputs(net)
    before = net(x, sigma, labels)
    with torch.no_grad():
        net.model.out_conv.weight[3:] += 1  # the variance half
        net.model.out_conv.bias[3:] += 1
    torch.testing.assert_close(net(x, sigma, labels), before, rtol=0, atol=0)


# Labels, sigma shapes and dtypes.


@pytest.mark.parametrize("kind", ["edm-ddpmpp", "edm-adm"])
def test_missing_labels_mean_a_zero_row(kind):
    net = tiny(kind)
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, None), net(x, sigma, torch.zeros_like(labels)), rtol=0, atol=0)
        assert (net(x, sigma, None) - net(x, sigma, labels)).abs().max() > 1e-4


def test_unconditional_net_ignores_labels():
    net = tiny("vp-uncond")
    x, sigma, _ = inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, torch.eye(10)[:4]), net(x, sigma, None), rtol=0, atol=0)


def test_scalar_sigma_broadcasts():
    net = tiny("edm-ddpmpp")
    x, _, labels = inputs(net)
    with torch.no_grad():
        ref = net(x, torch.full((4,), 2.5), labels)
        torch.testing.assert_close(net(x, torch.tensor(2.5, dtype=torch.float64), labels), ref, rtol=0, atol=0)
        torch.testing.assert_close(net(x, 2.5, labels), ref, rtol=0, atol=0)


def capture_model_dtype(net, *args, **kwargs):
    """Run net and return the dtype its U-Net received."""
    seen = []
    handle = net.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.no_grad():
        out = net(*args, **kwargs)
    handle.remove()
    assert out.dtype == torch.float32
    return seen[0]


def test_fp16_is_cuda_only_and_bf16_runs_anywhere():
    net = tiny("edm-ddpmpp")
    x, sigma, labels = inputs(net)
    ref = net(x, sigma, labels)
    half = build_network("EDMPrecond", dict(net.init_kwargs, use_fp16=True)).eval()
    half.load_state_dict(net.state_dict())
    assert capture_model_dtype(half, x, sigma, labels) == torch.float32  # on the CPU fp16 is ignored, as in EDM
    torch.testing.assert_close(half(x, sigma, labels), ref, rtol=0, atol=0)
    bf16 = build_network("EDMPrecond", dict(net.init_kwargs, use_bf16=True)).eval()
    bf16.load_state_dict(net.state_dict())
    assert capture_model_dtype(bf16, x, sigma, labels) == torch.bfloat16
    assert capture_model_dtype(bf16, x, sigma, labels, force_fp32=True) == torch.float32
    with torch.no_grad():
        err = (bf16(x, sigma, labels) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05


def test_compute_dtype_overrides_the_pickle_and_keeps_fp32_around_the_unet():
    from dmd.edm.precond import copy_network, set_compute_dtype

    net = tiny("edm-ddpmpp")
    x, sigma, labels = inputs(net)
    half = build_network("EDMPrecond", dict(net.init_kwargs, use_fp16=True, use_bf16=True)).eval()
    half.load_state_dict(net.state_dict())
    assert capture_model_dtype(set_compute_dtype(half, torch.float32), x, sigma, labels) == torch.float32
    assert capture_model_dtype(set_compute_dtype(net, torch.bfloat16), x, sigma, labels) == torch.bfloat16
    assert copy_network(net).compute_dtype == torch.bfloat16 and "compute_dtype" not in net.init_kwargs
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        set_compute_dtype(net, torch.float16)


def test_one_step_image_in_bf16_is_close_to_fp32(reference):
    # The DMD generator's forward at sigma 80 on EDM's fixture: bf16 rounds to 8 significant bits (0.4% at worst
    # per operation), so the image differs by about a percent of its range; 5% bounds it with margin (measured
    # 0.9% and 1.7% on the two fixtures, whose random weights amplify rounding more than trained ones), while an
    # error in how the bf16 path is wired (dtype casts, scalings) would be of order 100%.
    from dmd.edm.precond import copy_network, set_compute_dtype

    net, ref = reference
    net = copy_network(net).eval()  # the module-scoped fixture network stays untouched
    z, sigma, labels = (torch.from_numpy(ref[k]) for k in ("onestep_z", "onestep_sigma", "labels"))
    with torch.no_grad():
        fp32 = net(sigma * z, sigma, labels)
        bf16 = set_compute_dtype(net, torch.bfloat16)(sigma * z, sigma, labels)
    assert bf16.dtype == torch.float32
    err = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
    print(f"one-step bf16 vs fp32: max error {err:.2e} of max |image|")
    assert 0 < err < 0.05


def test_attention_logits_and_softmax_are_fp32_under_bf16(monkeypatch):
    from dmd.edm.precond import set_compute_dtype

    net = set_compute_dtype(tiny("edm-ddpmpp"), torch.bfloat16)
    x, sigma, labels = inputs(net)
    seen, einsum, softmax = [], torch.einsum, torch.Tensor.softmax
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: seen.append((eq, [o.dtype for o in ops])) or einsum(eq, *ops))
    monkeypatch.setattr(
        torch.Tensor, "softmax", lambda t, *a, **k: seen.append(("softmax", [t.dtype])) or softmax(t, *a, **k)
    )
    with torch.no_grad():
        net(x, sigma, labels)
    logits = [dtypes for eq, dtypes in seen if eq == "ncq,nck->nqk"]
    values = [dtypes for eq, dtypes in seen if eq == "nqk,nck->ncq"]
    assert logits and all(d == [torch.float32, torch.float32] for d in logits)
    assert all(d == [torch.float32] for eq, d in seen if eq == "softmax") and len(values) == len(logits)
    assert all(d == [torch.bfloat16, torch.bfloat16] for d in values)  # the rest of the U-Net stays in bf16


def test_dropout_follows_training_mode():
    net = tiny("edm-ddpmpp")
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
        net.train()
        assert (net(x, sigma, labels) - net(x, sigma, labels)).abs().max() > 1e-4


# init_kwargs, build_network and copy_network.


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rebuild_from_init_kwargs(kind):
    net = tiny(kind)
    init_kwargs = json.loads(json.dumps(net.init_kwargs))
    assert init_kwargs == net.init_kwargs
    clone = build_network(type(net).__name__, init_kwargs).eval()
    clone.load_state_dict(net.state_dict(), strict=True)
    net.load_state_dict(clone.state_dict(), strict=True)
    x, sigma, labels = inputs(net)
    augment = dict(augment_labels=torch.randn(4, 9)) if "augment_dim" in init_kwargs else {}
    with torch.no_grad():
        torch.testing.assert_close(clone(x, sigma, labels, **augment), net(x, sigma, labels, **augment), rtol=0, atol=0)


def test_init_kwargs_record_every_argument():
    net = EDMPrecond(8, 3, label_dim=2, model_type="SongUNet", model_channels=np.int64(16), channel_mult=(1, 2))
    assert net.init_kwargs == dict(
        img_resolution=8,
        img_channels=3,
        label_dim=2,
        use_fp16=False,
        sigma_min=0,
        sigma_max=math.inf,
        sigma_data=0.5,
        model_type="SongUNet",
        use_bf16=False,
        model_channels=16,
        channel_mult=[1, 2],
    )
    assert type(net.init_kwargs["model_channels"]) is int
    net.init_kwargs["label_dim"] = 5  # a copy: the network's record is unchanged
    assert net.init_kwargs["label_dim"] == 2
    vp = VPPrecond(8, 3, model_channels=16, channel_mult=[1])
    assert {k: vp.init_kwargs[k] for k in ("beta_d", "beta_min", "M", "epsilon_t")} == dict(
        beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5
    )
    assert set(iDDPMPrecond(8, 3, model_channels=16, channel_mult=[1]).init_kwargs) >= {"C_1", "C_2", "M"}


def test_copy_network_is_independent():
    net = tiny("edm-adm")
    clone = copy_network(net)
    assert type(clone) is EDMPrecond and not clone.training
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(clone(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
        clone.model.out_conv.bias.add_(1)
        assert (clone(x, sigma, labels) - net(x, sigma, labels)).abs().max() > 1e-3


def test_build_errors_name_the_culprit():
    assert set(PRECONDITIONERS) == {"EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "Precond"}  # EDM2's too
    with pytest.raises(ValueError, match="unknown network class 'training.networks.EDMPrecond'"):
        build_network("training.networks.EDMPrecond", {})
    with pytest.raises(ValueError, match="unknown model_type 'UNet2D'"):
        build_network("EDMPrecond", dict(img_resolution=8, img_channels=3, model_type="UNet2D"))
    with pytest.raises(ValueError, match="'dropout' is a Tensor"):
        EDMPrecond(8, 3, model_type="SongUNet", dropout=torch.tensor(0.1))


# Bottleneck features: the encoder output of the same preconditioned call.


def forward_capturing_bottleneck(net, *args, **kwargs):
    """Run net(*args, **kwargs); return the input of the U-Net's first decoder block, the bottleneck, as it was."""
    seen = []
    first_dec = net.model.dec[list(net.model.dec)[0]]
    handle = first_dec.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        net(*args, **kwargs)
    handle.remove()
    return seen[0]


def assert_bottleneck_matches_forward(net, *args, **kwargs):
    with torch.no_grad():
        h = net.bottleneck(*args, **kwargs)
    inside = forward_capturing_bottleneck(net, *args, **kwargs)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, inside.to(torch.float32), rtol=0, atol=0)
    return h


def test_fixture_bottleneck_is_the_encoder_output_of_forward(reference):
    net, ref = reference
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    h = assert_bottleneck_matches_forward(net, x, sigma, labels)
    assert h.shape == (4, 32, 4, 4)
    assert_bottleneck_matches_forward(net, x, sigma, None)
    assert_bottleneck_matches_forward(net, x, sigma, labels, augment_labels=torch.from_numpy(ref["augment_labels"]))
    assert_bottleneck_matches_forward(net, x, torch.tensor(2.5, dtype=torch.float64), labels)  # 0-d sigma
    assert (net.bottleneck(x, sigma * 2, labels) - h).abs().max() > 1e-3  # c_in and c_noise follow sigma


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bottleneck_of_every_preconditioner(kind):
    net = tiny(kind)
    x, sigma, labels = inputs(net)
    assert_bottleneck_matches_forward(net, x, sigma, labels)


def assert_one_pass_is_forward_and_bottleneck(net, x, sigma, labels, **kwargs):
    """net.forward_with_bottleneck equals (net(...), net.bottleneck(...)) to the bit, D without autograd and the
    features with the same gradient to x as bottleneck's; return the features."""
    x = x.clone().requires_grad_(True)
    D, h = net.forward_with_bottleneck(x, sigma, labels, **kwargs)
    (grad,) = torch.autograd.grad(h.square().sum(), x)
    alone = net.bottleneck(x, sigma, labels, **kwargs)
    (grad_alone,) = torch.autograd.grad(alone.square().sum(), x)
    with torch.no_grad():
        assert torch.equal(D, net(x, sigma, labels, **kwargs))
    assert not D.requires_grad and h.dtype == D.dtype == torch.float32
    assert torch.equal(h, alone) and torch.equal(grad, grad_alone) and grad.abs().sum() > 0
    return h


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_pass_gives_forward_and_bottleneck(kind):
    net = tiny(kind)
    assert_one_pass_is_forward_and_bottleneck(net, *inputs(net))


def test_bf16_one_pass_gives_forward_and_bottleneck():
    net = tiny("edm-ddpmpp", use_bf16=True)
    assert_one_pass_is_forward_and_bottleneck(net, *inputs(net))
    assert_one_pass_is_forward_and_bottleneck(net, *inputs(net), force_fp32=True)


def test_bf16_bottleneck_is_returned_in_float32():
    net = tiny("edm-ddpmpp", use_bf16=True)
    x, sigma, labels = inputs(net)
    assert forward_capturing_bottleneck(net, x, sigma, labels).dtype == torch.bfloat16
    h = assert_bottleneck_matches_forward(net, x, sigma, labels)
    assert_bottleneck_matches_forward(net, x, sigma, labels, force_fp32=True)
    assert (net.bottleneck(x, sigma, labels, force_fp32=True) - h).abs().max() > 0
