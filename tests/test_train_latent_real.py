"""DMD2 on a latent EDM2 teacher (the fixture edm2_latent_cond, 4 channels) with EDM2's encoded latents as real data:
the discriminator sees final latents drawn with the step's eps, the run resumes bit for bit and two processes equal
one, and pixel data for a latent teacher (or latents for a pixel one) is one line."""

import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import LOSSES, ONE_THREAD_ENV, ROOT, assert_same_updates, load, one_error_line, read_stats, run_cli

from dmd.batches import draw_noise
from dmd.edm.persistence import load_network
from dmd.edm2.vae import latent_info
from dmd.encoded import write_encoded_dataset
from dmd.images import write_image_dataset

EDM2 = Path(__file__).parent / "fixtures" / "edm2"
LATENT, PIXEL = EDM2 / "edm2_latent_cond.pkl", EDM2 / "edm2_img_cond.pkl"
KEYS = [*LOSSES, "loss_gan", "loss_disc"]


@pytest.fixture
def latents(tmp_path):
    """16 raw 8x8 latents (mean then std of 4 channels) with labels, in EDM2's encoded format (a zip)."""
    g = np.random.default_rng(5)
    raw = np.concatenate([g.standard_normal((16, 4, 8, 8)) * 3, g.uniform(0.05, 0.3, (16, 4, 8, 8))], axis=1)
    write_encoded_dataset(tmp_path / "img8-sd.zip", raw, np.arange(16) % 10)
    return tmp_path / "img8-sd.zip"


@pytest.fixture
def latent_args(tiny_vae):
    return partial(dmd2_latent_args, vae=tiny_vae)


def dmd2_latent_args(out, real, *extra, vae):
    """A small DMD2 run on the latent teacher (decoding through `vae`): GAN on, two fake-score steps, a two-step
    generator."""
    args = ["train", "--network", str(LATENT), "--vae", str(vae), "--output-dir", str(out), "--device", "cpu"]
    args += ["--workers", "0"]
    args += ["--log-every", "1", "--no-progress", "--image-every", "0", "--checkpoint-every", "0"]
    args += ["--recipe", "dmd2", "--real-data", str(real), "--fake-steps-per-gen", "2", "--batch-size", "2"]
    args += ["--generator-sigmas", "80,1.5", "--lr-gen", "1e-3", "--lr-fake", "1e-3"]
    return args + [str(a) for a in extra]


def test_the_discriminator_sees_final_latents_with_the_steps_eps(tmp_path, latents, latent_args, monkeypatch):
    """Every real batch reaches the GAN as (mean + std eps) scale + bias of raw entries of the zip, with eps the
    step's draw_noise(seed, step, 'real-eps{k}'); hand-computed from the zip's entries."""
    from dmd import gan

    seen = []
    discriminator = gan.GANLoss.discriminator

    def spy(self, x_fake, c_fake, x_real, c_real, **kwargs):
        seen.append((x_real.clone(), c_real.clone()))
        return discriminator(self, x_fake, c_fake, x_real, c_real, **kwargs)

    monkeypatch.setattr(gan.GANLoss, "discriminator", spy)
    run_cli(latent_args(tmp_path / "run", latents, "--max-steps", 1, "--seed", 7))
    stats = read_stats(tmp_path / "run")
    assert len(stats) == 1 and all(r["loss_disc"] > 0 and np.isfinite(r["loss_disc"]) for r in stats)
    from dmd.encoded import EncodedDataset

    data, info = EncodedDataset(latents), latent_info(load_network(LATENT))
    scale, bias = np.float32(info.scale)[:, None, None], np.float32(info.bias)[:, None, None]
    raws = np.stack([data[i][0].numpy() for i in range(16)])
    assert len(seen) == 2  # 2 fake-score steps
    for k, (x_real, c_real) in enumerate(seen):
        eps = draw_noise(7, 0, f"real-eps{k}", (2, 4, 8, 8), slice(None), "cpu").numpy()
        assert x_real.shape == (2, 4, 8, 8)
        for row in range(2):
            label = int(c_real[row].argmax())
            candidates = [i for i in range(16) if i % 10 == label]  # the entries of that label
            hand = [(raws[i, :4] + raws[i, 4:] * eps[row]) * scale + bias for i in candidates]
            errors = [np.abs(x_real[row].numpy() - h).max() for h in hand]
            assert min(errors) < 1e-5, (k, row, errors)
    assert load(tmp_path / "run" / "training-state-000001.pt")["real_position"] == {"epoch": 0, "index": 2}


def test_dmd2_on_latents_resumes_bit_for_bit(tmp_path, latents, latent_args):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli(latent_args(whole, latents, "--max-steps", 3))
    run_cli(latent_args(split, latents, "--max-steps", 2))
    run_cli(["train", "--output-dir", str(split), "--resume", "auto", "--max-steps", "3", "--no-progress"])
    assert [[r[k] for k in KEYS] for r in read_stats(split)] == [[r[k] for k in KEYS] for r in read_stats(whole)]
    a, b = load(whole / "training-state-000003.pt"), load(split / "training-state-000003.pt")
    for key in ("G", "mu_fake", "head"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key


def test_two_processes_draw_the_eps_of_one(tmp_path, latents, latent_args):
    """Each rank turns its rows of the real batch into final latents with its rows of the global batch's eps."""
    from dmd.build import student_copy

    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(latent_args(one, latents, "--max-steps", 1))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dmd"]
    args = latent_args(two, latents, "--max-steps", 1)
    args[args.index("--batch-size") + 1] = "1"
    proc = subprocess.run(ddp + args, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("loss_G", "loss_gan", "loss_fake", "loss_disc")  # the gradient norms differ by float sums (1e-3 rel.)
    np.testing.assert_allclose(
        [[r[k] for k in keys] for r in read_stats(two)], [[r[k] for k in keys] for r in read_stats(one)], rtol=1e-5
    )
    start = student_copy(load_network(LATENT), 0.0, torch.device("cpu")).state_dict()
    a, b = load(one / "training-state-000001.pt"), load(two / "training-state-000001.pt")
    assert_same_updates(a, b, dict(G=start, mu_fake=start))


def test_pixels_for_a_latent_teacher_and_latents_for_a_pixel_one_are_one_line(tmp_path, latents, latent_args):
    images = tmp_path / "img8.zip"
    write_image_dataset(images, np.zeros((4, 8, 8, 3), np.uint8), labels=[0, 1, 2, 3])
    result = run_cli(latent_args(tmp_path / "a", images, "--max-steps", 1), expect_ok=False)
    one_error_line(
        result,
        f"--real-data: real images {images} are pixels but the teacher runs on the latents of the VAE "
        "stabilityai/sd-vae-ft-mse",
        f"`python -m dmd make-dataset {images} {tmp_path / 'img8-sd.zip'} --encode --vae stabilityai/sd-vae-ft-mse`",
    )
    pixel = latent_args(tmp_path / "b", latents, "--max-steps", 1)
    pixel[pixel.index(str(LATENT))] = str(PIXEL)
    one_error_line(
        run_cli(pixel, expect_ok=False), f"--real-data: real data {latents} are VAE latents", "pixel-space network"
    )
    flipped = run_cli(latent_args(tmp_path / "c", latents, "--max-steps", 1, "--xflip"), expect_ok=False)
    one_error_line(flipped, "--xflip:", "a mirrored latent is not the latent of the mirrored image")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_bad_entry_stops_training_with_one_line(tmp_path, latents, latent_args):
    import zipfile

    bad = tmp_path / "bad-sd.zip"
    with zipfile.ZipFile(latents) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:-8] if name.endswith(".npy") and name != src.namelist()[0] else data)
    result = run_cli(latent_args(tmp_path / "run", bad, "--max-steps", 1), expect_ok=False)
    one_error_line(result, "--real-data:", f"{bad}/00000/img-mean-std-", "bytes of data", after_output=True)
