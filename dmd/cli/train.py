"""`train` and `plot`: DMD and DMD2 training and its curves (the work: dmd/train.py, dmd/config.py, dmd/plot.py)."""

import click

from dmd.cli import main
from dmd.cli.options import (
    COUNT,
    POSITIVE,
    Command,
    cache_option,
    config_option,
    default_of,
    device_option,
    field_comments,
    float_list,
    guide_options,
    option,
    output_path,
    resolve_progress,
    sentence,
)
from dmd.config import DIVERGENCES, RECIPES, ConfigError, TrainConfig, resolve_recipe, upgrade_config


def _train(flag, *aliases, section, **kwargs):
    return config_option(TrainConfig, flag, *aliases, section=section, **kwargs)


def _recipe(flag, section, **kwargs):
    """A train option a --recipe may set: unset it is None, and the recipe's value or else the default applies."""
    name = flag[2:].replace("-", "_")
    by_recipe = "".join(f"; --recipe {r}: {values[name]}" for r, values in RECIPES.items() if name in values)
    text = kwargs.pop("help", None) or field_comments(TrainConfig)[name]
    text = f"{sentence(text)}  [default: {default_of(TrainConfig, name)}{by_recipe}]"
    return option(flag, default=None, section=section, help=text, show_default=False, **kwargs)


MAIN, HYPER, DMD2, PERF, IO = "Main", "Hyperparameters", "DMD2", "Performance", "I/O"
TRAIN_EXAMPLES = """
# DMD on EDM's CIFAR-10 teacher (the paper's settings), on 7 GPUs: global batch 56 x 7 = 392
torchrun --nproc_per_node 7 -m dmd train --network edm-cifar10-32x32-cond-vp.pkl --data-path cifar10-pairs.h5 \\
    --output-dir runs/dmd-cifar10 --precision bf16 --max-steps 200000
# DMD2: no pairs, 5 fake-score steps per G step, GAN on the real images; a two-step generator
python -m dmd train --recipe dmd2 --network edm.pkl --real-data cifar10-32x32.zip --output-dir runs/dmd2 \\
    --generator-sigmas 80,1.5 --max-steps 100000
# Continue a stopped run bit for bit with its own settings; train longer
python -m dmd train --output-dir runs/dmd-cifar10 --resume auto --max-steps 300000
# ... or lower its learning rates from here on
python -m dmd train --output-dir runs/dmd-cifar10 --resume auto --allow-change lr-gen,lr-fake --lr-gen 1e-5
# A CPU smoke run on a test fixture, no downloads
python -m dmd train --network tests/fixtures/edm_ddpmpp_cond.pkl --output-dir /tmp/smoke --device cpu \\
    --lambda-reg 0 --max-steps 20 --batch-size 4 --workers 0
"""


@main.command("train", cls=Command, examples=TRAIN_EXAMPLES)
@_train(
    "--network",
    "--model-path",
    field="model_path",
    section=MAIN,
    default=None,
    metavar="PATH|URL",
    help="the teacher: an EDM or EDM2 network pickle (path, file:// or http(s):// URL); required unless --resume "
    "continues a run, which keeps the run's own",
)
@guide_options(section=MAIN)
@_train(
    "--output-dir", section=MAIN, default=None, type=click.Path(file_okay=False), callback=output_path, metavar="DIR"
)
@option(
    "--recipe",
    section=MAIN,
    default="dmd",
    type=click.Choice(sorted(RECIPES)),
    help="Defaults for the settings left unset: dmd (the DMD paper's), dmd2 (DMD2's: no pairs, 5 "
    "fake-score steps per G step, GAN on --real-data, lr 2e-6) or fdistill (dmd2's with --divergence js). Both keep "
    "DMD2's discriminator (--gan-features fake); NVIDIA FastGen's measured DMD2 and f-distill runs add --gan-features "
    "teacher and --ema 0.9999,0.99995,0.9996 (README: the recipes). Explicit flags override it; config.json records "
    "the result.",
)
@_train(
    "--data-path",
    section=MAIN,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    show_default=False,
    help="teacher pair file (make-pairs) for the regression loss",
)
@_train(
    "--real-data",
    section=MAIN,
    type=click.Path(exists=True),
    metavar="PATH",
    show_default=False,
    help="real images for DMD2's GAN: a folder or ZIP in EDM's dataset format (`dmd make-dataset`), e.g. "
    "cifar10-32x32.zip, matching the teacher's resolution, channels and classes; for a latent EDM2 teacher, its "
    "VAE's latents in EDM2's encoded format (e.g. img512-sd.zip)",
)
@_train(
    "--max-steps",
    section=MAIN,
    type=COUNT,
    metavar="INT",
    show_default=False,
    help="duration in steps (one G update with its fake-score updates); or give --epochs",
)
@_train(
    "--epochs", section=MAIN, type=COUNT, metavar="INT", show_default=False, help="duration in passes over --data-path"
)
@_train(
    "--batch-size",
    section=MAIN,
    type=COUNT,
    metavar="INT",
    help="generated images per process and step; the global batch is this x processes",
)
@option(
    "--batch",
    type=COUNT,
    hidden=True,
    help="The global batch, as EDM's train.py means --batch: split evenly over the processes.",
)
@_train("--seed", section=MAIN, type=int, metavar="INT")
@_train(
    "--resume",
    section=MAIN,
    metavar="auto|FILE",
    show_default=False,
    help="'auto' (the newest training state in --output-dir, if any) or a training-state file; the run's own "
    "settings apply, and a flag given with it is a change (see --allow-change)",
)
@option(
    "--allow-change",
    default="",
    section=MAIN,
    metavar="LIST",
    show_default=False,
    help="Settings a resumed run may change from the run's, e.g. lr-gen,lr-fake to lower the learning rates "
    "of a diverging run.",
)
@option(
    "--dry-run",
    is_flag=True,
    section=MAIN,
    help="Open everything the run needs (teacher, data, LPIPS weights, FID detector and reference, downloads), check "
    "them against each other and the run folder, print the config, exit.",
)
@_recipe("--lr-gen", HYPER, type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT")
@_recipe("--lr-fake", HYPER, type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT")
@_train("--weight-decay", section=HYPER, type=click.FloatRange(min=0), metavar="FLOAT")
@_train("--grad-clip", section=HYPER, type=POSITIVE, metavar="FLOAT")
@_train("--lambda-dm", section=HYPER, type=click.FloatRange(min=0), metavar="FLOAT")
@_recipe("--lambda-reg", HYPER, type=click.FloatRange(min=0), metavar="FLOAT")
@_train("--regression-distance", section=HYPER, type=click.Choice(["lpips", "mse"]))
@_train(
    "--reg-batch-size",
    section=HYPER,
    type=COUNT,
    metavar="INT",
    show_default=False,
    help="pairs per process and step for the regression loss  [default: --batch-size]",
)
@_recipe("--fake-steps-per-gen", HYPER, type=COUNT, metavar="INT")
@option(
    "--generator-sigmas",
    callback=float_list,
    section=HYPER,
    metavar="LIST",
    show_default=False,
    help="G's noise levels: 80 is the one-step G(z) = D(80 z; 80); a decreasing list such as 80,1.5 makes a "
    "few-step generator, trained with backward simulation.  [default: 80]",
)
@option("--generator-sigma", type=POSITIVE, hidden=True, help="One-step sigma_G (the old spelling).")
@_train(
    "--fake-score-levels",
    section=HYPER,
    type=click.Choice(["all", "last"]),
    help="the samples of a few-step G that mu_fake (and the GAN's discriminator) learns: 'all' levels, each step's "
    "drawn level (DMD2's backward simulation), or the 'last' level only, G's final samples; the generator step keeps "
    "its drawn level either way, so at an earlier level its DM gradient moves that level's outputs by the final "
    "samples' fake score. No effect with one level",
)
@_train("--dropout", section=HYPER, type=click.FloatRange(0, 1, max_open=True), metavar="FLOAT")
@_train("--t-min", section=HYPER, type=click.FloatRange(0, 1, max_open=True), metavar="FLOAT")
@_train(
    "--t-max",
    section=HYPER,
    type=click.FloatRange(0, 1, min_open=True),
    metavar="FLOAT",
    help="upper end (exclusive) of the DM loss's t range, a fraction of T",
)
@_train("--fake-sigma-sampling", section=HYPER, type=click.Choice(["karras", "lognormal"]))
@_train(
    "--ema",
    section=HYPER,
    default="",
    metavar="LIST",
    show_default=False,
    help="EMAs of G, comma-separated, each updated after every step (one G update) as G_ema <- beta G_ema + "
    "(1 - beta) G: a half-life in kimg, '10kimg' (beta = 0.5 ** (global batch / 10000), EDM's ema_halflife_kimg), "
    "or a decay per step in (0, 1), e.g. NVIDIA FastGen's three '0.9999,0.99995,0.9996' (FastGen applies beta once "
    "per training iteration; here once per step). Each EMA has its own snapshots (with several: "
    "network-snapshot-NNNNNN-ema0.9999.pt), best snapshot and FID; `generate --ema NAME` picks one from a training "
    "state.  [default: none]",
)
@option("--ema-halflife-kimg", type=click.FloatRange(min=0), hidden=True, help="--ema Xkimg (the old spelling).")
@_train("--xflip", section=DMD2, is_flag=True)
@_recipe("--gan-weight-gen", DMD2, type=click.FloatRange(min=0), metavar="FLOAT")
@_recipe("--gan-weight-disc", DMD2, type=click.FloatRange(min=0), metavar="FLOAT")
@_train("--gan-t-max", section=DMD2, type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT")
@_train(
    "--gan-features",
    section=DMD2,
    type=click.Choice(["fake", "teacher"]),
    help="what the GAN head reads: 'fake', mu_fake's bottleneck, the discriminator step training through mu_fake's "
    "encoder (DMD2's paper and code); 'teacher', the frozen teacher's bottleneck, only the head training, G's GAN "
    "term on the DM loss's noised sample, its features from the DM loss's teacher pass (NVIDIA FastGen's measured "
    "runs; 12% fewer FLOPs per step than 'fake' on "
    "the demo's network, benchmarks/gan_features.py)",
)
@_recipe(
    "--divergence",
    DMD2,
    type=click.Choice(list(DIVERGENCES)),
    help="f-distill (Xu et al. 2025): weight each sample's DM term by h(r), r = exp(logit) of the GAN head at the DM "
    "loss's noised sample (clipped to [0.1, 20], made relative to its noise level's mean and the weights to their "
    "batch mean): " + ", ".join(f"{name} h = {formula}" for name, formula in DIVERGENCES.items()) + "; rkl is "
    "DMD2's reverse KL, js the paper's best; needs the GAN",
)
@_train("--fdistill-ratio-ema", section=DMD2, type=click.FloatRange(0, 1, max_open=True), metavar="RATE")
@_train(
    "--precision",
    section=PERF,
    type=click.Choice(["fp32", "bf16"]),
    help="'fp32', or 'bf16': the U-Nets compute in bf16 with fp32 weights, losses and optimisers, as DMD2 does "
    "(works on CPU too, slowly)",
)
@_train(
    "--batch-gpu",
    section=PERF,
    type=COUNT,
    metavar="INT",
    show_default=False,
    help="most images (and pairs, real images) per process in one forward/backward pass, as EDM's --batch-gpu: "
    "each process's batch goes in micro-batches of this size whose gradients add up before the one optimizer "
    "step, the same update in less memory  [default: the whole batch at once]",
)
@_train("--channels-last", section=PERF, is_flag=True)
@_train(
    "--compile", section=PERF, is_flag=True, help="compile the U-Nets with torch.compile (slow start, faster steps)"
)
@_train(
    "--fsdp",
    section=PERF,
    is_flag=True,
    help="under torchrun, shard G and mu_fake (weights, gradients, AdamW states) over the processes with FSDP2 "
    "instead of a DDP copy on each, so that EDM2-XL/XXL students fit; the teacher stays whole on each (frozen)",
)
@device_option()
@_train(
    "--workers",
    section=PERF,
    type=click.IntRange(min=0),
    metavar="INT",
    help="DataLoader worker processes reading the pairs and real images",
)
@_train("--log-every", section=IO, type=COUNT, metavar="INT")
@_train("--image-every", section=IO, type=click.IntRange(min=0), metavar="INT")
@_train("--checkpoint-every", section=IO, type=click.IntRange(min=0), metavar="INT")
@_train("--keep-last", section=IO, type=click.IntRange(min=0), metavar="INT")
@_train("--max-bad-steps", section=IO, type=COUNT, metavar="INT")
@_train(
    "--progress/--no-progress",
    field="progress",
    section=IO,
    default=None,
    callback=resolve_progress,
    show_default=False,
    help="tqdm bar on stderr  [default: on when stderr is a terminal]",
)
@_train("--log-neptune", section=IO, is_flag=True)
@_train("--log-tensorboard", section=IO, is_flag=True)
@_train("--log-wandb", section=IO, is_flag=True)
@_train("--fid-every", section=IO, type=click.IntRange(min=0), metavar="INT")
@_train("--fid-num", section=IO, type=click.IntRange(min=2), metavar="INT")
@_train("--fid-ref", section=IO, metavar="PATH|URL", show_default=False)
@_train("--fid-detector", section=IO, metavar="PATH|URL", show_default=False)
@_train("--vae", section=IO, metavar="DIR|NAME", show_default=False)
@_train("--lpips-vgg", section=IO, metavar="PATH|URL", show_default=False)
@_train("--lpips-lin", section=IO, metavar="PATH|URL", show_default=False)
@option("--lpips-random", is_flag=True, section=IO, help="Random LPIPS weights: tests and smoke runs only.")
@cache_option()
@click.pass_context
def train_command(ctx, dry_run, **options):
    """Distill a teacher into a one-step (or few-step) generator with DMD or DMD2 (torchrun for several GPUs)."""
    from dmd.checkpoint import CheckpointError
    from dmd.steps import BatchError
    from dmd.train import TrainError, train
    from dmd.utils.logger import LoggerError

    try:
        cfg = build_config(ctx, options)
    except (ConfigError, CheckpointError) as e:
        raise click.ClickException(str(e)) from e
    try:
        result = train(cfg, dry_run=dry_run)
    except (TrainError, BatchError, CheckpointError, LoggerError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if dry_run:
        click.echo(cfg.to_json(), nl=False)
        return
    if result["step"] >= result["num_steps"] and result["start"] == result["step"]:
        click.echo(
            f"{cfg.output_dir} is already at step {result['step']}, at or past its {result['num_steps']} steps: "
            f"nothing to do (give a larger --max-steps to train on)"
        )
    if result["stopped"]:
        click.echo(f"Stopped by a signal at step {result['step']}; continue with --resume auto", err=True)
        ctx.exit(130)


def build_config(ctx, options):
    """The TrainConfig of the command line: a new run's from its flags and the recipe's defaults; a resumed run's
    (--resume) from the run's stored settings, with the flags given on this command line as changes (checked
    against the resume rules when the training state is read)."""
    from click.core import ParameterSource

    from dmd.checkpoint import stored_config

    def given_flag(name):
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    old_names = ("lpips_random", "generator_sigma", "batch", "ema_halflife_kimg")
    lpips_random, generator_sigma, batch, ema_halflife_kimg = (options.pop(k) for k in old_names)
    changeable = tuple(name for name in options.pop("allow_change").split(",") if name.strip())
    recipe = options.pop("recipe")
    given = {k for k in options if given_flag(k)}  # the config fields this command line sets
    for name in ("model_path", "output_dir"):  # --network only for a new run; the order of --help
        if options[name] is None and (name == "output_dir" or options["resume"] is None):
            raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == name))
    if generator_sigma is not None:
        if "generator_sigmas" in given:
            raise ConfigError("give --generator-sigmas or its old spelling --generator-sigma, not both")
        options["generator_sigmas"], given = (generator_sigma,), given | {"generator_sigmas"}
    if ema_halflife_kimg is not None:
        if "ema" in given:
            raise ConfigError("give --ema or its old spelling --ema-halflife-kimg, not both")
        options["ema"] = upgrade_config({"ema_halflife_kimg": ema_halflife_kimg})["ema"]
        given |= {"ema"}
    if batch is not None:
        if "batch_size" in given:
            raise ConfigError("give --batch-size (per process) or --batch (the global batch, EDM's meaning), not both")
        options["batch_size"], given = per_process_batch(batch), given | {"batch_size"}

    base = None if options["resume"] is None else stored_config(options["output_dir"], options["resume"])
    if base is None:  # a new run: its flags, then the recipe's values, then the defaults
        if options["model_path"] is None:
            raise click.UsageError(f"Missing option '--network' ({options['output_dir']} holds no run to resume).")
        if options["generator_sigmas"] is None:
            del options["generator_sigmas"]
        options = resolve_recipe(recipe, options)
        return TrainConfig(**options, lpips_pretrained=not lpips_random, allow_change=changeable)

    # A resumed run: its own settings, changed by what this command line gives.
    changed = {k: options[k] for k in given | {"resume", "output_dir"}}
    if {"max_steps", "epochs"} & given:  # one duration replaces the other
        changed = {"max_steps": None, "epochs": None, **changed}
    settings = dict(base)
    if given_flag("recipe") and recipe != base.get("recipe"):
        settings.update({k: v for k, v in resolve_recipe(recipe, {}).items() if k not in changed})
    settings.update(changed)
    if given_flag("lpips_random"):
        settings["lpips_pretrained"] = not lpips_random
    settings["allow_change"] = changeable
    return TrainConfig.from_dict(settings)


def per_process_batch(batch):
    """The per-process batch of EDM's --batch (the global batch) under torchrun's WORLD_SIZE processes."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise ConfigError(
            f"--batch {batch} (the global batch, as in EDM's train.py) does not split over {world} processes"
        )
    return batch // world


# Training curves (dmd/plot.py).
@main.command(
    "plot",
    cls=Command,
    examples="""
python -m dmd plot runs/dmd-cifar10                  # writes runs/dmd-cifar10/stats.png
""",
)
@click.argument("run_dir", type=click.Path(file_okay=False))
@option(
    "--out",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    callback=output_path,
    section="Main",
    show_default=False,
    help="PNG to write.  [default: RUN_DIR/stats.png]",
)
def plot_command(run_dir, out):
    """Plot a training run's losses, gradient norms and FID over kimg from its stats.jsonl into one PNG."""
    from dmd.plot import PlotError, plot_run

    try:
        path = plot_run(run_dir, out)
    except (PlotError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{path}: curves of {run_dir}")
