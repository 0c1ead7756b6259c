"""Benchmark sampling speed: a one-step generator (1 NFE) against the teacher's 18-step Heun sampler (35 NFE).

    python benchmarks/sampling.py [--batch 250] [--repeats 3] [--device auto] [--cifar]

Rows: the demo's digits teacher (16x16, 1 channel, the shipped pickle) and, with --cifar, EDM's CIFAR-10 DDPM++
network (55.7M parameters, random weights: speed does not depend on them). A one-step generator is the teacher's
architecture called once, so its speed is that of one denoiser call. Each rate is the best of `--repeats` timed
runs after a warm-up, so that load from other processes inflates no row more than another.
"""

import argparse
import time

import torch

from dmd.demo import SHIPPED_TEACHER
from dmd.edm.persistence import load_network
from dmd.edm.precond import EDMPrecond
from dmd.edm.presets import CIFAR10_COND
from dmd.edm.sampler import edm_sampler
from dmd.generator import one_step
from dmd.utils.common import one_hot, resolve_device


def best_rate(fn, num_images, repeats, device):
    """Images/s of `fn()` (which makes `num_images` images): the best of `repeats` timed calls after a warm-up."""
    fn()
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, num_images / (time.perf_counter() - start))
    return best


def rates(net, batch, repeats, device):
    """(one-step images/s, 35-NFE images/s) of `net` at `batch` images per call."""
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn((batch, net.img_channels, net.img_resolution, net.img_resolution), generator=g, device=device)
    c = one_hot(torch.arange(batch, device=device) % max(net.label_dim, 1), net.label_dim, device)
    with torch.inference_mode():
        fast = best_rate(lambda: one_step(net, z, c), batch, repeats, device)
        slow = best_rate(lambda: edm_sampler(net, z, c, num_steps=18), batch, repeats, device)
    return fast, slow


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=250, help="images per network call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per rate (the best counts)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cifar", action="store_true", help="also time EDM's CIFAR-10 network (slow on a CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)

    nets = [("digits teacher 16x16 (demo)", load_network(SHIPPED_TEACHER, device=device))]
    if args.cifar:
        nets.append(("EDM CIFAR-10 DDPM++ 32x32", EDMPrecond(**CIFAR10_COND).to(device)))
    print(f"device {device}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print("| network | params | one step (1 NFE) img/s | teacher (35 NFE) img/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, net in nets:
        net = net.eval().requires_grad_(False)
        params = sum(p.numel() for p in net.parameters())
        fast, slow = rates(net, args.batch, args.repeats, device)
        print(f"| {name} | {params / 1e6:.2f}M | {fast:.1f} | {slow:.2f} | {fast / slow:.1f}x |")


if __name__ == "__main__":
    main()
