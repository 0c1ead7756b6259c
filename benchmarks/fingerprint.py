"""Benchmark what checking the real data costs at every resume: `data_fingerprint` of a 50,000-image folder and ZIP.

    python benchmarks/fingerprint.py [--num 50000] [--resolution 32]

Writes random RGB images in EDM's dataset format (uncompressed PNGs, 3.1 KB each at 32x32, as cifar10-32x32.zip)
as a folder and as a ZIP in a temporary folder, then times, for each, dmd's fingerprint against the names-and-sizes
one it replaced (folders) or the first-and-last-MiB one (ZIPs), and against hashing every byte. "Cold-ish" drops the
files' pages from the page cache first (posix_fadvise DONTNEED after a sync; no root needed) but not the kernel's
cache of names and inodes, which only root can drop (all rows run with it warm); "warm" is the best of three runs
right after. Under a virtual machine the host may still cache the disk, so cold-ish reads can be fast there. The
files go to $TMPDIR (on a tmpfs nothing is cold: point it at a disk).
"""

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dmd.checkpoint import data_fingerprint, file_fingerprint
from dmd.images import write_image_dataset


def files_of(path):
    """Every file of a folder (sorted), or the file itself."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def names_and_sizes(path):
    """The folder fingerprint dmd used before: sha256 of every file's name and size."""
    digest = hashlib.sha256()
    for p in files_of(path):
        digest.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def every_byte(path):
    """sha256 of every byte of every file: what reading the data whole at each resume would cost."""
    digest = hashlib.sha256()
    for p in files_of(path):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def drop_cached_pages(path):
    """Ask the kernel to drop the cached pages of every file under `path` (they must be written back: sync first)."""
    os.sync()
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, path):
    start = time.perf_counter()
    fn(path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=50000, help="images in the folder and in the ZIP")
    parser.add_argument("--resolution", type=int, default=32, help="side of the RGB images")
    args = parser.parse_args()

    n, r = args.num, args.resolution
    images = np.random.default_rng(0).integers(0, 256, (n, r, r, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # $TMPDIR: put it on the disk the data would live on
        layouts = {"folder": Path(tmp) / "data", "zip": Path(tmp) / "data.zip"}
        for path in layouts.values():
            write_image_dataset(path, images, labels)
        methods = {
            "folder": [
                ("dmd: names, sizes, dataset.json, last 4 KiB of each file", data_fingerprint),
                ("before: names and sizes", names_and_sizes),
                ("every byte", every_byte),
            ],
            "zip": [
                ("dmd: names, sizes, CRC-32s of the central directory", data_fingerprint),
                ("before: size, first and last MiB", file_fingerprint),
                ("every byte", every_byte),
            ],
        }
        for layout, path in layouts.items():
            size = sum(p.stat().st_size for p in files_of(path))  # also puts every row on the same cached inodes
            for name, fn in methods[layout]:
                drop_cached_pages(path)
                cold = timed(fn, path)
                warm = min(timed(fn, path) for _ in range(3))
                rows.append((layout, f"{n:,} x {r}x{r}, {size / 1e6:.0f} MB", name, cold, warm))

    print("| data | images | fingerprint | cold-ish s | warm s |")
    print("| --- | --- | --- | ---: | ---: |")
    for layout, images, name, cold, warm in rows:
        print(f"| {layout} | {images} | {name} | {cold:.2f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
