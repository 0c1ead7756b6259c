"""An EDM2 latent teacher end to end (the fixture edm2_latent_cond: 4-channel 8x8 latents, with a tiny random VAE
standing in for Stable Diffusion's): make-pairs stores latents and says so, DMD trains in latent space with its grids
decoded and resumes bit for bit, and the student's samples come out of generate and fid calc as decoded pixels. Two
processes against one on latents: tests/test_train_latent_real.py."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_train import load, read_stats, run_cli
from test_train_edm2 import PixelFeatures

from dmd.data import PairDataset, read_pair_attrs

LATENT = Path(__file__).parent / "fixtures" / "edm2" / "edm2_latent_cond.pkl"
LOSSES = ("loss_G", "loss_dm", "loss_reg", "loss_fake", "grad_norm_G", "grad_norm_fake")


def latent_args(out, pairs, vae, *extra):
    """A small CPU DMD run on the latent teacher: regression (MSE, in latent space) on `pairs` plus DM."""
    args = ["train", "--network", str(LATENT), "--data-path", str(pairs), "--vae", str(vae)]
    args += ["--output-dir", str(out), "--device", "cpu", "--workers", "0", "--log-every", "1", "--no-progress"]
    args += ["--image-every", "0", "--checkpoint-every", "0", "--batch-size", "2", "--lr-gen", "1e-3"]
    args += ["--regression-distance", "mse", "--lr-fake", "1e-3"]
    return args + [str(a) for a in extra]


def make_latent_pairs(tmp_path, num=4):
    out = tmp_path / "pairs.h5"
    args = ["make-pairs", "--network", str(LATENT), "--out", str(out), "--num", str(num), "--steps", "2"]
    run_cli(args + ["--device", "cpu", "--no-progress"])
    return out


def test_a_latent_teacher_distils_in_latent_space_with_decoded_grids(tmp_path, tiny_vae):
    pairs = make_latent_pairs(tmp_path)
    attrs = read_pair_attrs(pairs)
    assert attrs["space"] == "latents of stabilityai/sd-vae-ft-mse" and attrs["channels"] == 4
    _, y, _ = PairDataset(pairs)[0]
    assert y.shape == (4, 8, 8) and y.abs().max() > 1  # the teacher's latents, not clamped to a pixel range

    out = tmp_path / "run"
    run_cli(latent_args(out, pairs, tiny_vae, "--max-steps", 2, "--image-every", 1))
    grid = Image.open(out / "grid-000002.png")
    assert grid.size[0] > 2 * 16 and len(read_stats(out)) == 2  # rows of 16x16 decoded images
    state = load(out / "training-state-000002.pt")
    assert state["encoder"]["class_name"] == "StabilityVAEEncoder"

    lpips = latent_args(tmp_path / "lpips", pairs, tiny_vae, "--max-steps", 1, "--regression-distance", "lpips")
    lpips = run_cli(lpips, False)
    assert lpips.exit_code == 1 and "give --regression-distance mse" in lpips.output
    missing = run_cli(latent_args(tmp_path / "novae", pairs, tmp_path / "no-vae", "--max-steps", 1), False)
    assert missing.exit_code == 1 and "Error: --vae " in missing.output and "no such folder" in missing.output


def test_a_latent_run_resumes_bit_for_bit(tmp_path, tiny_vae):
    pairs = make_latent_pairs(tmp_path)
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli(latent_args(whole, pairs, tiny_vae, "--max-steps", 3))
    run_cli(latent_args(split, pairs, tiny_vae, "--max-steps", 2))
    run_cli(["train", "--output-dir", str(split), "--resume", "auto", "--max-steps", "3", "--no-progress"])
    assert [[r[k] for k in LOSSES] for r in read_stats(split)] == [[r[k] for k in LOSSES] for r in read_stats(whole)]
    a, b = load(whole / "training-state-000003.pt"), load(split / "training-state-000003.pt")
    for key in ("G", "mu_fake"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_a_latent_student_generates_pngs_and_is_scored_on_decoded_pixels(tmp_path, tiny_vae):
    from dmd.fid import calc_fid, save_ref

    pairs = make_latent_pairs(tmp_path)
    out = tmp_path / "run"
    run_cli(latent_args(out, pairs, tiny_vae, "--max-steps", 1))
    png = tmp_path / "png"
    args = ["generate", "--network", str(out), "--output-dir", str(png), "--seeds", "0-3", "--class-balanced"]
    args += ["--vae", str(tiny_vae)]
    run_cli(args + ["--device", "cpu", "--no-progress"])
    files = sorted(png.glob("*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (16, 16) and Image.open(files[0]).mode == "RGB"
    detector = tmp_path / "detector.pt"
    torch.jit.script(PixelFeatures()).save(str(detector))
    save_ref(np.zeros(16), np.eye(16), tmp_path / "ref.npz")
    kwargs = dict(network=out, num=4, detector=str(detector), device="cpu", progress=False)
    score = calc_fid(tmp_path / "ref.npz", vae=str(tiny_vae), **kwargs)[0]
    # The generator's images are scored decoded and quantised: the pixels of its PNGs (labels seed % 10 in both).
    kwargs.update(network=None, images=png)
    assert np.isfinite(score) and calc_fid(tmp_path / "ref.npz", **kwargs)[0] == score
