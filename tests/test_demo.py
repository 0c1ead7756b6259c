"""Tests of the embedded demo: digits data, the judge, the teacher's training and pickle, and a shortened demo run."""

import json

import pytest
import torch
from click.testing import CliRunner

from dmd.cli import main
from dmd.demo.classifier import random_shift
from dmd.demo.config import DemoConfig, DemoError, TeacherConfig
from dmd.demo.digits import load_digits
from dmd.demo.run import check_output_dir, run_demo
from dmd.demo.teacher import TEACHER_KWARGS, ema_beta, train_teacher
from dmd.edm.persistence import load_network


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


def test_demo_config_errors_name_the_option(tmp_path):
    with pytest.raises(DemoError, match="--num-eval"):
        DemoConfig(num_eval=5)
    with pytest.raises(DemoError, match="--num-pairs"):
        DemoConfig(num_pairs=8, batch_size=16)
    check_output_dir(DemoConfig(output_dir=str(tmp_path)), tmp_path)
    with pytest.raises(DemoError, match="--output-dir"):
        check_output_dir(DemoConfig(output_dir=str(tmp_path), steps=7), tmp_path)
    result = CliRunner().invoke(main, ["demo", "--teacher", str(tmp_path / "missing.pkl"), "--output-dir", "x"])
    assert result.exit_code == 1 and "--teacher" in result.output


def test_short_demo_end_to_end(tmp_path):
    # A minute on an idle 2-core CPU: 128 pairs, 30 steps per student with 2 fake-score steps each, 200 samples.
    cfg = DemoConfig(
        output_dir=str(tmp_path), num_pairs=128, steps=30, batch_size=16, fake_steps_per_gen=2, num_eval=200
    )
    results = run_demo(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["format"] == "dmd-demo-results" and on_disk["config"] == cfg.to_dict()
    keys = ["teacher_35nfe", "teacher_1step", "dmd", "regression", "dm"]
    assert [r["key"] for r in on_disk["rows"]] == keys
    assert [r["nfe"] for r in on_disk["rows"]] == [35, 1, 1, 1, 1]
    for r in on_disk["rows"]:
        assert set(r) == {"key", "method", "nfe", "fid", "accuracy", "samples_per_s"}
        assert r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["samples_per_s"] > 0
    assert set(on_disk["checks"]) == {
        "dmd_fid_below_teacher_1step",
        "dmd_fid_below_regression",
        "dmd_fid_within_2x_teacher_35nfe",
        "dmd_accuracy_above_90pct",
    }
    assert on_disk["classifier"]["holdout_accuracy"] > 0.95
    by = {r["key"]: r for r in results["rows"]}
    assert by["dmd"]["fid"] < by["teacher_1step"]["fid"]
    assert on_disk["checks"]["dmd_fid_below_teacher_1step"]
    for name in ["results.md", "grid.png", *[f"samples-{k}.png" for k in keys]]:
        assert (tmp_path / name).is_file(), name
    assert "| DMD (DM + regression) | 1 |" in (tmp_path / "results.md").read_text()
