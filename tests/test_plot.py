"""`dmd plot`: the PNG of a training run (a valid PNG of the panels its records call for, written atomically), the
kimg axis of FID records that lack it, the smoothing, and one error line for each stats.jsonl it cannot plot."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dmd.cli import main
from dmd.plot import figure, kimg_axis, smooth

TEACHER = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (extra 'plot') is not installed"
)


def png_height(panels):
    """The PNG's height for a number of panels: 0.6 + 2.7 inches each at 110 dpi (the width is 9 in: 990 px)."""
    return round((0.6 + 2.7 * panels) * 110)


def record(step, **extra):
    """A stats.jsonl record of a DMD run at global batch 56 (regression off, no GAN)."""
    values = dict(loss_G=1 / step, loss_dm=1 / step, loss_reg=0.0, loss_gan=0.0, loss_fake=0.5, loss_disc=0.0)
    values.update(grad_norm_G=2.0, grad_norm_fake=9.0, img_per_s=100.0, lr_gen=5e-5, lr_fake=5e-5, **extra)
    return dict(step=step, kimg=step * 0.056, elapsed_s=step * 0.5, **values)


def write_stats(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "stats.jsonl").write_text("".join(line + "\n" for line in lines) + tail)
    return run_dir


def plot(*args):
    return CliRunner().invoke(main, ["plot", *map(str, args)])


def check_png(path, panels):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (990, png_height(panels)))
        image.verify()


@needs_matplotlib
def test_plot_of_a_training_run(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model-path", TEACHER, "--output-dir", out, "--device", "cpu", "--workers", "0"]
    args += ["--lambda-reg", "0", "--max-steps", "3", "--batch-size", "2", "--log-every", "1", "--no-progress"]
    assert CliRunner().invoke(main, list(map(str, args))).exit_code == 0
    result = plot(out)
    assert result.exit_code == 0 and result.output == f"{out / 'stats.png'}: curves of {out}\n"
    check_png(out / "stats.png", panels=2)  # losses, gradient norms
    assert not list(out.glob(".stats.png.*"))  # no temp file left by the atomic write


@needs_matplotlib
@pytest.mark.parametrize(
    "extra, panels",
    [
        ({}, 2),  # losses, gradient norms
        ({"fid": True}, 3),  # + FID
        ({"fid": True, "lr_change": True}, 4),  # + the learning rates a resume changed
        ({"regression_only": True}, 2),  # loss_dm, loss_fake and grad_norm_fake all 0: no line, same panels
    ],
)
def test_panels_follow_the_records(tmp_path, extra, panels):
    records = [record(step) for step in range(10, 301, 10)]
    if extra.get("lr_change"):
        records = [dict(r, lr_gen=2.5e-5) if r["step"] > 150 else r for r in records]
    if extra.get("regression_only"):
        records = [dict(r, loss_dm=0.0, loss_fake=0.0, loss_reg=0.2, grad_norm_fake=0.0) for r in records]
    if extra.get("fid"):  # FID lines of older runs: {step, fid} alone
        records += [{"step": step, "fid": 30 - step / 20} for step in (100, 200, 300)]
    run_dir = write_stats(tmp_path / "run", records, tail='{"step": 310, "loss_G"')  # torn by a kill: left out
    target = tmp_path / "elsewhere" / "curves.png"
    result = plot(run_dir, "--out", target)
    assert result.exit_code == 0, result.output
    check_png(target, panels)
    assert not (run_dir / "stats.png").exists()


def lines_of(ax):
    """{legend label: (x data, y data)} of the lines an axes draws."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


@needs_matplotlib
@pytest.mark.parametrize("gan", [True, False])
def test_chance_line_of_the_discriminator(tmp_path, gan):
    # DMD2's discriminator loss softplus(f(fake)) + softplus(-f(real)) is 2 ln 2 = ln 4 where D outputs 0 (chance).
    records = [record(step, loss_disc=1.39 if gan else 0.0, loss_gan=0.7 if gan else 0.0) for step in (10, 20, 30)]
    fig = figure(write_stats(tmp_path / "run", records))
    losses = lines_of(fig.axes[0])
    chance = [y for label, (_, y) in losses.items() if "chance" in label]
    assert chance == ([[math.log(4)] * 2] if gan else []), losses.keys()
    assert ("loss_disc" in losses) == gan
    assert all("chance" not in label for ax in fig.axes[1:] for label in lines_of(ax))


@needs_matplotlib
def test_non_finite_fid_records_are_plotted_as_gaps(tmp_path):
    # FID lines of a failed evaluation: NaN, inf, a string; the finite ones are drawn, the others counted.
    fids = [{"step": 10, "fid": 9.0}, {"step": 20, "fid": float("nan")}, {"step": 30, "fid": float("inf")}]
    fids += [{"step": 40, "fid": "nan"}, {"step": 50, "fid": 4.0}]
    run_dir = write_stats(tmp_path / "run", [record(step) for step in (10, 20, 30, 40, 50)] + fids)
    fig = figure(run_dir)
    fid = lines_of(fig.axes[-1])
    assert fid["FID"][1][0] == 9.0 and fid["FID"][1][-1] == 4.0 and len(fid["FID"][1]) == 5
    assert "best 4.000 at kimg 2.8" in fid and "3 of 5 FID records not finite" in fid
    run_dir = write_stats(tmp_path / "none", [record(10), {"step": 10, "fid": float("nan")}])
    assert "1 of 1 FID records not finite" in lines_of(figure(run_dir).axes[-1])
    assert plot(run_dir).exit_code == 0


def test_fid_records_without_kimg_take_it_from_the_steps():
    x_of, name = kimg_axis([record(10), {"step": 20, "fid": 5.0}])
    assert name == "kimg" and x_of({"step": 20, "fid": 5.0}) == pytest.approx(1.12)
    x_of, name = kimg_axis([{"step": 20, "loss_G": 1.0}])  # no record with kimg at all: steps
    assert name == "step" and x_of({"step": 20}) == 20


def test_smoothing_is_an_unbiased_ema_that_skips_gaps():
    assert smooth([1.0, 1.0, 1.0], 5) == [1.0, 1.0, 1.0]
    s = smooth([0.0, 2.0, float("nan"), 2.0], 3)  # alpha 0.5: means 0/0.5, 1/0.75, (held), 1.5/0.875
    assert s[:2] == [0.0, pytest.approx(4 / 3)] and s[2] == s[1] and s[3] == pytest.approx(12 / 7)
    assert math.isnan(smooth([float("nan"), 1.0], 3)[0])


@needs_matplotlib
@pytest.mark.parametrize(
    "case, fragment",
    [
        ("no folder", "no such folder (give the --output-dir of a `dmd train` run)"),
        ("no file", "stats.jsonl does not exist: is"),
        ("empty", "stats.jsonl holds no records yet"),
        ("torn only", "stats.jsonl holds no records yet"),
        ("corrupt", "stats.jsonl: line 2 is not a stats record (a JSON object with a step); is it corrupt?"),
        ("binary", "stats.jsonl: line 1 is not a stats record"),
        ("nothing to plot", "stats.jsonl holds no losses, gradient norms or FID to plot"),
        ("huge integer", "stats.jsonl: line 1 holds a number beyond float range under 'loss_G'; is it corrupt?"),
        ("huge FID", "stats.jsonl: line 2 holds a number beyond float range under 'fid'; is it corrupt?"),
        ("huge step", "stats.jsonl: line 1 holds a number beyond float range under 'step'; is it corrupt?"),
        ("too many digits", "stats.jsonl: line 1 is not a stats record"),
        ("deep nesting", "stats.jsonl: line 1 is not a stats record"),
        ("infinite step", "stats.jsonl: line 1 is not a stats record"),
    ],
)
def test_unplottable_stats_give_one_error_line(tmp_path, case, fragment):
    run_dir = tmp_path / "run"
    if case != "no folder":
        run_dir.mkdir()
    contents = {
        "empty": "",
        "torn only": '{"step": 1, "lo',
        "corrupt": json.dumps(record(1)) + "\nnot json\n" + json.dumps(record(2)) + "\n",
        "binary": "\x00\x01\x02\n\x03\n",
        "nothing to plot": json.dumps({"step": 1, "img_per_s": 5.0}) + "\n",
        "huge integer": '{"step": 1, "loss_G": 1' + "0" * 400 + "}\n" + json.dumps(record(2)) + "\n",
        "huge FID": json.dumps(record(1)) + '\n{"step": 1, "fid": 1' + "0" * 400 + "}\n",
        "huge step": '{"step": 1' + "0" * 400 + "}\n" + json.dumps(record(2)) + "\n",
        "too many digits": '{"step": 1, "loss_G": 1' + "0" * 5000 + "}\n" + json.dumps(record(2)) + "\n",
        "deep nesting": '{"step": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n" + json.dumps(record(2)) + "\n",
        "infinite step": '{"step": Infinity, "loss_G": 1.0}\n' + json.dumps(record(2)) + "\n",
    }
    if case in contents:
        (run_dir / "stats.jsonl").write_text(contents[case])
    result = plot(run_dir)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]
    assert not (run_dir / "stats.png").exists()


def test_missing_matplotlib_names_the_pip_command(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of it now fails as if absent
    result = plot(write_stats(tmp_path / "run", [record(1)]))
    assert result.exit_code == 1
    assert result.output == "Error: dmd plot needs matplotlib: pip install 'dmd-distill[plot]'\n"
