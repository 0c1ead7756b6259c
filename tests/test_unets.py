"""U-Net architectures: parameter counts and keys of EDM's released configs (built on the meta device), and the
behaviour of tiny 8x8 networks."""

import functools

import pytest
import torch
from test_layers import randomize_

from dmd.edm.precond import build_network
from dmd.edm.presets import ADM as ADM_ARCH
from dmd.edm.presets import DDPMPP, NCSNPP
from dmd.edm.unets import DhariwalUNet, SongUNet

CIFAR = dict(img_resolution=32, img_channels=3, augment_dim=9, dropout=0.13)
ADM = dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, dropout=0.10, augment_dim=0)
ADM.update(ADM_ARCH)

RELEASED = {
    "cifar10-cond-ddpmpp": (dict(CIFAR, label_dim=10, **DDPMPP), 55_735_299, 427),
    "cifar10-uncond-ddpmpp": (dict(CIFAR, label_dim=0, **DDPMPP), 55_733_891, None),
    "cifar10-cond-ncsnpp": (dict(CIFAR, label_dim=10, **NCSNPP), 56_400_643, None),
    "imagenet64-cond-adm": (ADM, 295_899_267, 553),
}


@functools.cache
def meta_network(name):
    """Build the EDMPrecond of RELEASED[name] without allocating its weights (once per test session)."""
    with torch.device("meta"):
        return build_network("EDMPrecond", RELEASED[name][0])


def attending(net):
    """Map 'enc.NAME' / 'dec.NAME' of every attention block to its head count."""
    parts = {"enc": net.model.enc, "dec": net.model.dec}
    return {f"{p}.{n}": m.num_heads for p, d in parts.items() for n, m in d.items() if getattr(m, "num_heads", 0)}


def shapes(net):
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_sizes(name):
    net = meta_network(name)
    _, num_params, num_tensors = RELEASED[name]
    assert sum(p.numel() for p in net.parameters()) == num_params
    if num_tensors is not None:
        assert len(net.state_dict()) == num_tensors


def test_cifar10_ddpmpp_keys_and_order():
    net = meta_network("cifar10-cond-ddpmpp")
    s = shapes(net)
    assert s["model.map_augment.weight"] == (128, 9)
    assert s["model.map_label.weight"] == (128, 10) and s["model.map_label.bias"] == (128,)
    assert "model.map_augment.bias" not in s
    filters = [k for k in s if k.endswith("resample_filter")]
    assert len(filters) == 8 and all(s[k] == (1, 1, 2, 2) for k in filters)
    blocks = [f"block{i}" for i in range(4)]
    assert list(net.model.enc) == (
        ["32x32_conv", *[f"32x32_{b}" for b in blocks], "16x16_down", *[f"16x16_{b}" for b in blocks]]
        + ["8x8_down", *[f"8x8_{b}" for b in blocks]]
    )
    blocks = [f"block{i}" for i in range(5)]
    assert list(net.model.dec) == (
        ["8x8_in0", "8x8_in1", *[f"8x8_{b}" for b in blocks], "16x16_up", *[f"16x16_{b}" for b in blocks]]
        + ["32x32_up", *[f"32x32_{b}" for b in blocks], "32x32_aux_norm", "32x32_aux_conv"]
    )
    assert set(attending(net)) == {f"enc.16x16_block{i}" for i in range(4)} | {"dec.8x8_in0", "dec.16x16_block4"}
    assert s["model.enc.32x32_conv.weight"] == (128, 3, 3, 3)  # level 0 outputs model_channels, not x mult
    assert s["model.enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert s["model.dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert list(s)[:7] == [
        "model.map_label.weight",
        "model.map_label.bias",
        "model.map_augment.weight",
        "model.map_layer0.weight",
        "model.map_layer0.bias",
        "model.map_layer1.weight",
        "model.map_layer1.bias",
    ]


def test_cifar10_ncsnpp_keys():
    s = shapes(meta_network("cifar10-cond-ncsnpp"))
    assert list(s)[0] == "model.map_noise.freqs" and s["model.map_noise.freqs"] == (128,)
    assert s["model.map_layer0.weight"] == (512, 256)  # channel_mult_noise 2
    assert s["model.enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert s["model.enc.8x8_aux_residual.weight"] == (256, 256, 3, 3)
    assert s["model.enc.8x8_aux_residual.resample_filter"] == (1, 1, 4, 4)


def test_imagenet_adm_keys_and_heads():
    net = meta_network("imagenet64-cond-adm")
    s = shapes(net)
    assert s["model.map_label.weight"] == (768, 1000) and "model.map_label.bias" not in s
    assert "model.map_augment.weight" not in s
    assert s["model.enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert s["model.out_conv.weight"] == (3, 192, 3, 3) and list(s)[-4:-2] == [
        "model.out_norm.weight",
        "model.out_norm.bias",
    ]
    heads = attending(net)
    for res, num_heads in [(32, 6), (16, 9), (8, 12)]:  # every block at an attention resolution attends
        blocks = [f"enc.{res}x{res}_block{i}" for i in range(3)] + [f"dec.{res}x{res}_block{i}" for i in range(4)]
        assert {heads.pop(name) for name in blocks} == {num_heads}
    assert heads == {"dec.8x8_in0": 12}
    assert "model.enc.32x32_down.skip.resample_filter" in s and "model.enc.32x32_down.skip.weight" not in s
    assert net.model.out_norm.eps == 1e-5 and net.model.enc["64x64_block0"].norm0.eps == 1e-5


def tiny_song(**kwargs):
    kwargs = dict(dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]), **kwargs)
    return randomize_(SongUNet(img_resolution=8, in_channels=3, out_channels=3, **kwargs))


def tiny_adm(**kwargs):
    kwargs = dict(dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]), **kwargs)
    return randomize_(DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, **kwargs))


def test_song_unet_skip_encoder_and_decoder_layout():
    net = tiny_song(encoder_type="skip", decoder_type="skip", channel_mult=[1, 2, 2])
    assert list(net.enc)[2:5] == ["4x4_down", "4x4_aux_down", "4x4_aux_skip"]
    assert net.enc["4x4_aux_skip"].weight.shape == (16, 3, 1, 1)  # image channels -> width of 4x4_down
    assert list(net.enc["4x4_aux_down"].state_dict()) == ["resample_filter"]
    heads = [name for name in net.dec if "aux" in name]
    assert heads == ["2x2_aux_norm", "2x2_aux_conv", "4x4_aux_up", "4x4_aux_norm", "4x4_aux_conv"] + [
        "8x8_aux_up",
        "8x8_aux_norm",
        "8x8_aux_conv",
    ]
    assert net.dec["8x8_aux_norm"].eps == 1e-6 and net.enc["8x8_block0"].norm0.eps == 1e-6
    out = net.eval()(torch.randn(2, 3, 8, 8), torch.randn(2), None)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_song_unet_residual_encoder_forward():
    net = tiny_song(encoder_type="residual", embedding_type="fourier", resample_filter=[1, 3, 3, 1]).eval()
    assert net.enc["4x4_aux_residual"].fused_resample
    out = net(torch.randn(2, 3, 8, 8), torch.randn(2), None)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("make", [tiny_song, tiny_adm])
def test_label_dropout_zeroes_labels_in_training_only(make):
    net = make(label_dim=5, dropout=0, label_dropout=1.0)
    x, noise = torch.randn(3, 3, 8, 8), torch.randn(3)
    labels = torch.eye(5)[[0, 2, 4]]
    dropped = net.train()(x, noise, labels)
    torch.testing.assert_close(dropped, net(x, noise, torch.zeros(3, 5)), rtol=0, atol=0)
    kept = net.eval()(x, noise, labels)
    assert (kept - dropped).abs().max() > 1e-3


@pytest.mark.parametrize("make", [tiny_song, tiny_adm])
def test_dropout_only_in_training(make):
    net = make(dropout=0.3)
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    assert (net.train()(x, noise, None) - net(x, noise, None)).abs().max() > 1e-3
    net.eval()
    torch.testing.assert_close(net(x, noise, None), net(x, noise, None), rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_song, tiny_adm])
def test_augment_labels_are_used_when_given(make):
    net = make(augment_dim=9).eval()
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    plain = net(x, noise, None)
    assert (net(x, noise, None, augment_labels=torch.randn(2, 9)) - plain).abs().max() > 1e-3
    torch.testing.assert_close(net(x, noise, None, augment_labels=torch.zeros(2, 9)), plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(embedding_type="learned"), "embedding_type"),
        (dict(encoder_type="dense"), "encoder_type"),
        (dict(decoder_type="residual"), "decoder_type"),
    ],
)
def test_song_unet_rejects_unknown_types(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SongUNet(img_resolution=8, in_channels=3, out_channels=3, **kwargs)


# Bottleneck features (DMD2's GAN head reads them).


@pytest.mark.parametrize(
    "name, shape", [("cifar10-cond-ddpmpp", (2, 256, 8, 8)), ("imagenet64-cond-adm", (2, 768, 8, 8))]
)
def test_released_config_bottleneck_shapes(name, shape):
    net = meta_network(name)
    x = torch.zeros(2, 3, net.img_resolution, net.img_resolution, device="meta")
    assert net.bottleneck(x, torch.ones(2, device="meta"), torch.zeros(2, net.label_dim, device="meta")).shape == shape


def forward_capturing_bottleneck(net, *args, **kwargs):
    """Run net(*args) and return (its output, the last encoder module's output, the first decoder block's input)."""
    seen = {}
    last_enc = net.enc[list(net.enc)[-1]].register_forward_hook(lambda m, a, out: seen.update(enc=out))
    first_dec = net.dec[list(net.dec)[0]].register_forward_pre_hook(lambda m, a: seen.update(dec=a[0]))
    out = net(*args, **kwargs)
    last_enc.remove()
    first_dec.remove()
    return out, seen["enc"], seen["dec"]


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (tiny_song, {}),
        (tiny_song, dict(encoder_type="skip", decoder_type="skip", channel_mult=[1, 2, 2])),
        (tiny_song, dict(encoder_type="residual", embedding_type="fourier", resample_filter=[1, 3, 3, 1])),
        (tiny_adm, dict(channel_mult=[1, 2, 2])),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_encode_is_the_bottleneck_inside_forward(make, kwargs, training):
    net = make(label_dim=5, augment_dim=9, dropout=0.3, label_dropout=0.5, **kwargs).train(training)
    x, noise, labels, augment = torch.randn(3, 3, 8, 8), torch.randn(3), torch.eye(5)[[0, 2, 4]], torch.randn(3, 9)
    torch.manual_seed(1)  # in training, dropout and label dropout draw the same numbers in both calls
    with torch.no_grad():
        _, enc_out, dec_in = forward_capturing_bottleneck(net, x, noise, labels, augment_labels=augment)
        torch.manual_seed(1)
        h = net.encode(x, noise, labels, augment_labels=augment)
    torch.testing.assert_close(enc_out, dec_in, rtol=0, atol=0)
    torch.testing.assert_close(h, enc_out, rtol=0, atol=0)
    bottom = 8 >> (len(kwargs.get("channel_mult", [1, 2])) - 1)  # one halving per level after the first
    assert h.shape == (3, net.dec[list(net.dec)[0]].in_channels, bottom, bottom)
