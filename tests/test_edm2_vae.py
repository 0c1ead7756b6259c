"""The VAE of EDM2's latent teachers (dmd/edm2/vae.py), on a tiny random AutoencoderKL saved to a folder (the real
Stable Diffusion VAE cannot be downloaded here): pixels enter it in [0, 1], latents leave it as mean and std, the
teacher's scale and bias are undone before decoding, errors name --vae; and a latent network's samples through
DMDGenerator, snapshots and exported folders."""

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_vae

from dmd.edm.persistence import load_network
from dmd.edm2.vae import LatentCodec, VAEError, latent_info, load_codec, load_vae

EDM2 = Path(__file__).parent / "fixtures" / "edm2"
LATENT, PIXEL = EDM2 / "edm2_latent_cond.pkl", EDM2 / "edm2_img_cond.pkl"


@pytest.fixture(scope="module")
def teacher():
    return load_network(LATENT)


def test_the_fixture_is_a_latent_teacher_with_edm2s_scale_and_bias(teacher):
    info = latent_info(teacher)
    raw_mean, raw_std = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]
    scale = [0.5 / s for s in raw_std]  # final_std / raw_std
    bias = [0 - m * k for m, k in zip(raw_mean, scale)]  # final_mean - raw_mean * scale
    assert info.vae_name == "stabilityai/sd-vae-ft-mse"
    assert info.scale == pytest.approx(scale, rel=1e-6) and info.bias == pytest.approx(bias, rel=1e-6)
    assert latent_info(load_network(PIXEL)) is None


def test_pixels_enter_in_unit_range_and_raw_latents_are_mean_then_std(teacher, tiny_vae):
    codec = load_codec(teacher, tiny_vae)
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    raw = codec.encode_raw(pixels)
    d = load_vae(tiny_vae).encode(pixels.float() / 255).latent_dist
    assert raw.shape == (3, 8, 8, 8) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, torch.cat([d.mean, d.std], dim=1), rtol=0, atol=0)


def test_decode_undoes_scale_and_bias_to_the_vaes_own_reconstruction(teacher, tiny_vae):
    """Final latents mean * scale + bias (EDM2's, with eps 0) decode to what the VAE makes of its mean itself,
    clamped to [0, 1] and truncated to uint8 as EDM2 decodes."""
    codec = load_codec(teacher, tiny_vae)
    raw = codec.encode_raw(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    scale = torch.tensor(codec.info.scale).reshape(1, 4, 1, 1)
    bias = torch.tensor(codec.info.bias).reshape(1, 4, 1, 1)
    pixels = codec.decode(raw[:, :4] * scale + bias)
    with torch.no_grad():
        own = codec.vae.decode(raw[:, :4]).sample
    expected = (own.clamp(0, 1) * 255).to(torch.uint8)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 16, 16)
    assert (pixels.int() - expected.int()).abs().max() <= 1  # float rounding of (x * scale + bias - bias) / scale
    torch.testing.assert_close(codec.decode_to_unit(raw[:, :4] * scale + bias), pixels.float() / 127.5 - 1)


def test_a_vae_that_is_missing_offline_or_unfit_is_one_line_naming_the_flag(teacher, tiny_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        str(tmp_path / "nowhere" / "vae"): "no such folder",
        "someone/some-vae": "without internet, save it with AutoencoderKL.from_pretrained('someone/some-vae')",
        str(tmp_path): "not a diffusers AutoencoderKL folder",
    }
    for source, message in cases.items():
        with pytest.raises(VAEError) as e:
            load_codec(teacher, source, cache_dir=tmp_path / "cache", flag="--vae")
        assert str(e.value).startswith("--vae ") and message in str(e.value) and "\n" not in str(e.value)
    three = save_tiny_vae(tmp_path / "three", latent_channels=3)
    with pytest.raises(VAEError, match="the VAE has 3 latent channels but the network runs on 4"):
        load_codec(teacher, three)
    with pytest.raises(VAEError, match="--vae is for latent teachers"):
        load_codec(load_network(PIXEL), tiny_vae)
    assert load_codec(load_network(PIXEL)) is None


def test_a_latent_network_generates_decoded_pixels_or_its_latents(teacher, tiny_vae):
    from dmd.generate import DMDGenerator

    G = DMDGenerator(net=teacher, vae=str(tiny_vae))
    latents = G.generate_batch(seeds=[0, 1], num_steps=2, output="latents")
    images = G.generate_batch(seeds=[0, 1], num_steps=2)
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    assert latents.abs().max() > 1  # latents are not clamped to the pixel range
    torch.testing.assert_close(images, G.codec.decode_to_unit(latents))
    assert images.min() >= -1 and images.max() <= 1
    codec = LatentCodec(G.codec.vae, G.codec.info)
    torch.testing.assert_close(DMDGenerator(net=teacher, vae=codec).generate_batch(seeds=[0, 1], num_steps=2), images)
    pixel = DMDGenerator(net=load_network(PIXEL))
    with pytest.raises(ValueError, match="'latents' for a latent network"):
        pixel.generate_batch(seeds=[0], output="latents")
    with pytest.raises(ValueError, match="runs on pixels"):
        DMDGenerator(net=load_network(PIXEL), vae=str(tiny_vae))


def test_snapshots_and_exported_folders_keep_the_latent_space(teacher, tiny_vae, tmp_path):
    from dmd.build import student_copy
    from dmd.checkpoint import save_snapshot
    from dmd.generate import DMDGenerator

    student = student_copy(teacher, 0.0, torch.device("cpu"))
    snapshot = tmp_path / "network-snapshot-000001.pt"
    save_snapshot(snapshot, student, generator_sigmas=[80.0], step=1, config={})
    loaded = DMDGenerator(snapshot, device="cpu", vae=str(tiny_vae))
    assert loaded.net.encoder_info == teacher.encoder_info and loaded.latent
    assert loaded.generate_batch(seeds=[0, 1], class_ids=1).shape == (2, 3, 16, 16)
    data = torch.load(snapshot, weights_only=True)
    data["encoder"]["scale"] = [1.0, 0.0, 1.0, 1.0]
    torch.save(data, tmp_path / "bad.pt")
    from dmd.generate import GeneratorLoadError

    with pytest.raises(GeneratorLoadError, match="bad.pt: the encoder's 'scale' holds a zero"):
        DMDGenerator(tmp_path / "bad.pt", device="cpu")
