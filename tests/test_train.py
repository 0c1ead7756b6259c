"""The DMD training loop end to end on a tiny EDM teacher (8x8, 16 channels): outputs, bit-exact resume, crash-safe
checkpoints, non-finite steps, 2-process DDP against one process, and the command line's errors.

LPIPS is replaced by a mean absolute distance here (`MeanAbsDistance`): VGG-16 at 224x224 costs seconds per image
on a shared CPU core, and these tests check the loop, not the metric (tests/test_lpips.py checks LPIPS itself).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dmd.cli import main
from dmd.data import PairWriter, create_pair_file

ROOT = Path(__file__).resolve().parents[1]
TEACHER = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"  # EDMPrecond + SongUNet, 8x8, label_dim 10
LOSSES = ("loss_G", "loss_dm", "loss_reg", "loss_fake", "grad_norm_G", "grad_norm_fake")


# Stand-in for dmd.lpips.LPIPS with its constructor: per-sample mean |x0 - x1| of (N, 3, H, W) images.
class MeanAbsDistance(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, x0, x1):
        return (x0 - x1).abs().flatten(1).mean(dim=1)


@pytest.fixture(autouse=True)
def _cheap_lpips(monkeypatch):
    monkeypatch.setattr("dmd.lpips.LPIPS", MeanAbsDistance)


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # The same for the runs in subprocesses.


def write_pairs(path, n, nan_images=False, resolution=8):
    """A pair file of n random pairs for the tiny conditional teacher (images NaN if asked)."""
    g = torch.Generator().manual_seed(n)
    latents = torch.randn(n, 3, resolution, resolution, generator=g)
    images = torch.full_like(latents, float("nan")) if nan_images else torch.rand(latents.shape, generator=g) * 2 - 1
    labels = torch.randint(10, (n,), generator=g)
    create_pair_file(path, channels=3, resolution=resolution, label_dim=10, seeds=list(range(n)), attrs={})
    with PairWriter(path) as writer:
        writer.append(latents.numpy(), images.numpy(), labels.numpy())
    return path


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.h5", 6)


def train_args(out, pairs=None, *extra):
    """Arguments of a small CPU run of `train`; without pairs the regression loss is off."""
    args = ["train", "--model-path", str(TEACHER), "--output-dir", str(out), "--device", "cpu", "--workers", "0"]
    args += ["--lpips-random", "--log-every", "1", "--image-every", "0", "--checkpoint-every", "0"]
    args += ["--lambda-reg", "0"] if pairs is None else ["--data-path", str(pairs)]
    return args + [str(a) for a in extra]


def run_cli(args, expect_ok=True):
    result = CliRunner().invoke(main, args)
    if expect_ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}") from result.exception
    return result


def read_stats(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_three_step_run_writes_every_output(tmp_path, pairs):
    from dmd.edm.precond import build_network

    out = tmp_path / "run"
    run_cli(
        train_args(out, pairs, "--max-steps", 3, "--batch-size", 2, "--image-every", 3, "--checkpoint-every", 2)
        + ["--keep-last", "1", "--ema-halflife-kimg", "0.01"]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "grid-000003.png",
        "network-snapshot-000003.pt",
        "stats.jsonl",
        "training-state-000003.pt",
    ]
    config = json.loads((out / "config.json").read_text())
    assert (config["max_steps"], config["batch_size"], config["data_path"]) == (3, 2, str(pairs))
    stats = read_stats(out)
    assert [r["step"] for r in stats] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in stats for k in LOSSES) and stats[-1]["kimg"] == 0.006
    assert stats[0]["loss_reg"] > 0 and stats[-1]["bad_steps"] == 0
    grid = __import__("PIL.Image", fromlist=["Image"]).open(out / "grid-000003.png")
    assert grid.height == 5 * (8 + 2) + 2  # rows G(z), mu_real(x_t), mu_fake(x_t), G(z_ref), y_ref

    snapshot = load(out / "network-snapshot-000003.pt")
    state = load(out / "training-state-000003.pt")
    assert (snapshot["format"], snapshot["version"], snapshot["step"], snapshot["sigma_G"]) == (
        "dmd-snapshot",
        1,
        3,
        80,
    )
    assert snapshot["init_kwargs"]["dropout"] == 0 and snapshot["config"] == config
    net = build_network(snapshot["class_name"], snapshot["init_kwargs"])
    net.load_state_dict(snapshot["state_dict"])
    for k, v in snapshot["state_dict"].items():  # The snapshot holds the EMA of G, which lags G.
        assert torch.equal(v, state["G_ema"][k])
    assert not all(torch.equal(state["G"][k], state["G_ema"][k]) for k in state["G"])
    assert state["format"] == "dmd-training-state" and state["data_position"] == {"epoch": 1, "index": 0}
    assert set(state) >= {"G", "mu_fake", "opt_G", "opt_fake", "step", "rng", "config", "sigma_G", "class_name"}


def test_regression_only_run_trains_g_on_mse_and_leaves_mu_fake_alone(tmp_path, pairs):
    from dmd.edm.persistence import load_network

    out = tmp_path / "run"
    run_cli(
        train_args(out, pairs, "--max-steps", 2, "--batch-size", 2, "--image-every", 2)
        + ["--lambda-dm", "0", "--regression-distance", "mse", "--lambda-reg", "1"]
    )
    stats = read_stats(out)
    assert all(r["loss_dm"] == 0 and r["loss_fake"] == 0 and r["grad_norm_fake"] == 0 for r in stats)
    assert all(r["loss_reg"] > 0 and r["loss_G"] == r["loss_reg"] for r in stats)
    state = load(out / "training-state-000002.pt")
    teacher = load_network(TEACHER).state_dict()
    assert all(torch.equal(state["mu_fake"][k], teacher[k]) for k in teacher)
    assert not all(torch.equal(state["G"][k], teacher[k]) for k in teacher)
    grid = __import__("PIL.Image", fromlist=["Image"]).open(out / "grid-000002.png")
    assert grid.height == 3 * (8 + 2) + 2  # rows G(z), G(z_ref), y_ref: no mu_real / mu_fake rows without DM


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, pairs):
    # 6 pairs at batch 2 are 3 steps per epoch, so step 4 also crosses an epoch of the pair sampler.
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(train_args(straight, pairs, "--max-steps", 4, "--batch-size", 2))
    run_cli(train_args(split, pairs, "--max-steps", 2, "--batch-size", 2))
    run_cli(train_args(split, pairs, "--max-steps", 4, "--batch-size", 2, "--resume", "auto"))
    a, b = read_stats(straight), read_stats(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [[r[k] for k in LOSSES] for r in a] == [[r[k] for k in LOSSES] for r in b]
    sa, sb = load(straight / "training-state-000004.pt"), load(split / "training-state-000004.pt")
    for key in ("G", "mu_fake"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])


def test_sigkill_never_leaves_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmd", *train_args(out, None, "--max-steps", 10_000, "--batch-size", 1)]
    cmd[cmd.index("--checkpoint-every") + 1] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught, deadline = False, time.monotonic() + 60
    try:
        while not caught and time.monotonic() < deadline:  # Kill while a checkpoint's temp file is being written.
            caught = len(list(out.glob("training-state-*.pt"))) >= 2 and bool(list(out.glob(".training-state-*.tmp")))
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert caught, "the run never wrote a checkpoint while watched"
    states = sorted(out.glob("training-state-*.pt"))
    assert len(states) >= 2
    for path in states:
        assert load(path)["format"] == "dmd-training-state"
    last = load(states[-1])["step"]
    run_cli(train_args(out, None, "--max-steps", last + 1, "--batch-size", 1, "--resume", "auto"))
    assert load(out / f"training-state-{last + 1:06d}.pt")["step"] == last + 1


def test_ctrl_c_finishes_the_step_and_writes_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmd", *train_args(out, None, "--max-steps", 10_000, "--batch-size", 1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(read_stats(out) if (out / "stats.jsonl").exists() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    last = read_stats(out)[-1]["step"]
    assert [p.name for p in out.glob("training-state-*.pt")] == [f"training-state-{last:06d}.pt"]
    assert f"Stopped by a signal at step {last}; continue with --resume auto" in err.decode()


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2))
    good = load(out / "training-state-000002.pt")
    nan_pairs = write_pairs(tmp_path / "nan.h5", 6, nan_images=True)  # The regression loss becomes NaN.
    args = train_args(out, nan_pairs, "--max-steps", 10, "--batch-size", 2, "--resume", "auto", "--max-bad-steps", 3)
    result = run_cli(args + ["--checkpoint-every", "1"], expect_ok=False)
    assert result.exit_code == 1
    assert "stopping at step 5: 3 steps in a row" in result.output and "training-state-000002.pt" in result.output
    assert [(r["step"], r["bad_steps"]) for r in read_stats(out)] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert [p.name for p in sorted(out.glob("training-state-*.pt"))] == ["training-state-000002.pt"]
    kept = load(out / "training-state-000002.pt")
    assert all(torch.equal(kept["G"][k], good["G"][k]) for k in good["G"])


def test_two_process_ddp_matches_one_process(tmp_path, pairs):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_args(one, pairs, "--max-steps", 2, "--batch-size", 2))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = ddp + [str(Path(__file__))] + train_args(two, pairs, "--max-steps", 2, "--batch-size", 1)
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_stats(one), read_stats(two)
    assert [r["step"] for r in b] == [1, 2]
    np.testing.assert_allclose(
        [[r[k] for k in LOSSES] for r in b], [[r[k] for k in LOSSES] for r in a], rtol=1e-5, atol=1e-6
    )
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    for k in sa["G"]:
        torch.testing.assert_close(sb["G"][k], sa["G"][k], rtol=1e-5, atol=1e-6)


# Stand-in for the Inception detector: 16 pixel values as features, scripted like the real one.
class PixelFeatures(torch.nn.Module):
    def forward(self, x, return_features: bool = True):
        return x.float().flatten(1)[:, :16] / 255


def test_fid_every_logs_fid_and_keeps_the_best_snapshot(tmp_path):
    from dmd.fid import save_ref

    detector = tmp_path / "detector.pt"
    torch.jit.script(PixelFeatures()).save(str(detector))
    g = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    save_ref(g.uniform(0.3, 0.7, 16), np.eye(16) * 0.05, ref)
    out = tmp_path / "run"
    args = ["--fid-every", 1, "--fid-num", 8, "--fid-ref", ref, "--fid-detector", detector, "--lr-gen", 1e-2]
    run_cli(train_args(out, None, "--max-steps", 3, "--batch-size", 2, *args))
    fids = [(r["step"], r["fid"]) for r in read_stats(out) if "fid" in r]
    assert [step for step, _ in fids] == [1, 2, 3] and len({fid for _, fid in fids}) == 3
    best_step, best = min(fids, key=lambda f: f[1])
    assert load(out / "network-snapshot-best.pt")["step"] == best_step
    assert load(out / "training-state-000003.pt")["best_fid"] == best


def test_readme_command_runs_epochs(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.h5", 64)
    out = tmp_path / "run"
    args = ["train", "--model-path", str(TEACHER), "--data-path", str(pairs), "--output-dir", str(out)]
    run_cli(args + ["--epochs", "2", "--batch-size", "32", "--device", "cpu", "--workers", "0", "--lpips-random"])
    assert load(out / "training-state-000004.pt")["data_position"] == {"epoch": 2, "index": 0}


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path, pairs):
    result = run_cli(train_args(tmp_path / "run", pairs, "--max-steps", 5, "--dry-run"))
    assert json.loads(result.output)["max_steps"] == 5
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model-path", "missing.pkl"], "--model-path"),
        (["--data-path", "missing.h5"], "--data-path"),
        (["--data-path", "WRONG_RES"], "--data-path: pair file"),
        (["--resume", "missing-state.pt"], "--resume: missing-state.pt does not exist"),
        (["--precision", "bf16"], "--precision bf16 needs a CUDA device"),
        (["--batch-size", "7"], "--batch-size: 6 pairs hold no batch of 7"),
        (["--epochs", "1"], "give exactly one of --max-steps and --epochs"),
    ],
)
def test_bad_inputs_give_one_clear_error(tmp_path, pairs, change, message):
    if "WRONG_RES" in change:
        change = ["--data-path", str(write_pairs(tmp_path / "res16.h5", 6, resolution=16))]
    args = train_args(tmp_path / "run", pairs, "--max-steps", 1) + change
    result = run_cli(args, expect_ok=False)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


if __name__ == "__main__":  # Entry point of the DDP test's torchrun workers, with the same LPIPS stand-in.
    import dmd.lpips

    dmd.lpips.LPIPS = MeanAbsDistance
    main(sys.argv[1:])
