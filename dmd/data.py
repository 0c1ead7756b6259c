"""Teacher noise-image pairs on disk: the HDF5 pair format, its crash-safe writer, and `PairDataset`.

Our layout (format 'dmd-pairs', written by `python -m dmd make-pairs` and `convert-pairs`), one row per pair:
    latents (N, C, H, W) float32   unscaled N(0, I) noise z; the sampler starts from sigma_max * z (80 * z)
    images  (N, C, H, W) float32   the teacher's raw sampler output y (not clipped)
    labels  (N,)         int64     class index, -1 for an unconditional teacher
    seeds   (N,)         int64     the seed each row's z (and label) was drawn from; all N written at creation
Every dataset is chunked by rows and allocated in full when the file is created, so rows are written straight to their
bytes (not through HDF5, whose chunk cache swallows a failed write and then crashes) and appending changes no HDF5
metadata; the only metadata a writer changes afterwards is the scalar attribute `num_complete`, bumped after the rows
are on disk. A writer killed at any moment, or stopped by a full disk, leaves a file whose first `num_complete` rows
are valid. Opening a file checks its attributes against its datasets and the labels of its complete rows; a row with
a NaN or inf is refused when it is read or written.

The port's layout (devrimcavusoglu/dmd, its released `cifar.hdf5`): one dataset per pair at `/data/{i}`, a float64
array (2, C, H, W) = [image, latent] with attributes `class_idx` and `seed`. `PairDataset` reads it too.
"""

import errno
import math
import mmap
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dmd.utils.io import atomic_path

FORMAT = "dmd-pairs"
FORMAT_VERSION = 1
CHUNK_ROWS = 256
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}  # errno -> words
COLUMNS = {"latents": "float32", "images": "float32", "labels": "int64", "seeds": "int64"}  # our datasets
# Integer attributes of our layout and their least values (num_complete <= num_requested is checked too).
_INT_ATTRS = {
    "format_version": 1,
    "resolution": 1,
    "channels": 1,
    "label_dim": 0,
    "num_requested": 1,
    "num_complete": 0,
}


class PairFileError(ValueError):
    """A pair file that cannot be read, written, resumed or used with a given teacher; the message names the file."""


def _open_h5(path, mode="r", **kwargs):
    """Open an HDF5 file, turning h5py's OSError for a missing or corrupt file into a PairFileError."""
    import h5py

    from dmd.images import special_file

    path = Path(path)
    kind = special_file(path)  # a FIFO would be opened and waited on, not read
    if kind is not None:
        raise PairFileError(f"pair file {path} is {kind}, not a regular file")
    if path.is_dir():
        raise PairFileError(f"pair file {path} is a folder; give the .h5 file make-pairs wrote")
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


def _int_attr(attrs, key, where):
    """attrs[key] as an int; PairFileError '<where>: attribute <key> is missing' (or not an integer) otherwise."""
    value = _attr_value(attrs.get(key))
    if not isinstance(value, int) or isinstance(value, bool):
        found = "missing" if value is None else f"{value!r}, not an integer"
        raise PairFileError(f"{where}: attribute {key} is {found}")
    return value


def _checked_attrs(f, path):
    """The attributes of the open pair file `f` of our layout as a plain dict, checked against its datasets."""
    import h5py

    attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise PairFileError(f"pair file {path} was not written by make-pairs (no format='{FORMAT}' attribute)")
    for key, least in _INT_ATTRS.items():
        value = _int_attr(attrs, key, f"pair file {path}")
        if value < least:
            raise PairFileError(f"pair file {path}: attribute {key}={value} is below {least}")
        if key == "format_version" and value > FORMAT_VERSION:
            raise PairFileError(f"pair file {path} has format version {value}; this dmd reads up to {FORMAT_VERSION}")
    n, c, r = attrs["num_requested"], attrs["channels"], attrs["resolution"]
    if attrs["num_complete"] > n:
        raise PairFileError(
            f"pair file {path}: attribute num_complete={attrs['num_complete']} exceeds num_requested={n}"
        )
    for name, dtype in COLUMNS.items():
        ds, shape = f.get(name), _column_shape(name, n, c, r)
        if not isinstance(ds, h5py.Dataset):
            raise PairFileError(f"pair file {path}: dataset /{name} is missing")
        if ds.shape != shape or ds.dtype != dtype:
            raise PairFileError(
                f"pair file {path}: /{name} is {ds.dtype} {ds.shape} but the attributes (num_requested, channels, "
                f"resolution) say {dtype} {shape}"
            )
        # Rows are read and written at byte offsets: whole rows per chunk, no filters, every chunk allocated.
        filtered = ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None
        if ds.chunks is None or ds.chunks[1:] != shape[1:] or filtered:
            raise PairFileError(f"pair file {path}: /{name} is unchunked or filtered, which make-pairs never writes")
        if ds.id.get_num_chunks() != math.ceil(n / ds.chunks[0]):
            raise PairFileError(f"pair file {path}: /{name} has unallocated chunks, which make-pairs never writes")
    return attrs


def read_pair_attrs(path):
    """Return the attributes of a pair file of our layout as a plain dict (PairFileError if it is not one)."""
    with _open_h5(path) as f:
        return _checked_attrs(f, path)


def _check_rows(path, first_row, latents=None, images=None, labels=None, label_dim=None):
    """Raise PairFileError naming the first bad row: a NaN or inf in latents/images (B, ...), or a label (B,) that is
    not a class in [0, label_dim) (not -1 when label_dim is 0). Rows count from `first_row`."""
    for name, x in (("latent", latents), ("image", images)):
        finite = True if x is None else np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not np.all(finite):
            row = first_row + int(np.argmin(finite))
            raise PairFileError(f"pair file {path}: row {row} has a NaN or inf in its {name}")
    if labels is not None:
        bad = labels != -1 if label_dim == 0 else (labels < 0) | (labels >= label_dim)
        if bad.any():
            i = int(np.argmax(bad))
            want = "-1 (the file is unconditional)" if label_dim == 0 else f"a class in [0, {label_dim})"
            raise PairFileError(f"pair file {path}: row {first_row + i} has label {labels[i]}, not {want}")


def read_seeds(path):
    """Return the full planned seed list (N,) int64 of a pair file of our layout."""
    with _open_h5(path) as f:
        return f["seeds"][:]


# Where the rows of one of our datasets lie in the file, so that they are read (from a memory map) and written (with
# pwrite) without HDF5: its per-call overhead is most of a random row read, and its chunk cache swallows a failed write
# (a full disk) and then crashes. Our datasets are uncompressed and all their chunks are allocated when the file is
# created, so row r sits at byte (offset of its chunk) + (r % chunk_rows) * row_bytes.
class _RowLayout:
    def __init__(self, ds):
        self.chunk_rows, self.row_shape, self.dtype = ds.chunks[0], ds.shape[1:], ds.dtype
        self.count = math.prod(self.row_shape)  # Elements per row.
        self.row_bytes = ds.dtype.itemsize * self.count
        self.chunk_offsets = np.zeros(math.ceil(ds.shape[0] / self.chunk_rows), dtype=np.int64)
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            self.chunk_offsets[info.chunk_offset[0] // self.chunk_rows] = info.byte_offset

    def offset(self, row):
        return int(self.chunk_offsets[row // self.chunk_rows] + (row % self.chunk_rows) * self.row_bytes)

    def read(self, buffer, row):
        """Row `row` of the memory map `buffer` as a fresh numpy array (C, H, W)."""
        return np.frombuffer(buffer, self.dtype, self.count, self.offset(row)).reshape(self.row_shape).copy()

    def write(self, fd, first, rows):
        """Write `rows` (B, C, H, W) as rows first... of the file open at `fd`; OSError (ENOSPC on a full disk)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        row, end = first, first + len(rows)
        while row < end:  # One pwrite per chunk touched: its rows are contiguous.
            stop = min((row // self.chunk_rows + 1) * self.chunk_rows, end)
            data, at = memoryview(rows[row - first : stop - first].tobytes()), self.offset(row)
            while data:
                written = os.pwrite(fd, data, at)
                data, at = data[written:], at + written
            row = stop


def _column_shape(name, n, channels, resolution):
    return (n, channels, resolution, resolution) if COLUMNS[name] == "float32" else (n,)


def _create_rows(f, name, shape, dtype):
    """Create a dataset chunked by rows with all its chunks allocated now, so later row writes touch only data."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((min(CHUNK_ROWS, shape[0]), *shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, fill_time="never")


def _size(num_bytes):
    """A byte count in words: '1.5 GB'."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:,.1f} TB"


def _check_free_space(path, n, channels, resolution):
    """Raise PairFileError unless the disk of `path` has room for a pair file of n pairs.

    HDF5 must not meet a full disk while it writes a new file's metadata: it then often crashes instead of raising.
    """
    chunk_rows = min(n, CHUNK_ROWS)
    chunks = math.ceil(n / chunk_rows)
    row_bytes = sum(
        math.prod(_column_shape(k, 1, channels, resolution)) * np.dtype(t).itemsize for k, t in COLUMNS.items()
    )
    # Whole chunks of rows, HDF5's chunk index (under 256 bytes a chunk) and its other metadata (~20 kB measured).
    need = chunks * chunk_rows * row_bytes + chunks * 256 + 2**16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise PairFileError(
            f"pair file {path}: {n} pairs need {_size(need)} but its disk has {_size(free)} free; "
            "free space or write the file elsewhere"
        )


@contextmanager
def _new_pair_file(path, *, channels, resolution, label_dim, seeds, attrs):
    """Yield the temporary path of a new, empty pair file planned for `len(seeds)` pairs; it becomes `path` when the
    block ends without error. A full disk raises PairFileError naming `path`, and nothing is left behind."""
    import h5py

    n = len(seeds)
    if n < 1:
        raise PairFileError(f"pair file {path}: cannot create a file for {n} pairs")
    _check_free_space(path, n, channels, resolution)
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                for name, dtype in COLUMNS.items():
                    _create_rows(f, name, _column_shape(name, n, channels, resolution), dtype)
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
                seed_rows = _RowLayout(f["seeds"])
            fd = os.open(tmp, os.O_RDWR)
            try:
                seed_rows.write(fd, 0, np.asarray(seeds, dtype=np.int64))
            finally:
                os.close(fd)
            yield tmp
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise PairFileError(f"pair file {path}: {DISK_FULL[e.errno]} while writing it, so it was not created") from e


def create_pair_file(path, *, channels, resolution, label_dim, seeds, attrs):
    """Atomically create an empty pair file planned for `len(seeds)` pairs, with `attrs` (teacher, sampler) recorded.

    `seeds` is any sequence of integers (a list, an IntRanges); a full disk raises PairFileError and leaves no file.
    """
    with _new_pair_file(path, channels=channels, resolution=resolution, label_dim=label_dim, seeds=seeds, attrs=attrs):
        pass


# Appends rows to a pair file of our layout: the rows (written and fsynced), then `num_complete` (flushed). A full
# disk raises OSError (ENOSPC) from `append` with `num_complete` and the file still as they were before the call.
class PairWriter:
    def __init__(self, path):
        self.path = Path(path)
        attrs = read_pair_attrs(self.path)  # Validates the layout before opening for writing.
        self.num_complete, self.num_requested = attrs["num_complete"], attrs["num_requested"]
        self.label_dim = attrs["label_dim"]
        self.file = _open_h5(self.path, "r+")
        self.rows = {name: _RowLayout(self.file[name]) for name in ("latents", "images", "labels")}
        self.fd = os.open(self.path, os.O_RDWR)

    def append(self, latents, images, labels):
        """Write the next rows: latents/images (B, C, H, W), labels (B,); then mark them complete."""
        n, b = self.num_complete, len(latents)
        if n + b > self.num_requested:
            raise PairFileError(f"pair file {self.path}: {n} + {b} rows exceed the planned {self.num_requested}")
        columns = {
            "latents": np.asarray(latents, dtype=np.float32),
            "images": np.asarray(images, dtype=np.float32),
            "labels": np.asarray(labels, dtype=np.int64),
        }
        for name, x in columns.items():  # A wrong shape would overwrite other rows: the bytes are ours to place.
            if x.shape != (b, *self.rows[name].row_shape):
                want = (b, *self.rows[name].row_shape)
                raise PairFileError(f"pair file {self.path}: {name} to append have shape {x.shape}, not {want}")
        _check_rows(self.path, n, columns["latents"], columns["images"], columns["labels"], self.label_dim)
        for name, x in columns.items():
            self.rows[name].write(self.fd, n, x)
        os.fsync(self.fd)  # The rows reach the disk before num_complete counts them; a late ENOSPC shows here too.
        # `modify` rewrites the existing scalar in place; `attrs[...] =` would delete and recreate it.
        self.file.attrs.modify("num_complete", np.int64(n + b))
        self.file.flush()
        self.num_complete = n + b

    def close(self):
        os.close(self.fd)
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


# Teacher pairs as a torch Dataset: items (latent (C, H, W) float32, image (C, H, W) float32, label int64 or -1).
# The HDF5 file is opened lazily in the process that reads (each DataLoader worker opens its own handle).
class PairDataset(Dataset):
    """Read teacher pairs (z, y, label) from a pair file, as a torch Dataset for the regression loss.

    `PairDataset(path)` opens a file of our layout (`make-pairs`, `convert-pairs`) and serves its first `num_complete`
    rows, or a file of the port's layout (`/data/{i}`), for which `label_dim` gives the number of classes (None infers
    max(class_idx) + 1, reading every pair; our files record theirs). Opening checks the layout (and, in ours, every
    label); each item is checked for NaN and inf as it is read. Any fault raises PairFileError naming the file.

    An item is (latent z (C, H, W) float32, unscaled; image y (C, H, W) float32, raw; label, an int64 scalar tensor,
    -1 for an unconditional file). `check_compatible(net)` checks the file against a teacher, `read_rows` reads a
    block of rows with their seeds. The attributes `num_pairs`, `channels`, `resolution`, `label_dim` and `layout`
    ('dmd' or 'port') describe the file. The file is opened lazily by each process that reads (DataLoader workers).

    Example:
        teacher = load_network("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        pairs = PairDataset("data/cifar10-pairs.h5")
        pairs.check_compatible(teacher)  # resolution, channels and label_dim, else PairFileError
        latent, image, label = pairs[0]  # (3, 32, 32) float32, (3, 32, 32) float32, int64 scalar
        loader = torch.utils.data.DataLoader(pairs, batch_size=56, shuffle=True, num_workers=2)
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],  # Pair file: our layout or the port's.
        label_dim: Optional[int] = None,  # Port layout only: number of classes; None infers max(class_idx) + 1.
    ) -> None:
        import h5py

        self.path = Path(path)
        self._forget_handles()
        with _open_h5(self.path) as f:
            if f.attrs.get("format") is not None:
                self.layout = "dmd"
                attrs = _checked_attrs(f, self.path)
                self.num_pairs = attrs["num_complete"]
                self.resolution, self.channels = attrs["resolution"], attrs["channels"]
                self.label_dim = attrs["label_dim"]
                self.label_dim_inferred = False
                self.space = attrs.get("space", "pixels")  # 'pixels', or the VAE latents of a latent teacher
                # Labels are 8 bytes a row, so all of them are checked now; latents and images as each row is read.
                _check_rows(self.path, 0, labels=f["labels"][: self.num_pairs], label_dim=self.label_dim)
            elif isinstance(f.get("data"), h5py.Group):
                self.layout = "port"
                self.space = "pixels"
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
        names = set(group)
        missing = next((i for i in range(self.num_pairs) if str(i) not in names), None)
        if missing is not None:
            raise PairFileError(
                f"pair file {self.path}: /data/{missing} is missing (the port's {self.num_pairs} pairs are "
                f"/data/0 ... /data/{self.num_pairs - 1})"
            )
        shape = getattr(group["0"], "shape", None)  # (2, C, H, W) = [image, latent]
        if shape is None or len(shape) != 4 or shape[0] != 2 or shape[2] != shape[3]:
            raise PairFileError(f"pair file {self.path}: /data/0 has shape {shape}, expected (2, C, R, R)")
        self.channels, self.resolution = int(shape[1]), int(shape[2])
        self.label_dim_inferred = label_dim is None
        if label_dim is None:
            label_dim = 1 + max(self._port_label(group[str(i)], i) for i in range(self.num_pairs))
        self.label_dim = int(label_dim)

    def __len__(self) -> int:
        return self.num_pairs

    def _h5(self):
        """The open file of this process (reopened after a fork: h5py handles must not cross processes)."""
        if self._file is None or self._pid != os.getpid():
            # No chunk cache: random rows would each pull a whole 256-row chunk (3 MiB at 3x32x32) into it.
            self._file = _open_h5(self.path)
            self._pid = os.getpid()
            if self.layout == "dmd":
                with open(self.path, "rb") as raw:  # np.memmap's subclass is 3x slower.
                    self._buffer = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
                self._latents, self._images = _RowLayout(self._file["latents"]), _RowLayout(self._file["images"])
                self._labels = torch.from_numpy(self._file["labels"][: self.num_pairs])  # (N,), 8 bytes a pair
        return self._file

    _HANDLES = ("_file", "_pid", "_buffer", "_latents", "_images", "_labels")

    def _forget_handles(self):
        for key in self._HANDLES:
            setattr(self, key, None)

    def __getstate__(self):
        """Pickle (for DataLoader workers) without this process's handles; each worker opens its own."""
        return {**self.__dict__, **dict.fromkeys(self._HANDLES)}

    def close(self) -> None:
        """Close this process's file handle (the next read reopens it)."""
        if self._file is not None:
            self._file.close()
        self._forget_handles()

    def _port_label(self, ds, index, label_dim=None):
        """Attribute class_idx of the port's pair /data/{index}: a class in [0, label_dim) (None: any class >= 0)."""
        where = f"pair file {self.path}: /data/{index}"
        label = _int_attr(ds.attrs, "class_idx", where)
        if label < 0 or (label_dim is not None and label >= label_dim):
            classes = "a class >= 0" if label_dim is None else f"a class in [0, {label_dim})"
            raise PairFileError(f"{where}: class_idx {label} is not {classes}")
        return label

    def _port_pair(self, index):
        """Row `index` of the port's layout -> (latent, image, label, seed), checked."""
        import h5py

        ds, shape = self._h5()["data"][str(index)], (2, self.channels, self.resolution, self.resolution)
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype.kind != "f":
            found = f"{ds.dtype} {ds.shape}" if isinstance(ds, h5py.Dataset) else "a group"
            raise PairFileError(f"pair file {self.path}: /data/{index} is {found}, not floats {shape} like /data/0")
        pair = ds[()].astype(np.float32)  # (2, C, H, W) = [image, latent]
        _check_rows(self.path, index, latents=pair[1:], images=pair[:1])
        label = self._port_label(ds, index, self.label_dim) if self.label_dim > 0 else -1
        seed = _int_attr(ds.attrs, "seed", f"pair file {self.path}: /data/{index}")
        return torch.from_numpy(pair[1]), torch.from_numpy(pair[0]), torch.tensor(label, dtype=torch.int64), seed

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return pair `index`: latent (C, H, W) float32, image (C, H, W) float32, label int64 (-1: unconditional)."""
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range for {self.num_pairs} pairs in {self.path}")
        if self.layout == "port":
            return self._port_pair(index)[:3]
        self._h5()
        latent, image = self._latents.read(self._buffer, index), self._images.read(self._buffer, index)
        if not (np.isfinite(latent).all() and np.isfinite(image).all()):  # ~3.5 us of an item's ~11 us at 3x32x32.
            _check_rows(self.path, index, latents=latent[None], images=image[None])
        return torch.from_numpy(latent), torch.from_numpy(image), self._labels[index]

    def check_compatible(self, net: torch.nn.Module) -> None:
        """Raise PairFileError naming the file if its resolution, channels or labels do not fit the teacher `net`."""
        from dmd.pairs import teacher_space

        found = {"resolution": self.resolution, "channels": self.channels, "space": self.space}
        wanted = {"resolution": net.img_resolution, "channels": net.img_channels, "space": teacher_space(net)}
        for key in found:
            if found[key] != wanted[key]:
                raise PairFileError(f"pair file {self.path} has {key} {found[key]} but the teacher has {wanted[key]}")
        # An inferred label_dim is only a lower bound: the file may not use the highest classes.
        labels_fit = self.label_dim <= net.label_dim if self.label_dim_inferred else self.label_dim == net.label_dim
        if not labels_fit or (self.label_dim == 0) != (net.label_dim == 0):
            raise PairFileError(
                f"pair file {self.path} has label_dim {self.label_dim} but the teacher has label_dim {net.label_dim}"
            )

    def read_rows(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return rows [start, stop) as tensors: latents (B, C, H, W), images (B, C, H, W), labels (B,), seeds (B,)."""
        if not 0 <= start <= stop <= self.num_pairs:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.num_pairs} pairs in {self.path}")
        if self.layout == "dmd":
            f = self._h5()
            latents, images, labels, seeds = (f[k][start:stop] for k in COLUMNS)
            _check_rows(self.path, start, latents, images)
            return tuple(torch.from_numpy(x) for x in (latents, images, labels, seeds))
        latents, images, labels, seeds = zip(*(self._port_pair(i) for i in range(start, stop)))
        return torch.stack(latents), torch.stack(images), torch.stack(labels), torch.tensor(seeds, dtype=torch.int64)


def _copy_pairs(src, path, *, seeds, attrs, batch_size, progress=False):
    """Write a new pair file at `path` (atomically) planned for `seeds`, holding every complete row of the
    PairDataset `src` as its first rows."""
    from tqdm import tqdm

    shape = dict(channels=src.channels, resolution=src.resolution, label_dim=src.label_dim)
    with _new_pair_file(path, **shape, seeds=seeds, attrs=attrs) as tmp:
        with PairWriter(tmp) as writer, tqdm(total=len(src), unit="pair", disable=not progress) as bar:
            for start in range(0, len(src), batch_size):
                latents, images, labels, _ = src.read_rows(start, min(start + batch_size, len(src)))
                writer.append(latents.numpy(), images.numpy(), labels.numpy())
                bar.update(len(latents))


def convert_port_file(old, new, label_dim=None, batch_size=1024, progress=True):
    """Rewrite a pair file of the port's layout as ours at `new` (atomically); return the number of pairs."""
    src = PairDataset(old, label_dim=label_dim)
    if src.layout != "port":
        raise PairFileError(f"pair file {old} already has our layout; nothing to convert")
    with _open_h5(old) as f:
        seeds = [_int_attr(f["data"][str(i)].attrs, "seed", f"pair file {old}: /data/{i}") for i in range(len(src))]
    attrs = {"source_format": "port", "converted_from": str(old)}
    _copy_pairs(src, new, seeds=seeds, attrs=attrs, batch_size=batch_size, progress=progress)
    return len(src)


def grow_pair_file(path, seeds, batch_size=1024):
    """Plan the pair file `path` of our layout for `seeds`, a longer list that begins with the file's own seeds,
    keeping its complete rows and its attributes; return its number of complete rows.

    Every row is allocated when a file is created (see the module's docstring), so a file grows by being rewritten:
    a new file planned for `seeds` receives the complete rows and then replaces the old one with `os.replace`. An
    interruption at any moment (kill -9 included) leaves the old file or the grown one, each with every complete row;
    the disk must hold both files meanwhile (checked before any work).
    """
    path = Path(path)
    attrs = read_pair_attrs(path)
    old, new = read_seeds(path), np.asarray(seeds, dtype=np.int64)
    if not (len(new) > len(old) and np.array_equal(new[: len(old)], old)):
        raise PairFileError(
            f"pair file {path} was made for a different seed list (--num/--seeds): its {len(old)} seeds are not the "
            f"first of this run's {len(new)}; refusing to append (choose another --out)"
        )
    layout = set(_INT_ATTRS) | {"format"}  # set anew by _new_pair_file; the rest (teacher, sampler) carries over
    src = PairDataset(path)
    try:
        _copy_pairs(
            src, path, seeds=new, attrs={k: v for k, v in attrs.items() if k not in layout}, batch_size=batch_size
        )
    finally:
        src.close()
    return attrs["num_complete"]
