"""Layers of dmd.edm.layers against formulas written out independently with plain torch ops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmd.edm.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, weight_init


def randomize_(module, seed=0, std=0.2):
    """Overwrite every parameter with seeded normal noise, so no zero-initialised layer can hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize(
    "mode, std",
    [
        ("xavier_uniform", math.sqrt(2 / (300 + 200))),
        ("xavier_normal", math.sqrt(2 / (300 + 200))),
        ("kaiming_uniform", math.sqrt(1 / 300)),
        ("kaiming_normal", math.sqrt(1 / 300)),
    ],
)
def test_weight_init_std(mode, std):
    w = weight_init([200, 300], mode=mode, fan_in=300, fan_out=200)
    assert w.shape == (200, 300)
    assert abs(w.std().item() / std - 1) < 0.02
    if mode.endswith("uniform"):
        assert w.abs().max().item() <= std * math.sqrt(3) + 1e-6


def test_weight_init_unknown_mode():
    with pytest.raises(ValueError, match="init_mode 'orthogonal'"):
        weight_init([2, 2], mode="orthogonal", fan_in=2, fan_out=2)


def test_linear_formula_and_keys():
    layer = randomize_(Linear(5, 3))
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert list(Linear(5, 3, bias=False).state_dict()) == ["weight"]


def test_conv2d_buffers_only_when_resampling():
    assert list(Conv2d(4, 8, kernel=3).state_dict()) == ["weight", "bias"]
    assert list(Conv2d(4, 8, kernel=1, bias=False).state_dict()) == ["weight"]
    assert list(Conv2d(4, 4, kernel=0, up=True).state_dict()) == ["resample_filter"]
    down = Conv2d(4, 8, kernel=3, down=True, resample_filter=[1, 3, 3, 1])
    assert list(down.state_dict()) == ["weight", "bias", "resample_filter"]
    f = np.array([1, 3, 3, 1], dtype=np.float64)
    np.testing.assert_allclose(down.resample_filter.numpy()[0, 0], np.outer(f, f) / f.sum() ** 2, rtol=1e-7)
    with pytest.raises(ValueError, match="both upsample and downsample"):
        Conv2d(4, 4, kernel=3, up=True, down=True)


def test_conv2d_box_filter_is_nearest_up_and_average_down():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(Conv2d(3, 3, kernel=0, up=True)(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(Conv2d(3, 3, kernel=0, down=True)(x), F.avg_pool2d(x, 2))
    conv = randomize_(Conv2d(3, 5, kernel=3, up=True))
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)


def test_conv2d_smooth_filter_resamples_to_the_right_size():
    x = torch.randn(1, 2, 8, 8)
    assert Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(x).shape == (1, 2, 16, 16)
    assert Conv2d(2, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1])(x).shape == (1, 4, 4, 4)
    # A constant image stays constant away from the zero-padded border (unit DC gain).
    ones = torch.ones(1, 1, 8, 8)
    up = Conv2d(1, 1, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(ones)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


def test_fused_up_equals_unfused_for_box_filter():
    # With [1, 1] the filter needs no padding, so fusing only moves the conv's padding: the results must agree.
    fused = randomize_(Conv2d(3, 4, kernel=3, up=True, fused_resample=True))
    plain = Conv2d(3, 4, kernel=3, up=True)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), plain(x))


def test_fused_down_is_one_strided_conv_with_the_composed_kernel():
    conv = randomize_(Conv2d(3, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True))
    x = torch.randn(2, 3, 8, 8)
    # conv(pad 2) then filter(stride 2) == one conv of the full 2D convolution w * f (6x6), stride 2, pad 2.
    f = conv.resample_filter[0, 0]
    composed = F.conv_transpose2d(conv.weight.reshape(12, 1, 3, 3), f[None, None]).reshape(4, 3, 6, 6)
    ref = F.conv2d(x, composed, conv.bias, stride=2, padding=2)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    # ... which is not what the unfused layer computes (filter first, conv at the lower resolution).
    plain = Conv2d(3, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1])
    plain.load_state_dict(conv.state_dict())
    assert (plain(x) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("channels, groups", [(12, 3), (16, 4), (64, 16), (128, 32), (256, 32), (768, 32)])
def test_groupnorm_group_count(channels, groups):
    norm = randomize_(GroupNorm(channels, eps=1e-6))
    assert norm.num_groups == groups
    x = torch.randn(2, channels, 4, 4)
    torch.testing.assert_close(norm(x), F.group_norm(x, groups, norm.weight, norm.bias, eps=1e-6))


@pytest.mark.parametrize("endpoint", [False, True])
def test_positional_embedding_formula(endpoint):
    c = 16
    x = torch.tensor([-1.3, 0.0, 0.25, 7.5, 300.0])
    freqs = (1 / 10000) ** (np.arange(c // 2) / (c // 2 - endpoint))
    angles = x.double().numpy()[:, None] * freqs[None]
    ref = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    out = PositionalEmbedding(c, endpoint=endpoint)(x)
    np.testing.assert_allclose(out.numpy(), ref, atol=5e-5)
    assert list(PositionalEmbedding(c).state_dict()) == []


def test_fourier_embedding_formula_and_persistent_freqs():
    emb = FourierEmbedding(16)
    assert list(emb.state_dict()) == ["freqs"] and emb.freqs.shape == (8,)
    assert 4 < emb.freqs.std().item() < 40  # drawn with scale 16
    x = torch.tensor([-0.6, 0.0, 0.01, 1.2])
    angles = 2 * np.pi * x.double().numpy()[:, None] * emb.freqs.double().numpy()[None]
    ref = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(emb(x).numpy(), ref, atol=1e-4)


def reference_block(block, x, emb, interleaved=True):
    """UNetBlock without resampling, spelled out with functional ops; interleaved=False reads q/k/v as stacked."""

    def norm(m, t):
        return F.group_norm(t, min(32, t.shape[1] // 4), m.weight, m.bias, m.eps)

    def conv(m, t):
        return F.conv2d(t, m.weight, m.bias, padding=m.weight.shape[-1] // 2)

    h = conv(block.conv0, F.silu(norm(block.norm0, x)))
    p = (emb @ block.affine.weight.T + block.affine.bias)[:, :, None, None]
    if block.adaptive_scale:
        scale, shift = p.chunk(2, dim=1)
        h = F.silu(shift + norm(block.norm1, h) * (scale + 1))
    else:
        h = F.silu(norm(block.norm1, h + p))
    h = conv(block.conv1, h)
    h = (h + (conv(block.skip, x) if block.skip is not None else x)) * block.skip_scale
    if not block.num_heads:
        return h
    n, c, height, width = h.shape
    heads, d = block.num_heads, c // block.num_heads
    qkv = conv(block.qkv, norm(block.norm2, h))
    if interleaved:
        q, k, v = qkv.reshape(n, heads, d, 3, height * width).unbind(3)  # channel (head*d + c)*3 + j
    else:
        q, k, v = qkv.reshape(n, 3, heads, d, height * width).unbind(1)  # three stacked [q | k | v] blocks
    w = torch.softmax(torch.einsum("nhci,nhcj->nhij", q, k) / math.sqrt(d), dim=-1)  # (N, heads, HW, HW)
    a = torch.einsum("nhij,nhcj->nhci", w, v).reshape(n, c, height, width)
    return (conv(block.proj, a) + h) * block.skip_scale


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_heads=2, skip_scale=math.sqrt(0.5), eps=1e-6, adaptive_scale=False),  # SongUNet style
        dict(channels_per_head=8, adaptive_scale=True),  # ADM style, heads derived from width: 4
    ],
)
def test_unetblock_attention_matches_interleaved_reference(kwargs):
    block = randomize_(UNetBlock(16, 32, emb_channels=24, attention=True, **kwargs)).eval()
    assert block.num_heads in (2, 4)
    x, emb = torch.randn(3, 16, 4, 4), torch.randn(3, 24)
    out = block(x, emb)
    torch.testing.assert_close(out, reference_block(block, x, emb), rtol=1e-4, atol=1e-5)
    assert (out - reference_block(block, x, emb, interleaved=False)).abs().max() > 1e-2


def test_unetblock_heads_and_skip_layouts():
    keys = list(UNetBlock(32, 32, 8, attention=True, channels_per_head=64).state_dict())
    assert not any(k.startswith(("norm2", "qkv", "proj")) for k in keys)  # fewer than 64 channels: no attention
    block = UNetBlock(128, 128, 8, attention=True)
    assert block.num_heads == 2 and block.qkv.weight.shape == (384, 128, 1, 1)
    assert UNetBlock(16, 16, 8).skip is None
    assert list(UNetBlock(16, 16, 8, down=True).skip.state_dict()) == ["resample_filter"]  # kernel-0 skip
    assert list(UNetBlock(16, 16, 8, down=True, resample_proj=True).skip.state_dict()) == [
        "weight",
        "bias",
        "resample_filter",
    ]
    assert UNetBlock(16, 32, 8).skip.weight.shape == (32, 16, 1, 1)
    assert UNetBlock(16, 16, 8, adaptive_scale=True).affine.weight.shape == (32, 8)


def test_unetblock_down_and_up_shapes():
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    assert UNetBlock(16, 16, 8, down=True)(x, emb).shape == (2, 16, 4, 4)
    assert UNetBlock(16, 32, 8, up=True, resample_filter=[1, 3, 3, 1])(x, emb).shape == (2, 32, 16, 16)


def test_unetblock_dropout_only_in_training():
    block = randomize_(UNetBlock(16, 16, 8, dropout=0.5))
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    assert (block.train()(x, emb) - block(x, emb)).abs().max() > 1e-3
    block.eval()
    torch.testing.assert_close(block(x, emb), block(x, emb), rtol=0, atol=0)
    torch.testing.assert_close(block(x, emb), reference_block(block, x, emb), rtol=1e-4, atol=1e-5)


def test_layers_cast_weights_to_input_dtype():
    block = randomize_(UNetBlock(16, 16, 8, attention=True, num_heads=1)).eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    out = block(x.bfloat16(), emb)
    assert out.dtype == torch.bfloat16 and block.conv0.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), block(x, emb), rtol=0.1, atol=0.1)
