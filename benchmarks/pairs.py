"""Benchmark teacher pairs: make_pairs throughput (pairs/s) and DataLoader read throughput, our layout vs the port's.

    python benchmarks/pairs.py [--num-make 64] [--num-read 4096] [--workers 0]

Pairs are made on the CPU from the tiny 8x8 EDM fixture teacher (tests/fixtures). Reads go through a shuffled
DataLoader with batch 56 (the port's batch size) over the same random 3x32x32 pairs written in both layouts; each
layout's rate is the best of three epochs, taken in turn, so that load from other processes biases neither.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmd.data import PairDataset, PairWriter, create_pair_file, write_port_layout
from dmd.pairs import make_pairs

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "edm_ddpmpp_cond.pkl"


def time_make_pairs(out, num, batch_size, num_steps):
    """Seconds to make `num` pairs from the fixture teacher, teacher loading included."""
    start = time.perf_counter()
    make_pairs(FIXTURE, out, num, batch_size=batch_size, num_steps=num_steps, device="cpu", progress=False)
    return time.perf_counter() - start


def write_read_data(folder, num, resolution=32, channels=3):
    """Write the same random pairs in our layout and the port's; return both paths."""
    g = np.random.default_rng(0)
    latents = g.standard_normal((num, channels, resolution, resolution)).astype(np.float32)
    images = g.standard_normal((num, channels, resolution, resolution)).astype(np.float32)
    labels, seeds = g.integers(0, 10, num), np.arange(num)
    ours, port = folder / "ours.h5", folder / "port.hdf5"
    create_pair_file(ours, channels=channels, resolution=resolution, label_dim=10, seeds=seeds, attrs={})
    with PairWriter(ours) as writer:
        for i in range(0, num, 1024):
            writer.append(latents[i : i + 1024], images[i : i + 1024], labels[i : i + 1024])
    write_port_layout(port, latents, images, labels, seeds)
    return ours, port


def read_throughput(path, batch_size, num_workers):
    """Samples/s for one shuffled epoch through a DataLoader."""
    dataset = PairDataset(path, label_dim=10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    start, count = time.perf_counter(), 0
    for latents, _, _ in loader:
        count += len(latents)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-make", type=int, default=64, help="pairs to make from the fixture teacher")
    parser.add_argument("--num-read", type=int, default=4096, help="3x32x32 pairs to write and read back")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for num_steps in (18, 4):
            seconds = time_make_pairs(folder / f"made-{num_steps}.h5", args.num_make, 32, num_steps)
            rows.append((f"make_pairs, 8x8 fixture teacher, {num_steps} steps, batch 32, CPU", args.num_make / seconds))
        ours, port = write_read_data(folder, args.num_read)
        speed_ours, speed_port = 0.0, 0.0
        for _ in range(3):
            speed_ours = max(speed_ours, read_throughput(ours, 56, args.workers))
            speed_port = max(speed_port, read_throughput(port, 56, args.workers))
        rows.append((f"read, our layout, {args.num_read} x 3x32x32, batch 56, {args.workers} workers", speed_ours))
        rows.append((f"read, port layout, {args.num_read} x 3x32x32, batch 56, {args.workers} workers", speed_port))

    print("| benchmark | per second |")
    print("| --- | ---: |")
    for name, value in rows:
        unit = "pairs/s" if name.startswith("make") else "samples/s"
        print(f"| {name} | {value:,.0f} {unit} |")
    print(f"\nour layout reads {speed_ours / speed_port:.1f}x faster than the port's")


if __name__ == "__main__":
    main()
