"""Command-line interface: `python -m dmd <command> --help`.

Each command parses and validates its options, builds a config and calls into the module that does the work.
Commands live here, one function each; the work itself lives in the module named in each docstring.
"""

import click

from dmd import __version__

# Plain dataclasses (no torch): the flags take their defaults from them.
from dmd.config import RECIPES, ConfigError, TrainConfig, resolve_recipe
from dmd.demo.config import DemoConfig, DemoError, DemoInterrupted, TeacherConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dmd")
def main():
    """Distill an EDM diffusion model into a one-step generator with Distribution Matching Distillation."""


# ----------------------------------------------------------------------------
# Commands are added below, one block each (see each module for the work).


# Teacher pairs (dmd/pairs.py, dmd/data.py).
@main.command("make-pairs")
@click.option("--network", "network", required=True, help="Teacher EDM network pickle: path or URL.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Pair file to write or resume.")
@click.option("--num", "num", required=True, type=click.IntRange(min=1), help="Number of pairs.")
@click.option(
    "--seeds", "seeds", default=None, help="Seed list like 0-99999; its first --num are used. [default: 0..num-1]"
)
@click.option("--class-balanced", is_flag=True, help="Cycle labels over classes (pair i -> class i % label_dim).")
@click.option(
    "--batch", "batch_size", default=256, type=click.IntRange(min=1), help="Pairs per sampler call per process."
)
@click.option(
    "--steps", "num_steps", default=18, type=click.IntRange(min=2), help="Sampler steps (2N-1 network calls)."
)
@click.option("--sigma-min", default=0.002, type=click.FloatRange(min=0, min_open=True), help="Lowest sampler sigma.")
@click.option("--sigma-max", default=80.0, type=click.FloatRange(min=0, min_open=True), help="Highest sampler sigma.")
@click.option("--rho", default=7.0, type=click.FloatRange(min=0, min_open=True), help="Time step exponent.")
@click.option("--S-churn", "S_churn", default=0.0, type=click.FloatRange(min=0), help="Stochasticity strength.")
@click.option("--S-min", "S_min", default=0.0, type=click.FloatRange(min=0), help="Stochasticity: lowest sigma.")
@click.option("--S-max", "S_max", default=float("inf"), type=click.FloatRange(min=0), help="Stochasticity: top sigma.")
@click.option("--S-noise", "S_noise", default=1.0, type=float, help="Stochasticity: noise inflation.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Download cache for URL teachers.")
def make_pairs_command(network, out, num, seeds, **options):
    """Sample teacher noise-image pairs into an HDF5 pair file (resumes an interrupted file)."""
    from dmd.data import PairFileError
    from dmd.edm.persistence import NetworkLoadError
    from dmd.pairs import make_pairs
    from dmd.utils import distributed
    from dmd.utils.download import DownloadError

    try:
        make_pairs(network, out, num, seeds=seeds, **options)
    except (PairFileError, NetworkLoadError, DownloadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()


@main.command("convert-pairs")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--label-dim", default=None, type=click.IntRange(min=0), help="Classes. [default: max class_idx + 1]")
def convert_pairs_command(old, new, label_dim):
    """Rewrite a pair file of the port's layout (/data/{i}) in our fast layout."""
    from pathlib import Path

    from dmd.data import PairFileError, convert_port_file

    if Path(new).exists():
        raise click.ClickException(f"{new} exists; remove it or choose another output path")
    try:
        num = convert_port_file(old, new, label_dim=label_dim)
    except PairFileError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{new}: {num} pairs converted from {old}")


# DMD training (dmd/train.py, dmd/config.py).
def _default(config, name):
    """The default of a config dataclass field, so `--help` shows the value the config really uses."""
    return config.__dataclass_fields__[name].default


def _option(config, flag, type, help):
    """An option whose default is the field of `config` named like the flag (--lr-gen -> lr_gen)."""
    return click.option(flag, default=_default(config, flag[2:].replace("-", "_")), type=type, help=help)


_POSITIVE = click.FloatRange(min=0, min_open=True)


def _recipe_option(flag, type, help):
    """An option a --recipe may set: unset it is None, and the recipe's value or else the config's default applies."""
    name = flag[2:].replace("-", "_")
    by_recipe = "".join(f"; --recipe {r}: {values[name]}" for r, values in RECIPES.items() if name in values)
    text = f"{help}  [default: {_default(TrainConfig, name)}{by_recipe}]"
    return click.option(flag, default=None, type=type, help=text, show_default=False)


def _float_list(ctx, param, value):
    """Parse '80' or '80,1.5' into a tuple of floats (None stays None)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from e


@main.command("train")
@click.option("--model-path", required=True, help="Teacher EDM network pickle: path, file:// or http(s):// URL.")
@click.option("--data-path", type=click.Path(dir_okay=False), help="Teacher pair file (make-pairs) for regression.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False), help="Run folder (created).")
@_option(TrainConfig, "--batch-size", click.IntRange(min=1), "Per process.")
@click.option(
    "--reg-batch-size",
    type=click.IntRange(min=1),
    help="Pairs per process and step for the regression loss.  [default: --batch-size]",
)
@click.option("--max-steps", type=click.IntRange(min=1), help="Duration in steps; or give --epochs.")
@click.option("--epochs", type=click.IntRange(min=1), help="Duration in passes over --data-path.")
@click.option(
    "--recipe",
    default="dmd",
    type=click.Choice(sorted(RECIPES)),
    help="Defaults for the settings left unset: dmd (the DMD paper's) or dmd2 (DMD2's: no pairs, 5 fake-score "
    "steps per G step, GAN on --real-data, lr 2e-6). Explicit flags override it; config.json records the result.",
)
@_recipe_option("--lr-gen", _POSITIVE, "AdamW learning rate of G.")
@_recipe_option("--lr-fake", _POSITIVE, "AdamW learning rate of mu_fake (and the GAN head).")
@_option(TrainConfig, "--weight-decay", click.FloatRange(min=0), "AdamW, both.")
@_option(TrainConfig, "--grad-clip", _POSITIVE, "Max gradient norm, both networks.")
@_option(TrainConfig, "--lambda-dm", click.FloatRange(min=0), "DM weight; 0=off.")
@_recipe_option("--lambda-reg", click.FloatRange(min=0), "Regression weight; 0 = off (no pairs needed).")
@_option(
    TrainConfig,
    "--regression-distance",
    click.Choice(["lpips", "mse"]),
    "Regression distance: the paper's LPIPS, or MSE at native resolution (CPU smoke runs).",
)
@_recipe_option("--fake-steps-per-gen", click.IntRange(min=1), "mu_fake steps per G step (DMD2's TTUR: 5).")
@click.option(
    "--generator-sigmas",
    callback=_float_list,
    help="G's noise levels: 80 is the one-step G(z) = D(80 z; 80); a decreasing list such as 80,1.5 makes a "
    "few-step generator trained with backward simulation.  [default: 80]",
)
@click.option("--generator-sigma", type=_POSITIVE, hidden=True, help="One-step sigma_G (old spelling).")
@click.option(
    "--real-data",
    type=click.Path(exists=True),
    help="Real images for DMD2's GAN: a folder or ZIP in EDM's dataset format (dataset_tool.py), e.g. "
    "cifar10-32x32.zip; resolution, channels and classes must match the teacher.",
)
@click.option("--xflip", is_flag=True, help="Also use the real images mirrored left-right (EDM's x-flip).")
@_recipe_option("--gan-weight-gen", click.FloatRange(min=0), "Weight of G's GAN loss; 0 = no GAN.")
@_recipe_option(
    "--gan-weight-disc", click.FloatRange(min=0), "Weight of the discriminator loss in the fake-score step."
)
@_option(TrainConfig, "--gan-t-max", click.FloatRange(0, 1, min_open=True), "Diffusion-GAN noise: index < this x T.")
@_option(TrainConfig, "--dropout", click.FloatRange(0, 1, max_open=True), "G, mu_fake.")
@_option(TrainConfig, "--t-min", click.FloatRange(0, 1), "DM loss t range, fraction of T.")
@_option(TrainConfig, "--t-max", click.FloatRange(0, 1), "Its upper end (exclusive).")
@_option(TrainConfig, "--fake-sigma-sampling", click.Choice(["karras", "lognormal"]), "Fake-loss sigmas.")
@_option(TrainConfig, "--ema-halflife-kimg", click.FloatRange(min=0), "EMA of G; 0 = off.")
@_option(
    TrainConfig,
    "--precision",
    click.Choice(["fp32", "bf16"]),
    "bf16: the U-Nets compute in bf16 with fp32 weights, losses and optimisers (as DMD2); works on CPU too, slowly.",
)
@click.option("--channels-last", is_flag=True, help="Networks in channels-last memory layout (GPU speed).")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the U-Nets (slow start, faster steps).")
@_option(TrainConfig, "--seed", int, "Seeds every random draw of the run.")
@click.option("--device", default="auto", help="auto, cpu or cuda (torchrun ranks use their local GPU).")
@_option(TrainConfig, "--log-every", click.IntRange(min=1), "Steps per stats line.")
@_option(TrainConfig, "--image-every", click.IntRange(min=0), "Grid; 0 = never.")
@_option(TrainConfig, "--checkpoint-every", click.IntRange(min=0), "0: exit.")
@_option(TrainConfig, "--keep-last", click.IntRange(min=0), "Checkpoints; 0 = all.")
@_option(TrainConfig, "--max-bad-steps", click.IntRange(min=1), "NaN in a row.")
@click.option("--resume", help="'auto' (newest state in --output-dir, if any) or a training-state file.")
@click.option(
    "--allow-change",
    default="",
    help="Comma-separated settings a resumed run may change from the run's, e.g. lr-gen,lr-fake to lower the "
    "learning rates of a diverging run.",
)
@click.option("--log-neptune", is_flag=True, help="Log to Neptune (neptune.cfg or NEPTUNE_PROJECT/NEPTUNE_API_TOKEN).")
@click.option(
    "--log-tensorboard",
    is_flag=True,
    help="Also write TensorBoard event files into --output-dir (needs the tensorboard package).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    help="The progress bar on stderr; --no-progress for batch jobs (stats lines still go to stdout and log.txt).",
)
@click.option("--lpips-vgg", help="VGG-16 weights for LPIPS: path or URL.  [default: torchvision's URL]")
@click.option("--lpips-lin", help="LPIPS v0.1 heads: path or URL.  [default: the LPIPS repository's URL]")
@click.option("--lpips-random", is_flag=True, help="Random LPIPS weights: tests and smoke runs only.")
@_option(TrainConfig, "--workers", click.IntRange(min=0), "Pair loader processes.")
@_option(TrainConfig, "--fid-every", click.IntRange(min=0), "Steps between FIDs of G; 0 = never.")
@_option(TrainConfig, "--fid-num", click.IntRange(min=2), "Images per FID.")
@click.option("--fid-ref", help="FID reference npz: path or URL.  [default: EDM's CIFAR-10 statistics]")
@click.option("--fid-detector", help="TorchScript feature detector: path or URL.  [default: EDM's Inception-v3]")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Download cache (teacher, LPIPS weights).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the teacher, pairs and run folder against each other, print the config, exit.",
)
@click.pass_context
def train_command(ctx, lpips_random, dry_run, allow_change, recipe, generator_sigma, **options):
    """Distill a teacher into a one-step (or few-step) generator with DMD or DMD2 (torchrun for several GPUs)."""
    from dmd.checkpoint import CheckpointError
    from dmd.train import TrainError, train
    from dmd.utils.logger import LoggerError

    try:
        if generator_sigma is not None:
            if options["generator_sigmas"] is not None:
                raise ConfigError("give --generator-sigmas or its old spelling --generator-sigma, not both")
            options["generator_sigmas"] = (generator_sigma,)
        if options["generator_sigmas"] is None:
            del options["generator_sigmas"]
        changeable = tuple(name for name in allow_change.split(",") if name.strip())
        options = resolve_recipe(recipe, options)
        cfg = TrainConfig(**options, lpips_pretrained=not lpips_random, allow_change=changeable)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    try:
        result = train(cfg, dry_run=dry_run)
    except (TrainError, CheckpointError, LoggerError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if dry_run:
        click.echo(cfg.to_json(), nl=False)
        return
    if result["stopped"]:
        click.echo(f"Stopped by a signal at step {result['step']}; continue with --resume auto", err=True)
        ctx.exit(130)


# Training curves (dmd/plot.py).
@main.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write.  [default: RUN_DIR/stats.png]")
def plot_command(run_dir, out):
    """Plot a training run's losses, gradient norms and FID over kimg from its stats.jsonl into one PNG."""
    from dmd.plot import PlotError, plot_run

    try:
        path = plot_run(run_dir, out)
    except (PlotError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{path}: curves of {run_dir}")


# One-step generation and FID (dmd/generate.py, dmd/fid.py).
@main.command("generate")
@click.option("--network", required=True, help="Snapshot, training state, EDM pickle or port checkpoint: path or URL.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--seeds", default="0-63", help="Seed list like 0-63,100; one image per seed.")
@click.option("--class", "class_idx", default=None, type=click.IntRange(min=0), help="One class for every image.")
@click.option("--class-balanced", is_flag=True, help="Seed s gets class s % label_dim (the FID protocol's labels).")
@click.option("--grid", default=None, type=click.Path(dir_okay=False), help="Also write a grid of all images here.")
@click.option("--batch", "batch_size", default=256, type=click.IntRange(min=1), help="Images per call per process.")
@click.option("--steps", "num_steps", default=None, type=click.IntRange(min=2), help="Teacher: edm_sampler steps.")
@click.option("--subdirs", is_flag=True, help="One folder per 1000 seeds, as EDM's --subdirs.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Download cache for URLs.")
def generate_command(
    network, outdir, seeds, class_idx, class_balanced, grid, batch_size, num_steps, subdirs, device, cache_dir
):
    """Write one PNG per seed from a one-step generator (or, with --steps, from an EDM teacher)."""
    from dmd.generate import GeneratorLoadError, generate_images
    from dmd.utils import distributed
    from dmd.utils.common import parse_int_list

    try:
        seed_list = parse_int_list(seeds)
    except ValueError as e:
        raise click.ClickException(f"--seeds: {e}") from e
    try:
        generate_images(
            network,
            outdir,
            seed_list,
            class_idx=class_idx,
            class_balanced=class_balanced,
            grid=grid,
            batch_size=batch_size,
            num_steps=num_steps,
            subdirs=subdirs,
            device=device,
            cache_dir=cache_dir,
        )
    except (GeneratorLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()


@main.group("fid")
def fid_group():
    """FID as EDM computes it: Inception-v3 features of uint8 images, float64 statistics."""


@fid_group.command("ref")
@click.option("--data", required=True, type=click.Path(exists=True), help="Image folder or ZIP (EDM's dataset layout).")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="Statistics file to write (.npz).")
@click.option("--detector", default=None, help="TorchScript detector: path or URL. [default: Inception-v3 of EDM]")
@click.option("--batch", "batch_size", default=256, type=click.IntRange(min=1), help="Images per detector call.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Download cache for URLs.")
def fid_ref_command(data, dest, detector, batch_size, device, cache_dir):
    """Compute reference statistics (mu, sigma) of every image in a dataset."""
    from dmd.fid import FIDError, make_ref
    from dmd.utils import distributed

    try:
        mu, _ = make_ref(data, dest, detector=detector, batch_size=batch_size, device=device, cache_dir=cache_dir)
        is_main = distributed.is_main()
    except (FIDError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()
    if is_main:
        click.echo(f"{dest}: statistics of {mu.shape[0]}-d features")


@fid_group.command("calc")
@click.option("--images", default=None, type=click.Path(exists=True), help="PNG folder or ZIP to score.")
@click.option("--network", default=None, help="Or a network to score straight from its samples: path or URL.")
@click.option("--ref", required=True, help="Reference statistics (.npz with mu, sigma): path or URL.")
@click.option(
    "--num",
    "--num-images",
    "num",
    default=50000,
    type=click.IntRange(min=2),
    help="Images per score (torchrun: --num-images).",
)
@click.option("--seeds", default=None, help="--network seeds. [default: 0 to num * repeats - 1]")
@click.option("--repeats", default=1, type=click.IntRange(min=1), help="--network: disjoint seed ranges to score.")
@click.option("--steps", "num_steps", default=None, type=click.IntRange(min=2), help="Teacher: edm_sampler steps.")
@click.option("--detector", default=None, help="TorchScript detector: path or URL. [default: Inception-v3 of EDM]")
@click.option("--batch", "batch_size", default=256, type=click.IntRange(min=1), help="Images per call per process.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun ranks use their local GPU).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Download cache for URLs.")
def fid_calc_command(images, network, ref, num, seeds, repeats, num_steps, detector, batch_size, device, cache_dir):
    """Score images (or a generator's samples, labels cycling over classes) against reference statistics."""
    import numpy as np

    from dmd.fid import FIDError, calc_fid
    from dmd.generate import GeneratorLoadError
    from dmd.utils import distributed
    from dmd.utils.common import parse_int_list

    try:
        seed_list = None if seeds is None else parse_int_list(seeds, limit=num * repeats)
    except ValueError as e:
        raise click.ClickException(f"--seeds: {e}") from e
    try:
        scores = calc_fid(
            ref,
            images=images,
            network=network,
            num=num,
            seeds=seed_list,
            repeats=repeats,
            num_steps=num_steps,
            detector=detector,
            batch_size=batch_size,
            device=device,
            cache_dir=cache_dir,
        )
        is_main = distributed.is_main()
    except (FIDError, GeneratorLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()
    if not is_main:
        return
    for r, score in enumerate(scores if len(scores) > 1 else []):
        click.echo(f"repeat {r}: FID {score:.6f}")
    click.echo(f"FID: {min(scores):.6f}")
    if len(scores) > 1:
        mean, std = np.mean(scores), np.std(scores, ddof=1)
        click.echo(f"FID over {len(scores)} seed ranges: min {min(scores):.4f}, mean {mean:.4f} +- {std:.4f} (std)")


# Embedded demo (dmd/demo/).
def _set_threads(threads):
    """Use `threads` torch CPU threads (0: torch's default); one thread is fastest on a CPU others are using."""
    import torch

    if threads:
        torch.set_num_threads(threads)


@main.group("demo", invoke_without_command=True)
@_option(DemoConfig, "--output-dir", click.Path(file_okay=False), "Pairs, training runs, grids, results.md/.json.")
@_option(DemoConfig, "--steps", click.IntRange(min=1), "Training steps per student.")
@_option(DemoConfig, "--num-pairs", click.IntRange(min=1), "Teacher pairs (35 NFE each).")
@_option(DemoConfig, "--batch-size", click.IntRange(min=1), "Generated images (and pairs) per step.")
@_option(DemoConfig, "--lr", _POSITIVE, "AdamW learning rate of G and mu_fake.")
@_option(DemoConfig, "--lambda-reg", _POSITIVE, "MSE regression weight.")
@_option(DemoConfig, "--fake-steps-per-gen", click.IntRange(min=1), "mu_fake steps per G step.")
@_option(DemoConfig, "--num-eval", click.IntRange(min=1), "Samples per method for FID and accuracy.")
@_option(DemoConfig, "--seed", int, "Seed of the judge and the training runs.")
@click.option("--teacher", default=None, type=click.Path(dir_okay=False), help="EDM pickle. [default: shipped]")
@click.option("--threads", default=0, type=click.IntRange(min=0), help="Torch CPU threads; 0 = torch's default.")
@click.option("--no-progress", is_flag=True, help="No bar while sampling pairs (training keeps its bar).")
@click.pass_context
def demo_group(ctx, teacher, threads, no_progress, **options):
    """Distil the shipped digits teacher into one-step generators on CPU and measure them (minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from dmd.checkpoint import CheckpointError
    from dmd.data import PairFileError
    from dmd.demo.digits import DigitsUnavailableError
    from dmd.demo.run import run_demo
    from dmd.train import TrainError

    _set_threads(threads)
    try:
        cfg = DemoConfig(**options, progress=not no_progress, **({} if teacher is None else {"teacher": teacher}))
        run_demo(cfg)
    except (DemoError, DigitsUnavailableError, TrainError, CheckpointError, ConfigError, PairFileError, OSError) as e:
        raise click.ClickException(str(e)) from e
    except (DemoInterrupted, KeyboardInterrupt) as e:
        reason = f" ({e})" if str(e) else ""
        click.echo(f"Demo stopped by a signal{reason}; rerun the same command to continue where it stopped", err=True)
        ctx.exit(130)


@demo_group.command("train-teacher")
@click.option("--out", default="demo_teacher.pkl", type=click.Path(dir_okay=False), help="EDM pickle to write.")
@_option(TeacherConfig, "--seed", int, "Seeds every draw.")
@_option(TeacherConfig, "--kimg", _POSITIVE, "Thousands of images.")
@click.option("--batch", "batch_size", default=_default(TeacherConfig, "batch_size"), type=click.IntRange(min=1))
@_option(TeacherConfig, "--lr", _POSITIVE, "Adam lr after warm-up.")
@click.option("--threads", default=0, type=click.IntRange(min=0), help="Torch CPU threads; 0 = torch's default.")
def demo_train_teacher_command(out, threads, **options):
    """Train the demo's digits teacher with EDM's loss and save it as an EDM pickle (reproducible from --seed)."""
    from dmd.demo.digits import DigitsUnavailableError
    from dmd.demo.teacher import train_teacher

    _set_threads(threads)
    try:
        train_teacher(out, TeacherConfig(**options))
    except (DemoError, DigitsUnavailableError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{out}: teacher written; distil it with `python -m dmd demo --teacher {out}`")
