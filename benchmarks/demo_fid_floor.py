"""The demo's digits FID for samples of the real digits' own distribution: the bias a FID of N samples starts from.

    python benchmarks/demo_fid_floor.py [--draws 10] [--seed 0]

Trains the demo's judge (dmd.demo.run.build_judge, seed 0), fits a Gaussian to its 64-d features of the 1,797 real
digits (the reference statistics every demo FID is measured against), draws N samples from that Gaussian and scores
their FID against it, for several N. A perfect generator scores no better on average, so a FID difference between
methods smaller than these values at the --num-eval used says little; dmd.demo.run.FID_MIN_SAMPLES is set from them.
Prints a Markdown table: mean and std over --draws draws. Seconds on a CPU.
"""

import argparse

import numpy as np
import torch


def main():
    from dmd.demo.run import FID_MIN_SAMPLES, build_judge
    from dmd.fid import frechet_distance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10, help="draws per sample count")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws")
    args = parser.parse_args()
    torch.set_num_threads(1)

    _, _, (mu, sigma) = build_judge(0)
    rng = np.random.default_rng(args.seed)
    print(f"| samples N | FID of N samples of the reference Gaussian (mean +- std of {args.draws}) |")
    print("| ---: | ---: |")
    for n in sorted({65, 100, 200, 500, FID_MIN_SAMPLES, 1000, 2000, 4000}):
        fids = []
        for _ in range(args.draws):
            x = rng.multivariate_normal(mu, sigma, size=n)  # (N, 64)
            fids.append(frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma))
        print(f"| {n} | {np.mean(fids):.2f} +- {np.std(fids):.2f} |")


if __name__ == "__main__":
    main()
