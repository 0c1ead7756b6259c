"""The DINOv2 detector of FD_DINOv2: EDM2's preprocessing against PIL, the features against the model called by hand
with the hub model's position embeddings, and one-line errors for every way loading fails. The tiny random model of
conftest stands in for facebook/dinov2-large (no network in the tests)."""

import json
import shutil
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_dinov2

from dmd.cli import main
from dmd.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from dmd.fid import FIDError, detect, save_ref

MEAN, STD = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)


def images(n, size, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def pil_preprocess(x):
    """EDM2's preprocessing by another route: each channel's 0..255 values resized by PIL's bicubic (the kernel
    torch's antialiased bicubic reproduces, a = -0.5 and widened when shrinking), then / 255, then ImageNet's
    normalisation. (N, 3, H, W) uint8 -> (N, 3, 224, 224) float64."""
    resized = [
        [
            np.asarray(PIL.Image.fromarray(c.astype(np.float32), "F").resize((224, 224), PIL.Image.BICUBIC))
            for c in image
        ]
        for image in x.numpy()
    ]
    return (np.array(resized, np.float64) / 255 - MEAN) / STD


@pytest.mark.parametrize("size", [8, 240])
def test_preprocessing_is_edm2s(dinov2_folder, size):
    """Resized to 224x224 (bicubic, antialiased: PIL's kernel; without antialias it is off by up to 110 of 255 when
    shrinking), scaled to [0, 1], normalised with ImageNet's mean and std; a constant image exactly so."""
    detector = load_dinov2(dinov2_folder)
    x = images(2, size)
    np.testing.assert_allclose(detector.preprocess(x).double().numpy(), pil_preprocess(x), atol=1e-4, rtol=0)
    constant = torch.tensor([10, 128, 250], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, size, size)
    expected = (np.array([10, 128, 250]).reshape(3, 1, 1) / 255 - MEAN) / STD
    np.testing.assert_allclose(detector.preprocess(constant)[0].numpy(), np.broadcast_to(expected, (3, 224, 224)),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_features_are_the_cls_token_with_the_hub_models_position_embeddings(dinov2_folder):
    """The detector's features equal the model's normalised CLS token with the 37x37 position embeddings resampled
    to 16x16 as torch.hub's DINOv2 does (bicubic, scale factor (16 + 0.1) / 37), not as transformers does (to size
    16, a grid shifted by up to a third of a patch)."""
    from transformers import Dinov2Model

    detector = load_dinov2(dinov2_folder)
    x = images(3, 8, seed=1)
    with torch.inference_mode():
        features = detector(x, return_features=True)
    assert features.shape == (3, 32) and features.dtype == torch.float32

    model = Dinov2Model.from_pretrained(dinov2_folder).eval()
    pos = model.embeddings.position_embeddings.data  # (1, 1 + 37 * 37, 32): the CLS token's, then row by row
    grid = pos[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic")  # (1, 32, 16, 16)
    hub = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)  # (1, 1 + 16 * 16, 32)
    with torch.inference_mode():
        own = model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224)
    assert torch.equal(detector.model.embeddings.position_embeddings, hub)
    assert (own - hub).abs().max() > 0.1
    model.embeddings.position_embeddings.data = hub
    with torch.inference_mode():
        expected = model(pixel_values=detector.preprocess(x)).last_hidden_state[:, 0]  # after the final layernorm
    np.testing.assert_allclose(features.numpy(), expected.numpy(), atol=1e-6, rtol=0)

    # A model whose embeddings are already 16x16 keeps them, as the hub model does; gray images repeat to RGB.
    square = load_dinov2(save_tiny_dinov2(dinov2_folder.parent / "square", image_size=224))
    assert torch.equal(square.model.embeddings.position_embeddings, Dinov2Model.from_pretrained(
        dinov2_folder.parent / "square").embeddings.position_embeddings)  # fmt: skip
    gray = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    rgb = np.repeat(gray, 3, axis=3)
    assert torch.equal(detect(square, gray, "cpu"), detect(square, rgb, "cpu"))


def test_hub_names_are_downloaded_into_dmds_cache(dinov2_folder, tmp_path, monkeypatch):
    """A Hub name is fetched with huggingface_hub into <cache>/huggingface (config.json and model.safetensors only);
    offline, the error says how to bring a folder instead."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot(name, **kwargs):
        calls.append((name, kwargs))
        return str(dinov2_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    detector = load_dinov2(None, cache_dir=tmp_path / "cache")
    assert detector.model.config.hidden_size == 32
    assert calls == [
        ("facebook/dinov2-large", {"cache_dir": tmp_path / "cache" / "huggingface", "allow_patterns": list(
            ("config.json", "model.safetensors"))})
    ]  # fmt: skip

    def offline(name, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FIDError) as error:
        load_dinov2("facebook/dinov2-large")
    assert str(error.value) == (
        "--dinov2 facebook/dinov2-large: no such folder, and the Hugging Face Hub download failed (Got: ConnectError: "
        "[Errno -2] Name or service not known); without internet, run Dinov2Model.from_pretrained("
        "'facebook/dinov2-large').save_pretrained(DIR) where there is, copy DIR here and give --dinov2 DIR"
    )


def test_bad_models_are_one_line_errors(dinov2_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(dinov2_folder, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    vit = shutil.copytree(dinov2_folder, tmp_path / "vit")
    config = json.loads((vit / "config.json").read_text())
    (vit / "config.json").write_text(json.dumps(dict(config, model_type="vit")))
    pickled = shutil.copytree(dinov2_folder, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")  # refused: loading it would unpickle
    cases = {
        str(tmp_path / "nope"): "no such folder; give a folder saved with save_pretrained or a Hugging Face Hub name",
        str(tmp_path): "no readable config.json of a model saved with save_pretrained",
        str(missing): r"the weights do not fit the config \(\{'missing_keys': \['layernorm.weight'\]\}\)",
        str(vit): "config.json describes a 'vit' model, not 'dinov2'",
        str(pickled): "not a readable DINOv2 model",
    }
    for source, message in cases.items():
        with pytest.raises(FIDError, match=f"^--dinov2 {source}: {message}") as error:
            load_dinov2(source)
        assert "\n" not in str(error.value)

    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(
        FIDError, match=r"^--dinov2: FD_DINOv2 needs transformers: pip install 'dmd-distill\[dinov2\]'$"
    ):
        load_dinov2(dinov2_folder)


def test_cli_names_the_dinov2_flag(tmp_path):
    (tmp_path / "pngs").mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "pngs" / f"{i}.png")
    args = ["fid", "ref", "--data", str(tmp_path / "pngs"), "--dest", str(tmp_path / "ref.pkl")]
    result = CliRunner().invoke(main, [*args, "--metrics", "fd_dinov2", "--dinov2", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --dinov2 {tmp_path / 'nope'}: no such folder") and result.output.count(
        "\n") == 1  # fmt: skip
    save_ref(np.zeros(4), np.eye(4), tmp_path / "ref.npz")
    args = ["fid", "calc", "--images", str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--num", "2"]
    result = CliRunner().invoke(main, [*args, "--metrics", "fd_dinov2"])
    assert result.exit_code == 1
    assert result.output == f"Error: --ref {tmp_path / 'ref.npz'}: an npz holds FID statistics only, not 'fd_dinov2' " \
        "(EDM2's pickles hold both)\n"  # fmt: skip
