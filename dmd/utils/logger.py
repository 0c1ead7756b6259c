"""Training logs: `stats.jsonl` (one JSON record per logging step), a console line, and an optional Neptune run.

Neptune is imported lazily. Its credentials come from NEPTUNE_PROJECT / NEPTUNE_API_TOKEN or the `[credentials]`
section (`project`, `token`) of `neptune.cfg`; the token is handed to Neptune only, never written or printed.
"""

import configparser
import json
import os
from pathlib import Path

from dmd.utils.io import atomic_write_text


class LoggerError(RuntimeError):
    """Logging cannot start (missing Neptune package or credentials)."""


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


def format_stats(step, total_steps, stats):
    """One console line: step, losses, throughput, memory and skipped steps."""
    losses = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
    return (
        f"step {step}/{total_steps} | {losses} | {stats['img_per_s']:.1f} img/s | "
        f"mem {stats['mem_gib']:.2f} GiB | bad {stats['bad_steps']}"
    )


# Neptune run that receives each metric once per logging step under `train/<name>`.
class NeptuneLogger:
    def __init__(
        self,
        config,  # dict stored under `config` (holds no secrets)
        cfg_path="neptune.cfg",  # credentials file, used where the environment variables are unset
        mode=None,  # Neptune mode; None = $NEPTUNE_MODE or 'async' ('debug'/'offline' work without a server)
    ):
        try:
            import neptune
            from neptune.utils import stringify_unsupported
        except ImportError as e:
            raise LoggerError("--log-neptune needs the neptune package: pip install 'dmd[neptune]'") from e
        project, token = neptune_credentials(cfg_path)
        if not project or not token:
            raise LoggerError(
                f"--log-neptune needs NEPTUNE_PROJECT and NEPTUNE_API_TOKEN, or a [credentials] section in {cfg_path}"
            )
        self.run = neptune.init_run(project=project, api_token=token, mode=mode or os.environ.get("NEPTUNE_MODE"))
        self.run["config"] = stringify_unsupported(config)

    def log(self, step, stats):
        """Append every metric of one logging step."""
        for name, value in stats.items():
            self.run[f"train/{name}"].append(value, step=step)

    def close(self):
        self.run.stop()


# Rank-0 sink for training statistics: appends to `<run_dir>/stats.jsonl` and forwards to Neptune if given.
class StatsLogger:
    def __init__(
        self,
        run_dir,  # run folder holding stats.jsonl
        neptune=None,  # a NeptuneLogger, or None
    ):
        self.path = Path(run_dir) / "stats.jsonl"
        self.neptune = neptune

    def truncate_after(self, step):
        """Drop records past `step` (and torn lines), so a resumed run does not log the steps it redoes twice."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # A line cut short by a killed run.
                continue
        atomic_write_text("".join(line + "\n" for line in kept), self.path)

    def log(self, step, stats):
        """Write one record `{"step": step, **stats}`."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
        if self.neptune is not None:
            self.neptune.log(step, stats)

    def close(self):
        if self.neptune is not None:
            self.neptune.close()
