"""`make-pairs` and `convert-pairs`: teacher noise-image pairs (the work: dmd/pairs.py, dmd/data.py)."""

import click

from dmd.cli import main
from dmd.cli.options import (
    COUNT,
    Command,
    batch_option,
    cache_option,
    device_option,
    guide_options,
    new_file,
    option,
    output_path,
    progress_option,
    sampler_options,
)


@main.command(
    "make-pairs",
    cls=Command,
    examples="""
# 100k pairs from EDM's conditional CIFAR-10 teacher, 10k per class, one seed per pair; rerun to resume
python -m dmd make-pairs --network https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl \\
    --out data/cifar10-pairs.h5 --num 100000 --class-balanced
# The same file grown to 200k pairs (seeds 0-199999): its 100k pairs are kept, the new ones appended
python -m dmd make-pairs --network https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl \\
    --out data/cifar10-pairs.h5 --num 200000 --class-balanced
# The same file on 8 GPUs ("--" keeps torchrun from parsing --num)
torchrun --nproc_per_node 8 -m dmd -- make-pairs --network edm.pkl --out data/cifar10-pairs.h5 --num 100000
""",
)
@option(
    "--network",
    "network",
    required=True,
    metavar="PATH|URL",
    section="Main",
    help="Teacher: an EDM or EDM2 network pickle.",
)
@option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    callback=output_path,
    metavar="FILE",
    section="Main",
    help="Pair file to write, to resume, or to grow (a longer seed list that begins with the file's).",
)
@option("--num", required=True, type=COUNT, metavar="INT", section="Main", help="Number of pairs.")
@option(
    "--seeds",
    default=None,
    metavar="LIST",
    section="Main",
    show_default=False,
    help="Seeds like 0-99999; the first --num are used.  [default: 0 to --num - 1]",
)
@option("--class-balanced", is_flag=True, section="Main", help="Pair i gets class i % label_dim, not a drawn label.")
@sampler_options(None, "Sampler steps (2 x steps - 1 network calls).  [default: 18 for EDM's networks, 32 for EDM2's]")
@guide_options()
@batch_option("Pairs per sampler call, per process.")
@device_option()
@cache_option()
@progress_option()
def make_pairs_command(network, out, num, seeds, **options):
    """Sample teacher noise-image pairs into an HDF5 pair file (resumes an interrupted one, grows a finished one)."""
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


@main.command(
    "convert-pairs",
    cls=Command,
    examples="""
python -m dmd convert-pairs data/cifar.hdf5 data/cifar-port.h5    # the port's released pairs, read ~25x faster
""",
)
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False), callback=new_file)
@option(
    "--label-dim",
    default=None,
    type=click.IntRange(min=0),
    metavar="INT",
    section="Main",
    show_default=False,
    help="Classes.  [default: max class_idx + 1]",
)
@progress_option()
def convert_pairs_command(old, new, label_dim, progress):
    """Rewrite a pair file of the port's layout (/data/{i}) in our fast layout."""
    from dmd.data import PairFileError, convert_port_file

    try:
        num = convert_port_file(old, new, label_dim=label_dim, progress=progress)
    except PairFileError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{new}: {num} pairs converted from {old}")
