"""Training logs: `stats.jsonl` (one JSON record per logging step), a console line also kept in `log.txt`, and
optional trackers: TensorBoard event files, a Neptune run, a Weights & Biases run. Trackers get the metrics (without
the losses a run has switched off) and the sample grids.

The trackers' packages are imported lazily. Neptune's credentials come from NEPTUNE_PROJECT / NEPTUNE_API_TOKEN or
the `[credentials]` section (`project`, `token`) of `neptune.cfg`; the token is handed to Neptune only, never written
or printed. Weights & Biases reads its own settings (WANDB_API_KEY or `wandb login`, WANDB_PROJECT, WANDB_MODE=offline
for a machine without network).
"""

import configparser
import json
import os
import secrets
import time
from pathlib import Path

from tqdm import tqdm

from dmd.utils.common import parse_json
from dmd.utils.io import atomic_write_text


class LoggerError(RuntimeError):
    """Logging cannot start (a missing TensorBoard or Neptune package, missing Neptune credentials)."""


def neptune_credentials(cfg_path="neptune.cfg"):
    """Return (project, token): the environment variables win over `cfg_path`; either may be None."""
    project, token = None, None
    if Path(cfg_path).is_file():
        parser = configparser.ConfigParser()
        parser.read(cfg_path, encoding="utf-8")
        if parser.has_section("credentials"):
            project = parser.get("credentials", "project", fallback=None)
            token = parser.get("credentials", "token", fallback=None)
    return os.environ.get("NEPTUNE_PROJECT", project), os.environ.get("NEPTUNE_API_TOKEN", token)


def format_duration(seconds):
    """A duration as EDM's console shows one: 45s, 3m 05s, 2h 03m 05s, 1d 02h 03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s"
    return f"{s // 86400}d {s // 3600 % 24:02d}h {s // 60 % 60:02d}m"


def format_head(step, total_steps, stats):
    """The start of every console line of a record: local time, step, kimg and the run's training time."""
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats["timestamp"]))
    return f"{clock} | step {step}/{total_steps} | kimg {stats['kimg']:.3f} | {format_duration(stats['elapsed_s'])}"


def format_stats(step, total_steps, stats, hide=()):
    """One console line: time and progress, speed, the losses but those in `hide` (the ones a run has switched off),
    f-distill's weights (h_min, h_mean, h_max) unless hidden, learning rates, memory and skipped steps."""
    losses = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.startswith("loss_") and k not in hide)
    if "h_mean" in stats and "h_mean" not in hide:
        losses += f" | h {stats['h_min']:.3f}/{stats['h_mean']:.3f}/{stats['h_max']:.3f}"
    return (
        f"{format_head(step, total_steps, stats)} | {stats['s_per_kimg']:.1f} s/kimg | {losses} | "
        f"lr_gen {stats['lr_gen']:.3g} lr_fake {stats['lr_fake']:.3g} | {stats['img_per_s']:.1f} img/s | "
        f"mem {stats['mem_gib']:.2f} GiB | bad {stats['bad_steps']}"
    )


def metrics(stats, hide=()):
    """The numeric values of a record a tracker plots: all but its wall-clock `timestamp`, which it gets as time, and
    those in `hide` (the losses a run has switched off, which would plot as flat zeros)."""
    return {k: v for k, v in stats.items() if k != "timestamp" and k not in hide and isinstance(v, (int, float))}


def _missing(flag, package, extra):
    return LoggerError(f"{flag} needs the {package} package: pip install 'dmd-distill[{extra}]'")


def check_trackers(log_neptune=False, log_tensorboard=False, log_wandb=False, cfg_path="neptune.cfg"):
    """Raise LoggerError now, before any work, if a tracker asked for cannot start: its package is missing (or
    Neptune's credentials are)."""
    if log_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise _missing("--log-tensorboard", "tensorboard", "tensorboard") from e
    if log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise _missing("--log-wandb", "wandb", "wandb") from e
    if log_neptune:
        try:
            import neptune  # noqa: F401
        except ImportError as e:
            raise _missing("--log-neptune", "neptune", "neptune") from e
        project, token = neptune_credentials(cfg_path)
        if not project or not token:
            raise LoggerError(
                f"--log-neptune needs NEPTUNE_PROJECT and NEPTUNE_API_TOKEN, or a [credentials] section in {cfg_path}"
            )


# Neptune run that receives each metric once per logging step under `train/<name>`.
class NeptuneLogger:
    def __init__(
        self,
        config,  # dict stored under `config` (holds no secrets)
        cfg_path="neptune.cfg",  # credentials file, used where the environment variables are unset
        mode=None,  # Neptune mode; None = $NEPTUNE_MODE or 'async' ('debug'/'offline' work without a server)
    ):
        check_trackers(log_neptune=True, cfg_path=cfg_path)
        import neptune
        from neptune.utils import stringify_unsupported

        project, token = neptune_credentials(cfg_path)
        self.run = neptune.init_run(project=project, api_token=token, mode=mode or os.environ.get("NEPTUNE_MODE"))
        self.run["config"] = stringify_unsupported(config)

    def log(self, step, stats, hide=()):
        """Append every metric of one logging step (but those in `hide`)."""
        for name, value in metrics(stats, hide).items():
            self.run[f"train/{name}"].append(value, step=step, timestamp=stats.get("timestamp"))

    def image(self, step, kimg, name, image):
        """Append a sample grid (a PIL image) to the series `grids/<name>`."""
        from neptune.types import File

        self.run[f"grids/{name}"].append(File.as_image(image), step=step, description=f"{kimg:.3f} kimg")

    def close(self):
        self.run.stop()


# TensorBoard event files in the run folder, the tracker EDM writes to when it is installed. Every metric goes under
# `train/<name>` at global step = images seen (the record's kimg x 1000): EDM's x axis is kimg, counted here in
# images so that the logging steps within one kimg stay apart.
class TensorBoardLogger:
    def __init__(
        self,
        run_dir,  # folder of the event files (a resumed run adds a file beside the earlier ones)
        purge_step=None,  # a resumed run: hide the earlier files' events from this global step on (steps it redoes)
    ):
        check_trackers(log_tensorboard=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def log(self, step, stats, hide=()):
        """Add every metric of one record (it must hold `kimg`; but those in `hide`) and flush, so a crash loses no
        logged step."""
        nimg = round(stats["kimg"] * 1000)
        for name, value in metrics(stats, hide).items():
            self.writer.add_scalar(f"train/{name}", value, global_step=nimg, walltime=stats.get("timestamp"))
        self.writer.flush()

    def image(self, step, kimg, name, image):
        """Add a sample grid (a PIL image) under `grids/<name>` at the images seen."""
        import numpy as np

        self.writer.add_image(f"grids/{name}", np.asarray(image), global_step=round(kimg * 1000), dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


# A Weights & Biases run (DMD2's and FastGen's tracker) in the run folder: metrics under `train/<name>` against
# `train/kimg`, sample grids under `grids/<name>`. A resumed run continues the same W&B run: its id is kept in
# RUN/wandb-run-id. Steps a resume redoes are logged again (W&B has no purge like TensorBoard's).
class WandbLogger:
    def __init__(
        self,
        run_dir,  # run folder: wandb writes under RUN/wandb
        config,  # dict stored as the W&B run's config
        mode=None,  # 'online', 'offline', 'disabled'; None = $WANDB_MODE or online
    ):
        check_trackers(log_wandb=True)
        import wandb

        id_file = Path(run_dir) / "wandb-run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else secrets.token_hex(8)
        self.run = wandb.init(
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT", "dmd"),
            name=Path(run_dir).name,
            id=run_id,
            resume="allow",
            config=config,
            mode=mode or os.environ.get("WANDB_MODE"),
        )
        self.run.define_metric("train/kimg")
        self.run.define_metric("train/*", step_metric="train/kimg")
        self.run.define_metric("grids/*", step_metric="train/kimg")
        atomic_write_text(run_id + "\n", id_file)

    def log(self, step, stats, hide=()):
        """Log every metric of one record (but those in `hide`) against its kimg."""
        self.run.log({f"train/{name}": value for name, value in metrics(stats, hide).items()})

    def image(self, step, kimg, name, image):
        """Log a sample grid (a PIL image) under `grids/<name>`."""
        import wandb

        self.run.log({"train/kimg": kimg, f"grids/{name}": wandb.Image(image, caption=f"step {step}")})

    def close(self):
        self.run.finish()


# Rank-0 sink for training statistics and console lines: records go to `<run_dir>/stats.jsonl` (whole) and the
# trackers given (without the metrics in `hide`), grids to the trackers, console lines to the console and
# `<run_dir>/log.txt`.
class StatsLogger:
    def __init__(
        self,
        run_dir,  # run folder holding stats.jsonl and log.txt
        trackers=(),  # NeptuneLogger, TensorBoardLogger, WandbLogger
        hide=(),  # metrics the trackers leave out (the losses a run has switched off)
    ):
        self.path = Path(run_dir) / "stats.jsonl"
        self.trackers, self.hide = list(trackers), set(hide)
        # Appended to (a resumed run continues the log); line-buffered and flushed per line, so a crash loses at
        # most the line being written.
        self.console_log = open(Path(run_dir) / "log.txt", "a", encoding="utf-8", buffering=1)

    def truncate_after(self, step):
        """Drop records past `step` (and torn lines), so a resumed run does not log the steps it redoes twice."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if parse_json(line, self.path)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # A line cut short by a killed run, or not a record of ours.
                continue
        atomic_write_text("".join(line + "\n" for line in kept), self.path)

    def log(self, step, stats):
        """Write one record `{"step": step, **stats}`."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, stats, self.hide)

    def image(self, step, kimg, name, image):
        """Send a sample grid (a PIL image) to the trackers."""
        for tracker in self.trackers:
            tracker.image(step, kimg, name, image)

    def echo(self, text, console=True):
        """Print `text` (above the progress bar, on stdout) and append it to log.txt; console=False: log.txt only,
        for a line someone else prints (the CLI's error line)."""
        text = text.rstrip("\n")
        if console:
            tqdm.write(text)
        self.console_log.write(text + "\n")
        self.console_log.flush()

    def close(self):
        self.console_log.close()
        for tracker in self.trackers:
            tracker.close()
