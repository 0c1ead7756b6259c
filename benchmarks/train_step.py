"""Benchmark DMD training steps: img/s, step time, peak memory, FLOPs per step and MFU of `python -m dmd train`.

    python benchmarks/train_step.py [--steps 5] [--warmup 2] [--compile] [--compare OLD_CHECKOUT]
    python benchmarks/train_step.py --gpu-check [--deadline 330]       # what benchmarks/gpu_check.sh runs

Each row runs the real command in a fresh process on a random-weight teacher pickle and random pairs, and reads
`stats.jsonl` (one record per step): the step time is the mean over the steps after the warm-up; img/s counts G's
batch; memory is the peak CUDA allocation on GPU and the process's peak RSS on CPU; MFU is the counted FLOPs per
step over the step time, against the device's dense bf16 peak (looked up by name in PEAK_BF16_TFLOPS, printed with
the row; fp32 rows are compared with the same bf16 peak). LPIPS runs with random weights (same FLOPs, no download).

Rows: the tiny 8x8 fixture teacher on the CPU and, where CUDA exists, the CIFAR-10 DDPM++ teacher (55.7M parameters)
at batch 56 (without CUDA those rows give the FLOPs only), in fp32 and bf16, each with the losses of DMD (DM +
LPIPS regression on pairs), DM alone, and DMD2's recipe (DM + GAN on real images, 5 fake-score steps per G step),
eager and compiled (--compile on the CPU: torch.compile takes about 1.5 minutes per network on a 2-core CPU). A
second table compares the per-step losses of runs that should agree: bf16 against fp32 (same seed: the same
draws), compiled against eager.

--compare OLD_CHECKOUT times the tiny fp32 row of another checkout of dmd (e.g. `git worktree add /tmp/old <commit>`)
interleaved with this one, old, new, old, new, ..., and prints the ratio: the machine's speed drifts, so only
interleaved runs in one session compare.

FLOPs per step (per process) count the forward FLOPs F of one U-Net call and L of VGG-16 on one 224x224 image with
torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs; a backward costs 2 forwards, 1 where only the
input gradient is needed), times the passes of one step with batch B, R regression pairs (0 without) and k fake
steps per G step:
    U-Net: G forward + backward on B + R images 3(B + R), mu_real and mu_fake forwards in the DM loss 2B,
           fake-score forward + backward 3Bk, fresh G samples for the extra fake steps B(k - 1)
    LPIPS: VGG forward on both images of R pairs 2R, input gradient through the G(z_ref) half only R
    GAN (DMD2), in forwards E of the U-Net's encoder alone: G's loss, encoder forward and input gradient on G(z) 2B;
           the discriminator in each fake step, encoder forward + backward on B generated and B real images 3 x 2Bk
(the head on the 8x8 bottleneck is negligible). A "step" is one G update with its k fake-score updates.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmd.data import PairWriter, create_pair_file
from dmd.edm.persistence import load_network
from dmd.edm.precond import build_network
from dmd.edm.presets import CIFAR10_COND
from dmd.edm.writer import save_network_pickle
from dmd.lpips import LPIPS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "edm_ddpmpp_cond.pkl"

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets, TFLOP/s; matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A40": 150.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


# The losses a row trains with: DMD's (DM + LPIPS regression on pairs), DM alone, DMD2's recipe (DM + GAN on real
# images, 5 fake-score steps per G step, no pairs). label, flags, regression pairs?, fake steps, GAN?
VARIANTS = {
    "dmd": ("DMD: DM + 0.25 LPIPS", ["--lambda-reg", "0.25"], True, 1, False),
    "dm": ("DM only", ["--lambda-reg", "0"], False, 1, False),
    "dmd2": ("DMD2: DM + GAN, TTUR 5", ["--recipe", "dmd2"], False, 5, True),
}

# The CUDA rows, most important first (a --deadline cuts the list short): precision, variant, compile, steps.
CIFAR_ROWS = (
    ("bf16", "dmd", False, 20),
    ("fp32", "dmd", False, 20),
    ("bf16", "dmd2", False, 10),
    ("bf16", "dm", False, 10),
    ("fp32", "dm", False, 10),
    ("bf16", "dmd", True, 20),
    ("bf16", "dmd2", True, 10),
)
CIFAR_AGREEMENT = (
    ("CIFAR, DMD: bf16 vs fp32", ("bf16", "dmd", False), ("fp32", "dmd", False)),
    ("CIFAR, DMD, bf16: compiled vs eager", ("bf16", "dmd", True), ("bf16", "dmd", False)),
)


def peak_bf16(device_name):
    """(name matched, peak TFLOP/s) for a CUDA device name, or (None, None) if unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # longest first: "H100 SXM" before "H100"
        if key in device_name:
            return key, PEAK_BF16_TFLOPS[key]
    return None, None


def forward_flops(fn):
    """FLOPs of one call of `fn()` counted by FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(teacher, batch_size, variant):
    """FLOPs of one training step (one G update and its fake-score updates) per process (see the module docstring),
    counted on the meta device."""
    _, _, reg, k, gan = VARIANTS[variant]
    meta = torch.device("meta")
    net, lpips = teacher.to(meta), LPIPS(pretrained=False).to(meta)
    r, c = net.img_resolution, net.img_channels
    x, sigma = torch.zeros(1, c, r, r, device=meta), torch.ones(1, device=meta)
    labels = torch.eye(net.label_dim, device=meta)[:1] if net.label_dim else None
    F = forward_flops(lambda: net(x, sigma, labels))
    E = forward_flops(lambda: net.bottleneck(x, sigma, labels))  # the encoder alone (the GAN's input)
    image = torch.zeros(1, 3, 224, 224, device=meta)
    L = forward_flops(lambda: lpips(image, image)) / 2  # One call runs VGG on both images.
    B, R = batch_size, batch_size if reg else 0
    unet_passes = 3 * (B + R) + 2 * B + 3 * B * k + B * (k - 1)
    encoder_passes = 2 * B + 3 * 2 * B * k if gan else 0
    return F * unet_passes + E * encoder_passes + L * 3 * R


def write_real(path, n, resolution, channels=3, label_dim=10):
    """n random real images with labels in EDM's dataset format (a zip)."""
    from dmd.images import write_image_dataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, resolution, resolution, channels), generator=g, dtype=torch.uint8)
    write_image_dataset(path, images.numpy(), labels=torch.arange(n) % label_dim)


def write_pairs(path, n, resolution, channels=3, label_dim=10):
    """n random pairs in our layout."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, channels, resolution, resolution, generator=g)
    images = torch.rand(latents.shape, generator=g) * 2 - 1
    create_pair_file(path, channels=channels, resolution=resolution, label_dim=label_dim, seeds=range(n), attrs={})
    with PairWriter(path) as writer:
        writer.append(latents.numpy(), images.numpy(), torch.randint(label_dim, (n,), generator=g).numpy())


class Runner:
    """Runs `python -m dmd train` rows in fresh processes inside one temporary folder."""

    def __init__(self, folder, checkout=ROOT):
        self.folder, self.checkout = folder, Path(checkout)

    def run(self, teacher, resolution, batch, variant, precision, device, steps, warmup, extra=(), nproc=1):
        """Run warmup + steps steps of a VARIANTS entry (on `nproc` processes under torchrun); return the stats
        records after the warm-up."""
        _, flags, reg, k, gan = VARIANTS[variant]
        items = batch * nproc * (steps + warmup) * k  # pairs for every step, real images for every fake step
        data = self.folder / f"{'pairs' if reg else 'real'}-{resolution}-{items}{'.h5' if reg else '.zip'}"
        if reg and not data.exists():
            write_pairs(data, items, resolution)
        if gan and not data.exists():
            write_real(data, items, resolution)
        flags = [*flags, "--data-path" if reg else "--real-data", str(data)] if reg or gan else flags
        out = Path(tempfile.mkdtemp(prefix="run-", dir=self.folder)) / "run"  # a fresh folder per row
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*launcher, "-m", "dmd", "train", "--model-path", str(teacher), "--output-dir", str(out)]
        cmd += [*flags, "--batch-size", str(batch)]
        cmd += ["--max-steps", str(steps + warmup), "--device", device, "--workers", "0", "--lpips-random"]
        cmd += ["--log-every", "1", "--image-every", "0", "--checkpoint-every", "0", *extra]
        if precision != "fp32":  # An older checkout may not know the flag; fp32 is every version's default.
            cmd += ["--precision", precision]
        env = {**os.environ, "PYTHONPATH": str(self.checkout)}
        proc = subprocess.run(cmd, cwd=self.checkout, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()][warmup:]


def summarise(records, batch, flops, peak):
    """img/s, step ms, peak memory GiB, MFU % (or None) of a row's records."""
    step_s = statistics.mean(batch / r["img_per_s"] for r in records)
    mfu = None if peak is None else 100 * flops / step_s / (peak * 1e12)
    return batch / step_s, 1000 * step_s, max(r["mem_gib"] for r in records), mfu


def max_rel_diff(a, b, key="loss_G"):
    """Largest relative difference of a per-step statistic between two runs of the same steps (early in a run the
    DM loss is tiny, a difference of two nearly equal scores, so its relative differences are the largest)."""
    return max(abs(x[key] - y[key]) / max(abs(y[key]), 1e-12) for x, y in zip(a, b))


def fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def print_header():
    print("| network | device | precision | compile | batch | losses | img/s | step ms | peak mem GiB |", end="")
    print(" GFLOP/step | MFU % |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)


def print_row(name, device, precision, compiled, batch, variant, result, flops):
    """One table line, printed as soon as its row is measured (a killed run keeps what it printed)."""
    speed, ms, mem, mfu = result if result is not None else (None,) * 4
    speed_text = fmt(speed) if result is not None else "n/a (no GPU)"
    print(
        f"| {name} | {device} | {precision} | {'yes' if compiled else 'no'} | {batch} | {VARIANTS[variant][0]} | "
        f"{speed_text} | "
        f"{fmt(ms, '.1f')} | {fmt(mem)} | {flops / 1e9:.2f} | {fmt(mfu, '.1f')} |",
        flush=True,
    )


def print_agreement(pairs):
    if not pairs:
        return
    keys = ("loss_G", "loss_reg", "loss_fake", "grad_norm_G")
    print("\n| runs compared | steps | " + " | ".join(f"max rel. diff. {k}" for k in keys) + " |")
    print("| --- | ---: |" + " ---: |" * len(keys))
    for title, a, b in pairs:
        diffs = [max_rel_diff(a, b, k) if b[0][k] else None for k in keys]
        print(f"| {title} | {len(a)} | " + " | ".join(fmt(d, ".2e") for d in diffs) + " |", flush=True)


def compare_checkouts(runner_new, runner_old, repeats, steps, warmup):
    """Interleaved timings of the tiny fp32 row (batch 8, no regression) in two checkouts; print the ratio."""
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for key, runner in (("old", runner_old), ("new", runner_new)):
            records = runner.run(FIXTURE, 8, 8, "dm", "fp32", "cpu", steps, warmup)
            times[key].append(statistics.mean(8 / r["img_per_s"] for r in records))
    print("| checkout | step ms (median of runs) | runs |")
    print("| --- | ---: | ---: |")
    for key in ("old", "new"):
        print(f"| {key} | {1000 * statistics.median(times[key]):.1f} | {len(times[key])} |")
    ratio = statistics.median(times["old"]) / statistics.median(times["new"])
    print(f"\nnew step is {ratio:.2f}x as fast as old (median step time old / new)")


def tiny_rows(runner, args):
    """The CPU rows of the fixture teacher; returns the pairs of runs to compare."""
    tiny, agreement = load_network(FIXTURE), []
    for compiled in (False, True) if args.compile else (False,):
        extra = ["--compile"] if compiled else []
        for variant in ("dm", "dmd", "dmd2"):
            batch = 2 if variant == "dmd" else 8
            steps, warmup = (2, 1) if variant == "dmd" else (args.steps, args.warmup)  # LPIPS at 224: slow on CPU
            flops, results = step_flops(tiny, batch, variant), {}
            for precision in ("fp32", "bf16"):
                results[precision] = runner.run(FIXTURE, 8, batch, variant, precision, "cpu", steps, warmup, extra)
                summary = summarise(results[precision], batch, flops, None)
                print_row("tiny 8x8 (fixture)", "cpu", precision, compiled, batch, variant, summary, flops)
            agreement.append((f"tiny, {VARIANTS[variant][0]}: bf16 vs fp32", results["bf16"], results["fp32"]))
            if compiled:
                eager = runner.run(FIXTURE, 8, batch, variant, "fp32", "cpu", steps, warmup)
                agreement.append((f"tiny, {VARIANTS[variant][0]}: compiled vs eager", results["fp32"], eager))
    return agreement


def cifar_rows(runner, target, measure, peak, args, start):
    """The CIFAR-10 rows: measured where `measure` (CUDA) until --deadline, FLOPs only otherwise; returns the runs to
    compare. `target` is (name, teacher pickle, resolution, batch, device): the CIFAR config on CUDA, or under
    --smoke the fixture teacher on the CPU, which runs the same code paths in seconds."""
    name, teacher, resolution, batch, device = target
    net, results = load_network(teacher), {}
    for precision, variant, compiled, steps in CIFAR_ROWS:
        flops = step_flops(net, batch, variant)
        if not measure:
            if not compiled:
                print_row(name, "cuda", precision, False, batch, variant, None, flops)
            continue
        if time.monotonic() - start > args.deadline * (0.5 if compiled else 0.8) or (compiled and args.smoke):
            print(f"skipped (--deadline): {name} {precision} {variant} compile {compiled}", flush=True)
            continue
        extra = ["--compile"] if compiled else []
        records = runner.run(teacher, resolution, batch, variant, precision, device, steps, 3, extra)
        results[precision, variant, compiled] = records
        print_row(name, device, precision, compiled, batch, variant, summarise(records, batch, flops, peak), flops)
    return [(title, results[a], results[b]) for title, a, b in CIFAR_AGREEMENT if a in results and b in results]


def ddp_check(runner, target):
    """The step on 2 processes (NCCL on 2 GPUs; gloo under --smoke) at half the batch each against 1 process: the
    same draws and the same global batch, so the same losses up to the order of float sums."""
    name, teacher, resolution, batch, device = target
    one = runner.run(teacher, resolution, batch, "dmd", "fp32", device, 5, 0)
    two = runner.run(teacher, resolution, batch // 2, "dmd", "fp32", device, 5, 0, nproc=2)
    print_agreement([(f"{name} fp32, 2 processes vs 1, global batch {batch}", two, one)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--compile", action="store_true", help="also compiled rows on the CPU (minutes each)")
    parser.add_argument("--compare", type=Path, help="another dmd checkout to time the tiny fp32 row against")
    parser.add_argument("--repeats", type=int, default=5, help="--compare: runs per checkout")
    parser.add_argument("--gpu-check", action="store_true", help="only the CIFAR rows on CUDA, within --deadline")
    parser.add_argument("--ddp-check", action="store_true", help="only the 2-GPU NCCL run against one GPU")
    parser.add_argument("--deadline", type=float, default=330.0, help="seconds after which no row starts")
    parser.add_argument("--smoke", action="store_true", help="--gpu-check/--ddp-check paths on the CPU, tiny net")
    args = parser.parse_args()
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else None
    matched, peak = peak_bf16(name) if cuda else (None, None)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs" + (f", {name}" if cuda else ", no GPU"))
    if cuda:
        print(f"MFU against {peak} TFLOP/s dense bf16 ({matched})" if peak else f"no bf16 peak known for {name}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runner = Runner(folder)
        if args.compare is not None:
            compare_checkouts(runner, Runner(folder, args.compare), args.repeats, args.steps, args.warmup)
            return
        torch.manual_seed(0)
        save_network_pickle(build_network("EDMPrecond", CIFAR10_COND), folder / "cifar10.pkl")
        target = ("CIFAR-10 DDPM++ 55.7M", folder / "cifar10.pkl", 32, 56, "cuda")
        if args.smoke:
            target = ("tiny 8x8 (smoke)", FIXTURE, 8, 4, "cpu")
        if args.ddp_check:
            ddp_check(runner, target)
            return
        print_header()
        agreement = [] if args.gpu_check else tiny_rows(runner, args)
        agreement += cifar_rows(runner, target, cuda or args.smoke, peak, args, start)
    print_agreement(agreement)


if __name__ == "__main__":
    main()
