"""`demo` and `demo train-teacher`: the CPU demo on digits (the work: dmd/demo/)."""

import click

from dmd.cli import main
from dmd.cli.options import (
    COUNT,
    POSITIVE,
    Command,
    Group,
    config_option,
    default_of,
    field_comments,
    new_file,
    option,
    progress_option,
    sentence,
)
from dmd.config import ConfigError
from dmd.demo import SHIPPED_TEACHER_THREADS
from dmd.demo.config import DemoConfig, DemoError, DemoInterrupted, TeacherConfig


# Embedded demo (dmd/demo/).
def _busy_cores():
    """How many cores other processes keep busy: the larger of the 1-minute load average and the processes running
    right now besides this one (/proc/loadavg's runnable count, sampled a few times: the average lags a new load)."""
    import os
    import time

    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        for _ in range(5):
            with open("/proc/loadavg", encoding="ascii") as f:
                running = int(f.read().split()[3].split("/")[0])
            busy = max(busy, running - 1)
            time.sleep(0.02)
    except (OSError, ValueError, IndexError):
        pass
    return busy


def _set_threads(threads):
    """Use `threads` torch CPU threads; 0: one per core that is free now (at least one), since threads fighting
    other processes for a core slow each other down 10-50x."""
    import os

    import torch

    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(cores, round(cores - _busy_cores())))
    torch.set_num_threads(threads)
    return threads


def _threads_option(default=0, help="Torch CPU threads; 0: one per free core (cores less the load average)."):
    return option(
        "--threads", default=default, type=click.IntRange(min=0), metavar="INT", section="Performance", help=help
    )


def _demo(flag, *aliases, section="Settings", **kwargs):
    """A demo option: unset it is None, and --full's value or else DemoConfig's default applies."""
    from dmd.demo.config import FULL

    name = flag[2:].replace("-", "_")
    text = field_comments(DemoConfig)[name]
    full = f"; --full: {FULL[name]}" if name in FULL else ""
    text = f"{sentence(text)}  [default: {default_of(DemoConfig, name)}{full}]"
    return option(flag, *aliases, name, default=None, section=section, help=text, show_default=False, **kwargs)


DEMO_EXAMPLES = """
python -m dmd demo                                   # the default run (minutes on a 2-core CPU), into runs/demo
python -m dmd demo --full --output-dir runs/demo-full  # longer training, twice the evaluation samples
python -m dmd demo --no-progress > demo.log          # for logs; rerun the same command after an interruption
python -m dmd demo train-teacher --out teacher.pkl && python -m dmd demo --network teacher.pkl
"""


@main.group("demo", cls=Group, invoke_without_command=True, examples=DEMO_EXAMPLES)
@_demo("--output-dir", type=click.Path(file_okay=False), metavar="DIR", section="Main")
@option(
    "--network",
    "--teacher",
    "teacher",
    default=None,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    section="Main",
    show_default=False,
    help="EDM pickle of the digits teacher.  [default: shipped]",
)
@option(
    "--full", is_flag=True, section="Main", help="Train longer and evaluate more samples (see --max-steps, --num-eval)."
)
@_demo("--max-steps", "--steps", type=COUNT, metavar="INT")
@_demo("--batch-size", type=COUNT, metavar="INT")
@_demo("--num-pairs", type=COUNT, metavar="INT")
@_demo("--lr-gen", type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT")
@_demo("--lr-fake", type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT")
@option("--lr", type=click.FloatRange(0, 1, min_open=True), hidden=True, help="Both learning rates (old spelling).")
@_demo("--fake-steps-per-gen", type=COUNT, metavar="INT")
@_demo("--lambda-reg", type=POSITIVE, metavar="FLOAT")
@_demo("--gan-weight-gen", type=POSITIVE, metavar="FLOAT")
@_demo("--gan-weight-disc", type=POSITIVE, metavar="FLOAT")
@option("--two-step", is_flag=True, section="Settings", help="Also distil DMD2's two-step generator.  [--full: on]")
@option("--fdistill", is_flag=True, section="Settings", help="Also distil f-distill (JS) beside DMD2.  [--full: on]")
@_demo("--two-step-sigma", type=click.FloatRange(0, 80, min_open=True, max_open=True), metavar="FLOAT")
@_demo("--num-eval", type=click.IntRange(min=20), metavar="INT")
@_demo("--seed", type=int, metavar="INT")
@_threads_option()
@progress_option("Progress bars of the pair sampling and the training")
@click.pass_context
def demo_group(ctx, teacher, full, lr, two_step, fdistill, threads, progress, **options):
    """Distil the shipped digits teacher into one-step generators on a CPU and measure them (minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from dmd.checkpoint import CheckpointError
    from dmd.data import PairFileError
    from dmd.demo.config import FULL
    from dmd.demo.digits import DigitsUnavailableError
    from dmd.demo.run import run_demo
    from dmd.train import TrainError

    if lr is not None:  # the old --lr set both learning rates
        options = {**options, "lr_gen": options["lr_gen"] or lr, "lr_fake": options["lr_fake"] or lr}
    settings = {k: v for k, v in options.items() if v is not None}
    if full:
        settings = {**FULL, **settings}
    if two_step:
        settings["two_step"] = True
    if fdistill:
        settings["fdistill"] = True
    if teacher is not None:
        settings["teacher"] = teacher
    _set_threads(threads)
    try:
        cfg = DemoConfig(**settings, progress=progress)
        run_demo(cfg)
    except (DemoError, DigitsUnavailableError, TrainError, CheckpointError, ConfigError, PairFileError, OSError) as e:
        raise click.ClickException(str(e)) from e
    except (DemoInterrupted, KeyboardInterrupt) as e:
        reason = f" ({e})" if str(e) else ""
        click.echo(f"Demo stopped by a signal{reason}; rerun the same command to continue where it stopped", err=True)
        ctx.exit(130)


@demo_group.command(
    "train-teacher",
    cls=Command,
    examples="""
python -m dmd demo train-teacher --out demo_teacher.pkl   # the shipped teacher, byte for byte (torch 2.13, AVX512)
""",
)
@option(
    "--out",
    default="demo_teacher.pkl",
    type=click.Path(dir_okay=False),
    callback=new_file,
    metavar="FILE",
    section="Main",
    help="EDM pickle to write.",
)
@config_option(TeacherConfig, "--seed", section="Main", type=int, metavar="INT")
@config_option(
    TeacherConfig,
    "--kimg",
    section="Main",
    type=POSITIVE,
    metavar="KIMG",
    help="training duration in thousands of images",
)
@config_option(
    TeacherConfig, "--batch-size", "--batch", section="Main", type=COUNT, metavar="INT", help="images per step"
)
@config_option(TeacherConfig, "--lr", section="Main", type=POSITIVE, metavar="FLOAT")
@_threads_option(
    SHIPPED_TEACHER_THREADS,
    "Torch CPU threads, part of the recipe (float sums split across threads); 0: one per free core.",
)
@progress_option()
def demo_train_teacher_command(out, threads, progress, **options):
    """Train the demo's digits teacher with EDM's loss and save it as an EDM pickle (reproducible from --seed)."""
    from dmd.demo.digits import DigitsUnavailableError
    from dmd.demo.teacher import train_teacher

    _set_threads(threads)
    try:
        train_teacher(out, TeacherConfig(**options), progress=progress)
    except (DemoError, DigitsUnavailableError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{out}: teacher written; distil it with `python -m dmd demo --network {out}`")
