"""The LPIPS regression step, forward + backward on G's half: our LPIPS as shipped against the same LPIPS with its
VGG ReLUs out of place (how it ran before), interleaved in one process, on random weights (the speed does not depend
on them). Prints one Markdown table: ms per step for each, their ratio per round and the median, and the largest
difference of the distances and of the input gradients (in-place activations change no value).

    OMP_NUM_THREADS=2 python benchmarks/lpips_step.py --batch 4 --rounds 8
"""

import argparse
import copy
import os
import statistics
import time

import torch

from dmd.losses import RegressionLoss
from dmd.lpips import LPIPS


def out_of_place(lpips):
    """A copy of `lpips` whose ReLUs write new tensors, as before they ran in place."""
    before = copy.deepcopy(lpips)
    for layer in before.features:
        if isinstance(layer, torch.nn.ReLU):
            layer.inplace = False
    return before


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
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=32, help="G's resolution (upsampled to 224 for LPIPS)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=2, help="steps per timing")
    args = parser.parse_args()

    torch.manual_seed(0)
    after = LPIPS(pretrained=False)
    before = out_of_place(after)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    y = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    losses = {"before (out-of-place ReLU)": RegressionLoss(before), "ours": RegressionLoss(after)}
    (d0, g0), (d1, g1) = (step(loss, x, y) for loss in losses.values())
    for loss in losses.values():  # warm-up
        timed(loss, x, y, 1)
    times = {name: [] for name in losses}
    for r in range(args.rounds):
        order = list(losses) if r % 2 == 0 else list(reversed(losses))  # alternate who goes first
        for name in order:
            times[name].append(timed(losses[name], x, y, args.repeats))
    ratios = [b / a for b, a in zip(*times.values())]
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.resolution}x{args.resolution} -> 224, {args.rounds} interleaved rounds, load average {load:.2f}\n"
    )
    print("| LPIPS | median ms per step (forward + backward) |")
    print("| --- | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} |")
    span = f"rounds {min(ratios):.3f}-{max(ratios):.3f}"
    diff = f"distances {float((d0 - d1).abs().max()):.2e}, gradients {float((g0 - g1).abs().max()):.2e}"
    print(f"\nspeed of ours against before: {statistics.median(ratios):.3f}x ({span}); largest difference: {diff}")


if __name__ == "__main__":
    main()
