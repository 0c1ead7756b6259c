"""Logging: stats.jsonl records and truncation, the console line and log.txt, TensorBoard event files, Neptune (debug
mode) without leaking the token; and what `train` logs: the clock, speed and learning rates of every record (across
a resume), log.txt holding the console, --no-progress, and TensorBoard scalars equal to stats.jsonl."""

import errno
import io
import json
import math
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from test_train import TEACHER, load, read_stats, run_cli  # the training tests' fixture teacher and helpers

from dmd.utils.logger import (
    LoggerError,
    NeptuneLogger,
    StatsLogger,
    TensorBoardLogger,
    format_duration,
    format_stats,
    neptune_credentials,
)

TOKEN = "tok-7f3e-do-not-leak"
STATS = dict(loss_G=0.5, loss_fake=2.25, img_per_s=123.45, mem_gib=1.5, bad_steps=0)


def test_credentials_from_file_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    cfg = tmp_path / "neptune.cfg"
    assert neptune_credentials(cfg) == (None, None)
    cfg.write_text(f"[credentials]\nproject = ws/proj\ntoken = {TOKEN}\n")
    assert neptune_credentials(cfg) == ("ws/proj", TOKEN)
    monkeypatch.setenv("NEPTUNE_PROJECT", "ws/other")
    assert neptune_credentials(cfg) == ("ws/other", TOKEN)


def test_stats_jsonl_records_and_truncation(tmp_path):
    logger = StatsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"loss_G": step / 10})
    logger.truncate_after(2)
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss_G": 0.1}, {"step": 2, "loss_G": 0.2}]
    # Lines no run of ours writes (torn, deeply nested, huge integers, not a record) are dropped, never a traceback.
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write(
            '{"step": 1, "lo\n' + "[" * 100_000 + "\n" + '{"step": ' + "9" * 5000 + "}\n" + '["step"]\n{"step": "2"}\n'
        )
    logger.truncate_after(2)
    assert [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()] == records


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_console_line(utc):
    clock = dict(kimg=0.392, elapsed_s=3725.4, s_per_kimg=8.1, lr_gen=5e-5, lr_fake=2e-6, timestamp=1_700_000_000.9)
    line = format_stats(7, 100, {**STATS, "loss_gan": 0.0, **clock}, hide={"loss_gan"})  # a loss switched off
    assert line == (
        "2023-11-14 22:13:20 | step 7/100 | kimg 0.392 | 1h 02m 05s | 8.1 s/kimg | loss_G 0.5000 loss_fake 2.2500 | "
        "lr_gen 5e-05 lr_fake 2e-06 | 123.5 img/s | mem 1.50 GiB | bad 0"
    )


def test_durations_read_as_edm_prints_them():
    durations = [format_duration(s) for s in (0, 44.6, 185, 7385, 93784)]
    assert durations == ["0s", "45s", "3m 05s", "2h 03m 05s", "1d 02h 03m"]


def test_echo_prints_and_appends_each_line_to_log_txt(tmp_path, capsys):
    logger = StatsLogger(tmp_path)
    logger.echo("first\n")
    logger.echo("Error: only in the file", console=False)
    assert (tmp_path / "log.txt").read_text() == "first\nError: only in the file\n"  # flushed before close
    logger.close()
    resumed = StatsLogger(tmp_path)
    resumed.echo("a resumed run appends")
    resumed.close()
    assert capsys.readouterr().out == "first\na resumed run appends\n"
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "a resumed run appends"


def test_neptune_needs_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    with pytest.raises(LoggerError, match="NEPTUNE_API_TOKEN"):
        NeptuneLogger({}, cfg_path=tmp_path / "missing.cfg", mode="debug")


def test_neptune_logs_each_metric_once_and_never_shows_the_token(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_PROJECT", "ws/proj")
    monkeypatch.setenv("NEPTUNE_API_TOKEN", TOKEN)
    neptune = NeptuneLogger({"lr_gen": 5e-5, "resume": None}, mode="debug")
    logger = StatsLogger(tmp_path, [neptune])
    for step in (10, 20, 30):
        logger.log(step, {**STATS, "loss_G": step / 100})
    values = neptune.run["train/loss_G"].fetch_values()
    assert list(values["value"]) == [0.1, 0.2, 0.3]
    assert len(neptune.run["train/img_per_s"].fetch_values()) == 3
    assert neptune.run["config/lr_gen"].fetch() == 5e-5
    logger.image(30, 0.06, "samples", PIL.Image.new("RGB", (8, 8)))
    assert set(neptune.run.get_structure()["grids"]) == {"samples"}
    logger.close()
    out, err = capfd.readouterr()
    assert TOKEN not in out + err
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()


def test_neptune_offline_files_hold_no_token(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Offline mode writes its queue under ./.neptune.
    monkeypatch.setenv("NEPTUNE_PROJECT", "ws/proj")
    monkeypatch.setenv("NEPTUNE_API_TOKEN", TOKEN)
    neptune = NeptuneLogger({"lr_gen": 5e-5}, mode="offline")
    neptune.log(1, STATS)
    neptune.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(TOKEN.encode() not in p.read_bytes() for p in files)


def tensorboard_scalars(run_dir):
    """{tag: [(global step, value)]} of the event files in `run_dir`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_every_metric_at_images_seen(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package (extra 'tensorboard') is not installed")
    logger = StatsLogger(tmp_path, [TensorBoardLogger(tmp_path)])
    for step in (1, 2):
        logger.log(step, {"loss_G": step / 3, "kimg": step * 0.056, "bad_steps": 0, "timestamp": 1e9 + step})
    logger.close()
    scalars = tensorboard_scalars(tmp_path)
    assert sorted(scalars) == ["train/bad_steps", "train/kimg", "train/loss_G"]  # the timestamp is the events' time
    assert scalars["train/loss_G"] == [(56, np.float32(1 / 3)), (112, np.float32(2 / 3))]


def test_missing_tensorboard_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails as if absent
    with pytest.raises(
        LoggerError, match=r"^--log-tensorboard needs the tensorboard package: pip install 'dmd-distill\[tensorboard\]'"
    ):
        TensorBoardLogger(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# What `train` logs, on short CPU runs of the fixture teacher (no regression, so no pairs and no LPIPS).


def train(out, *extra, ok=True):
    args = ["train", "--model-path", str(TEACHER), "--output-dir", str(out), "--device", "cpu", "--workers", "0"]
    args += ["--lambda-reg", "0", "--batch-size", "2", "--log-every", "1", "--image-every", "0"]
    return run_cli(args + [str(a) for a in extra], expect_ok=ok)


def test_records_carry_clock_speed_and_learning_rates_across_a_resume(tmp_path):
    out = tmp_path / "run"
    train(out, "--max-steps", 3, "--lr-gen", 1e-4, "--lr-fake", 3e-5)
    state = load(out / "training-state-000003.pt")
    train(out, "--max-steps", 5, "--lr-gen", 1e-4, "--lr-fake", 3e-5, "--resume", "auto")
    records = read_stats(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["kimg"] for r in records] == [0.002, 0.004, 0.006, 0.008, 0.01]  # global batch 2
    assert all((r["lr_gen"], r["lr_fake"]) == (1e-4, 3e-5) for r in records)  # the optimisers' own values
    assert all(math.isclose(r["s_per_kimg"], 1000 / r["img_per_s"]) for r in records)
    elapsed = [r["elapsed_s"] for r in records]
    assert 0 < elapsed[0] and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    # The resumed run goes on from the training time the state recorded (a little past step 3's record), not 0.
    assert elapsed[2] <= state["elapsed_s"] < elapsed[3]
    stamps = [r["timestamp"] for r in records]
    assert all(a <= b for a, b in zip(stamps, stamps[1:])) and abs(stamps[-1] - time.time()) < 600


@pytest.mark.parametrize("recorded", [None, 1000.0])  # None: a format-2 state written before the counter
def test_training_time_goes_on_from_what_the_state_records(tmp_path, recorded):
    out = tmp_path / "run"
    train(out, "--max-steps", 2)
    path = out / "training-state-000002.pt"
    state = load(path)
    state.pop("elapsed_s")
    torch.save(state if recorded is None else {**state, "elapsed_s": recorded}, path)
    start = time.monotonic()
    train(out, "--max-steps", 3, "--resume", "auto")
    wall = time.monotonic() - start
    elapsed = read_stats(out)[-1]["elapsed_s"]
    assert (recorded or 0) < elapsed < (recorded or 0) + wall
    assert load(out / "training-state-000003.pt")["elapsed_s"] > elapsed


def test_a_state_with_a_bad_training_time_is_one_error_line(tmp_path):
    out = tmp_path / "run"
    train(out, "--max-steps", 1)
    path = out / "training-state-000001.pt"
    torch.save({**load(path), "elapsed_s": "soon"}, path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = train(out, "--max-steps", 2, "--resume", "auto", ok=False)
    assert result.exit_code == 1
    assert result.stderr == f"Error: --resume: {path}: elapsed_s 'soon' is not a duration in seconds\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_log_txt_holds_the_console_and_no_progress_shows_no_bar(tmp_path):
    out = tmp_path / "run"
    first = train(out, "--max-steps", 2, "--progress")
    assert "step/s" in first.stderr  # the bar, on stderr, stays out of log.txt
    log = (out / "log.txt").read_text()
    config = (out / "config.json").read_text()
    assert log == f"Training config:\n{config}" + first.stdout  # every setting in log.txt, a summary on the console
    summary = first.stdout.splitlines()[:6]
    assert [line.split(":")[0] for line in summary] == ["Teacher", "Data", "Method", "Batch", "Precision", "Output"]
    assert "EDMPrecond (SongUNet), 8x8, 3 channels, 10 classes" in summary[0] and "{" not in first.stdout
    assert summary[3] == "Batch:     2 per process x 1 process(es) = global batch 2"
    resumed = train(out, "--max-steps", 3, "--resume", "auto", "--no-progress")
    assert resumed.stderr == ""
    config = (out / "config.json").read_text()  # the resumed run's
    assert (out / "log.txt").read_text() == log + f"Training config:\n{config}" + resumed.stdout  # appended
    lines = resumed.stdout.splitlines()
    assert lines[-3].startswith(f"Resuming from {out / 'training-state-000002.pt'} at step 2")
    assert " | step 3/3 | kimg 0.006 | " in lines[-2] and "lr_gen 5e-05 lr_fake 5e-05" in lines[-2]
    snapshot = out / "network-snapshot-000003.pt"
    assert lines[-1] == (
        f"Finished at step 3/3; snapshot {snapshot}; sample with: python -m dmd generate --network {snapshot} "
        f"--output-dir {out / 'samples'} --seeds 0-63 --grid {out / 'samples.png'}"
    )


def test_an_error_during_training_is_the_last_line_of_log_txt(tmp_path, monkeypatch):
    def full_disk(path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("dmd.train.save_training_state", full_disk)
    out = tmp_path / "run"
    result = train(out, "--max-steps", 2, "--no-progress", ok=False)
    error = result.stderr.strip()
    assert result.exit_code == 1 and error.startswith("Error: cannot write the checkpoint of step 2")
    assert (out / "log.txt").read_text().splitlines()[-1] == error


def test_tensorboard_scalars_equal_stats_jsonl_after_a_resume_that_redoes_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package (extra 'tensorboard') is not installed")
    out = tmp_path / "run"
    train(out, "--max-steps", 3, "--checkpoint-every", 2, "--log-tensorboard")
    for name in ("training-state-000003.pt", "network-snapshot-000003.pt"):
        (out / name).unlink()  # killed after logging step 3, before its checkpoint: step 3 is done again
    train(out, "--max-steps", 4, "--log-tensorboard", "--resume", "auto")
    records = read_stats(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    scalars = tensorboard_scalars(out)
    off = {"loss_reg", "loss_gan", "loss_disc", "h_min", "h_mean", "h_max"}  # this DMD run has no f-distill weights
    names = {k for r in records for k in r} - {"step", "timestamp", *off}  # used only
    assert set(scalars) == {f"train/{k}" for k in names}
    for name in names:
        expected = [(round(r["kimg"] * 1000), float(np.float32(r[name]))) for r in records]
        assert scalars[f"train/{name}"] == expected, name  # the first run's step 3 is hidden, the redone one shown


def test_train_without_tensorboard_fails_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = train(tmp_path / "run", "--max-steps", 1, "--log-tensorboard", ok=False)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: --log-tensorboard needs the tensorboard package: pip install 'dmd-distill[tensorboard]'"
    ]
    assert not (tmp_path / "run").exists()


def test_trackers_get_the_grids_and_not_the_losses_a_run_switched_off(tmp_path):
    """TensorBoard: the scalars of the losses in use only (a DM-only run has no regression or GAN loss, which plotted
    as flat zeros) and every sample grid as an image; stats.jsonl keeps every field."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(out, "--max-steps", 2, "--image-every", 1, "--log-tensorboard")
    assert {"loss_reg", "loss_gan", "loss_disc"} <= set(read_stats(out)[0])
    scalars = tensorboard_scalars(out)
    assert "train/loss_dm" in scalars and not {"train/loss_reg", "train/loss_gan", "train/loss_disc"} & set(scalars)
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("grids/samples")
    assert [g.step for g in grids] == [2, 4]  # images seen: batch 2 per step
    png = PIL.Image.open(io.BytesIO(grids[-1].encoded_image_string))
    assert np.array_equal(
        np.asarray(png.convert("RGB")), np.asarray(PIL.Image.open(out / "grid-000002.png").convert("RGB"))
    )


def test_weights_and_biases_offline_gets_the_metrics_and_grids(tmp_path, monkeypatch):
    """--log-wandb with WANDB_MODE=offline: every metric of stats.jsonl but the switched-off losses, against kimg,
    and the grids; a resumed run continues the same W&B run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    init = wandb.init

    def recording_init(**kwargs):
        run = init(**kwargs)
        log = run.log
        run.log = lambda data, *a, **k: (logged.append((kwargs["id"], data)), log(data, *a, **k))[1]
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    out = tmp_path / "run"
    train(out, "--max-steps", 2, "--image-every", 2, "--log-wandb")
    train(out, "--max-steps", 3, "--log-wandb", "--resume", "auto")
    run_id = (out / "wandb-run-id").read_text().strip()
    assert {i for i, _ in logged} == {run_id}  # one W&B run across the resume
    records = [data for _, data in logged if "train/loss_G" in data]
    assert len(records) == 3 and all("train/loss_reg" not in r and "train/loss_gan" not in r for r in records)
    off = {"step", "timestamp", "loss_reg", "loss_gan", "loss_disc", "h_min", "h_mean", "h_max"}
    assert records == [{f"train/{k}": v for k, v in stats.items() if k not in off} for stats in read_stats(out)]
    grids = [data for _, data in logged if "grids/samples" in data]
    assert len(grids) == 1 and grids[0]["train/kimg"] == 0.004
    assert list((out / "wandb").glob("offline-run-*")), "the offline run's files are in the run folder"


def test_a_missing_tracker_package_stops_even_a_dry_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = train(tmp_path / "run", "--max-steps", 1, "--log-wandb", "--dry-run", ok=False)
    assert result.output.strip().splitlines() == [
        "Error: --log-wandb needs the wandb package: pip install 'dmd-distill[wandb]'"
    ]
    assert not (tmp_path / "run").exists()
