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
from conftest import write_pairs

import dmd.lpips
from dmd.cli import main
from dmd.config import ConfigError, TrainConfig

REAL_LPIPS = dmd.lpips.LPIPS  # Kept before the stand-in below replaces it in every test.

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
        ".dmd-train.lock",  # the run's lock, stale once it ended
        "config.json",
        "grid-000003.png",
        "log.txt",
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
    assert grid.height == 24 + 2 * 24 + 5 * (64 + 2) + 2  # title, 2 class bands, rows G(z) ... G(z_ref), y_ref

    snapshot = load(out / "network-snapshot-000003.pt")
    state = load(out / "training-state-000003.pt")
    assert (snapshot["format"], snapshot["version"], snapshot["step"], snapshot["sigma_G"]) == (
        "dmd-snapshot",
        2,
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
    assert grid.height == 24 + 2 * 24 + 3 * (64 + 2) + 2  # title, bands, G(z), G(z_ref), y_ref: no mu rows w/o DM


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


# The LPIPS stand-in gone bad: every regression loss is NaN.
class NaNDistance(MeanAbsDistance):
    def forward(self, x0, x1):
        return super().forward(x0, x1) * float("nan")


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, pairs, monkeypatch):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2))
    good = load(out / "training-state-000002.pt")
    monkeypatch.setattr("dmd.lpips.LPIPS", NaNDistance)
    args = train_args(out, pairs, "--max-steps", 10, "--batch-size", 2, "--resume", "auto", "--max-bad-steps", 3)
    result = run_cli(args + ["--checkpoint-every", "1"], expect_ok=False)
    assert result.exit_code == 1
    assert "stopping at step 5: 3 steps in a row" in result.output and "training-state-000002.pt" in result.output
    assert [(r["step"], r["bad_steps"]) for r in read_stats(out)] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert [p.name for p in sorted(out.glob("training-state-*.pt"))] == ["training-state-000002.pt"]
    kept = load(out / "training-state-000002.pt")
    assert all(torch.equal(kept["G"][k], good["G"][k]) for k in good["G"])


def assert_same_updates(state_a, state_b, starts):
    """Two runs of the same steps (1 process and 2, say) made the same weight updates, up to float sums.

    Adam moves each weight by about lr times the sign of its gradient, so the few weights whose gradient is at the
    level of float-sum noise may move the other way (each such flip changes the update by up to 2 lr per step;
    0.15% of the update's norm seen); any real difference (other data, a gradient not averaged over ranks) changes
    the update as a whole. 1% of its norm separates the two. An elementwise bound cannot: how many weights flip
    depends on the CPU's instruction set. `starts` maps state keys to the weights the runs started from.
    """
    for key, start in starts.items():
        step_a = torch.cat([(state_a[key][k] - start[k]).flatten() for k in start])
        step_b = torch.cat([(state_b[key][k] - start[k]).flatten() for k in start])
        assert (step_b - step_a).norm() < 0.01 * step_a.norm(), key


def test_two_process_ddp_matches_one_process(tmp_path, pairs):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_args(one, pairs, "--max-steps", 2, "--batch-size", 2))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = ddp + [str(Path(__file__))] + train_args(two, pairs, "--max-steps", 2, "--batch-size", 1)
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr  # torch's deprecation of broadcast_buffers filled every log
    a, b = read_stats(one), read_stats(two)
    assert [r["step"] for r in b] == [1, 2]
    np.testing.assert_allclose(
        [[r[k] for k in LOSSES] for r in b], [[r[k] for k in LOSSES] for r in a], rtol=1e-5, atol=1e-6
    )
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state()))


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


def test_fid_inputs_are_opened_and_checked_before_any_work(tmp_path):
    """A dry run loads the detector and the reference and checks them against each other and the teacher; without
    --fid-ref a teacher that is not CIFAR-10's shape is refused (its "best" snapshot was chosen against CIFAR-10)."""
    from dmd.fid import save_ref

    detector = tmp_path / "detector.pt"
    torch.jit.script(PixelFeatures()).save(str(detector))  # 16 features
    ref16, ref8 = tmp_path / "ref16.npz", tmp_path / "ref8.npz"
    save_ref(np.zeros(16), np.eye(16), ref16)
    save_ref(np.zeros(8), np.eye(8), ref8)
    base = train_args(tmp_path / "run", None, "--max-steps", 1, "--batch-size", 2, "--fid-every", 1, "--dry-run")
    cases = [
        (["--fid-detector", detector], "--fid-every needs --fid-ref for this teacher (8x8, 3 channels, 10 classes)"),
        (["--fid-detector", detector, "--fid-ref", ref8], "--fid-ref holds statistics of 8-d features but"),
        (["--fid-detector", detector, "--fid-ref", tmp_path / "none.npz"], "--fid-ref: no such file"),
        (["--fid-detector", tmp_path / "none.pt", "--fid-ref", ref16], "--fid-detector: detector: no such file"),
    ]
    for extra, message in cases:
        one_error_line(run_cli([*base, *map(str, extra)], expect_ok=False), message)
    assert json.loads(run_cli([*base, "--fid-detector", str(detector), "--fid-ref", str(ref16)]).output)["fid_every"]
    assert not (tmp_path / "run").exists()


def test_readme_command_runs_epochs(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.h5", 64)
    out = tmp_path / "run"
    args = ["train", "--model-path", str(TEACHER), "--data-path", str(pairs), "--output-dir", str(out)]
    run_cli(args + ["--epochs", "2", "--batch-size", "32", "--device", "cpu", "--workers", "0", "--lpips-random"])
    assert load(out / "training-state-000004.pt")["data_position"] == {"epoch": 2, "index": 0}


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path, pairs):
    result = run_cli(train_args(tmp_path / "run", pairs, "--max-steps", 5, "--batch-size", 2, "--dry-run"))
    assert json.loads(result.output)["max_steps"] == 5
    assert not (tmp_path / "run").exists()


def test_dry_run_checks_the_teacher_against_the_pairs(tmp_path):
    # As EDM's --dry-run does, the inputs are opened and checked before the config is printed.
    wrong = write_pairs(tmp_path / "res16.h5", 6, resolution=16)
    result = run_cli(train_args(tmp_path / "run", wrong, "--max-steps", 5, "--batch-size", 2, "--dry-run"), False)
    assert result.exit_code == 1 and "--data-path: pair file" in result.output and "resolution 16" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_row_is_one_line_also_from_dataloader_workers(tmp_path, workers):
    """A NaN pair row, or an unreadable real image, is found as it is read: one line naming the flag and the row or
    file, also when a worker process read it (torch put the worker's 23-line traceback inside the message)."""
    import h5py

    from dmd.images import write_image_dataset

    nan_pairs = write_pairs(tmp_path / "nan.h5", 6)
    with h5py.File(nan_pairs, "r+") as f:  # past the writer's own check of every row it appends
        f["images"][3] = np.nan
    bad_real = tmp_path / "bad"
    write_image_dataset(bad_real, np.zeros((5, 8, 8, 3), np.uint8), labels=[0, 1, 2, 3, 4])
    (bad_real / "00000" / "img00000004.png").write_bytes(b"not a png")
    cases = [
        (train_args(tmp_path / "a", nan_pairs), ["--data-path: pair file", "row ", "NaN or inf"]),
        (
            dmd2_args(tmp_path / "b", bad_real),
            ["--real-data: ", "img00000004.png: not a PNG image"],
        ),
    ]
    for args, fragments in cases:
        args = [*args, "--max-steps", "3", "--batch-size", "2"]
        args[args.index("--workers") + 1] = str(workers)
        line = one_error_line(run_cli(args, expect_ok=False), *fragments, after_output=True)
        assert "Traceback" not in line and "worker" not in line and len(line) < 300


def test_generator_sigmas_outside_the_teachers_range_are_refused(tmp_path):
    vp = TEACHER.parent / "vp_ddpmpp_cond.pkl"  # VPPrecond: sigma from ~0.001 to ~152
    args = train_args(tmp_path / "run", None, "--max-steps", 1, "--generator-sigmas", "500,1.5", "--dry-run")
    args[args.index("--model-path") + 1] = str(vp)
    one_error_line(
        run_cli(args, expect_ok=False), "--generator-sigmas: noise levels [500, 1.5] leave the network's range"
    )
    assert not (tmp_path / "run").exists()


def test_out_of_range_flags_are_refused_by_the_parser_naming_them(tmp_path, pairs):
    # --help shows the range the command accepts (0<x<=1), and the parser refuses what lies outside it.
    result = run_cli(train_args(tmp_path / "run", pairs, "--max-steps", 1, "--lr-gen", "1e39"), expect_ok=False)
    assert (
        result.exit_code == 2
        and "Error: Invalid value for '--lr-gen': 1e+39 is not in the range 0<x<=1" in result.output
    )
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--lr-gen and --lr-fake must be at most 1"):  # the Python API's check
        TrainConfig(model_path="m", output_dir="o", max_steps=1, lambda_reg=0, lr_gen=1e39)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model-path", "missing.pkl"], "--network"),
        (["--data-path", "missing.h5"], "--data-path"),
        (["--data-path", "WRONG_RES"], "--data-path: pair file"),
        (["--resume", "missing-state.pt"], "--resume: missing-state.pt does not exist"),
        (["--reg-batch-size", "7"], "--reg-batch-size: 6 pairs hold no batch of 7"),
        (["--batch-size", "7"], "--batch-size: 6 pairs hold no batch of 7"),
        (["--epochs", "1"], "give exactly one of --max-steps and --epochs"),
        (["--lr-fake", "nan"], "--lr-fake must be a finite number"),
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


def test_bf16_step_is_close_to_the_fp32_step(tmp_path, pairs):
    # bf16 keeps 8 significant bits (a rounding of 2^-9 = 0.2% per operation) inside the U-Nets only; losses, the DM
    # normalisation and AdamW stay fp32. So losses and gradient norms agree to about a percent. Adam's first steps
    # move each weight by about lr times the sign of its gradient, and bf16 flips the sign of only the smallest
    # gradient entries: the two runs' updates of G point the same way (cosine 0.97 measured; a broken bf16 path,
    # e.g. one that used other weights or inputs, would be near 0).
    from dmd.edm.persistence import load_network

    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2, "--precision", precision))
        runs[precision] = read_stats(out), load(out / "training-state-000002.pt")
    (stats32, state32), (stats16, state16) = runs["fp32"], runs["bf16"]
    assert all(np.isfinite(r[k]) for r in stats16 for k in LOSSES)
    for k in ("loss_G", "loss_reg", "loss_fake", "grad_norm_G", "grad_norm_fake"):
        assert stats16[0][k] == pytest.approx(stats32[0][k], rel=0.02), k
    teacher = load_network(TEACHER).state_dict()
    for net in ("G", "mu_fake"):
        step32, step16 = (torch.cat([(s[net][k] - teacher[k]).flatten() for k in teacher]) for s in (state32, state16))
        assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.9, net
        assert step16.norm() == pytest.approx(step32.norm().item(), rel=0.02)
    for key in ("opt_G", "opt_fake"):  # fp32 master weights and optimiser state
        assert all(v.dtype == torch.float32 for st in state16[key]["state"].values() for v in st.values() if v.ndim)


# ----------------------------------------------------------------------------------------------------------------------
# DMD2: the recipe, the GAN on real images, the few-step generator with backward simulation.


def load_network_state():
    """The fixture teacher's state dict: where G and mu_fake start."""
    from dmd.edm.persistence import load_network

    return load_network(TEACHER).state_dict()


def initial_head_state(seed=0):
    """The discriminator head a run of `seed` starts from (drawn from its own seeded stream on every rank)."""
    from dmd.batches import step_seed
    from dmd.edm.persistence import load_network
    from dmd.gan import DiscriminatorHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, 0, "head"))
        return DiscriminatorHead.for_network(load_network(TEACHER)).state_dict()


def dmd2_args(out, real, *extra):
    """A small DMD2 run: the dmd2 recipe (no pairs, GAN on), two fake-score steps, a two-step generator."""
    args = train_args(out, None, "--recipe", "dmd2", "--real-data", real, "--fake-steps-per-gen", 2, *extra)
    i = args.index("--lambda-reg")
    del args[i : i + 2]  # the recipe sets it
    return args + ["--generator-sigmas", "80,1.5", "--batch-size", "2", "--lr-gen", "1e-3", "--lr-fake", "1e-3"]


def test_dmd2_recipe_trains_a_two_step_generator_with_the_gan(tmp_path, real):
    from dmd.generate import DMDGenerator

    out = tmp_path / "run"
    run_cli(dmd2_args(out, real, "--max-steps", 3))
    config = json.loads((out / "config.json").read_text())
    expected = dict(recipe="dmd2", lambda_reg=0.0, gan_weight_gen=3e-3, gan_weight_disc=1e-2, fake_steps_per_gen=2)
    assert {k: config[k] for k in expected} == expected and config["generator_sigmas"] == [80.0, 1.5]
    assert config["lr_gen"] == 1e-3  # explicit flags override the recipe (its lr is 2e-6)
    stats = read_stats(out)
    assert all(r["loss_gan"] > 0 and r["loss_disc"] > 0 and r["loss_reg"] == 0 for r in stats)
    state = load(out / "training-state-000003.pt")
    assert state["head"] is not None and state["real_position"] == {"epoch": 0, "index": 6}
    assert state["data_position"] is None and set(state["fingerprints"]) == {"teacher", "real"}
    # The head joins mu_fake's AdamW: one group holding both.
    from dmd.edm.persistence import load_network

    num_params = len(list(load_network(TEACHER).parameters())) + len(state["head"])  # the head has no buffers
    assert [len(g["params"]) for g in state["opt_fake"]["param_groups"]] == [num_params]
    snapshot = load(out / "network-snapshot-000003.pt")
    assert snapshot["generator_sigmas"] == [80.0, 1.5] and snapshot["sigma_G"] == 80.0
    assert DMDGenerator(out / "network-snapshot-000003.pt", device="cpu").sigmas == [80.0, 1.5]


def test_dmd2_resume_is_bit_exact(tmp_path, real):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(dmd2_args(straight, real, "--max-steps", 4))
    run_cli(dmd2_args(split, real, "--max-steps", 2))
    run_cli(dmd2_args(split, real, "--max-steps", 4, "--resume", "auto"))
    keys = [*LOSSES, "loss_gan", "loss_disc"]
    assert [[r[k] for k in keys] for r in read_stats(split)] == [[r[k] for k in keys] for r in read_stats(straight)]
    sa, sb = load(straight / "training-state-000004.pt"), load(split / "training-state-000004.pt")
    for key in ("G", "mu_fake", "head"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key


def test_dmd2_two_process_ddp_matches_one_process(tmp_path, real):
    one, two = tmp_path / "one", tmp_path / "two"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(Path(__file__))]
    # At the default lr (Adam's steps, about lr each, turn float-sum differences of near-zero gradients into
    # weight differences of up to about 1% of lr), as the one-step DDP test runs.
    lr = ["--lr-gen", "5e-5", "--lr-fake", "5e-5"]
    run_cli(dmd2_args(one, real, "--max-steps", 2) + lr)
    args = dmd2_args(two, real, "--max-steps", 2) + lr + ["--batch-size", "1"]
    proc = subprocess.run(ddp + args, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [*LOSSES, "loss_gan", "loss_disc"]
    a, b = read_stats(one), read_stats(two)
    np.testing.assert_allclose(
        [[r[k] for k in keys] for r in b], [[r[k] for k in keys] for r in a], rtol=1e-5, atol=1e-6
    )  # the one-step DDP test's tolerances: float sums in another order
    sa, sb = load(one / "training-state-000002.pt"), load(two / "training-state-000002.pt")
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state(), head=initial_head_state()))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--gan-weight-gen", "0"], "--gan-weight-gen and --gan-weight-disc: both > 0 (GAN on) or both 0"),
        (["--lambda-dm", "0", "--lambda-reg", "1", "--data-path", "PAIRS"], "the GAN trains in the fake-score step"),
        (["--generator-sigmas", "1.5,80"], "--generator-sigmas: noise levels must be strictly decreasing"),
        (["--generator-sigmas", "80,x"], "is not a comma-separated list of numbers"),
    ],
)
def test_dmd2_bad_settings_name_the_flag(tmp_path, real, pairs, change, message):
    change = [str(pairs) if c == "PAIRS" else c for c in change]
    result = run_cli(dmd2_args(tmp_path / "run", real, "--max-steps", 1) + change, expect_ok=False)
    assert result.exit_code != 0 and message in result.output, result.output


def test_gan_needs_real_data_that_fits_the_teacher(tmp_path):
    from dmd.images import write_image_dataset

    result = run_cli(train_args(tmp_path / "run", None, "--max-steps", 1, "--recipe", "dmd2"), expect_ok=False)
    one_error_line(result, "the GAN needs real images: give --real-data")
    gray = tmp_path / "gray.zip"
    write_image_dataset(gray, np.zeros((4, 8, 8, 1), np.uint8), labels=[0, 1, 2, 3])
    args = train_args(tmp_path / "run", None, "--max-steps", 1, "--recipe", "dmd2", "--real-data", gray)
    one_error_line(run_cli(args, expect_ok=False), "--real-data:", "gray.zip")


# ----------------------------------------------------------------------------------------------------------------------
# Run folders and resume: a run is never overwritten, and a resume continues the same run or says why it cannot.


def folder_bytes(run_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir())}


def one_error_line(result, *fragments, after_output=False):
    """The one `Error:` line a failed command prints: its whole output, or (after_output) one line among its output
    (the click runner does not keep the order of stdout and stderr)."""
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 or after_output, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output
    return errors[0]


def test_output_dir_holding_a_run_is_refused_and_left_alone(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2, "--checkpoint-every", 1))
    before = folder_bytes(out)
    result = run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2), expect_ok=False)
    one_error_line(result, f"--output-dir {out} already holds a run", "--resume auto", "another --output-dir")
    assert folder_bytes(out) == before


def test_resume_path_into_a_folder_with_later_states_is_refused(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 3, "--batch-size", 2, "--checkpoint-every", 1, "--keep-last", 0))
    before = folder_bytes(out)
    old = out / "training-state-000001.pt"
    result = run_cli(train_args(out, pairs, "--max-steps", 3, "--batch-size", 2, "--resume", old), expect_ok=False)
    one_error_line(result, "holds later states (training-state-000003.pt)", "new --output-dir")
    assert folder_bytes(out) == before
    # Into a new folder the same state resumes, and repeats the original run's steps 2 and 3.
    fork = tmp_path / "fork"
    run_cli(train_args(fork, pairs, "--max-steps", 3, "--batch-size", 2, "--resume", old))
    assert [[r[k] for k in LOSSES] for r in read_stats(fork)] == [[r[k] for k in LOSSES] for r in read_stats(out)[1:]]


@pytest.mark.parametrize(
    "change, fragments",
    [
        (["--lr-gen", "1e-4"], ["--lr-gen 5e-05 -> 0.0001", "--allow-change lr-gen"]),
        (["--lambda-reg", "0.5", "--fake-steps-per-gen", "2"], ["--fake-steps-per-gen 1 -> 2", "--lambda-reg 0.25"]),
        (["--t-min", "0.1"], ["--t-min 0.02 -> 0.1"]),
        (["--seed", "1"], ["--seed cannot change within a run"]),
        (["--batch-size", "3"], ["global batch of 2", "this run has 3"]),
        (["--allow-change", "seed", "--seed", "1"], ["--allow-change seed: that setting cannot change within a run"]),
        (["--allow-change", "nonsense"], ["--allow-change nonsense: no such setting"]),
    ],
)
def test_resume_refuses_other_settings_naming_the_flags(tmp_path, pairs, change, fragments):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    before = folder_bytes(out)
    batch = [] if "--batch-size" in change else ["--batch-size", 2]
    args = train_args(out, pairs, "--max-steps", 2, *batch, "--resume", "auto", *change)
    one_error_line(run_cli(args, expect_ok=False), *fragments)
    assert folder_bytes(out) == before


def test_resume_refuses_another_teacher_or_pair_file(tmp_path, pairs):
    from dmd.edm.persistence import load_network
    from dmd.edm.writer import save_network_pickle

    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    teacher = load_network(TEACHER)
    with torch.no_grad():
        teacher.model.map_layer0.bias.add_(0.01)  # Same architecture, other weights.
    other_teacher = tmp_path / "other.pkl"
    save_network_pickle(teacher, other_teacher)
    other_pairs = write_pairs(tmp_path / "other.h5", 7)
    resume = ["--max-steps", 2, "--batch-size", 2, "--resume", "auto"]
    args = train_args(out, pairs, *resume)
    args[args.index("--model-path") + 1] = str(other_teacher)
    one_error_line(run_cli(args, expect_ok=False), "another teacher file than --network gives")
    one_error_line(run_cli(train_args(out, other_pairs, *resume), False), "another pairs file than --data-path")
    # A copy of the same teacher elsewhere is the same teacher.
    copy = tmp_path / "copy.pkl"
    copy.write_bytes(TEACHER.read_bytes())
    args[args.index("--model-path") + 1] = str(copy)
    run_cli(args)


def test_allowed_change_reaches_the_optimiser_and_is_recorded(tmp_path, pairs):
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    run_cli(train_args(straight, pairs, "--max-steps", 3, "--batch-size", 2, "--checkpoint-every", 1))
    run_cli(train_args(changed, pairs, "--max-steps", 2, "--batch-size", 2))
    args = train_args(changed, pairs, "--max-steps", 3, "--batch-size", 2, "--resume", "auto", "--lr-gen", 1e-3)
    result = run_cli(args + ["--allow-change", "lr-gen"])
    assert "changed: lr_gen 5e-05 -> 0.001" in result.output
    assert json.loads((changed / "config.json").read_text())["lr_gen"] == 1e-3
    state = load(changed / "training-state-000003.pt")
    assert [g["lr"] for g in state["opt_G"]["param_groups"]] == [1e-3]
    assert [g["lr"] for g in state["opt_fake"]["param_groups"]] == [5e-5]
    # Both runs are equal at step 2; an Adam step moves a weight by up to about lr, so the resumed step 3 moves G
    # about 20x as far as the original run's step 3 does.
    G2 = load(straight / "training-state-000002.pt")["G"]
    assert all(torch.equal(G2[k], load(changed / "training-state-000002.pt")["G"][k]) for k in G2)
    G3 = load(straight / "training-state-000003.pt")["G"]
    moved = max((state["G"][k] - G2[k]).abs().max().item() for k in G2)
    moved_before = max((G3[k] - G2[k]).abs().max().item() for k in G2)
    assert moved > 5 * moved_before


def test_resume_under_two_processes_at_the_same_global_batch_equals_one_process(tmp_path, pairs):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(train_args(straight, pairs, "--max-steps", 4, "--batch-size", 2))
    run_cli(train_args(split, pairs, "--max-steps", 2, "--batch-size", 2))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(Path(__file__))]
    cmd = ddp + train_args(split, pairs, "--max-steps", 4, "--batch-size", 1, "--resume", "auto")
    proc = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_stats(straight), read_stats(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [[r[k] for k in LOSSES] for r in b], [[r[k] for k in LOSSES] for r in a], rtol=1e-5, atol=1e-6
    )  # the one-step DDP test's tolerances: float sums in another order
    sa, sb = load(straight / "training-state-000004.pt"), load(split / "training-state-000004.pt")
    assert sb["global_batch"] == {"batch_size": 2, "reg_batch_size": 2} and sb["data_position"] == sa["data_position"]
    assert_same_updates(sa, sb, dict(G=load_network_state(), mu_fake=load_network_state()))


def test_truncated_newest_state_names_the_newest_good_one(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 3, "--batch-size", 2, "--checkpoint-every", 1))
    newest = out / "training-state-000003.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    (out / "training-state-000002.pt").write_bytes(b"junk")
    result = run_cli(train_args(out, pairs, "--max-steps", 4, "--batch-size", 2, "--resume", "auto"), False)
    line = one_error_line(result, f"{newest} is not a readable training state")
    assert f"newest good state is {out / 'training-state-000001.pt'}" in line
    assert f"--resume {out / 'training-state-000001.pt'}" in line


@pytest.mark.parametrize("damage", ["missing", "shapes", "type"])
def test_damaged_state_gives_one_line_naming_the_file(tmp_path, pairs, damage):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    path = out / "training-state-000001.pt"
    state = load(path)
    if damage == "missing":
        del state["opt_G"], state["fingerprints"]
        fragments = [f"{path} is an incomplete training state (missing opt_G, fingerprints)"]
    elif damage == "shapes":
        state["G"] = {k: v[..., :1] if v.ndim else v for k, v in state["G"].items()}
        fragments = [f"--resume: {path}: the G weights do not fit the network"]
    else:
        state["step"] = "3"
        fragments = [f"{path} is an incomplete training state (bad step)"]
    torch.save(state, path)
    result = run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2, "--resume", "auto"), False)
    assert len(one_error_line(result, *fragments)) < 600


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, pairs, monkeypatch):
    import errno

    import dmd.checkpoint

    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    good = (out / "training-state-000001.pt").read_bytes()

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dmd.checkpoint, "atomic_torch_save", full)
    result = run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2, "--resume", "auto"), False)
    fragments = ["cannot write the checkpoint of step 2", "the disk is full", "training-state-000001.pt"]
    one_error_line(result, *fragments, after_output=True)
    assert (out / "training-state-000001.pt").read_bytes() == good


def test_lpips_without_weights_suggests_local_files_or_mse(tmp_path, pairs, monkeypatch):
    monkeypatch.setattr("dmd.lpips.LPIPS", REAL_LPIPS)
    args = train_args(tmp_path / "run", pairs, "--max-steps", 1, "--batch-size", 2, "--lpips-vgg", tmp_path / "no.pth")
    args.remove("--lpips-random")
    line = one_error_line(run_cli(args, expect_ok=False), "--lpips-vgg / --lpips-lin", "no.pth")
    assert "--regression-distance mse" in line and "--lpips-vgg PATH --lpips-lin PATH" in line
    # A dry run opens the weights too (it passed, and the real run failed after its setup).
    assert one_error_line(run_cli([*args, "--dry-run"], expect_ok=False)) == line
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":  # Entry point of the DDP test's torchrun workers, with the same LPIPS stand-in.
    import dmd.lpips

    dmd.lpips.LPIPS = MeanAbsDistance
    main(sys.argv[1:])


def test_few_step_training_feeds_G_its_own_backward_simulated_input(tmp_path, monkeypatch):
    """With --generator-sigmas 80,1.5 each G step trains at its drawn level: at level 0 on sigma_0 z, at level 1 on
    the input G made itself without gradients (G's one-step output re-noised to 1.5), and G is called at that
    level's sigma with that very input."""
    import dmd.steps as steps
    import dmd.train as loop
    from dmd.batches import draw_index, draw_noise
    from dmd.generator import denoise_at

    made, seen = {}, []

    def spy_generated(G, z, c, cfg, step, stream, level, rows, n):
        x, sigma = original(G, z, c, cfg, step, stream, level, rows, n)
        if stream == "G":
            with torch.no_grad():  # level 1's input, rebuilt: the trained G's one-step output now
                one_step = denoise_at(wrapped[0], z * 80.0, 80.0, c)
            made[step] = (level, x, sigma, z, one_step)
        return x, sigma

    class Recorder(torch.nn.Module):  # stands in for the DDP wrapper of G (the first network wrapped)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, sigma, c=None):
            seen.append((x, sigma))
            return self.net(x, sigma, c)

    wrapped = []

    def wrap(net, device):
        wrapped.append(net)
        return Recorder(net) if len(wrapped) == 1 else net

    original = steps.generated
    monkeypatch.setattr(steps, "generated", spy_generated)
    monkeypatch.setattr(loop, "wrap_ddp", wrap)
    run_cli(
        train_args(
            tmp_path / "run",
            None,
            "--max-steps",
            8,
            "--batch-size",
            2,
            "--generator-sigmas",
            "80,1.5",
            "--lr-gen",
            "1e-3",
        )
    )
    levels = [draw_index(0, step, "level", 2) for step in range(8)]
    assert sorted(made) == list(range(8)) and len(seen) == 8 and 0 < sum(levels) < 8  # both levels were trained
    for step, (level, x, sigma, z, one_step) in made.items():
        assert level == levels[step] and torch.equal(sigma, torch.full((2,), (80.0, 1.5)[level]))
        assert seen[step][0] is x and torch.equal(seen[step][1], sigma)  # G trained on exactly this input
        if level == 0:
            assert torch.equal(x, z * 80.0)
        else:  # G's own output plus the step's fresh noise (a teacher- or EMA-made input would differ by ~lr)
            noise = draw_noise(0, step, "G-noise0", tuple(z.shape), slice(None), z.device)
            assert not x.requires_grad
            torch.testing.assert_close(x, one_step + 1.5 * noise, rtol=0, atol=1e-6)
