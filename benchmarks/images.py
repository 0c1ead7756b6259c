"""Benchmark real-image reads (DMD2's GAN data): DataLoader throughput of `ImageDataset` on EDM's ZIP and folder layout.

    python benchmarks/images.py [--num 4096] [--batch 64] [--workers 0 2]

The images are random 3x32x32 uint8 written as EDM's dataset_tool.py writes them (uncompressed PNGs, uncompressed
ZIP, dataset.json labels), so decoding costs what it costs on cifar10-32x32.zip. Each row is the best of three
shuffled epochs, the rows taken in turn so that load from other processes biases none of them.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmd.images import ImageDataset, write_image_dataset


def read_throughput(path, batch_size, num_workers, xflip=False):
    """Images/s for one shuffled epoch through a DataLoader (worker start-up included, as each epoch pays it)."""
    dataset = ImageDataset(path, xflip=xflip)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=4096, help="3x32x32 images to write and read back")
    parser.add_argument("--batch", type=int, default=64, help="DataLoader batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.num)
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {"zip": Path(tmp) / "data.zip", "folder": Path(tmp) / "data"}
        for path in layouts.values():
            write_image_dataset(path, images, labels)
        rows = {(layout, workers): 0.0 for layout in layouts for workers in args.workers}
        for _ in range(3):
            for layout, workers in rows:
                rows[layout, workers] = max(
                    rows[layout, workers], read_throughput(layouts[layout], args.batch, workers)
                )

    print("| layout | images | batch | workers | images/s | ms per batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (layout, workers), speed in rows.items():
        ms = 1000 * args.batch / speed
        print(f"| {layout} | {args.num} x 3x32x32 | {args.batch} | {workers} | {speed:,.0f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
