"""Benchmark the host memory of reading EDM2's encoded latents: peak RSS against the size of the ZIP.

    python benchmarks/encoded_memory.py [--num 20000] [--resolution 64] [--batches 200] [--batch 64]

Writes a ZIP of `num` random raw latents (8, resolution, resolution) float32 in EDM2's encoded format (the shape of
img512-sd.zip's entries at the default 64: 128 KiB each, ~650 MB in all) into a temporary folder, one entry at a
time through dmd's writer (never one array of them all), then reads `batches` batches through EncodedDataset and
BatchStream with 0 and 2 DataLoader workers, each in a fresh process, and prints the peak resident memory of the
reading process and of its largest worker (resource.getrusage; psutil, when installed, also samples the sum over
the process and its workers), before and after reading, beside the ZIP's size. Entries are read one at a time, so
the peak should stay flat in the ZIP's size; the ZIP's pages the kernel caches are not resident memory of the
process. The files go to $TMPDIR.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20


def write_zip(dest, num, resolution):
    """Write `num` random raw latents (mean, then a positive std) and labels, entry by entry; return the labels."""
    from dmd.encoded import LatentWriter

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, num)
    writer = LatentWriter(dest, num, {"benchmark": "encoded_memory", "resolution": resolution})
    for i in writer.todo():
        raw = rng.standard_normal((8, resolution, resolution), dtype=np.float32)
        raw[4:] = np.abs(raw[4:]) * 0.1
        writer.write(i, raw)
    writer.publish(labels)


def sample_rss(peaks, done):
    """Until `done`, keep in `peaks` the largest RSS of one worker and of this process and its workers together."""
    import psutil

    me = psutil.Process()
    while not done.is_set():
        sizes = []
        for p in me.children(recursive=True):
            try:
                sizes.append(p.memory_info().rss)
            except psutil.Error:  # a worker that just exited
                pass
        peaks["worker"] = max([peaks["worker"], *sizes])
        peaks["tree"] = max(peaks["tree"], me.memory_info().rss + sum(sizes))
        time.sleep(0.02)


def measure(path, workers, batches, batch):
    """Read `batches` batches of `batch` latents from the ZIP `path`; return a dict of memory and speed."""
    import torch

    from dmd.batches import BatchStream
    from dmd.encoded import EncodedDataset
    from dmd.images import ImageDatasetError

    torch.set_num_threads(1)
    data = EncodedDataset(path)
    stream = BatchStream(data, batch, seed=0, workers=workers, errors=(ImageDatasetError,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peaks, done = {"worker": 0, "tree": 0}, threading.Event()
    try:
        import psutil  # noqa: F401

        sampler = threading.Thread(target=sample_rss, args=(peaks, done), daemon=True)
        sampler.start()
    except ImportError:
        sampler = None
    start = time.perf_counter()
    for _ in range(batches):
        stream.next(torch.device("cpu"))
    seconds = time.perf_counter() - start
    done.set()
    if sampler is not None:
        sampler.join()
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peaks, before=before, main=main_peak, psutil=sampler is not None, per_s=batches * batch / seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=20000, help="latents in the ZIP")
    parser.add_argument("--resolution", type=int, default=64, help="latent size (64: 512x512 images)")
    parser.add_argument("--batches", type=int, default=200, help="batches read per row")
    parser.add_argument("--batch", type=int, default=64, help="latents per batch")
    parser.add_argument("--measure", nargs=2, metavar=("ZIP", "WORKERS"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.batches, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"img{args.resolution * 8}-sd.zip"
        start = time.perf_counter()
        write_zip(path, args.num, args.resolution)
        size = path.stat().st_size
        print(f"wrote {path.name}: {args.num:,} entries, {size / MiB:,.0f} MiB in {time.perf_counter() - start:.0f} s")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        print()
        print(
            "| workers | latents read | ZIP MiB | main RSS before MiB | main peak RSS MiB | largest worker peak MiB "
            "| peak RSS, main + workers MiB | latents/s |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for workers in (0, 2):
            command = [sys.executable, __file__, "--measure", str(path), str(workers)]
            command += ["--batches", str(args.batches), "--batch", str(args.batch)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            tree = f"{r['tree'] / MiB:.0f}" if r["psutil"] else "n/a (no psutil)"
            worker = "-" if not workers else f"{r['worker'] / MiB:.0f}" if r["psutil"] else "n/a (no psutil)"
            print(
                f"| {workers} | {args.batches * args.batch:,} | {size / MiB:,.0f} | {r['before'] / MiB:.0f} | "
                f"{r['main'] / MiB:.0f} | {worker} | {tree} | {r['per_s']:,.0f} |"
            )


if __name__ == "__main__":
    main()
