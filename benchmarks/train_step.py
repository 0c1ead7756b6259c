"""Benchmark DMD training steps: img/s, step time, peak memory, FLOPs per step and MFU of `python -m dmd train`.

    python benchmarks/train_step.py [--steps 5] [--warmup 2] [--compile] [--compare OLD_CHECKOUT]
    python benchmarks/train_step.py --gpu-check [--deadline 330]       # what benchmarks/gpu_check.sh runs
    python benchmarks/train_step.py --edm2-cpu [--edm2-steps 5]         # the EDM2 rows alone, on the CPU

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

EDM2 rows (a third table): the ImageNet-64 teacher EDM2-S (280M parameters, random weights) with and without its
autoguidance guide EDM2-XS (125M). These rows time the generator step alone in this process (DMD2's whole step on
EDM2-S with its guide, through `dmd train`, is benchmarks/train_options.py's), built as `dmd train` builds it
(dmd.losses' DM loss, AdamW, clip_and_step): G's one-step sample, the DM loss with the real score guided or not,
backward and the update; each row in a fresh process, so that its peak memory is its own. On CUDA at batch 32 in
bf16 and fp32 (where --gpu-check runs them, after the CIFAR rows and before the compiled ones); on the CPU with
--edm2-cpu alone (those rows only), at batch 1 in fp32 (a step takes seconds there, and 8 GiB). A fourth table
counts the FLOPs of each recipe's steps with the EDM2 networks at the CUDA rows' batch.

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
(the head on the 8x8 bottleneck is negligible). A "step" is one G update with its k fake-score updates; the generator
step alone is its first three terms and the GAN's 2B. A guided real score D_w = D_guide + w (D - D_guide) adds one
forward of the guide per DM evaluation, B per generator step.
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

from dmd.config import TrainConfig
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


# EDM2's ImageNet-64 networks: the presets edm2-img64-s and edm2-img64-xs of NVlabs/edm2's train_edm2.py (model_channels
# 192 and 128, dropout 0, fp16), UNet's defaults there (channel_mult [1,2,3,4], num_blocks 3, attention at 16 and 8)
# written out, and ImageNet-64's shape; generate_images.py's edm2-img64-s-autog-fid guides S by XS at guidance 1.7.
EDM2_IMG64_S = dict(
    img_resolution=64,
    img_channels=3,
    label_dim=1000,
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    num_blocks=3,
    attn_resolutions=[16, 8],
    dropout=0.0,
    use_fp16=True,
)
EDM2_IMG64_XS = dict(EDM2_IMG64_S, model_channels=128)
EDM2_GUIDANCE = 1.7
# The EDM2 rows: device -> (batch, precisions); the CPU's only with --edm2-cpu.
EDM2_ROWS = {"cuda": (32, ("bf16", "fp32")), "cpu": (1, ("fp32",))}


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


def step_flops(teacher, batch_size, variant, guide=None):
    """FLOPs per process of (the generator step, the whole training step: one G update and its fake-score updates),
    with the real score guided by `guide` or not (see the module docstring), counted on the meta device."""
    _, _, reg, k, gan = VARIANTS[variant]
    meta = torch.device("meta")
    net, lpips = teacher.to(meta), LPIPS(pretrained=False).to(meta)
    r, c = net.img_resolution, net.img_channels
    x, sigma = torch.zeros(1, c, r, r, device=meta), torch.ones(1, device=meta)
    labels = torch.eye(net.label_dim, device=meta)[:1] if net.label_dim else None
    F = forward_flops(lambda: net(x, sigma, labels))
    F_guide = 0 if guide is None else forward_flops(lambda: guide.to(meta)(x, sigma, labels))
    E = forward_flops(lambda: net.bottleneck(x, sigma, labels))  # the encoder alone (the GAN's input)
    image = torch.zeros(1, 3, 224, 224, device=meta)
    L = forward_flops(lambda: lpips(image, image)) / 2  # One call runs VGG on both images.
    B, R = batch_size, batch_size if reg else 0
    generator = F * (3 * (B + R) + 2 * B) + F_guide * B + (E * 2 * B if gan else 0) + L * 3 * R
    fake_scores = F * (3 * B * k + B * (k - 1)) + (E * 3 * 2 * B * k if gan else 0)
    return generator, generator + fake_scores


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
    """Runs `python -m dmd train` rows in fresh processes inside one temporary folder (`entry`: what follows
    `python` or torchrun in place of `-m dmd`, e.g. a script that runs dmd's CLI)."""

    def __init__(self, folder, checkout=ROOT, entry=("-m", "dmd")):
        self.folder, self.checkout, self.entry = folder, Path(checkout), list(entry)

    def run(
        self, teacher, resolution, batch, variant, precision, device, steps, warmup, extra=(), nproc=1, torchrun=False
    ):
        """Run warmup + steps steps of a VARIANTS entry (on `nproc` processes under torchrun, which also starts
        a single one with `torchrun`); return the stats records after the warm-up."""
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
        if nproc > 1 or torchrun:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*launcher, *self.entry, "train", "--model-path", str(teacher), "--output-dir", str(out)]
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
            flops, results = step_flops(tiny, batch, variant)[1], {}
            for precision in ("fp32", "bf16"):
                results[precision] = runner.run(FIXTURE, 8, batch, variant, precision, "cpu", steps, warmup, extra)
                summary = summarise(results[precision], batch, flops, None)
                print_row("tiny 8x8 (fixture)", "cpu", precision, compiled, batch, variant, summary, flops)
            agreement.append((f"tiny, {VARIANTS[variant][0]}: bf16 vs fp32", results["bf16"], results["fp32"]))
            if compiled:
                eager = runner.run(FIXTURE, 8, batch, variant, "fp32", "cpu", steps, warmup)
                agreement.append((f"tiny, {VARIANTS[variant][0]}: compiled vs eager", results["fp32"], eager))
    return agreement


def cifar_rows(runner, target, measure, peak, args, start, compiled):
    """The eager or the `compiled` CIFAR-10 rows: measured where `measure` (CUDA) until --deadline, FLOPs only
    otherwise; returns the runs to compare. `target` is (name, teacher pickle, resolution, batch, device): the CIFAR
    config on CUDA, or under --smoke the fixture teacher on the CPU, which runs the same code paths in seconds."""
    name, teacher, resolution, batch, device = target
    net, results = load_network(teacher), {}
    for precision, variant, row_compiled, steps in CIFAR_ROWS:
        if row_compiled != compiled:
            continue
        flops = step_flops(net, batch, variant)[1]
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


def edm2_networks(guided, device="meta"):
    """The EDM2-S teacher (random weights) and, if `guided`, its EDM2-XS guide, built on `device`."""
    with torch.device(device):
        teacher = build_network("Precond", EDM2_IMG64_S)
        return teacher, build_network("Precond", EDM2_IMG64_XS) if guided else None


def edm2_generator_steps(guided, batch, precision, device, steps, warmup):
    """Run warmup + steps generator steps of DMD on the EDM2-S teacher (see the module docstring); return
    (mean step seconds after the warm-up, peak memory GiB). The networks are set up as `dmd train` sets them up: the
    teacher and guide frozen in eval mode, G and mu_fake trainable in training mode (EDM2's forced weight
    normalisation on) with fp16 off, every U-Net in the run's precision."""
    from dmd.edm.precond import set_compute_dtype
    from dmd.edm.sampler import GuidedDenoiser
    from dmd.generator import one_step
    from dmd.losses import DistributionMatchingLoss, KarrasGrid
    from dmd.utils.common import one_hot
    from dmd.utils.training import clip_and_step, memory_gib

    device, dtype = torch.device(device), torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    teacher, guide = edm2_networks(guided, device)
    with torch.device(device):  # in training mode, as built
        G, mu_fake = (build_network("Precond", dict(EDM2_IMG64_S, use_fp16=False)) for _ in range(2))
    for net in (teacher, guide, G, mu_fake):
        if net is not None:
            set_compute_dtype(net, dtype)
    teacher.eval().requires_grad_(False)
    mu_real = teacher if guide is None else GuidedDenoiser(teacher, guide.eval().requires_grad_(False), EDM2_GUIDANCE)
    dm_loss = DistributionMatchingLoss(mu_real, mu_fake, KarrasGrid(T=TrainConfig.num_timesteps).to(device))
    opt = torch.optim.AdamW(G.parameters(), lr=TrainConfig.lr_gen, betas=TrainConfig.betas, fused=True)
    seconds = []
    for _ in range(warmup + steps):
        z = torch.randn(batch, 3, 64, 64, device=device)
        c = one_hot(torch.randint(1000, (batch,), device=device), 1000)
        start = time.perf_counter()
        loss = dm_loss(one_step(G, z, c), c)[0].mean()
        loss.backward()
        clip_and_step(opt, G.parameters(), TrainConfig.grad_clip, loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.mean(seconds[warmup:]), memory_gib(device)


def edm2_rows(measure, device, peak, args, start):
    """The EDM2 rows: generator steps of EDM2-S without and with the XS guide, each timed in a fresh process where
    `measure` (on CUDA until --deadline); FLOPs and parameters alone otherwise."""
    batch, precisions = EDM2_ROWS[device]
    print("\n| teacher | guide | device | precision | batch | params M (trained / frozen) | GFLOP per G step |", end="")
    print(" G step ms | img/s | peak mem GiB | MFU % |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for guided in (False, True):
        teacher, guide = edm2_networks(guided)
        frozen = sum(p.numel() for net in (teacher, guide) if net is not None for p in net.parameters())
        trained = 2 * sum(p.numel() for p in teacher.parameters())  # G and mu_fake
        flops = step_flops(teacher, batch, "dm", guide)[0]
        for precision in precisions:
            if measure and device == "cuda" and time.monotonic() - start > args.deadline * 0.8:
                print(f"skipped (--deadline): EDM2-S, guided {guided}, {precision}", flush=True)
                continue
            ms = speed = mem = mfu = None
            if measure:
                row = json.dumps(dict(guided=guided, batch=batch, precision=precision, device=device))
                cmd = [sys.executable, __file__, "--edm2-row", row]
                cmd += ["--edm2-steps", str(args.edm2_steps), "--edm2-warmup", str(args.edm2_warmup)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                seconds, mem = json.loads(proc.stdout.splitlines()[-1])
                ms, speed = 1000 * seconds, batch / seconds
                mfu = None if peak is None else 100 * flops / seconds / (peak * 1e12)
            cells = [edm2_guide_name(guided), device, precision, batch, f"{trained / 1e6:.1f} / {frozen / 1e6:.1f}"]
            cells += [f"{flops / 1e9:.1f}", fmt(ms, ".0f"), fmt(speed), fmt(mem), fmt(mfu, ".1f")]
            print("| EDM2-S img64 | " + " | ".join(map(str, cells)) + " |", flush=True)


def edm2_guide_name(guided):
    return f"EDM2-XS, w {EDM2_GUIDANCE}" if guided else "none"


def edm2_recipe_flops(batch):
    """The FLOPs of each recipe's generator step and whole step with the EDM2 networks at `batch` per process."""
    print("\n| teacher | guide | batch | losses | GFLOP per G step | GFLOP per step (G + fake-score steps) |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for guided in (False, True):
        teacher, guide = edm2_networks(guided)
        for variant in VARIANTS:
            generator, whole = step_flops(teacher, batch, variant, guide)
            print(f"| EDM2-S img64 | {edm2_guide_name(guided)} | {batch} | {VARIANTS[variant][0]} | ", end="")
            print(f"{generator / 1e9:.1f} | {whole / 1e9:.1f} |", flush=True)


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
    parser.add_argument("--gpu-check", action="store_true", help="only the CIFAR and EDM2 rows on CUDA (--deadline)")
    parser.add_argument("--ddp-check", action="store_true", help="only the 2-GPU NCCL run against one GPU")
    parser.add_argument("--deadline", type=float, default=330.0, help="seconds after which no row starts")
    parser.add_argument("--smoke", action="store_true", help="--gpu-check/--ddp-check paths on the CPU, tiny net")
    parser.add_argument("--edm2-cpu", action="store_true", help="only the EDM2 rows, timed on the CPU (batch 1)")
    parser.add_argument("--edm2-steps", type=int, default=5, help="timed generator steps per EDM2 row")
    parser.add_argument("--edm2-warmup", type=int, default=2, help="untimed generator steps before them")
    parser.add_argument("--edm2-row", help=argparse.SUPPRESS)  # one EDM2 row (JSON), run by edm2_rows in a process
    args = parser.parse_args()
    if args.edm2_row is not None:
        row = json.loads(args.edm2_row)
        print(json.dumps(edm2_generator_steps(**row, steps=args.edm2_steps, warmup=args.edm2_warmup)))
        return
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
        if args.edm2_cpu:
            edm2_rows(True, "cpu", None, args, start)
            edm2_recipe_flops(EDM2_ROWS["cuda"][0])
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
        measure, edm2_device = cuda or args.smoke, "cuda" if cuda else "cpu"
        agreement += cifar_rows(runner, target, measure, peak, args, start, compiled=False)
        edm2_rows(cuda, edm2_device, peak, args, start)
        if measure:  # last: each compiles for minutes, so they are the rows a --deadline drops first
            print()
            print_header()
            agreement += cifar_rows(runner, target, measure, peak, args, start, compiled=True)
    print_agreement(agreement)
    if not args.gpu_check:
        edm2_recipe_flops(EDM2_ROWS["cuda"][0])


if __name__ == "__main__":
    main()
