"""`export`: a trained generator as a folder to share, model.safetensors + config.json + a model card, optionally
uploaded to the Hugging Face Hub (the work: dmd/export.py)."""

import click

from dmd.cli import main
from dmd.cli.options import Command, cache_option, device_option, ema_option, option, output_path, vae_option


def new_folder(ctx, param, value):
    """Callback of DEST_DIR: refuse, before any work, a folder that holds anything, or a name too long to write."""
    from dmd.export import ExportError, check_dest

    try:
        check_dest(value)
    except ExportError as e:
        raise click.BadParameter(str(e)) from None
    return output_path(ctx, param, value)


def hub_repo(ctx, param, value):
    """Callback of --push: a repository id the Hub takes, and huggingface_hub installed, before any work."""
    from dmd.export import ExportError, check_repo_id

    if value is not None:
        try:
            check_repo_id(value)
        except ExportError as e:
            raise click.BadParameter(str(e)) from None
    return value


@main.command(
    "export",
    cls=Command,
    examples="""
# The run's best snapshot as a folder: model.safetensors, config.json, README.md (model card), samples.png
python -m dmd export runs/dmd-cifar10/network-snapshot-best.pt exports/dmd-cifar10
# The newest snapshot of a run, bf16 weights, uploaded to the Hub (log in first: huggingface-cli login)
python -m dmd export runs/dmd-cifar10 exports/dmd-cifar10-bf16 --dtype bf16 --push me/dmd-cifar10
# Sample it: a local folder, or the Hub repository as hf://user/repo[@revision]
python -m dmd generate --network hf://me/dmd-cifar10 --output-dir out --seeds 0-63 --grid grid.png
""",
)
@click.argument("snapshot", metavar="SNAPSHOT")
@click.argument("dest", metavar="DEST_DIR", type=click.Path(file_okay=False), callback=new_folder)
@option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    section="Main",
    help="Precision of the weights: fp32 (the run's, exact) or bf16 (half the size, images close but not equal).",
)
@option(
    "--push",
    "repo_id",
    default=None,
    callback=hub_repo,
    metavar="USER/REPO",
    section="Hub",
    show_default=False,
    help="Also upload the folder to this Hugging Face Hub model repository, created if missing (needs "
    "`pip install 'dmd-distill[hub]'` and a token: huggingface-cli login or HF_TOKEN).",
)
@option("--private", is_flag=True, section="Hub", help="--push: create the repository private.")
@device_option()
@ema_option()
@vae_option()
@cache_option()
def export_command(snapshot, dest, dtype, repo_id, private, device, ema, vae, cache_dir):
    """Export SNAPSHOT (a network snapshot or training state of `train`, or its run folder: the newest snapshot) as
    a folder DEST_DIR that DMDGenerator and `generate --network` load, with a model card."""
    from dmd.export import ExportError, export_generator, push
    from dmd.generate import GeneratorLoadError
    from dmd.utils.common import resolve_device

    try:
        folder, config = export_generator(
            snapshot,
            dest,
            dtype=dtype,
            repo_id=repo_id,
            device=resolve_device(device),
            cache_dir=cache_dir,
            vae=vae,
            ema=ema,
        )
        fid = config["fid"]
        recorded = f"FID {fid['value']:.3f} at step {fid['step']}" if fid else "no FID recorded"
        click.echo(f"{folder}: {config['source']} as {config['dtype']} safetensors, model card ({recorded})")
        if repo_id is not None:
            click.echo(f"{folder}: uploaded to {push(folder, repo_id, private=private)}")
    except (ExportError, GeneratorLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
