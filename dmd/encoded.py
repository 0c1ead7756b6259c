"""EDM2's encoded datasets: the real data of DMD2's GAN for a latent EDM2 teacher (the edm2-img512-* networks, which
run on Stable Diffusion VAE latents). A reader, a torch Dataset and a writer.

The format is what EDM2's `dataset_tool.py encode` writes (`img512-sd.zip` for ImageNet-512): EDM's dataset layout
(dmd/images.py: a folder or uncompressed ZIP, groups of 1000, `dataset.json` labels) whose entries are `.npy` arrays
named `00000/img-mean-std-00000000.npy`, each float32 (2C, h, w): the VAE's latent mean (C = 4 channels) then its
std, for one image (8 x 64 x 64 for a 512 x 512 image). The final latent the teacher sees is drawn from them each
time the image is used (`dmd.edm2.encoders.final_latents`, in the fake-score step), so the dataset stays raw.

Latents are read one entry at a time (a ZIP through a handle per process, as ImageFolder reads PNGs): ImageNet-512's
zip is ~1.3M entries, never loaded whole. Every entry's .npy header is checked before its data is read (dtype
float32 little-endian, C order, the first entry's shape, at most MAX_VALUES values), so a small file cannot ask for
gigabytes and a bad entry is one line naming the file and entry; values must be finite (a NaN would poison mu_fake).
"""

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dmd.images import (
    DatasetWriter,
    ImageDatasetError,
    ImageFolder,
    check_fits,
    class_labels,
    special_file,
    write_all,
)

DTYPE = np.dtype("<f4")  # EDM2's encoder writes float32 (little-endian on its machines)
MAX_VALUES = 1 << 24  # values per entry (64 MiB): EDM2's latents of 512 x 512 images have 8 * 64 * 64 = 32,768
HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}  # np.save's


class EncodedDatasetError(ImageDatasetError):
    """An encoded dataset that cannot be read or used with a given teacher; the message names the file and entry."""


def latent_name(index):
    """EDM2's name of latent `index`: 00000/img-mean-std-00000000.npy, ..., 00001/img-mean-std-00001000.npy, ..."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img-mean-std-{digits}.npy"


def npy_bytes(raw):
    """(2C, h, w) -> the bytes of `np.save` of it as float32."""
    header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": tuple(raw.shape)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + np.ascontiguousarray(raw, dtype=DTYPE).tobytes()


def holds_latents(path):
    """Whether the folder or ZIP `path` holds .npy entries (EDM2's encoded latents) rather than images; False for
    anything unreadable, which the reader then names."""
    path = Path(path)
    if special_file(path) is not None:
        return False
    if path.is_dir():
        return any(p.suffix.lower() == ".npy" for p in path.rglob("*"))
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.lower().endswith(".npy") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# The .npy entries of a folder (searched recursively) or ZIP, sorted by name, each read as (2C, h, w) float32, and the
# labels of its dataset.json: ImageFolder's listing, ZIP checks and labels, with .npy entries in place of PNGs.
class LatentFolder(ImageFolder):
    error = EncodedDatasetError
    items = "VAE latents (.npy entries as EDM2's `dataset_tool.py encode` writes)"

    def extensions(self):
        return {".npy"}

    def read(self, index, shape=None):
        """Return latent `index` as (2C, h, w) float32, its header checked before its data is read: against `shape`
        when given, else as a first entry (three dimensions, an even number of channels)."""
        where = f"{self.path}/{self.names[index]}"
        try:
            with self._open(self.names[index]) as f:
                version = np.lib.format.read_magic(f)
                if version not in HEADERS:
                    raise self.error(f"{where}: .npy format version {version}; expected 1.0 or 2.0 (np.save's)")
                found, fortran, dtype = HEADERS[version](f)  # bounded: numpy refuses headers over 10,000 bytes
                self._check_header(where, found, fortran, dtype, shape)
                raw = np.empty(found, DTYPE)
                count = f.readinto(memoryview(raw).cast("B"))
        except self.error:
            raise
        except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise self.error(f"{where}: not a readable .npy array ({e})") from e
        if count != raw.nbytes:
            raise self.error(f"{where}: {count:,} bytes of data; its header declares {raw.nbytes:,}")
        if not np.isfinite(raw).all():
            raise self.error(f"{where}: holds an inf or a NaN")
        return raw

    def _check_header(self, where, found, fortran, dtype, shape):
        if dtype != DTYPE or fortran:
            order = "Fortran" if fortran else "C"
            raise self.error(f"{where}: a {dtype} array in {order} order; EDM2's latents are float32 in C order")
        if shape is not None and found != shape:
            raise self.error(
                f"{where}: shape {found} but the first entry {self.names[0]} has {shape}; all latents must share one "
                "shape"
            )
        if len(found) != 3 or found[0] % 2 or 0 in found or int(np.prod(found)) > MAX_VALUES:
            raise self.error(
                f"{where}: shape {found}; EDM2's latents are (2C, h, w), the mean then the std of C channels, of at "
                f"most {MAX_VALUES:,} values"
            )


# EDM2's encoded dataset as a torch Dataset: items (raw latent (2C, h, w) float32 = mean then std; label int64, -1
# without labels), as ImageDataset's (image, label). The fake-score step turns raw latents into final ones.
class EncodedDataset(Dataset):
    def __init__(
        self,
        path,  # Folder or ZIP in EDM2's encoded format.
    ):
        self.files = LatentFolder(path)
        self.path = self.files.path
        self.num_images = len(self.files)
        raw_channels, height, width = self.files.shape
        if height != width:
            raise EncodedDatasetError(f"{self.path}: latents are {height}x{width}; EDM2's networks take square ones")
        self.resolution, self.channels = height, raw_channels // 2  # channels: C of the final latent
        self.labels, self.label_dim = class_labels(self.files)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"latent index {index} out of range for {len(self)} items of {self.path}")
        return torch.from_numpy(self.files.read_same_shape(index)), self.labels[index]

    def close(self):
        self.files.close()

    def check_compatible(self, net):
        """Raise EncodedDatasetError naming the data unless `net` is a latent EDM2 network (StabilityVAEEncoder)
        with C channels (the entries hold 2C: mean and std), the latents' resolution and labels that fit."""
        from dmd.edm2.vae import latent_info

        if latent_info(net) is None:
            raise EncodedDatasetError(
                f"real data {self.path} are VAE latents (EDM2's encoded dataset) but the teacher is a pixel-space "
                "network; it trains on images in EDM's dataset format (`dmd make-dataset`)"
            )
        wanted = (net.img_resolution, net.img_channels, net.label_dim)
        check_fits(f"real latents {self.path}", self, wanted, EncodedDatasetError)


# EDM2's encoded format written as DatasetWriter writes EDM's (staged, atomic, resumable, never overwriting).
class LatentWriter(DatasetWriter):
    name = staticmethod(latent_name)
    items = "latents"

    def encode(self, item):
        return npy_bytes(item)


def write_encoded_dataset(dest, raw, labels=None):
    """Write raw latents (N, 2C, h, w) (mean then std, cast to float32) and optional class indices (N,) in EDM2's
    encoded format with `LatentWriter`: `dest` ending in .zip gets an uncompressed ZIP, anything else a folder;
    `dest` must not exist."""
    raw = np.asarray(raw, dtype=DTYPE)
    if raw.ndim != 4 or raw.shape[1] % 2:
        raise EncodedDatasetError(f"{dest}: latents must be (N, 2C, h, w), got shape {raw.shape}")
    write_all(LatentWriter, dest, raw, labels)
