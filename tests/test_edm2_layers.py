"""EDM2's magnitude-preserving layers: each keeps unit-magnitude inputs at unit magnitude (the property EDM2 is built
on), forced weight normalisation happens in training mode only, and resampling is EDM2's 2x box / nearest filter."""

import math

import pytest
import torch

from dmd.edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


def rms(x):
    return x.square().mean().sqrt().item()


def test_normalize_gives_unit_magnitude_per_slice():
    x = torch.randn(3, 16, 5, 5) * torch.tensor([0.1, 1, 30]).reshape(3, 1, 1, 1)
    for row, before in zip(normalize(x), x):
        assert rms(row) == pytest.approx(rms(before) / (1e-4 + rms(before)), rel=1e-5)  # 1 up to eps = 1e-4
    # Pixel norm: unit magnitude over the channels of each pixel.
    before, after = (t.square().mean(dim=1).sqrt() for t in (x, normalize(x, dim=1)))
    torch.testing.assert_close(after, before / (1e-4 + before), rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_sum_and_concatenation_preserve_magnitude(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, 16, 16, generator=g), torch.randn(64, 96, 16, 16, generator=g)
    assert rms(mp_sum(a, b[:, :32], t)) == pytest.approx(1, abs=0.01)
    cat = mp_cat(a, b, t=t)
    assert cat.shape == (64, 128, 16, 16) and rms(cat) == pytest.approx(1, abs=0.01)
    # Eq. 103: each part's share of the output's energy follows t, not its width.
    share = cat[:, :32].square().sum() / cat.square().sum()
    assert share.item() == pytest.approx((1 - t) ** 2 / ((1 - t) ** 2 + t**2), abs=0.01)
    assert rms(mp_silu(torch.randn(10**6, generator=g))) == pytest.approx(1, abs=0.01)


def test_fourier_features_have_unit_magnitude():
    torch.manual_seed(1)
    y = MPFourier(256)(torch.linspace(-3, 3, 1000))
    assert y.shape == (1000, 256) and rms(y) == pytest.approx(1, abs=0.02)


def test_forced_weight_normalisation_in_training_mode_only():
    torch.manual_seed(2)
    conv = MPConv(8, 4, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(5)
    x = torch.randn(2, 8, 6, 6)
    stored = conv.weight.detach().clone()
    y = conv.eval()(x)
    assert torch.equal(conv.weight, stored)
    conv.train()(x)
    assert torch.equal(conv.weight, normalize(stored))  # the stored weight itself is now unit-magnitude per row
    # Either way the layer uses normalize(w) / sqrt(fan_in): the scale of the stored weight never matters (up to eps).
    torch.testing.assert_close(conv.eval()(x), y, rtol=1e-3, atol=1e-3)
    linear = MPConv(8, 4, kernel=[])
    assert linear(torch.randn(5, 8)).shape == (5, 4)


def test_resampling_is_a_box_filter_down_and_nearest_up():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resample(x, mode="down")
    assert torch.equal(down, torch.nn.functional.avg_pool2d(x, 2))
    assert torch.equal(resample(down, mode="up"), down.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert resample(x) is x
    with pytest.raises(ValueError, match="resample mode"):
        resample(x, mode="sideways")
    assert math.isclose(rms(resample(torch.randn(1, 4, 32, 32), mode="up")), 1, abs_tol=0.1)
