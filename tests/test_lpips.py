"""Tests of dmd.lpips with random weights: metric properties, gradients, and loading weight files in the layouts of
torchvision's vgg16 and the LPIPS repository's v0.1 vgg.pth."""

from functools import partial

import pytest
import torch

from dmd.lpips import LPIPS, NORM_EPS, TAP_CHANNELS, LPIPSWeightsError, _UnitNormalize


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1


def _save_layouts(model, tmp_path):
    """Write `model`'s weights as torchvision's vgg16 state dict (with a classifier) and as LPIPS's vgg.pth."""
    vgg = {f"features.{k}": v.clone() for k, v in model.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 8)  # torchvision's file also holds the classifier; it is ignored.
    lin = {f"lin{k}.model.1.weight": head.weight.clone() for k, head in enumerate(model.heads)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "vgg.pth"


def test_lpips_is_a_frozen_distance(lpips, images):
    x, y = images
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training
    d = lpips(x, y)
    assert d.shape == (2,)
    assert bool((d > 0).all())
    torch.testing.assert_close(lpips(y, x), d)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    # Each sample's distance depends on that sample only.
    torch.testing.assert_close(lpips(x[:1], y[:1]), d[:1])


def _hand_lpips(lpips, x, y):
    """The `lpips` package's formulas on `lpips`'s weights: sqrt(sum f^2) norms, a quotient, heads at every pixel."""
    feats = []
    for v in (x, y):
        h = (v - torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]
        ).reshape(1, 3, 1, 1)
        taps = []
        for i, layer in enumerate(lpips.features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                taps.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        feats.append(taps)
    assert [f.shape[1] for f in feats[0]] == list(TAP_CHANNELS)
    return sum(
        ((f0 - f1) ** 2 * head.weight.reshape(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        for f0, f1, head in zip(*feats, lpips.heads)
    )


def test_lpips_matches_hand_computation(lpips, images):
    # Within 1e-6 relative (9e-8 measured): the heads sum over space before the channels, the package after.
    x, y = images
    torch.testing.assert_close(lpips(x, y), _hand_lpips(lpips, x, y), rtol=1e-6, atol=0)


def test_lpips_gradient_matches_hand_computation(lpips, images):
    # The hand-written backward of the normalisation and the heads summed over space first change the input
    # gradient by rounding only: within 1e-6 of its largest entry (3e-7 measured).
    x, y = images
    grads = []
    for distance in (lpips, partial(_hand_lpips, lpips)):
        x0 = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(distance(x0, y).sum(), x0)
        grads.append(g)
    g, ref = grads
    assert float((g - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_unit_normalisation_backward_matches_autograd_also_at_zero_vectors():
    # Against autograd through the quotient by vector_norm (the formulation before the hand-written backward), which
    # takes the norm's gradient at a zero vector as 0; sqrt(sum f^2) under autograd would give NaN there.
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=g).relu()
    f[0, :, 1, 1] = 0  # a feature vector a ReLU zeroed
    upstream = torch.randn(f.shape, dtype=torch.float64, generator=g)
    f.requires_grad_(True)
    phi = _UnitNormalize.apply(f)
    ref = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + NORM_EPS)
    torch.testing.assert_close(phi, ref, rtol=1e-15, atol=0)
    (grad,) = torch.autograd.grad(phi, f, upstream)
    (grad_ref,) = torch.autograd.grad(ref, f, upstream)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12 * float(grad_ref.abs().max()))  # cancellations
    # Away from zero vectors the backward is the derivative of the forward (finite differences).
    assert torch.autograd.gradcheck(_UnitNormalize.apply, (f[1:].detach().clone().requires_grad_(True),))


def test_lpips_gradient_flows_to_input(lpips, images):
    x, y = images
    x = x.clone().requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    # A small step against the gradient lowers the distance.
    with torch.no_grad():
        assert (lpips(x - 1e-2 * x.grad / x.grad.abs().max(), y).sum() < lpips(x, y).sum()).item()


def test_random_lpips_is_the_same_metric_in_every_process():
    torch.manual_seed(1)
    a = LPIPS(pretrained=False)
    torch.manual_seed(2)
    b = LPIPS(pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_lpips_target_features_are_computed_without_autograd(lpips, images):
    x, y = images
    x = x.clone().requires_grad_(True)
    grad_enabled = []
    handle = lpips.features[0].register_forward_hook(lambda *args: grad_enabled.append(torch.is_grad_enabled()))
    try:
        d = lpips(x, y)
        d_both = lpips(x, y.clone().requires_grad_(True))  # a target that wants its gradient still gets one
    finally:
        handle.remove()
    assert grad_enabled == [True, False, True, True]
    torch.testing.assert_close(d, d_both)
    (gx,) = torch.autograd.grad(d.sum(), x)
    (gx_both,) = torch.autograd.grad(d_both.sum(), x)
    torch.testing.assert_close(gx, gx_both)


def test_lpips_in_bf16_is_close_to_fp32(images):
    # bf16 VGG features (8 significant bits), fp32 normalisation and heads: distances agree to about half a
    # percent at 224x224 (0.6% measured on random weights); 3% leaves a margin, a wrong cast would be far off.
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    x, y = (torch.nn.functional.interpolate(v, size=(64, 64), mode="bilinear") for v in images)
    with torch.no_grad():
        ref = model(x, y)
        model.compute_dtype = torch.bfloat16
        d = model(x, y)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, ref, rtol=0.03, atol=0)
    assert not torch.equal(d, ref)


def test_lpips_weight_files_round_trip(lpips, images, tmp_path):
    vgg_path, lin_path = _save_layouts(lpips, tmp_path)
    loaded = LPIPS(vgg_weights=vgg_path, lin_weights=str(lin_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    x, y = images
    assert torch.equal(loaded(x, y), lpips(x, y))


def test_lpips_wrong_keys_or_shapes_name_the_file(lpips, tmp_path):
    vgg_path, lin_path = _save_layouts(lpips, tmp_path)
    renamed = {k.replace("features.", "vgg."): v for k, v in torch.load(vgg_path, weights_only=True).items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(LPIPSWeightsError, match=r"renamed\.pth: missing keys \['features\.0\.weight'"):
        LPIPS(vgg_weights=tmp_path / "renamed.pth", lin_weights=lin_path)
    lin = torch.load(lin_path, weights_only=True)
    lin["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
    torch.save(lin, tmp_path / "bad_shape.pth")
    with pytest.raises(
        LPIPSWeightsError, match=r"bad_shape\.pth: wrong shapes: lin2\.model\.1\.weight \(1, 128, 1, 1\)"
    ):
        LPIPS(vgg_weights=vgg_path, lin_weights=tmp_path / "bad_shape.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsError, match=r"garbage\.pth: cannot read"):
        LPIPS(vgg_weights=tmp_path / "garbage.pth", lin_weights=lin_path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LPIPS(vgg_weights=tmp_path / "missing.pth", lin_weights=lin_path)
