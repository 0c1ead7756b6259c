"""Logging: stats.jsonl records and truncation, the console line, and Neptune (debug mode) without leaking the token."""

import json

import pytest

from dmd.utils.logger import LoggerError, NeptuneLogger, StatsLogger, format_stats, neptune_credentials

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


def test_console_line():
    line = format_stats(7, 100, STATS)
    assert line == "step 7/100 | loss_G 0.5000 loss_fake 2.2500 | 123.5 img/s | mem 1.50 GiB | bad 0"


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
    logger = StatsLogger(tmp_path, neptune)
    for step in (10, 20, 30):
        logger.log(step, {**STATS, "loss_G": step / 100})
    values = neptune.run["train/loss_G"].fetch_values()
    assert list(values["value"]) == [0.1, 0.2, 0.3]
    assert len(neptune.run["train/img_per_s"].fetch_values()) == 3
    assert neptune.run["config/lr_gen"].fetch() == 5e-5
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
