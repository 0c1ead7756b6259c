"""`dmd make-dataset`: real images in EDM's dataset format (dmd/images.py) from the forms researchers have them in, read
as EDM's `dataset_tool.py` reads them, so that DMD2's `--real-data` and `fid ref --data` need no code of EDM's.

Sources:
- a folder or ZIP of images (searched recursively, sorted by path part by part as EDM's tool sorts them). Labels: the
  source's own dataset.json if it has one (an EDM dataset, e.g. to resize it); else, as EDM's tool, the top-level
  subfolders when there are two or more, numbered in sorted name order (a flat folder, or one subfolder, is
  unlabelled); images both at the top and in subfolders are refused, being neither layout. Files are decoded as PNG,
  JPEG, BMP or WebP only, whatever their names (PIL picks a decoder by content; EPS would start Ghostscript).
- CIFAR-10's python tarball (`cifar-10-python.tar.gz`): data_batch_1 .. data_batch_5 in order, 50,000 labelled 32x32
  images, as EDM's cifar10-32x32.zip. The batches are pickles; they are read by an unpickler that builds dicts,
  lists, strings, numbers and numpy arrays and nothing else, so a tampered tarball cannot run code.

Sizes and modes: without --resolution every image must have one square size (the first one's); with it, each image
is center-cropped to its largest centered square and resized with Lanczos, as EDM's --transform=center-crop (an image
already of that size is kept as it is). The output is grayscale if every image is, else RGB (grayscale, palette and
CMYK images converted); images with alpha or more than 8 bits a channel are refused, as EDM's tool refuses them.
--max-images keeps the first N images.

Writing goes through `DatasetWriter`: into `DEST.partial`, which becomes DEST only when complete, so an interrupted
run (Ctrl-C, kill -9, a bad image) leaves no DEST; rerunning the same command continues from the images already
written (a ZIP DEST is then packed from them), and the same command on other data or options is refused.
"""

import codecs
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dmd.images import DatasetWriter, ImageDatasetError, ImageFolder, refuse_existing, special_file

MAX_RESOLUTION = 4096  # the largest side dmd's dataset reader takes (dmd.images.MAX_PIXELS)
GRAY_MODES = ("1", "L")  # PIL modes written as grayscale
COLOR_MODES = ("P", "RGB", "CMYK", "YCbCr")  # PIL modes written as RGB (or grayscale promoted to it)
CIFAR_BATCHES = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
CIFAR_BATCH_BYTES = 64 << 20  # a CIFAR-10 batch is a 31 MB pickle; a larger member is refused unread


# The images of a folder or ZIP as make-dataset reads them: the dataset reader's checks (names, declared sizes, FIFOs,
# ZIP entries, dataset.json), with the formats image collections come in and photographs' sizes.
class SourceImages(ImageFolder):
    formats = ("PNG", "JPEG", "BMP", "WEBP")
    format_note = ""
    max_pixels = 100_000_000  # a 100-megapixel photograph; PIL's own bomb check starts at 89 million

    def __init__(self, path):
        super().__init__(path)
        self.names.sort(key=lambda name: name.split("/"))  # EDM's tool sorts Paths: part by part

    def labels(self):
        """Class indices of all images (a list), or None: dataset.json's, else one class per top-level subfolder."""
        if self.has_labels_file:
            labels = self.read_labels()
            return None if labels is None else labels.tolist()
        tops = [name.split("/")[0] if "/" in name else None for name in self.names]
        if None in tops and any(top is not None for top in tops):
            flat, nested = self.names[tops.index(None)], next(n for n, t in zip(self.names, tops) if t is not None)
            raise ImageDatasetError(
                f"{self.path} has images both at its top ({flat}) and in subfolders ({nested}); give one subfolder per "
                "class, or a flat folder for unlabelled images"
            )
        classes = sorted(set(tops) - {None})
        if len(classes) < 2:
            return None
        index = {name: i for i, name in enumerate(classes)}
        return [index[top] for top in tops]

    def scan(self, num, resolution):
        """Check the headers of images 0 .. num - 1 before any is written; return the output (resolution, channels)."""
        first, gray = None, True
        for i in range(num):
            with self.open_image(i) as image:
                mode, size = image.mode, image.size
            where = f"{self.path}/{self.names[i]}"
            if mode not in GRAY_MODES + COLOR_MODES:
                raise ImageDatasetError(
                    f"{where}: mode {mode}; make-dataset reads RGB, grayscale, palette and CMYK images of 8 bits a "
                    "channel, without alpha"
                )
            gray = gray and mode in GRAY_MODES
            if resolution is None and size[0] != size[1]:
                raise ImageDatasetError(
                    f"{where} is {size[0]}x{size[1]}, not square; give --resolution to center-crop and resize"
                )
            if resolution is None and first is not None and size != first[1]:
                raise ImageDatasetError(
                    f"{where} is {size[0]}x{size[1]} but the first image {first[0]} is {first[1][0]}x{first[1][1]}; "
                    "give --resolution to center-crop and resize every image to one size"
                )
            first = first or (self.names[i], size)
        return resolution or first[1][0], 1 if gray else 3

    def read_as(self, index, resolution, channels):
        """Image `index` as (resolution, resolution, channels) uint8."""
        with self.open_image(index) as image:
            image = image.convert("L" if channels == 1 else "RGB")  # decodes
        return _pixels(center_crop(image, resolution))


# Images already in memory (CIFAR-10's), (N, H, W, C) uint8, with their labels (N ints).
class ArrayImages:
    def __init__(self, images, labels):
        self.images, self._labels = images, labels

    def __len__(self):
        return len(self.images)

    def labels(self):
        return self._labels

    def scan(self, num, resolution):
        return resolution or self.images.shape[1], self.images.shape[3]

    def read_as(self, index, resolution, channels):
        import PIL.Image

        pixels = self.images[index]
        if resolution == pixels.shape[0]:
            return pixels
        return _pixels(center_crop(PIL.Image.fromarray(pixels), resolution))


def _pixels(image):
    """PIL image -> (H, W, C) uint8."""
    pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def center_crop(image, resolution):
    """EDM's --transform=center-crop: the largest centered square of a PIL image, resized to resolution x resolution
    with Lanczos; an image already of that size is returned as it is."""
    import PIL.Image

    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    crop = min(width, height)
    left, top = (width - crop) // 2, (height - crop) // 2
    return image.crop((left, top, left + crop, top + crop)).resize((resolution, resolution), PIL.Image.LANCZOS)


def _latin1_bytes(text, encoding):
    """`_codecs.encode(text, 'latin1')`, the call through which Python 3 writes bytes into a protocol-2 pickle."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes text as {encoding!r}, which a CIFAR-10 batch does not")
    return codecs.encode(text, "latin1")


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-unpickling function (module name differs by version)
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name in CIFAR-10's own files (numpy 1)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2's
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


# An unpickler that builds only what CIFAR-10's batches hold: dicts, lists, strings and numbers (which need no global)
# and numpy arrays. Every other global a pickle names (a function to call, a class to build) is refused before use.
class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch does not hold")
        return _CIFAR_GLOBALS[module, name]


def read_cifar10(path):
    """The training images of CIFAR-10's python tarball, (50000, 32, 32, 3) uint8, and their labels (a list)."""
    images, labels = [], []
    try:
        with tarfile.open(path) as tar:
            for name in CIFAR_BATCHES:
                where = f"{path}: {name}"
                try:
                    member = tar.getmember(name)
                except KeyError:
                    raise ImageDatasetError(f"{path}: no {name}; not CIFAR-10's python tarball") from None
                if not member.isfile() or member.size > CIFAR_BATCH_BYTES:
                    raise ImageDatasetError(f"{where}: not a file of at most {CIFAR_BATCH_BYTES:,} bytes")
                try:
                    batch = _CifarUnpickler(tar.extractfile(member), encoding="latin1").load()
                except (
                    pickle.UnpicklingError,
                    EOFError,
                    ValueError,
                    TypeError,
                    AttributeError,
                    IndexError,
                    KeyError,
                ) as e:
                    raise ImageDatasetError(f"{where}: not a CIFAR-10 batch ({e})") from e
                except (MemoryError, OverflowError, RecursionError) as e:  # what a crafted pickle may ask for
                    raise ImageDatasetError(f"{where}: not a CIFAR-10 batch ({type(e).__name__})") from e
                data = batch.get("data") if isinstance(batch, dict) else None
                rows = batch.get("labels") if isinstance(batch, dict) else None
                ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                if not (ok and data.shape[1] == 3 * 32 * 32 and isinstance(rows, list) and len(rows) == len(data)):
                    raise ImageDatasetError(f"{where}: not a CIFAR-10 batch (no uint8 'data' (N, 3072) and N 'labels')")
                if not all(type(c) is int and 0 <= c < 10 for c in rows):
                    raise ImageDatasetError(f"{where}: labels outside the 10 classes of CIFAR-10")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows hold R, G, B planes
                labels += rows
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ImageDatasetError(f"{path}: not a readable tarball ({e})") from e
    return np.ascontiguousarray(np.concatenate(images)), labels


def open_source(src):
    """The images of `src` (SourceImages or ArrayImages); ImageDatasetError naming it if it is neither form."""
    path = Path(src)
    kind = special_file(path)
    if kind is not None:
        raise ImageDatasetError(f"{src}: {kind}, not a folder, ZIP or tarball of images")
    if not path.exists():
        raise ImageDatasetError(f"{src} does not exist")
    if path.is_dir() or zipfile.is_zipfile(path):
        return SourceImages(path)
    if tarfile.is_tarfile(path):
        return ArrayImages(*read_cifar10(path))
    raise ImageDatasetError(f"{src}: not a folder or ZIP of images, nor CIFAR-10's python tarball")


def make_dataset(src, dest, *, resolution=None, max_images=None, progress=True, codec=None):
    """Write the images of `src` in EDM's dataset format at `dest` (a ZIP if it ends in .zip, else a folder), or with
    a VAE `codec` (dmd.edm2.vae.LatentCodec) their raw latents in EDM2's encoded format (dmd/encoded.py), as EDM2's
    `dataset_tool.py encode` does; return a summary dict (images, resolution, channels, classes, continued: images
    kept from an interrupted run)."""
    from tqdm import tqdm

    from dmd.checkpoint import data_fingerprint

    dest = Path(dest)
    refuse_existing(dest)  # before the work; the writer checks again before its final rename
    if resolution is not None and not 1 <= resolution <= MAX_RESOLUTION:
        raise ImageDatasetError(f"--resolution {resolution} is outside 1 .. {MAX_RESOLUTION}")
    if dest.absolute().is_relative_to(Path(src).absolute()):
        raise ImageDatasetError(f"{dest} is inside {src}; a dataset cannot be written into its own source")
    source = open_source(src)
    num = len(source) if max_images is None else min(len(source), max_images)
    labels = source.labels()
    labels = None if labels is None else labels[:num]
    resolution, channels = source.scan(num, resolution)  # every image checked before any is written
    job = {
        "source": data_fingerprint(src),
        "resolution": resolution,
        "channels": channels,
        "labels": labels is not None,
    }
    if codec is not None:
        import torch

        from dmd.encoded import LatentWriter

        channels = 3  # the VAE reads RGB: grayscale images are converted
        job.update(channels=channels, vae=codec.info.vae_name)
    writer = (DatasetWriter if codec is None else LatentWriter)(dest, num, job)
    todo = writer.todo()
    step = 1 if codec is None else codec.batch_size  # images per VAE call
    with tqdm(total=num, initial=num - len(todo), unit="img", desc="make-dataset", disable=not progress) as bar:
        for start in range(0, len(todo), step):
            indices = todo[start : start + step]
            items = np.stack([source.read_as(i, resolution, channels) for i in indices])  # (B, H, W, C) uint8
            if codec is not None:  # (B, 2C, h, w) float32: the VAE's mean then std
                items = codec.encode_raw(torch.from_numpy(items).permute(0, 3, 1, 2)).cpu().numpy()
            for i, item in zip(indices, items):
                writer.write(i, item)
            bar.update(len(indices))
    writer.publish(labels)
    classes = 0 if labels is None else len(set(labels))
    return dict(images=num, resolution=resolution, channels=channels, classes=classes, continued=num - len(todo))
