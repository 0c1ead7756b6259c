"""Real images in EDM's dataset format, the real data of DMD2's GAN: a reader, a torch Dataset and a writer.

The format is what EDM's `dataset_tool.py` writes (e.g. `cifar10-32x32.zip`): a folder, or an uncompressed ZIP, of
PNGs named `00000/img00000000.png`, `00000/img00000001.png`, ..., `00001/img00001000.png`, ..., and a `dataset.json`
at the top whose "labels" is a list of `[relative_path, class_index]` pairs, or null for unlabelled data. As EDM's
ImageFolderDataset does, every file under the folder whose extension PIL knows counts as an image, in sorted name
order; the first image fixes the size and mode (RGB or grayscale) and every image read is checked against it.

Every image is decoded as PNG and nothing else, whatever its name: PIL picks a decoder by a file's content, and an
EPS file named `.png` would make it run Ghostscript. A JPEG (or any other format) in a dataset is an error naming the
file; `dmd make-dataset` (dmd/dataset_tool.py) converts other images into this format. FIFOs, sockets and devices are
refused by name rather than opened (opening a FIFO waits for a writer forever).

`ImageFolder` is the one reader of this format: `dmd.fid.ImageFiles` is the same class raising FIDError,
make-dataset reads its sources with a subclass that allows more formats, and dmd/encoded.py's `LatentFolder` reads
EDM2's encoded latents (.npy entries in the same layout) with it. `DatasetWriter` is the one writer (of both).
"""

import hashlib
import io
import json
import os
import shutil
import stat
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dmd.utils.common import parse_json

LABELS_FILE = "dataset.json"
LABEL_BYTES_PER_IMAGE = 1024  # dataset.json's bound: EDM writes ~40 bytes per [path, class] entry
MAX_PIXELS = 4096 * 4096  # far above EDM's datasets (32-512 px a side); bounds what one PNG header may ask to allocate
MAX_CLASS = 2**31 - 1  # the largest class index dataset.json may give (numpy's int64 overflowed on larger ones)
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # EDM's tool stores entries; zip tools deflate them
_SPECIAL_FILES = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class ImageDatasetError(ValueError):
    """A real-image folder or ZIP that cannot be read or used with a given teacher; the message names the file."""


def special_file(path):
    """What `path` is if it exists but is neither a folder nor a regular file ('a FIFO', 'a socket', ...), else None.

    Data is read only from folders and regular files: opening a FIFO waits for a writer forever, and a device may
    never end.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, or not to be stat'ed: whoever opens it next says why
        return None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return _SPECIAL_FILES.get(stat.S_IFMT(mode), "not a regular file")


def _zip_problem(info):
    """Why the ZIP entry `info` cannot be read here, or None: zipfile raised RuntimeError for an encrypted entry and
    NotImplementedError for a compression method it lacks (zstd, ...)."""
    if info.flag_bits & 0x41:  # bit 0: encrypted, bit 6: strong encryption
        return "encrypted; dmd reads unencrypted ZIPs"
    if info.flag_bits & 0x20:
        return "holds patch data (ZIP flag bit 5), which dmd does not read"
    if info.compress_type not in ZIP_METHODS:
        return f"compression method {info.compress_type}; dmd reads stored or deflated entries (EDM's tool stores them)"
    return None


def _describe(shape):
    """(H, W, C) -> '32x32 RGB' or '28x28 grayscale'."""
    return f"{shape[0]}x{shape[1]} {'RGB' if shape[2] == 3 else 'grayscale'}"


# The images of a folder (searched recursively) or ZIP, sorted by name, decoded as (H, W, C) uint8, and the labels of
# its dataset.json. A ZIP is opened lazily by each process that reads: DataLoader workers are forked copies, and one
# ZipFile handle must not be shared across processes.
class ImageFolder:
    error = ImageDatasetError  # The exception class of every message (fid's subclass raises FIDError).
    formats = ("PNG",)  # The only decoders PIL may use (EDM's dataset format holds PNGs).
    format_note = "EDM's dataset format holds PNGs; `dmd make-dataset` converts other images"
    max_pixels = MAX_PIXELS  # The most pixels an image may declare.
    items = "images"  # What the entries are, in messages (dmd/encoded.py's subclass reads VAE latents).

    def extensions(self):
        """The file extensions read as items: every one PIL knows, as EDM counts images."""
        import PIL.Image

        return set(PIL.Image.registered_extensions())

    def __init__(self, path):
        self.path = Path(path)
        self._zip = self._pid = None
        self._shape = None  # The shape of the first item, read when first needed.
        extensions = self.extensions()

        def counts(name):  # Is `name` read: an item or the labels?
            return name == LABELS_FILE or Path(name).suffix.lower() in extensions

        kind = special_file(self.path)
        if kind is not None:
            raise self.error(f"{path}: {kind}, not a folder or ZIP of {self.items}")
        if self.path.is_dir():
            self.is_zip = False
            names = []
            for p in self.path.rglob("*"):
                name = p.relative_to(self.path).as_posix()
                if not counts(name):
                    continue
                kind = special_file(p)
                if kind is not None:
                    raise self.error(f"{self.path}/{name}: {kind}, not a regular file")
                if p.is_file():
                    names.append(name)
        elif zipfile.is_zipfile(self.path):
            self.is_zip = True
            try:
                infos = self._zipfile().infolist()
            except (OSError, zipfile.BadZipFile) as e:
                raise self.error(f"{path}: not a readable ZIP ({e})") from e
            for info in infos:
                problem = _zip_problem(info) if counts(info.filename) else None
                if problem is not None:
                    raise self.error(f"{self.path}/{info.filename}: {problem}")
            names = [info.filename for info in infos if counts(info.filename)]
        else:
            raise self.error(f"{path}: not a folder or ZIP of {self.items}")
        self.names = sorted(n for n in names if n != LABELS_FILE)
        self.has_labels_file = LABELS_FILE in names
        if not self.names:
            raise self.error(f"{path}: no {self.items} found")

    def __len__(self):
        return len(self.names)

    def _zipfile(self):
        """The ZipFile of this process (reopened after a fork)."""
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def _open(self, name):
        return self._zipfile().open(name) if self.is_zip else open(self.path / name, "rb")

    def __getstate__(self):
        """Pickle (for DataLoader workers) without this process's ZIP handle."""
        return dict(self.__dict__, _zip=None, _pid=None)

    def close(self):
        """Close this process's ZIP handle (the next read reopens it)."""
        if self._zip is not None:
            self._zip.close()
        self._zip = self._pid = None

    @contextmanager
    def open_image(self, index):
        """Yield image `index` as a PIL image whose header (size, mode) is read but not its pixels, opened only as
        one of `formats` and refused if it declares more than `max_pixels`; an error naming the file for any failure
        inside the block, so that a small file cannot ask for gigabytes and a bad one gives one line."""
        import PIL.Image

        where = f"{self.path}/{self.names[index]}"
        try:
            with self._open(self.names[index]) as f:
                image = PIL.Image.open(f, formats=self.formats)
                width, height = image.size
                if width * height > self.max_pixels:
                    raise self.error(
                        f"{where}: declares {width}x{height} pixels, more than the {self.max_pixels:,} an image may "
                        "have here"
                    )
                yield image
        except PIL.UnidentifiedImageError as e:
            note = f" ({self.format_note})" if self.format_note else ""
            raise self.error(f"{where}: not a {' or '.join(self.formats)} image{note}") from e
        except (OSError, EOFError, SyntaxError, zlib.error, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as e:
            raise self.error(f"{where}: not a readable image ({e})") from e

    def read(self, index, shape=None):
        """Return image `index` as (H, W, C) uint8 (C = 1 or 3); with `shape` (H, W, C), an error naming both files
        if its size or mode differs, checked before its pixels are decoded."""
        with self.open_image(index) as image:
            width, height = image.size
            if shape is not None and (height, width) != shape[:2]:
                self._mismatch(index, (height, width, len(image.getbands())), shape)
            image.load()
        if image.mode not in ("L", "RGB"):
            raise self.error(f"{self.path}/{self.names[index]}: mode {image.mode}; expected RGB or L (grayscale)")
        pixels = np.asarray(image)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if shape is not None and pixels.shape != shape:
            self._mismatch(index, pixels.shape, shape)
        return pixels

    def _mismatch(self, index, found, shape):
        raise self.error(
            f"{self.path}/{self.names[index]}: a {_describe(found)} image, but the first image {self.names[0]} is "
            f"{_describe(shape)}; all images must share one size and mode"
        )

    @property
    def shape(self):
        """The shape of the first item as `read` returns it ((H, W, C) for an image), which every item must share."""
        if self._shape is None:
            self._shape = self.read(0).shape
        return self._shape

    def read_same_shape(self, index):
        """Return image `index` as `read` does, raising an error naming both files if its size or mode differs."""
        return self.read(index, self.shape)

    def read_labels(self):
        """Return the class index of every item (N,) int64 from dataset.json, or None if it gives no labels."""
        if not self.has_labels_file:
            return None
        where = f"{self.path}/{LABELS_FILE}"
        limit = LABEL_BYTES_PER_IMAGE * len(self.names) + (1 << 20)
        try:
            with self._open(LABELS_FILE) as f:
                text = f.read(limit + 1)  # bounded: a ZIP entry may inflate to far more than it declares
        except (OSError, zipfile.BadZipFile) as e:
            raise self.error(f"{where}: not readable JSON ({e})") from e
        if len(text) > limit:
            raise self.error(f"{where}: more than {limit:,} bytes for {len(self.names)} {self.items}; not a label file")
        try:
            meta = parse_json(text, where)
        except ValueError as e:
            raise self.error(str(e)) from None
        if not isinstance(meta, dict) or "labels" not in meta:
            raise self.error(f"{where}: no 'labels' entry (expected {{\"labels\": [[path, class], ...] or null}})")
        pairs = meta["labels"]
        if pairs is None:
            return None
        if not isinstance(pairs, list):
            raise self.error(f"{where}: 'labels' is a {type(pairs).__name__}, not a list of [path, class] pairs")
        for pair in pairs:
            ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
            if not (ok and type(pair[1]) is int and 0 <= pair[1] <= MAX_CLASS):  # EDM's label vectors are no classes
                raise self.error(
                    f"{where}: entry {json.dumps(pair)[:80]} is not a [path, class index] pair (a class is an integer "
                    f"from 0 to {MAX_CLASS})"
                )
        labels = dict(pairs)
        missing = [name for name in self.names if name not in labels]
        if missing:
            raise self.error(
                f"{where}: no label for {len(missing)} of {len(self.names)} {self.items} (e.g. {missing[0]})"
            )
        return np.array([labels[name] for name in self.names], dtype=np.int64)


# Real images as a torch Dataset: items (image (C, H, W) float32 in [-1, 1] = uint8 / 127.5 - 1, as EDM's training
# loop scales them; label int64, -1 without labels). With xflip the dataset doubles, as EDM's does: index i < N is
# image i and index N + i is image i mirrored left-right. The flips are thus part of the index a sampler draws, and a
# seeded sampler makes them as reproducible and resumable as the order of the images.
class ImageDataset(Dataset):
    def __init__(
        self,
        path,  # Folder or ZIP in EDM's format.
        xflip=False,  # Add the mirrored images (indices N .. 2N - 1)?
    ):
        self.files = ImageFolder(path)
        self.path = self.files.path
        self.xflip = bool(xflip)
        self.num_images = len(self.files)
        height, width, self.channels = self.files.shape
        if height != width:
            raise ImageDatasetError(f"{self.path}: images are {height}x{width}; EDM's networks take square images")
        self.resolution = height
        self.labels, self.label_dim = class_labels(self.files)

    def __len__(self):
        return self.num_images * (2 if self.xflip else 1)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} items of {self.path}")
        raw = index % self.num_images
        pixels = self.files.read_same_shape(raw)  # (H, W, C) uint8
        if index >= self.num_images:
            pixels = pixels[:, ::-1]
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(torch.float32) / 127.5 - 1
        return image, self.labels[raw]

    def close(self):
        self.files.close()

    def check_compatible(self, net):
        """Raise ImageDatasetError naming the data if its resolution, channels or labels do not fit the teacher `net`,
        or if `net` runs on VAE latents (see refuse_pixels_for_latents)."""
        refuse_pixels_for_latents(self.path, net)
        check_fits(f"real images {self.path}", self, (net.img_resolution, net.img_channels, net.label_dim))


def class_labels(files):
    """The class index of every item of an ImageFolder `files` as a tensor (N,) int64, -1 without labels, and the
    label_dim they imply: 1 + the largest index (a lower bound: the top classes may be unused), 0 without labels."""
    labels = files.read_labels()
    label_dim = 0 if labels is None else int(labels.max()) + 1
    labels = np.full(len(files), -1, dtype=np.int64) if labels is None else labels
    return torch.from_numpy(labels), label_dim


def check_fits(what, data, wanted, error=ImageDatasetError):
    """Raise `error` naming `what` if the data's resolution, channels or labels (its attributes
    `resolution`, `channels`, `label_dim`) do not fit `wanted` = a teacher's (resolution, channels, label_dim).

    An unconditional teacher ignores labels (EDM's cifar10-32x32.zip is labelled and serves its unconditional runs
    too); a conditional one needs labels below its label_dim.
    """
    resolution, channels, label_dim = wanted
    for key, want in (("resolution", resolution), ("channels", channels)):
        if getattr(data, key) != want:
            raise error(f"{what} have {key} {getattr(data, key)} but the teacher has {want}")
    if label_dim > 0 and data.label_dim == 0:
        raise error(f"{what} have no labels ({LABELS_FILE}) but the teacher has label_dim {label_dim}")
    if label_dim > 0 and data.label_dim > label_dim:
        raise error(f"{what} have class indices up to {data.label_dim - 1} but the teacher has label_dim {label_dim}")


def refuse_pixels_for_latents(path, net):
    """Raise ImageDatasetError naming `path` if the teacher `net` is a latent EDM2 network (it runs on Stable
    Diffusion VAE latents), giving the command that encodes the images once.

    Encoding on the fly would cost a VAE encoder pass over every real batch of every fake-score step, and EDM2 itself
    trains its latent networks on pre-encoded datasets (`dataset_tool.py encode`); dmd/encoded.py reads those.
    """
    from dmd.edm2.vae import latent_info

    info = latent_info(net)
    if info is not None:
        dest = Path(path).with_name(f"{Path(path).stem}-sd.zip")
        raise ImageDatasetError(
            f"real images {path} are pixels but the teacher runs on the latents of the VAE {info.vae_name}; encode "
            f"them once (a VAE pass over every real batch would slow every fake-score step): `python -m dmd "
            f"make-dataset {path} {dest} --encode --vae {info.vae_name}`"
        )


def image_name(index):
    """EDM's name of image `index` in a dataset: 00000/img00000000.png, ..., 00001/img00001000.png, ..."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def encode_png(pixels):
    """(H, W, C) uint8, C = 1 or 3 -> PNG bytes with EDM's dataset_tool.py settings (uncompressed: fast to decode)."""
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(
        buffer, format="png", compress_level=0, optimize=False
    )
    return buffer.getvalue()


def refuse_existing(dest):
    """ImageDatasetError if `dest` exists (a file or folder a person made is never overwritten)."""
    if os.path.lexists(dest):
        raise ImageDatasetError(f"{dest} exists; remove it or choose another DEST")


JOB_FILE = "make-dataset.json"  # In a staging folder: the job that is writing it.
CHUNK = 1000  # Images per staged group: one folder of EDM's layout (00000/ holds images 0-999).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # ZIP entry times: the same images give the same bytes


def _zip_entry(name):
    entry = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    entry.external_attr = 0o644 << 16  # rw-r--r-- when unzipped
    return entry


# EDM's dataset format written into a staging folder `DEST.partial` beside DEST, which becomes DEST only when complete
# (renamed, for a folder DEST, or packed into a ZIP DEST), so that an interrupted write, kill -9 included, never
# leaves a half DEST. Images are staged by EDM's groups of 1000 (00000/, 00001/, ...), each written under a temporary
# name and renamed when whole: a small ZIP per group for a ZIP DEST (a few dozen files for CIFAR-10, not 50,000), a
# folder per group for a folder DEST. The staging folder records the job writing it (a JSON dict saying what is
# written from what): a writer of the same job continues after the last whole group, one of another job is refused,
# as is an existing DEST, so that a file a person made is never overwritten. ZIP entries carry a fixed time: the
# same images give the same bytes. Subclasses write other entries under other names (dmd/encoded.py: EDM2's latents).
class DatasetWriter:
    name = staticmethod(image_name)  # index -> the entry's name (its folder is the group's: 00000/ ...)
    items = "images"  # What the items are, in messages.

    def encode(self, item):
        """An item -> the entry's bytes (an image: a PNG)."""
        return encode_png(item)

    def __init__(self, dest, num, job):
        from dmd.utils.io import atomic_write_text, check_name_length

        self.dest, self.num = Path(dest), num
        self.is_zip = self.dest.suffix.lower() == ".zip"
        self.staging = self.dest.with_name(self.dest.name + ".partial")
        refuse_existing(self.dest)
        try:
            check_name_length(self.staging)
        except ValueError as e:
            raise ImageDatasetError(f"{dest}: {e}") from None
        if num >= 10**8:  # EDM's names have 8 digits
            raise ImageDatasetError(f"{dest}: {num:,} {self.items}; EDM's dataset format names at most 99,999,999")
        job = json.loads(json.dumps(dict(job, images=num, zip=self.is_zip)))  # as it reads back (tuples: lists)
        record = self.staging / JOB_FILE
        if record.is_file():
            try:
                found = parse_json(record.read_bytes(), f"{record}")
            except ValueError as e:
                raise ImageDatasetError(str(e)) from None
            if found != job:
                raise ImageDatasetError(
                    f"{self.staging} holds an interrupted write from other data or options (the job in {JOB_FILE} "
                    "differs); rerun the command that started it, or remove it to start over"
                )
        elif self.staging.is_dir() and not any(self.staging.iterdir()):  # made by a writer killed right after mkdir
            atomic_write_text(json.dumps(job), record)
        elif os.path.lexists(self.staging):
            raise ImageDatasetError(f"{self.staging} exists and was not made by dmd; remove it or choose another DEST")
        else:
            self.staging.mkdir(parents=True)
            atomic_write_text(json.dumps(job), record)
        for path in self.staging.glob("*.tmp"):  # a group whose writing was interrupted
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._group = None  # (its temporary path, the ZipFile it is written through or None), while one is open

    def _final(self, index):
        """Where the whole group of image `index` lies in the staging folder."""
        folder = self.name(index).split("/")[0]
        return self.staging / (f"{folder}.zip" if self.is_zip else folder)

    def todo(self):
        """The indices still to write, in order: those of groups not written whole before."""
        starts = [start for start in range(0, self.num, CHUNK) if not self._final(start).exists()]
        return [i for start in starts for i in range(start, min(start + CHUNK, self.num))]

    def write(self, index, item):
        """Write item `index` (an image: (H, W, C) uint8 with C = 1 or 3); items come in order, a group from its
        first."""
        final = self._final(index)
        if self._group is None:
            tmp = final.with_name(final.name + ".tmp")
            if self.is_zip:
                self._group = tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED)
            else:
                tmp.mkdir()
                self._group = tmp, None
        tmp, z = self._group
        name = self.name(index)
        if z is not None:
            z.writestr(_zip_entry(name), self.encode(item))
        else:
            (tmp / name.split("/")[1]).write_bytes(self.encode(item))
        if index == min(index // CHUNK * CHUNK + CHUNK, self.num) - 1:  # the group's last image
            if z is not None:
                z.close()
            os.replace(tmp, final)
            self._group = None

    def publish(self, labels=None):
        """Make DEST of all `num` images and their class indices `labels` (num ints, or None for unlabelled)."""
        meta = {"labels": None if labels is None else [[self.name(i), int(c)] for i, c in enumerate(labels)]}
        if not self.is_zip:
            (self.staging / LABELS_FILE).write_text(json.dumps(meta), encoding="utf-8")
            refuse_existing(self.dest)
            os.rename(self.staging, self.dest)
            (self.dest / JOB_FILE).unlink()
            return
        pack = self.staging / "pack.zip"  # inside the staging folder: an interrupted packing leaves no stray file
        with open(pack, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                for start in range(0, self.num, CHUNK):
                    with zipfile.ZipFile(self._final(start)) as group:  # reads check each entry's CRC-32
                        for name in group.namelist():
                            z.writestr(_zip_entry(name), group.read(name))
                z.writestr(_zip_entry(LABELS_FILE), json.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        refuse_existing(self.dest)
        os.replace(pack, self.dest)
        shutil.rmtree(self.staging)


def write_image_dataset(dest, images, labels=None):
    """Write uint8 images (N, H, W, C), C = 1 or 3, and optional class indices (N,) in EDM's format with
    `DatasetWriter`: `dest` ending in .zip gets an uncompressed ZIP, anything else a folder; `dest` must not exist."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ImageDatasetError(f"{dest}: images must be (N, H, W, 1 or 3) uint8, got shape {images.shape}")
    write_all(DatasetWriter, dest, images, labels)


def write_all(writer_class, dest, items, labels):
    """Write the array `items` (N, ...) and optional class indices (N,) at `dest` with a DatasetWriter subclass."""
    if labels is not None and len(labels) != len(items):
        raise ImageDatasetError(f"{dest}: {len(labels)} labels for {len(items)} {writer_class.items}")
    labels = None if labels is None else [int(c) for c in labels]
    digest = hashlib.sha256(items.tobytes())  # the job: these very items and labels
    digest.update(json.dumps([items.shape, labels]).encode())
    writer = writer_class(dest, len(items), {"sha256": digest.hexdigest()})
    for i in writer.todo():
        writer.write(i, items[i])
    writer.publish(labels)
