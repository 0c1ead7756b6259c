"""Benchmark DMD training steps: img/s, peak memory and FLOPs per step of `python -m dmd train`.

    python benchmarks/train_step.py [--steps 5] [--warmup 2]

Each row runs the real command in a fresh process on a random-weight teacher pickle and random pairs, and reads
`stats.jsonl`: img/s is G's batch per second of step time after the warm-up steps; memory is the peak CUDA
allocation on GPU and the process's peak RSS on CPU. Rows: the tiny 8x8 fixture teacher on the CPU (without and with
the LPIPS regression), and, where CUDA exists, the CIFAR-10 DDPM++ teacher (55.7M parameters) at batch 56 in fp32 and
bf16 (without CUDA those rows give the FLOPs only). LPIPS runs with random weights (same FLOPs; no download).

FLOPs per step (per process) count the forward FLOPs F of one U-Net call and L of VGG-16 on one 224x224 image with
torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs; a backward costs 2 forwards, 1 where only the
input gradient is needed), times the passes of one step with batch B, R = B regression pairs (0 without) and k
fake steps per G step:
    U-Net: G forward + backward on B + R images 3(B + R), mu_real and mu_fake forwards in the DM loss 2B,
           fake-score forward + backward 3Bk, fresh G samples for the extra fake steps B(k - 1)
    LPIPS: VGG forward on both images of R pairs 2R, input gradient through the x_ref half R
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmd.data import PairWriter, create_pair_file
from dmd.edm.persistence import load_network, save_network_pickle
from dmd.edm.precond import build_network
from dmd.edm.presets import CIFAR10_COND
from dmd.lpips import LPIPS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "edm_ddpmpp_cond.pkl"


def forward_flops(fn):
    """FLOPs of one call of `fn()` counted by FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(teacher, batch_size, lambda_reg, fake_steps=1):
    """Analytic FLOPs of one training step per process (see the module docstring), counted on the meta device."""
    meta = torch.device("meta")
    net, lpips = teacher.to(meta), LPIPS(pretrained=False).to(meta)
    r, c = net.img_resolution, net.img_channels
    labels = torch.eye(net.label_dim, device=meta)[:1] if net.label_dim else None
    F = forward_flops(lambda: net(torch.zeros(1, c, r, r, device=meta), torch.ones(1, device=meta), labels))
    image = torch.zeros(1, 3, 224, 224, device=meta)
    L = forward_flops(lambda: lpips(image, image)) / 2  # One call runs VGG on both images.
    B, R, k = batch_size, batch_size if lambda_reg > 0 else 0, fake_steps
    unet_passes = 3 * (B + R) + 2 * B + 3 * B * k + B * (k - 1)
    lpips_passes = 2 * R + R
    return F * unet_passes + L * lpips_passes


def write_pairs(path, n, resolution, channels=3, label_dim=10):
    """n random pairs in our layout."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, channels, resolution, resolution, generator=g)
    images = torch.rand(latents.shape, generator=g) * 2 - 1
    create_pair_file(path, channels=channels, resolution=resolution, label_dim=label_dim, seeds=range(n), attrs={})
    with PairWriter(path) as writer:
        writer.append(latents.numpy(), images.numpy(), torch.randint(label_dim, (n,), generator=g).numpy())


def run_steps(folder, teacher_path, resolution, batch_size, lambda_reg, precision, device, steps, warmup):
    """Run `python -m dmd train` for warmup + steps steps; return (img/s after the warm-up, peak memory GiB)."""
    pairs = folder / f"pairs-{resolution}-{batch_size}.h5"
    if not pairs.exists():
        write_pairs(pairs, batch_size * (steps + warmup), resolution)
    out = folder / f"run-{resolution}-{batch_size}-{lambda_reg}-{precision}"
    cmd = [sys.executable, "-m", "dmd", "train", "--model-path", str(teacher_path), "--output-dir", str(out)]
    cmd += ["--data-path", str(pairs), "--lambda-reg", str(lambda_reg), "--batch-size", str(batch_size)]
    cmd += ["--max-steps", str(steps + warmup), "--precision", precision, "--device", device, "--workers", "0"]
    cmd += ["--lpips-random", "--log-every", "1", "--image-every", "0", "--checkpoint-every", "0"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()][warmup:]
    seconds = sum(batch_size / r["img_per_s"] for r in records)
    return batch_size * len(records) / seconds, max(r["mem_gib"] for r in records)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tiny = load_network(FIXTURE)
        for batch_size, lambda_reg in ((8, 0.0), (2, 0.25)):
            steps, warmup = (args.steps, args.warmup) if lambda_reg == 0 else (2, 1)  # LPIPS at 224 is slow on CPU.
            flops = step_flops(tiny, batch_size, lambda_reg)
            speed, mem = run_steps(folder, FIXTURE, 8, batch_size, lambda_reg, "fp32", "cpu", steps, warmup)
            rows.append(("tiny 8x8 (fixture)", "cpu", "fp32", batch_size, lambda_reg, speed, mem, flops))
        torch.manual_seed(0)
        cifar = build_network("EDMPrecond", CIFAR10_COND)
        save_network_pickle(cifar, folder / "cifar10.pkl")
        flops = step_flops(cifar, 56, 0.25)
        for precision in ("fp32", "bf16"):
            speed, mem = None, None  # FLOPs only, without a GPU.
            if torch.cuda.is_available():
                speed, mem = run_steps(
                    folder, folder / "cifar10.pkl", 32, 56, 0.25, precision, "cuda", args.steps, args.warmup
                )
            rows.append(("CIFAR-10 DDPM++ 55.7M", "cuda", precision, 56, 0.25, speed, mem, flops))

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs" + (", CUDA" if torch.cuda.is_available() else ""))
    print("| network | device | precision | batch | lambda_reg | img/s | peak memory GiB | GFLOP/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, device, precision, batch, reg, speed, mem, flops in rows:
        speed, mem = ("n/a (no GPU)", "n/a") if speed is None else (f"{speed:.2f}", f"{mem:.2f}")
        print(f"| {name} | {device} | {precision} | {batch} | {reg} | {speed} | {mem} | {flops / 1e9:.2f} |")


if __name__ == "__main__":
    main()
