"""The LPIPS regression step, forward + backward on G's half: our LPIPS as it is in this checkout against the LPIPS of
an earlier commit (--before, git's copy of its dmd/lpips.py), interleaved in one process, both with the same random
weights (the speed does not depend on them) through the same RegressionLoss. Prints one Markdown table: ms per step
for each, the median of their per-round ratio and its range, and the largest difference of the distances and of the
input gradients.

    OMP_NUM_THREADS=2 python benchmarks/lpips_step.py --batch 4 --rounds 10
    OMP_NUM_THREADS=2 python benchmarks/lpips_step.py --before b5e370b~1   # the VGG ReLUs out of place

The default --before, 724dcc4, is the formulation before issue 21's rework: the unit normalisation as a quotient by
vector_norm under autograd, and the heads as 1x1 convolutions over squared differences.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dmd.losses import RegressionLoss
from dmd.lpips import LPIPS

ROOT = Path(__file__).resolve().parents[1]


def lpips_at(revision):
    """The LPIPS class of dmd/lpips.py as committed at `revision`, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:dmd/lpips.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lpips_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("lpips_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.LPIPS


def step(loss, x, y):
    """One regression step: distances of G's half x (with gradient) to the target y, backward; returns (d, dx)."""
    x = x.detach().requires_grad_(True)
    d = loss(x, y)
    d.mean().backward()
    return d.detach(), x.grad


def timed(loss, x, y, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        step(loss, x, y)
    return (time.perf_counter() - start) / repeats * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="724dcc4", help="git revision whose dmd/lpips.py to compare against")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=32, help="G's resolution (upsampled to 224 for LPIPS)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=1, help="steps per timing")
    args = parser.parse_args()
    try:
        before_class = lpips_at(args.before)
    except subprocess.CalledProcessError as e:
        parser.error(f"--before {args.before}: git cannot show its dmd/lpips.py ({e.stderr.strip()})")

    torch.manual_seed(0)
    after = LPIPS(pretrained=False)
    before = before_class(pretrained=False)
    before.load_state_dict(after.state_dict())
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    y = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    losses = {f"before ({args.before})": RegressionLoss(before), "ours": RegressionLoss(after)}
    (d0, g0), (d1, g1) = (step(loss, x, y) for loss in losses.values())  # also the warm-up
    times = {name: [] for name in losses}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        order = list(losses) if r % 2 == 0 else list(reversed(losses))  # alternate who goes first
        for name in order:
            times[name].append(timed(losses[name], x, y, args.repeats))
    load_after = os.getloadavg()[0]
    ratios = [b / a for b, a in zip(*times.values())]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.resolution}x{args.resolution} -> 224, {args.rounds} interleaved rounds, "
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after\n"
    )
    print("| LPIPS | median ms per step (forward + backward) |")
    print("| --- | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} |")
    span = f"rounds {min(ratios):.3f}-{max(ratios):.3f}"
    diff = (
        f"distances {float((d0 - d1).abs().max()):.2e} (of {float(d0.abs().max()):.4f}), "
        f"gradients {float((g0 - g1).abs().max()):.2e} (of {float(g0.abs().max()):.2e})"
    )
    print(f"\nspeed of ours against before: {statistics.median(ratios):.3f}x ({span}); largest difference: {diff}")


if __name__ == "__main__":
    main()
