"""`dmd plot RUN_DIR`: one PNG of a training run's curves over kimg, read from its stats.jsonl: the losses, the
gradient norms, the FID where it was measured and the learning rates where they changed.

matplotlib (the `plot` extra) is imported lazily, and only its object API is used (no pyplot, no global backend),
so plotting from inside another program changes nothing there.
"""

import json
import math
from pathlib import Path

from dmd.utils.common import parse_json
from dmd.utils.io import atomic_path
from dmd.utils.logger import format_duration

# The keys of a stats.jsonl record that the panels show, in the order of their legends.
LOSSES = ("loss_G", "loss_dm", "loss_reg", "loss_gan", "loss_fake", "loss_disc")
GRAD_NORMS = ("grad_norm_G", "grad_norm_fake")
LEARNING_RATES = ("lr_gen", "lr_fake")
# A key's colour in every plot: G's in blue, mu_fake's in purple, the parts of loss_G in their own; loss_G is a wide
# grey line under its parts, so a part equal to it (loss_dm of a run without regression) still shows both.
COLOURS = dict(loss_G="0.55", loss_dm="C1", loss_reg="C2", loss_gan="C6", loss_fake="C4", loss_disc="C9")
COLOURS.update(grad_norm_G="C0", grad_norm_fake="C4", lr_gen="C0", lr_fake="C4")
WIDE = {"loss_G": 3.5}
SMOOTH_FROM = 100  # points of a curve from which a smoothed line is drawn over the faint raw one
# DMD2's discriminator loss softplus(f(fake)) + softplus(-f(real)) (dmd/gan.py) where D outputs 0 for every image,
# i.e. cannot tell real from generated: 2 ln 2.
DISC_CHANCE = math.log(4)
CHANCE_LABEL = "loss_disc at chance (D outputs 0): ln 4"


class PlotError(RuntimeError):
    """A run folder whose statistics cannot be plotted; the message names the file."""


def read_stats(path):
    """The records of a stats.jsonl in file order; a torn last line (a run killed mid-write, or one still running)
    is left out, any other line that is not a record (a JSON object with a finite step, every number a float) is an
    error naming it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PlotError(f"{path.parent}: no such folder (give the --output-dir of a `dmd train` run)")
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {path.parent} the --output-dir of a `dmd train` run?")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}: line {number}")  # deep nesting, too many digits: a ValueError
        except ValueError:
            record = None
        # An integer beyond float range would end the plot in an OverflowError wherever it is converted.
        huge = [k for k, v in record.items() if not _fits_float(v)] if isinstance(record, dict) else []
        if huge:
            raise PlotError(
                f"{path}: line {number} holds a number beyond float range under '{huge[0][:40]}'; is it corrupt?"
            )
        if not isinstance(record, dict) or not (_is_number(record.get("step")) and math.isfinite(record["step"])):
            if number == len(lines):
                break
            raise PlotError(f"{path}: line {number} is not a stats record (a JSON object with a step); is it corrupt?")
        records.append(record)
    if not records:
        raise PlotError(f"{path} holds no records yet (training writes one every --log-every steps)")
    return records


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits_float(value):
    """Whether value, if a number, converts to a float (JSON integers have no bound)."""
    if not _is_number(value):
        return True
    try:
        float(value)
    except OverflowError:
        return False
    return True


def kimg_axis(records):
    """A function giving a record's x value, and the axis name: kimg where the records have it; FID records of
    older runs ({step, fid} alone) get theirs from the images per step the other records show; steps without any."""
    ratios = [r["kimg"] / r["step"] for r in records if _is_number(r.get("kimg")) and r["step"] > 0]
    if not ratios:
        return (lambda r: r["step"]), "step"
    per_step = ratios[-1]  # the global batch / 1000, fixed within a run
    return (lambda r: r["kimg"] if _is_number(r.get("kimg")) else r["step"] * per_step), "kimg"


def series(records, key, x_of):
    """(x, y) of the records holding a number under `key`, ordered by x; non-finite values stay (as gaps)."""
    points = sorted((x_of(r), float(r[key])) for r in records if _is_number(r.get(key)))
    return [x for x, _ in points], [y for _, y in points]


def shown(curves):
    """The curves worth a line: some finite value that is not 0 (regression-only runs log loss_dm 0, DMD runs log
    loss_gan 0)."""
    return {k: c for k, c in curves.items() if any(math.isfinite(y) and y != 0 for y in c[1])}


def smooth(y, span):
    """An exponential moving average of `y` over about `span` points, started without bias; NaNs are skipped."""
    alpha, mean, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for value in y:
        if math.isfinite(value):
            mean, weight = (1 - alpha) * mean + alpha * value, (1 - alpha) * weight + alpha
        out.append(mean / weight if weight > 0 else float("nan"))
    return out


def draw_curves(ax, curves, ylabel, steps=False):
    """Draw each (x, y) of `curves` on `ax`: raw, or faint with a smoothed line over it when it is long (`steps`:
    always raw, as a staircase); a log scale when every finite value is positive and they span a decade or more
    (under a decade a log axis has one labelled tick or none)."""
    for key, (x, y) in curves.items():
        colour, width = COLOURS.get(key), WIDE.get(key, 1.5)
        if steps:
            ax.plot(x, y, color=colour, linewidth=width, drawstyle="steps-post", label=key)
        elif len(y) >= SMOOTH_FROM:
            ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth(y, len(y) // 50), color=colour, linewidth=width, label=key)
        else:
            marker = "o" if len(y) <= 50 and key not in WIDE else None
            ax.plot(x, y, color=colour, linewidth=width, marker=marker, markersize=3, label=key)
    values = [y for _, ys in curves.values() for y in ys if math.isfinite(y)]
    if values and min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(curves), 3), loc="best")


def config_value(run_dir, key):
    """A setting from the run's config.json, or None where it is missing or unreadable (plotting needs none)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def plot_run(run_dir, out=None):
    """Write the PNG of `run_dir`'s stats.jsonl to `out` (default RUN_DIR/stats.png) atomically; return its path.

    Panels, over kimg: the losses (log scale where all positive; with a GAN, the discriminator's chance line ln 4),
    the gradient norms G and mu_fake report before clipping (with the --grad-clip line), the FID records if any (best
    marked, non-finite ones counted), the learning rates if they changed (a resume with --allow-change). PlotError
    naming the file (and line) for a missing, empty or corrupt stats.jsonl.
    """
    run_dir = Path(run_dir)
    out = run_dir / "stats.png" if out is None else Path(out)
    fig = figure(run_dir)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return out


def figure(run_dir):
    """The matplotlib Figure plot_run writes for `run_dir`."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotError("dmd plot needs matplotlib: pip install 'dmd-distill[plot]'") from e

    run_dir = Path(run_dir)
    records = read_stats(run_dir / "stats.jsonl")
    x_of, x_name = kimg_axis(records)
    losses = shown({k: series(records, k, x_of) for k in LOSSES})
    norms = shown({k: series(records, k, x_of) for k in GRAD_NORMS})
    # Every FID record, a failed evaluation's NaN, inf or string too: drawn as a gap and counted in the legend. A run
    # with several EMAs (--ema) records fid_<name> per EMA: one curve each.
    fid = {}
    for key in sorted({k for r in records for k in r if k == "fid" or k.startswith("fid_")}):
        fid_records = [dict(r, **{key: r[key] if _is_number(r[key]) else math.nan}) for r in records if key in r]
        fid[key] = series(fid_records, key, x_of)
    rates = {k: series(records, k, x_of) for k in LEARNING_RATES}
    rates = rates if any(len(set(y)) > 1 for _, y in rates.values()) else {}  # a panel only when one changed
    panels = [p for p, has in (("losses", losses), ("norms", norms), ("fid", fid), ("lr", rates)) if has]
    if not panels:
        raise PlotError(f"{run_dir / 'stats.jsonl'} holds no losses, gradient norms or FID to plot")

    fig = Figure(figsize=(9, 0.6 + 2.7 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "losses":
            draw_curves(ax, losses, "loss")
            if "loss_disc" in losses:  # a GAN run: non-GAN runs log loss_disc 0, which `shown` leaves out
                ax.axhline(DISC_CHANCE, color=COLOURS["loss_disc"], linestyle=":", linewidth=1.2, label=CHANCE_LABEL)
                ax.legend(fontsize=8, ncol=3, loc="best")
        elif panel == "norms":
            draw_curves(ax, norms, "gradient norm")
            clip = config_value(run_dir, "grad_clip")
            if _is_number(clip) and math.isfinite(clip):
                ax.axhline(clip, color="0.4", linestyle="--", linewidth=1, label=f"--grad-clip {clip:g}")
                ax.legend(fontsize=8, ncol=3, loc="best")
        elif panel == "fid":
            for i, (key, (x, y)) in enumerate(fid.items()):
                draw_fid(ax, x, y, x_name, "FID" if key == "fid" else f"FID {key[4:]}", f"C{3 + i}")
        else:
            draw_curves(ax, {k: c for k, c in rates.items() if c[1]}, "learning rate", steps=True)
    axes[-1].set_xlabel(x_name)
    fig.suptitle(title(run_dir, records, x_of, x_name), fontsize=10)
    return fig


def draw_fid(ax, x, y, x_name, name="FID", colour="C3"):
    """One FID curve (`name`: FID, or FID <ema> per EMA) with its best (lowest) value marked and written in the
    legend, and the count of records that are not finite (gaps in the curve) written there too."""
    ax.plot(x, y, color=colour, linewidth=1.5, marker="o", markersize=3, label=name)
    finite = [(v, i) for i, v in enumerate(y) if math.isfinite(v)]
    if finite:
        best, i = min(finite)
        ax.plot([x[i]], [best], color=colour, marker="*", markersize=12, linestyle="none")
        label = f"best {best:.3f} at {x_name} {x[i]:g}"
        ax.plot([], [], color=colour, marker="*", markersize=8, linestyle="none", label=label)
    if len(finite) < len(y):
        label = f"{len(y) - len(finite)} of {len(y)} {name} records not finite"
        ax.plot([], [], color=colour, marker="x", markersize=8, linestyle="none", label=label)
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def title(run_dir, records, x_of, x_name):
    """The run folder and where its last record stands: step, kimg and training time where recorded."""
    last = max(records, key=lambda r: r["step"])
    where = f"step {last['step']}"
    if x_name == "kimg":
        where += f", {x_of(last):g} kimg"
    elapsed = [r["elapsed_s"] for r in records if _is_number(r.get("elapsed_s"))]
    if elapsed:
        where += f", {format_duration(max(elapsed))} of training"
    return f"{run_dir}: {where}"
