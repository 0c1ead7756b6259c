"""Run folders of `train`: a run continued from its folder alone (its stored settings, the flags given as changes),
a finished run left alone, stored settings checked when read, one run per folder at a time (the lock), and how
refused resumes name what differs."""

import json
import os
import socket
import subprocess
import sys
import time

import torch
from test_train import (  # the training tests' helpers
    ONE_THREAD_ENV,
    ROOT,
    dmd2_args,
    folder_bytes,
    load,
    one_error_line,
    read_stats,
    run_cli,
    train_args,
)

LOSSES = ("loss_G", "loss_dm", "loss_gan", "loss_fake", "loss_disc", "grad_norm_G", "grad_norm_fake")


def resume_args(out, *extra):
    return ["train", "--output-dir", str(out), "--resume", "auto", "--no-progress", *map(str, extra)]


def test_a_run_continues_from_its_folder_alone(tmp_path, real):
    """`train --output-dir RUN --resume auto --max-steps N`: the run's own settings (recipe, data, sigmas, batch),
    the same steps as an uninterrupted run; before, --network was required and a forgotten --recipe dmd2 failed."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli(dmd2_args(whole, real, "--max-steps", 3))
    run_cli(dmd2_args(split, real, "--max-steps", 2))
    result = run_cli(resume_args(split, "--max-steps", 3))
    assert f"Resuming from {split / 'training-state-000002.pt'} at step 2" in result.output
    config, first = json.loads((split / "config.json").read_text()), json.loads((whole / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("output_dir", "resume")} == {
        k: v for k, v in first.items() if k not in ("output_dir", "resume")
    }
    assert config["recipe"] == "dmd2" and config["generator_sigmas"] == [80.0, 1.5]
    assert [[r[k] for k in LOSSES] for r in read_stats(split)] == [[r[k] for k in LOSSES] for r in read_stats(whole)]


def test_a_flag_given_on_resume_is_a_change_under_the_rules(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    before = folder_bytes(out)
    refused = run_cli(resume_args(out, "--max-steps", 2, "--lr-gen", "1e-4"), expect_ok=False)
    one_error_line(refused, "--lr-gen 5e-05 -> 0.0001", "--allow-change lr-gen")
    assert folder_bytes(out) == before
    run_cli(resume_args(out, "--max-steps", 2, "--lr-gen", "1e-4", "--allow-change", "lr-gen"))
    assert [r["lr_gen"] for r in read_stats(out)] == [5e-05, 1e-4]
    # --epochs replaces the run's --max-steps instead of clashing with it ("give exactly one").
    assert json.loads(run_cli([*resume_args(out, "--epochs", 1), "--dry-run"]).output)["max_steps"] is None


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 2, "--batch-size", 2))
    before = folder_bytes(out)
    for max_steps in (2, 1):
        result = run_cli(resume_args(out, "--max-steps", max_steps))
        assert result.output == f"{out} is already at step 2, at or past its {max_steps} steps: nothing to do " + (
            "(give a larger --max-steps to train on)\n"
        )
        assert folder_bytes(out) == before  # config.json, stats.jsonl and log.txt were rewritten before


def test_a_run_stopped_before_its_first_checkpoint_restarts_from_config_json(tmp_path, pairs):
    first = tmp_path / "first"
    run_cli(train_args(first, pairs, "--max-steps", 1, "--batch-size", 2, "--seed", 5))
    out = tmp_path / "run"
    out.mkdir()
    config = json.loads((first / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, output_dir=str(out), max_steps=2)))
    result = run_cli(resume_args(out))
    assert f"No training state in {out}: starting at step 0" in result.output
    assert json.loads((out / "config.json").read_text())["seed"] == 5 and load(out / "training-state-000002.pt")


def test_a_folder_without_a_run_still_needs_a_teacher(tmp_path):
    result = run_cli(resume_args(tmp_path / "empty"), expect_ok=False)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: Missing option '--network' ({tmp_path / 'empty'} holds no run to resume).")


def test_stored_noise_levels_are_checked_when_a_state_is_read(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, pairs, "--max-steps", 1, "--batch-size", 2))
    path = out / "training-state-000001.pt"
    state = load(path)
    cases = [
        ([float("nan")], "finite and positive"),
        ([1e308], "above 10000"),
        ([80.0] * 1000, "1000 noise levels"),
        ("80", "a str, not a list"),
        ([1.5, 80.0], "strictly decreasing"),
    ]
    for sigmas, message in cases:
        torch.save({**state, "config": {**state["config"], "generator_sigmas": sigmas}}, path)
        before = folder_bytes(out)
        for args in (resume_args(out, "--max-steps", 2), train_args(out, pairs, "--max-steps", 2, "--resume", "auto")):
            error = one_error_line(run_cli(args, expect_ok=False), str(path), message)
            assert len(error) < 400
        assert folder_bytes(out) == before


def test_edm_batch_is_the_global_batch(tmp_path, pairs, monkeypatch):
    """EDM's train.py reads --batch as the total batch over all GPUs; ours is --batch-size, per process."""
    config = json.loads(run_cli(train_args(tmp_path / "a", pairs, "--max-steps", 1, "--batch", 4, "--dry-run")).output)
    assert config["batch_size"] == 4
    both = run_cli(train_args(tmp_path / "b", pairs, "--max-steps", 1, "--batch", 4, "--batch-size", 4), False)
    one_error_line(both, "give --batch-size (per process) or --batch (the global batch, EDM's meaning), not both")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun: refused before any process group is joined
    uneven = run_cli(train_args(tmp_path / "c", pairs, "--max-steps", 1, "--batch", 4), expect_ok=False)
    one_error_line(uneven, "--batch 4 (the global batch, as in EDM's train.py) does not split over 3 processes")


def test_one_run_per_folder_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmd", *train_args(out, None, "--max-steps", 10**6, "--batch-size", 2)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = out / ".dmd-train.lock"
        deadline = time.monotonic() + 60
        while not (out / "config.json").is_file() and first.poll() is None:  # locked, then config.json written
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        pid, host, _ = lock.read_text().split()
        assert int(pid) == first.pid and host == socket.gethostname()
        for args in (
            train_args(out, None, "--max-steps", 2, "--batch-size", 2),
            train_args(out, None, "--max-steps", 2, "--batch-size", 2, "--resume", "auto"),
            resume_args(out, "--dry-run"),
        ):
            one_error_line(run_cli(args, expect_ok=False), f"--output-dir {out} is in use by process {pid} on {host}")
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait(timeout=60)
    assert lock.read_text().split()[0] == pid
    result = run_cli(resume_args(out, "--max-steps", 2))  # the leftover lock is nobody's: taken over
    assert f"No training state in {out}: starting at step 0" in result.output and load(out / "training-state-000002.pt")
    assert lock.read_text().split()[0] == str(os.getpid())


def test_a_refused_resume_names_data_the_run_never_had(tmp_path, pairs):
    out = tmp_path / "run"
    run_cli(train_args(out, None, "--max-steps", 1, "--batch-size", 2))  # distribution matching alone: no data
    before = folder_bytes(out)
    added = resume_args(
        out, "--max-steps", 2, "--data-path", pairs, "--lambda-reg", 0.25, "--allow-change", "lambda-reg"
    )
    one_error_line(run_cli(added, expect_ok=False), "was trained without --data-path, this run gives one")
    assert folder_bytes(out) == before  # it blamed "another pairs file", which the run never had


def test_a_state_with_the_old_real_data_fingerprint_still_resumes(tmp_path, real):
    """States written before content fingerprints recorded names and sizes (a folder) or the file's ends (a ZIP):
    the same data still resumes them, and the next state records the content fingerprint."""
    from dmd.checkpoint import data_fingerprint, legacy_data_fingerprint

    out = tmp_path / "run"
    run_cli(dmd2_args(out, real, "--max-steps", 1))
    path = out / "training-state-000001.pt"
    state = load(path)
    state["fingerprints"]["real"] = legacy_data_fingerprint(real)
    torch.save(state, path)
    run_cli(resume_args(out, "--max-steps", 2))
    assert load(out / "training-state-000002.pt")["fingerprints"]["real"] == data_fingerprint(real)
