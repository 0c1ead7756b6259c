"""Teacher noise-image pairs on disk: the HDF5 pair format, its crash-safe writer, and `PairDataset`.

Our layout (format 'dmd-pairs', written by `python -m dmd make-pairs` and `convert-pairs`), one row per pair:
    latents (N, C, H, W) float32   unscaled N(0, I) noise z; the sampler starts from sigma_max * z (80 * z)
    images  (N, C, H, W) float32   the teacher's raw sampler output y (not clipped)
    labels  (N,)         int64     class index, -1 for an unconditional teacher
    seeds   (N,)         int64     the seed each row's z (and label) was drawn from; all N written at creation
Every dataset is chunked by rows and allocated in full when the file is created, so appending rows changes no HDF5
metadata; the only metadata a writer changes afterwards is the scalar attribute `num_complete`, bumped after the rows
are flushed. A writer killed at any moment therefore leaves a file whose first `num_complete` rows are valid.

The port's layout (devrimcavusoglu/dmd, its released `cifar.hdf5`): one dataset per pair at `/data/{i}`, a float64
array (2, C, H, W) = [image, latent] with attributes `class_idx` and `seed`. `PairDataset` reads it too.
"""

import math
import mmap
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dmd.utils.io import atomic_path

FORMAT = "dmd-pairs"
FORMAT_VERSION = 1
CHUNK_ROWS = 256


class PairFileError(ValueError):
    """A pair file that cannot be read, resumed or used with a given teacher; the message names the file."""


def _open_h5(path, mode="r", **kwargs):
    """Open an HDF5 file, turning h5py's OSError for a missing or corrupt file into a PairFileError."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PairFileError(f"pair file {path} does not exist")
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as e:
        raise PairFileError(f"cannot open pair file {path} as HDF5 ({e})") from e


def _attr_value(v):
    """HDF5 attribute -> plain Python value (numpy scalars and bytes come back from h5py)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_pair_attrs(path):
    """Return the attributes of a pair file of our layout as a plain dict (PairFileError if it is not one)."""
    with _open_h5(path) as f:
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise PairFileError(f"pair file {path} was not written by make-pairs (no format='{FORMAT}' attribute)")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise PairFileError(
            f"pair file {path} has format version {attrs['format_version']}; this dmd reads up to {FORMAT_VERSION}"
        )
    return attrs


def read_seeds(path):
    """Return the full planned seed list (N,) int64 of a pair file of our layout."""
    with _open_h5(path) as f:
        return f["seeds"][:]


def _create_rows(f, name, shape, dtype):
    """Create a dataset chunked by rows with all its chunks allocated now, so later row writes touch only data."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((min(CHUNK_ROWS, shape[0]), *shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, fill_time="never")


def create_pair_file(path, *, channels, resolution, label_dim, seeds, attrs):
    """Atomically create an empty pair file planned for `len(seeds)` pairs, with `attrs` (teacher, sampler) recorded."""
    import h5py

    n = len(seeds)
    if n < 1:
        raise PairFileError(f"pair file {path}: cannot create a file for {n} pairs")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _create_rows(f, "latents", (n, channels, resolution, resolution), "float32")
            _create_rows(f, "images", (n, channels, resolution, resolution), "float32")
            _create_rows(f, "labels", (n,), "int64")
            _create_rows(f, "seeds", (n,), "int64")
            f["seeds"][:] = np.asarray(seeds, dtype=np.int64)
            f.attrs.update(attrs)
            f.attrs.update(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                resolution=resolution,
                channels=channels,
                label_dim=label_dim,
                num_requested=n,
            )
            f.attrs["num_complete"] = np.int64(0)


# Appends rows to a pair file of our layout: rows first, then `num_complete`, each followed by a flush.
class PairWriter:
    def __init__(self, path):
        self.path = Path(path)
        read_pair_attrs(self.path)  # Validates the format before opening for writing.
        self.file = _open_h5(self.path, "r+")
        self.num_complete = int(self.file.attrs["num_complete"])
        self.num_requested = int(self.file.attrs["num_requested"])

    def append(self, latents, images, labels):
        """Write the next rows: latents/images (B, C, H, W), labels (B,); then mark them complete."""
        n, b = self.num_complete, len(latents)
        if n + b > self.num_requested:
            raise PairFileError(f"pair file {self.path}: {n} + {b} rows exceed the planned {self.num_requested}")
        rows = slice(n, n + b)
        self.file["latents"][rows] = np.asarray(latents, dtype=np.float32)
        self.file["images"][rows] = np.asarray(images, dtype=np.float32)
        self.file["labels"][rows] = np.asarray(labels, dtype=np.int64)
        self.file.flush()
        # `modify` rewrites the existing scalar in place; `attrs[...] =` would delete and recreate it.
        self.file.attrs.modify("num_complete", np.int64(n + b))
        self.file.flush()
        self.num_complete = n + b

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_port_layout(path, latents, images, labels, seeds):
    """Write pairs in the port's layout (`/data/{i}` = float64 [image, latent], attrs class_idx, seed), atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            group = f.create_group("data")
            for i in range(len(latents)):
                pair = np.stack([np.asarray(images[i]), np.asarray(latents[i])]).astype(np.float64)  # (2, C, H, W)
                ds = group.create_dataset(str(i), data=pair)
                ds.attrs["class_idx"] = int(labels[i])
                ds.attrs["seed"] = int(seeds[i])


# Rows of one of our datasets read straight from a memory map of the file, bypassing HDF5 (whose per-call overhead
# is most of a random row read). Our datasets are uncompressed and all their chunks are allocated when the file is
# created, so row r of a dataset sits at byte (offset of its chunk) + (r % chunk_rows) * row_bytes.
class _RowMap:
    def __init__(self, ds, path):
        if ds.chunks is None or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None:
            raise PairFileError(f"pair file {path}: {ds.name} is unchunked or filtered, which make-pairs never writes")
        self.chunk_rows, self.row_shape, self.dtype = ds.chunks[0], ds.shape[1:], ds.dtype
        self.count = math.prod(self.row_shape)  # Elements per row.
        self.row_bytes = ds.dtype.itemsize * self.count
        self.chunk_offsets = np.zeros(math.ceil(ds.shape[0] / self.chunk_rows), dtype=np.int64)
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            self.chunk_offsets[info.chunk_offset[0] // self.chunk_rows] = info.byte_offset
        with open(path, "rb") as f:
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # np.memmap's subclass is 3x slower.

    def __getitem__(self, row):
        """Row `row` as a fresh numpy array (C, H, W)."""
        start = self.chunk_offsets[row // self.chunk_rows] + (row % self.chunk_rows) * self.row_bytes
        return np.frombuffer(self.buffer, self.dtype, self.count, int(start)).reshape(self.row_shape).copy()


# Teacher pairs as a torch Dataset: items (latent (C, H, W) float32, image (C, H, W) float32, label int64 or -1).
# The HDF5 file is opened lazily in the process that reads (each DataLoader worker opens its own handle).
class PairDataset(Dataset):
    def __init__(
        self,
        path,  # Pair file: our layout or the port's.
        label_dim=None,  # Port layout only: number of classes; None infers max(class_idx) + 1 (reads every pair).
    ):
        import h5py

        self.path = Path(path)
        self._forget_handles()
        with _open_h5(self.path) as f:
            if f.attrs.get("format") is not None:
                self.layout = "dmd"
                attrs = read_pair_attrs(self.path)
                self.num_pairs = int(attrs["num_complete"])
                self.resolution = int(attrs["resolution"])
                self.channels = int(attrs["channels"])
                self.label_dim = int(attrs["label_dim"])
                self.label_dim_inferred = False
            elif isinstance(f.get("data"), h5py.Group):
                self.layout = "port"
                self._read_port_metadata(f, label_dim)
            else:
                raise PairFileError(
                    f"pair file {self.path} has neither our layout (format='{FORMAT}') nor the port's (/data/{{i}})"
                )

    def _read_port_metadata(self, f, label_dim):
        group = f["data"]
        self.num_pairs = len(group)
        if self.num_pairs == 0:
            raise PairFileError(f"pair file {self.path} (port layout) holds no pairs under /data")
        shape = group["0"].shape  # (2, C, H, W) = [image, latent]
        if len(shape) != 4 or shape[0] != 2 or shape[2] != shape[3]:
            raise PairFileError(f"pair file {self.path}: /data/0 has shape {shape}, expected (2, C, R, R)")
        self.channels, self.resolution = int(shape[1]), int(shape[2])
        self.label_dim_inferred = label_dim is None
        if label_dim is None:
            label_dim = 1 + max(int(group[str(i)].attrs["class_idx"]) for i in range(self.num_pairs))
        self.label_dim = int(label_dim)

    def __len__(self):
        return self.num_pairs

    def _h5(self):
        """The open file of this process (reopened after a fork: h5py handles must not cross processes)."""
        if self._file is None or self._pid != os.getpid():
            # No chunk cache: random rows would each pull a whole 256-row chunk (3 MiB at 3x32x32) into it.
            self._file = _open_h5(self.path)
            self._pid = os.getpid()
            if self.layout == "dmd":
                self._latents = _RowMap(self._file["latents"], self.path)
                self._images = _RowMap(self._file["images"], self.path)
                self._labels = torch.from_numpy(self._file["labels"][: self.num_pairs])  # (N,), 8 bytes a pair
        return self._file

    def _forget_handles(self):
        self._file = self._pid = self._latents = self._images = self._labels = None

    def __getstate__(self):
        """Pickle (for DataLoader workers) without this process's handles; each worker opens its own."""
        state = self.__dict__.copy()
        for key in ("_file", "_pid", "_latents", "_images", "_labels"):
            state[key] = None
        return state

    def close(self):
        """Close this process's file handle (the next read reopens it)."""
        if self._file is not None:
            self._file.close()
        self._forget_handles()

    def _port_pair(self, index):
        """Row `index` of the port's layout -> (latent, image, label, seed)."""
        ds = self._h5()["data"][str(index)]
        image, latent = torch.from_numpy(ds[()].astype(np.float32))  # (2, C, H, W) = [image, latent]
        label = int(ds.attrs["class_idx"]) if self.label_dim > 0 else -1
        return latent, image, torch.tensor(label, dtype=torch.int64), int(ds.attrs["seed"])

    def __getitem__(self, index):
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range for {self.num_pairs} pairs in {self.path}")
        if self.layout == "port":
            return self._port_pair(index)[:3]
        self._h5()
        return torch.from_numpy(self._latents[index]), torch.from_numpy(self._images[index]), self._labels[index]

    def check_compatible(self, net):
        """Raise PairFileError naming the file if its resolution, channels or labels do not fit the teacher `net`."""
        found = {"resolution": self.resolution, "channels": self.channels}
        wanted = {"resolution": net.img_resolution, "channels": net.img_channels}
        for key in found:
            if found[key] != wanted[key]:
                raise PairFileError(f"pair file {self.path} has {key} {found[key]} but the teacher has {wanted[key]}")
        # An inferred label_dim is only a lower bound: the file may not use the highest classes.
        labels_fit = self.label_dim <= net.label_dim if self.label_dim_inferred else self.label_dim == net.label_dim
        if not labels_fit or (self.label_dim == 0) != (net.label_dim == 0):
            raise PairFileError(
                f"pair file {self.path} has label_dim {self.label_dim} but the teacher has label_dim {net.label_dim}"
            )

    def read_rows(self, start, stop):
        """Return rows [start, stop) as tensors: latents (B, C, H, W), images (B, C, H, W), labels (B,), seeds (B,)."""
        if not 0 <= start <= stop <= self.num_pairs:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.num_pairs} pairs in {self.path}")
        if self.layout == "dmd":
            f = self._h5()
            return tuple(torch.from_numpy(f[k][start:stop]) for k in ("latents", "images", "labels", "seeds"))
        latents, images, labels, seeds = zip(*(self._port_pair(i) for i in range(start, stop)))
        return torch.stack(latents), torch.stack(images), torch.stack(labels), torch.tensor(seeds, dtype=torch.int64)


def convert_port_file(old, new, label_dim=None, batch_size=1024, progress=True):
    """Rewrite a pair file of the port's layout as ours at `new` (atomically); return the number of pairs."""
    from tqdm import tqdm

    src = PairDataset(old, label_dim=label_dim)
    if src.layout != "port":
        raise PairFileError(f"pair file {old} already has our layout; nothing to convert")
    with _open_h5(old) as f:
        seeds = [int(f["data"][str(i)].attrs["seed"]) for i in range(len(src))]
    attrs = {"source_format": "port", "converted_from": str(old)}
    with atomic_path(new) as tmp:
        create_pair_file(
            tmp, channels=src.channels, resolution=src.resolution, label_dim=src.label_dim, seeds=seeds, attrs=attrs
        )
        with PairWriter(tmp) as writer, tqdm(total=len(src), unit="pair", disable=not progress) as bar:
            for start in range(0, len(src), batch_size):
                latents, images, labels, _ = src.read_rows(start, min(start + batch_size, len(src)))
                writer.append(latents.numpy(), images.numpy(), labels.numpy())
                bar.update(len(latents))
    return len(src)
