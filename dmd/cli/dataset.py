"""`make-dataset`: real images in EDM's dataset format, for DMD2's --real-data and `fid ref` (dmd/dataset_tool.py)."""

import re

import click

from dmd.cli import main
from dmd.cli.options import COUNT, Command, cache_option, new_file, option, progress_option


def _square_size(ctx, param, value):
    """'64' or '64x64' -> 64; a size that is not square is refused (EDM's networks take square images)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", value)
    if match is None or match.group(2) not in (None, match.group(1)):
        raise click.BadParameter(f"{value!r} is not a square size like 64 or 64x64")
    return int(match.group(1))


@main.command(
    "make-dataset",
    cls=Command,
    examples="""
# EDM's cifar10-32x32.zip (50,000 labelled 32x32 images) from the CIFAR-10 python tarball
python -m dmd make-dataset cifar-10-python.tar.gz datasets/cifar10-32x32.zip
# One subfolder per class (classes numbered in sorted folder order), center-cropped and resized to 64x64
python -m dmd make-dataset ~/imagenet/train datasets/imagenet-64x64.zip --resolution 64
# A flat folder of images (unlabelled), the first 10,000 only, written as a folder; rerun it if interrupted
python -m dmd make-dataset photos datasets/photos-10k --max-images 10000
# EDM2's encoded ImageNet-512 for a latent teacher (as EDM2's `dataset_tool.py encode` writes img512-sd.zip)
python -m dmd make-dataset datasets/img512.zip datasets/img512-sd.zip --encode
# Then: `train --recipe dmd2 --real-data datasets/cifar10-32x32.zip`, and FID reference statistics of the same images
python -m dmd fid ref --data datasets/cifar10-32x32.zip --dest fid-refs/cifar10-32x32.npz
""",
)
@click.argument("src", type=click.Path(exists=True))
@click.argument("dest", type=click.Path(), callback=new_file)
@option(
    "--resolution",
    default=None,
    callback=_square_size,
    metavar="INT",
    section="Main",
    show_default=False,
    help="Center-crop each image to a square and resize it to INT x INT (Lanczos), as EDM's --transform=center-crop."
    "  [default: keep the size; all images must share one square size]",
)
@option(
    "--max-images",
    default=None,
    type=COUNT,
    metavar="INT",
    section="Main",
    show_default=False,
    help="Write only the first INT images.  [default: all]",
)
@option(
    "--encode",
    is_flag=True,
    section="Main",
    help="Write the VAE's raw latents (mean and std, .npy entries) instead of PNGs, as EDM2's `dataset_tool.py "
    "encode`: the real data of a latent EDM2 teacher.",
)
@option(
    "--vae",
    default="stabilityai/sd-vae-ft-mse",
    metavar="DIR|NAME",
    section="Main",
    help="With --encode: the VAE, a folder saved with save_pretrained or a Hugging Face name (EDM2's).",
)
@option(
    "--device",
    default=None,
    metavar="DEV",
    section="Main",
    show_default=False,
    help="With --encode: where the VAE runs.  [default: cuda if available, else cpu]",
)
@cache_option()
@progress_option()
def make_dataset_command(src, dest, resolution, max_images, encode, vae, device, cache_dir, progress):
    """Write SRC's images in EDM's dataset format at DEST (a ZIP of PNGs and dataset.json, or a folder if DEST does
    not end in .zip).

    SRC is a folder or ZIP of images (PNG, JPEG, BMP, WebP), labelled by one subfolder per class or unlabelled if
    flat, or CIFAR-10's python tarball. An interrupted run leaves DEST.partial, never a half DEST: rerun the same
    command to continue it.
    """
    from dmd.dataset_tool import make_dataset
    from dmd.images import ImageDatasetError

    codec = None
    try:
        if encode:
            codec = _encoder(vae, device, cache_dir)
        done = make_dataset(src, dest, resolution=resolution, max_images=max_images, progress=progress, codec=codec)
    except (ImageDatasetError, OSError) as e:
        raise click.ClickException(str(e)) from e
    r = done["resolution"]
    what = f"{done['classes']} classes" if done["classes"] else "unlabelled"
    mode = "RGB" if done["channels"] == 3 else "grayscale"
    continued = f" ({done['continued']} of them kept from the interrupted run)" if done["continued"] else ""
    if codec is not None:
        h = r // codec.scale_factor
        click.echo(f"{dest}: {done['images']} latents{continued} of {r}x{r} images, 8x{h}x{h} (mean, std), {what}")
        return
    click.echo(f"{dest}: {done['images']} images{continued}, {r}x{r} {mode}, {what}")


def _encoder(vae, device, cache_dir):
    """The LatentCodec that encodes images (EDM2's StabilityVAEEncoder: its VAE; scale and bias are the teacher's,
    applied at training time, not here); a ClickException naming --vae or --device if it does not load."""
    import torch

    from dmd.edm2.encoders import EncoderInfo
    from dmd.edm2.vae import LatentCodec, VAEError, load_vae

    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise click.ClickException(f"--device {device}: not a torch device ({e})") from None
    try:
        model = load_vae(vae, cache_dir=cache_dir, device=device)
    except VAEError as e:
        raise click.ClickException(str(e)) from None
    return LatentCodec(model, EncoderInfo("StabilityVAEEncoder", vae_name=str(vae), batch_size=8))
