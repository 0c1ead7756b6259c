"""`generate` and `fid`: samples of a generator or a teacher, and EDM-protocol FID (dmd/generate.py, dmd/fid.py)."""

import click

from dmd.cli import main
from dmd.cli.options import (
    COUNT,
    Command,
    batch_option,
    cache_option,
    detector_option,
    device_option,
    ema_option,
    guide_options,
    metrics_options,
    new_file,
    option,
    output_path,
    progress_option,
    sampler_kwargs_of,
    sampler_options,
    vae_option,
)

_NETWORK_HELP = (
    "A snapshot or training state of `train` (a run folder: its newest snapshot), a folder of `export` or one on the "
    "Hugging Face Hub as hf://user/repo[@revision], an EDM network pickle, or the port's checkpoint."
)


@main.command(
    "generate",
    cls=Command,
    examples="""
# Samples of a trained generator (its own one- or few-step sigmas), with a labelled grid
python -m dmd generate --network runs/dmd-cifar10/network-snapshot-best.pt --output-dir out --seeds 0-63 --grid grid.png
# The teacher with EDM's sampler (18 steps = 35 network calls) on the same seeds, for a side-by-side grid
python -m dmd generate --network edm-cifar10-32x32-cond-vp.pkl --output-dir teacher --seeds 0-63 --steps 18 --grid t.png
# 50k class-balanced PNGs for FID on 8 GPUs
torchrun --standalone --nproc_per_node 8 -m dmd generate --network model.pt --output-dir fid-out --seeds 0-49999 \\
    --subdirs --class-balanced
""",
)
@option("--network", required=True, metavar="PATH|URL", section="Main", help=_NETWORK_HELP)
@ema_option()
@option(
    "--output-dir",
    "--outdir",
    "outdir",
    required=True,
    type=click.Path(file_okay=False),
    callback=output_path,
    metavar="DIR",
    section="Main",
    help="Folder for the PNGs.",
)
@option("--seeds", default="0-63", metavar="LIST", section="Main", help="Seeds like 0-63,100; one image per seed.")
@option(
    "--class",
    "class_idx",
    default=None,
    type=click.IntRange(min=0),
    metavar="INT",
    section="Main",
    show_default=False,
    help="One class for every image.  [default: drawn from each seed]",
)
@option("--class-balanced", is_flag=True, section="Main", help="Seed s gets class s % label_dim (the FID protocol's).")
@option(
    "--grid",
    default=None,
    type=click.Path(dir_okay=False),
    callback=output_path,
    metavar="FILE",
    section="Main",
    show_default=False,
    help="Also write a labelled grid of all images here.",
)
@sampler_options(
    None,
    "Sample with EDM's sampler in this many steps (a teacher) instead of the generator's own "
    "sigmas.  [default: the generator]",
)
@guide_options()
@batch_option("Images per network call, per process.")
@device_option()
@option("--subdirs", is_flag=True, section="I/O", help="One folder per 1000 seeds, as EDM's --subdirs.")
@vae_option()
@cache_option()
@progress_option()
def generate_command(
    network,
    ema,
    outdir,
    seeds,
    class_idx,
    class_balanced,
    grid,
    batch_size,
    num_steps,
    subdirs,
    vae,
    device,
    cache_dir,
    progress,
    **sampler,
):
    """Write one PNG per seed from a trained generator (or, with --steps, from an EDM teacher)."""
    from dmd.generate import GeneratorLoadError, generate_images
    from dmd.utils import distributed
    from dmd.utils.common import parse_int_list

    try:
        seed_list = parse_int_list(seeds)
    except ValueError as e:
        raise click.ClickException(f"--seeds: {e}") from e
    sampler_kwargs = sampler_kwargs_of(num_steps, sampler)
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
            sampler_kwargs=sampler_kwargs,
            subdirs=subdirs,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
            vae=vae,
            ema=ema,
        )
    except (GeneratorLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()


@main.group("fid")
def fid_group():
    """FID as EDM computes it (Inception-v3 features of uint8 images, float64 statistics), and EDM2's FD_DINOv2."""


@fid_group.command(
    "ref",
    cls=Command,
    examples="""
python -m dmd fid ref --data cifar10-32x32.zip --dest cifar10-32x32.npz    # a ZIP or folder made by EDM's dataset_tool
# FID and FD_DINOv2 statistics in one pass, in EDM2's pickle layout (what its dataset-refs/img512.pkl holds)
python -m dmd fid ref --data img512.zip --dest img512.pkl --metrics fid,fd_dinov2
""",
)
@option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    metavar="PATH",
    section="Main",
    help="Image folder or ZIP (EDM's dataset layout).",
)
@option(
    "--dest",
    required=True,
    type=click.Path(dir_okay=False),
    callback=new_file,
    metavar="FILE",
    section="Main",
    help="Statistics file to write: .pkl for EDM2's pickle ({'fid': {'mu', 'sigma'}, 'fd_dinov2': ...}), else EDM's "
    ".npz of mu, sigma (fid only).",
)
@metrics_options()
@detector_option()
@batch_option("Images per detector call, per process.")
@device_option()
@cache_option()
@progress_option()
def fid_ref_command(data, dest, metrics, dinov2, detector, batch_size, device, cache_dir, progress):
    """Compute reference statistics (mu, sigma) of every image in a dataset, for each metric."""
    from dmd.fid import FIDError, make_ref
    from dmd.utils import distributed

    try:
        stats = make_ref(
            data,
            dest,
            metrics=metrics.split(","),
            detector=detector,
            dinov2=dinov2,
            batch_size=batch_size,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
        )
        is_main = distributed.is_main()
    except (FIDError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()
    if is_main:
        named = len(stats) > 1 or "fid" not in stats  # a plain FID reference reads as it always has
        dims = [f"{mu.shape[0]}-d features" + (f" ({metric})" if named else "") for metric, (mu, _) in stats.items()]
        click.echo(f"{dest}: statistics of {', '.join(dims)}")


@fid_group.command(
    "calc",
    cls=Command,
    examples="""
REF=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
# A generator over 3 disjoint ranges of 50k seeds (EDM reports the minimum; we print min and mean +- std)
torchrun --standalone --nproc_per_node 8 -m dmd fid calc --network model.pt --ref $REF --num-images 50000 --repeats 3
# PNGs written by generate --class-balanced (the same number as --network on the same seeds)
python -m dmd fid calc --images fid-out --ref $REF --num-images 50000
# EDM2's protocol: FID and FD_DINOv2 of the same 50k images against its ImageNet-512 reference
python -m dmd fid calc --images fid-out --ref https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
    --metrics fid,fd_dinov2
""",
)
@option(
    "--images",
    default=None,
    type=click.Path(exists=True),
    metavar="PATH",
    section="Main",
    show_default=False,
    help="A PNG folder or ZIP to score ...",
)
@option(
    "--network",
    default=None,
    metavar="PATH|URL",
    section="Main",
    show_default=False,
    help="... or a network as generate takes it, scored straight from its samples (seed s labelled s % label_dim).",
)
@ema_option()
@option(
    "--ref",
    required=True,
    metavar="PATH|URL",
    section="Main",
    help="Reference statistics: EDM's .npz (mu, sigma; fid only) or EDM2's dataset-refs .pkl (an entry per metric).",
)
@option(
    "--num-images",
    "--num",
    "num",
    default=50000,
    type=click.IntRange(min=2),
    metavar="INT",
    section="Main",
    help="Images per score.",
)
@option(
    "--seeds",
    default=None,
    metavar="LIST",
    section="Main",
    show_default=False,
    help="--network seeds.  [default: 0 to num-images x repeats - 1]",
)
@option(
    "--repeats", default=1, type=COUNT, metavar="INT", section="Main", help="--network: disjoint seed ranges to score."
)
@metrics_options()
@detector_option()
@sampler_options(
    None, "--network: sample with EDM's sampler in this many steps (a teacher).  [default: the generator's own sigmas]"
)
@guide_options()
@batch_option("Images per call, per process.")
@device_option()
@vae_option()
@cache_option()
@progress_option()
def fid_calc_command(
    images,
    network,
    ema,
    ref,
    num,
    seeds,
    repeats,
    metrics,
    dinov2,
    num_steps,
    detector,
    batch_size,
    device,
    vae,
    cache_dir,
    progress,
    **sampler,
):
    """Score images (or a generator's samples, labels cycling over classes) against reference statistics."""
    import numpy as np

    from dmd.fid import METRICS, FIDError, calc_metrics
    from dmd.generate import GeneratorLoadError
    from dmd.utils import distributed
    from dmd.utils.common import parse_int_list

    try:
        seed_list = None if seeds is None else parse_int_list(seeds, limit=num * repeats)
    except ValueError as e:
        raise click.ClickException(f"--seeds: {e}") from e
    sampler_kwargs = sampler_kwargs_of(num_steps, sampler)
    try:
        scores = calc_metrics(
            ref,
            metrics=metrics.split(","),
            images=images,
            network=network,
            num=num,
            seeds=seed_list,
            repeats=repeats,
            num_steps=num_steps,
            sampler_kwargs=sampler_kwargs,
            detector=detector,
            dinov2=dinov2,
            batch_size=batch_size,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
            vae=vae,
            ema=ema,
        )
        is_main = distributed.is_main()
    except (FIDError, GeneratorLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        distributed.shutdown()
    if not is_main:
        return
    for r, repeat in enumerate(scores if len(scores) > 1 else []):
        for metric, score in repeat.items():
            click.echo(f"repeat {r}: {METRICS[metric]} {score:.6f}")
    for metric in scores[0]:
        name, values = METRICS[metric], [repeat[metric] for repeat in scores]
        click.echo(f"{name}: {min(values):.6f}")
        if len(values) > 1:
            mean, std = np.mean(values), np.std(values, ddof=1)
            click.echo(
                f"{name} over {len(values)} seed ranges: min {min(values):.4f}, mean {mean:.4f} +- {std:.4f} (std)"
            )
