"""Tests of the embedded demo: digits data, the judge, the teacher's training and pickle, and a shortened demo run."""

import dataclasses
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from dmd.cli import main
from dmd.demo import SHIPPED_TEACHER, SHIPPED_TEACHER_SHA256
from dmd.demo.classifier import FEATURE_DIM, random_shift
from dmd.demo.config import DemoConfig, DemoError, TeacherConfig
from dmd.demo.digits import load_digits
from dmd.demo.run import FID_MIN_SAMPLES, check_output_dir, results_markdown, run_demo
from dmd.demo.teacher import TEACHER_KWARGS, build_teacher, ema_beta, train_teacher
from dmd.edm.persistence import load_network
from dmd.edm.writer import save_network_pickle


def test_digits_upsampled_bilinearly_to_minus_one_one():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images.min() == -1 and images.max() == 1
    # Image 0 starts with rows [0 0 5 13 ...] and [0 0 13 15 ...] (values 0..16). With align_corners=False output
    # column 5 samples source column 2.25 and output row 1 source row 0.25; row 0 clamps to source row 0.
    assert images[0, 0, 0, 5].item() == pytest.approx((0.75 * 5 + 0.25 * 13) / 8 - 1)
    row1 = 0.75 * 13 + 0.25 * 15
    assert images[0, 0, 1, 5].item() == pytest.approx((0.75 * 7 + 0.25 * row1) / 8 - 1)


def test_random_shift_translates_and_fills_with_background():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(0))
    shifted = random_shift(x, g)
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], [1, 1, 1, 1], value=-1.0)
        assert torch.equal(shifted[i], padded[:, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16])


def test_ema_beta_follows_edm_rampup():
    assert ema_beta(128, 0, 10, 0.05) == 0.0  # no image seen yet: the EMA copies the network
    assert ema_beta(100, 100_000, 10, 0.05) == pytest.approx(0.5 ** (100 / 5000))  # ramp-up: 5% of images seen
    assert ema_beta(100, 1_000_000, 10, 0.05) == pytest.approx(0.5 ** (100 / 10000))  # capped by the half-life


def test_teacher_training_is_seeded_and_pickles_in_edm_layout(tmp_path):
    cfg = TeacherConfig(kimg=0.064, batch_size=16)  # 4 steps
    ema_a = train_teacher(tmp_path / "a.pkl", cfg, progress=False)
    ema_b = train_teacher(tmp_path / "b.pkl", cfg, progress=False)
    ema_c = train_teacher(tmp_path / "c.pkl", TeacherConfig(kimg=0.064, batch_size=16, seed=1), progress=False)
    for k, v in ema_a.state_dict().items():
        assert torch.equal(v, ema_b.state_dict()[k]), k
    assert any(not torch.equal(v, ema_c.state_dict()[k]) for k, v in ema_a.state_dict().items())
    loaded = load_network(tmp_path / "a.pkl")
    assert type(loaded).__name__ == "EDMPrecond"
    assert {k: loaded.init_kwargs[k] for k in TEACHER_KWARGS} == TEACHER_KWARGS
    x, sigma, c = torch.randn(3, 1, 16, 16), torch.tensor([0.1, 1.0, 50.0]), torch.eye(10)[:3]
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, c), ema_a.eval()(x, sigma, c))


def test_shipped_teacher_is_what_its_recipe_writes(tmp_path):
    # The file's bytes are its recorded digest, and exactly what train-teacher's writer makes of its weights in
    # TEACHER_KWARGS' architecture; retraining itself (minutes) is benchmarks/demo_teacher.py.
    assert hashlib.sha256(SHIPPED_TEACHER.read_bytes()).hexdigest() == SHIPPED_TEACHER_SHA256
    shipped = load_network(SHIPPED_TEACHER)
    net = build_teacher()
    assert shipped.init_kwargs == net.init_kwargs
    net.load_state_dict(shipped.state_dict())
    save_network_pickle(net, tmp_path / "again.pkl")
    assert (tmp_path / "again.pkl").read_bytes() == SHIPPED_TEACHER.read_bytes()


def test_demo_config_errors_name_the_option(tmp_path):
    with pytest.raises(DemoError, match="--num-eval"):
        DemoConfig(num_eval=5)
    with pytest.raises(DemoError, match="--num-pairs"):
        DemoConfig(num_pairs=8, batch_size=16)
    check_output_dir(DemoConfig(output_dir=str(tmp_path)), tmp_path)
    with pytest.raises(DemoError, match="--output-dir"):
        check_output_dir(DemoConfig(output_dir=str(tmp_path), max_steps=7), tmp_path)
    # A folder written before --fdistill existed (no such key) holds the same settings as the default now.
    saved = json.loads((tmp_path / "demo-config.json").read_text())
    (tmp_path / "demo-config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "fdistill"}))
    check_output_dir(DemoConfig(output_dir=str(tmp_path)), tmp_path)
    with pytest.raises(DemoError, match="--output-dir"):
        check_output_dir(DemoConfig(output_dir=str(tmp_path), fdistill=True), tmp_path)
    result = CliRunner().invoke(main, ["demo", "--teacher", str(tmp_path / "missing.pkl"), "--output-dir", "x"])
    assert result.exit_code == 1 and "--network" in result.output  # --teacher: the old spelling of --network


def test_short_demo_end_to_end(tmp_path, capsys):
    # Under a minute on an idle 2-core CPU: 128 pairs, 30 steps per student, 200 samples.
    cfg = DemoConfig(output_dir=str(tmp_path), num_pairs=128, max_steps=30, batch_size=16, num_eval=200, two_step=True)
    cfg = dataclasses.replace(cfg, fdistill=True)
    results = run_demo(cfg)
    # The demo's console is its own: none of what the training loop prints (its config, summary, losses: all in
    # each student's log.txt) reaches it.
    printed = set(capsys.readouterr().out.splitlines())
    for key in ("dmd", "regression", "dm", "dmd2", "fdistill", "dmd2_2step_last"):
        logged = {line for line in (tmp_path / "train" / key / "log.txt").read_text().splitlines() if line.strip()}
        assert logged and not logged & printed, logged & printed
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["format"] == "dmd-demo-results" and on_disk["config"] == cfg.to_dict()
    keys = ["teacher_35nfe", "teacher_1step", "dmd", "regression", "dm", "dmd2", "fdistill", "dmd2_2step_last"]
    assert [r["key"] for r in on_disk["rows"]] == keys
    assert [r["nfe"] for r in on_disk["rows"]] == [35, 1, 1, 1, 1, 1, 1, 2]
    fdistill = json.loads((tmp_path / "train" / "fdistill" / "config.json").read_text())
    two_step = json.loads((tmp_path / "train" / "dmd2_2step_last" / "config.json").read_text())
    assert fdistill["divergence"] == "js" and two_step["fake_score_levels"] == "last"
    for r in on_disk["rows"]:
        assert set(r) == {"key", "method", "nfe", "fid", "accuracy", "samples_per_s"}
        assert r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["samples_per_s"] > 0
    assert "checks" not in on_disk
    assert on_disk["classifier"]["holdout_accuracy"] > 0.95
    by = {r["key"]: r for r in results["rows"]}
    assert by["dmd"]["fid"] < by["teacher_1step"]["fid"]
    for name in ["results.md", "grid.png", *[f"samples-{k}.png" for k in keys]]:
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "results.md").read_text()
    assert "| DMD (DM + regression) | 1 |" in report and "30 steps at batch 16" in report
    assert "check" not in report.lower() and "issue" not in report.lower()
    assert "200 samples per method are too few" in report  # num_eval below FID_MIN_SAMPLES


@pytest.mark.parametrize("num_eval, warned", [(20, True), (639, True), (640, False), (1000, False)])
def test_results_warn_when_too_few_samples_for_fid(num_eval, warned):
    # 64-d judge features: below 10 samples per dimension the FID of samples drawn from the real digits' own
    # distribution is already several points (README), so the table cannot be read.
    row = dict(key="dmd", method="DMD", nfe=1, fid=3.0, accuracy=0.95, samples_per_s=1000.0)
    results = dict(
        config=DemoConfig(num_eval=num_eval).to_dict(),
        rows=[row],
        classifier=dict(holdout_accuracy=0.98, feature_dim=FEATURE_DIM),
        timings_s=dict(total=1.0),
        machine=dict(cpu_count=2, torch_threads=1, load_average_1min=0.0),
    )
    report = results_markdown(results)
    warning = f"{num_eval} samples per method are too few for a {FEATURE_DIM}-d FID"
    assert (warning in report) == warned and FID_MIN_SAMPLES == 10 * FEATURE_DIM == 640


def test_bad_teacher_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    result = CliRunner().invoke(main, ["demo", "--network", str(bad), "--output-dir", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: --network:"), result.output
    assert str(bad) in lines[0] and not (tmp_path / "out").exists()


def test_sigterm_stops_the_demo_and_the_same_command_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from dmd.demo.run import STUDENTS, distil

    out = tmp_path / "demo"
    settings = dict(num_pairs=64, max_steps=20, batch_size=8, num_eval=40)
    cmd = [sys.executable, "-m", "dmd", "demo", "--output-dir", str(out), "--threads", "1", "--no-progress"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stats, deadline = out / "train" / "dm" / "stats.jsonl", time.monotonic() + 240
    while not stats.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # During the DM-only student; the DMD2 students after it have not begun.
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to continue" in err and "dm student" in err
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
    interrupted_at = torch.load(next((out / "train" / "dm").glob("training-state-*.pt")), weights_only=True)["step"]
    assert 0 < interrupted_at < settings["max_steps"]

    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["rows"]][2:] == ["dmd", "regression", "dm", "dmd2"]
    # The continued student is the one an uninterrupted run trains, bit for bit.
    cfg = DemoConfig(output_dir=str(tmp_path / "straight"), **settings)
    losses = dict(next(losses for key, _, losses in STUDENTS if key == "dm"))
    data = dict(pairs=out / "pairs.h5", real=out / "digits.zip")
    straight = torch.load(distil(cfg, tmp_path / "straight", "dm", losses, data), weights_only=True)
    resumed = torch.load(sorted((out / "train" / "dm").glob("network-snapshot-*.pt"))[-1], weights_only=True)
    assert resumed["step"] == straight["step"] == settings["max_steps"]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
