"""Retrain the demo's digits teacher from its recipe and compare it with the shipped `dmd/assets/demo_teacher.pkl`.

    python benchmarks/demo_teacher.py [--threads 2] [--out FILE]

Runs `python -m dmd demo train-teacher` in a fresh process (TeacherConfig's defaults: seed 0, 150 kimg at batch
128) with the given torch thread count, then prints one Markdown row: the file's sha256 against the one recorded in
`dmd.demo.SHIPPED_TEACHER_SHA256`, and the largest weight difference to the shipped teacher. Float sums are split
across threads and the kernels depend on the CPU, so the thread count and the CPU capability are part of the recipe:
the shipped file needs SHIPPED_TEACHER_THREADS threads and AVX512 kernels (with ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 the weights end 0.01 away). About 8 CPU-minutes.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmd.demo import SHIPPED_TEACHER, SHIPPED_TEACHER_SHA256, SHIPPED_TEACHER_THREADS
from dmd.edm.persistence import load_network


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=SHIPPED_TEACHER_THREADS, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="where to keep the retrained teacher (default: a temp file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "demo_teacher.pkl")
        command = [sys.executable, "-m", "dmd", "demo", "train-teacher", "--threads", str(args.threads)]
        command += ["--no-progress", "--out", str(out)]
        probe = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
        capability = subprocess.run(probe, check=True, capture_output=True, text=True).stdout.strip()  # the child's
        start, load = time.perf_counter(), os.getloadavg()[0]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        ours, shipped = load_network(out).state_dict(), load_network(SHIPPED_TEACHER).state_dict()
        diff = max((ours[k] - shipped[k]).abs().max().item() for k in shipped)
        digest = sha256(out)
    print("| threads | torch | CPU | wall s | load avg at start | sha256 | = recorded | max abs diff to shipped |")
    print("| ---: | --- | --- | ---: | ---: | --- | --- | ---: |")
    same = "yes" if digest == SHIPPED_TEACHER_SHA256 else "no"
    cells = [
        args.threads,
        torch.__version__,
        capability,
        f"{seconds:.0f}",
        f"{load:.2f}",
        f"{digest[:16]}...",
        same,
        f"{diff:.3g}",
    ]
    print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
