"""Our DMD2 and f-distill training steps against NVIDIA FastGen's, on the same EDM networks, interleaved.

    python benchmarks/peers/vs_fastgen.py --fastgen PATH --venv PATH [--configs tiny,cifar] [--precisions fp32,bf16]
        [--methods dmd2,fdistill] [--divergences js] [--batch N] [--rounds R] [--warmup W] [--device cpu|cuda]
        [--fastgen-heads config|bottleneck] [--no-memory]

FastGen is not vendored and not a dependency of dmd: --fastgen names a checkout of github.com/NVlabs/FastGen (e.g.
`git clone https://github.com/NVlabs/FastGen PATH`), which is run, never imported into the package. Both sides run
in one separate virtual environment, --venv: if it has no python the script creates it (`python -m venv`) and installs
torch, what importing FastGen's DMD2 and f-distill models needs (FASTGEN_DEPS: found by importing them, not FastGen's
requirements.txt, which pins numpy<2 and transformers 4.49 and adds jupyter, opencv, ...) and dmd's own dependencies;
if an import fails there it installs them again (pip skips what is present). Then it runs itself again under that
venv's python with PYTHONPATH = this checkout and the FastGen checkout. On a GPU machine install the CUDA torch first
(`PATH/bin/pip install torch`) or let pip pick PyPI's default build.

For each network (--configs) and precision, each method is one interleaved group in a fresh process:
    dmd2:     ours with --gan-features fake (DMD2's), ours with --gan-features teacher (FastGen's), FastGen DMD2Model
    fdistill: per --divergences entry, ours with --gan-features teacher and FastGen FdistillModel (f_div the same)
A "step" is one generator update and its 5 fake-score/discriminator updates (TTUR 5, GAN on), built as each side's
training builds it: ours is dmd.build.build_parts + dmd.steps.generator_step / fake_score_step (the real `dmd train`
step); FastGen's is its model (DMD2Model / FdistillModel from its method config, random weights:
pretrained_model_path "") stepped by its own Trainer.train_step (autocast, backward, its grad-clip callback,
optimizer and scheduler steps, zero_grad), 6 iterations with student_update_freq 6. Each group builds its sides once,
counts the FLOPs of the first step of each with torch.utils.flop_counter.FlopCounterMode (generator update and fake
updates apart; a multiply-add is 2 FLOPs), runs --warmup more steps, then --rounds rounds of one step per side, the
order reversed every other round; the speed against FastGen is FastGen's step time over the side's in the same round
(median and range over rounds; above 1: faster than FastGen). Peak memory is measured in one more fresh process per
side (2 steps): on CUDA torch.cuda.max_memory_allocated, on the CPU the RSS high-water mark less the RSS after the
imports (FastGen's imports alone take more: diffusers, transformers, wandb). Both sides get the same in-memory real
batch at every discriminator update (no data loading timed on either side) and the same network: the notes say whether
the parameter counts and the FLOPs of one forward agree (FastGen's SongUNet adds one unused Linear, logvar_linear).
(The file is not named fastgen.py: python puts a script's folder first on sys.path, where it would hide FastGen.)

Networks (random weights; SongUNet DDPM++, dropout 0, 10 classes, augment_dim 9 as EDM's CIFAR-10 teacher):
    tiny:  16x16x3, 32 channels x [1, 2], 4 blocks per level (FastGen taps a level's features after its block3),
           attention at 8x8; both discriminators read the 8x8 bottleneck
    cifar: EDM's CIFAR-10 DDPM++ (55.7M), FastGen's EDM_CIFAR10_Config; FastGen's discriminator reads the teacher's
           features at 32, 16 and 8 (Discriminator_EDM_CIFAR10_Config, --fastgen-heads config) or the 8x8
           bottleneck alone (--fastgen-heads bottleneck), ours mu_fake's or the teacher's 8x8 bottleneck
Batch: 8 for tiny; for cifar 2 on the CPU (about 42 GFLOP per image forward), 56 on CUDA; --batch sets both.

Examples (the CPU; then a GPU machine):
    OMP_NUM_THREADS=2 python benchmarks/peers/vs_fastgen.py --fastgen /work/fastgen --venv /work/peers-venv \
        --configs tiny --rounds 6
    OMP_NUM_THREADS=2 python benchmarks/peers/vs_fastgen.py --fastgen /work/fastgen --venv /work/peers-venv \
        --configs cifar --precisions fp32 --batch 1 --rounds 0     # FLOPs and parameters only (FLOPs ~ batch)
    python benchmarks/peers/vs_fastgen.py --fastgen ~/FastGen --venv ~/peers-venv --device cuda --configs tiny,cifar
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's dmd, installed or not
from dmd.edm import presets  # noqa: E402

# What importing fastgen.methods (DMD2Model, FdistillModel), their method configs and the grad-clip callback needs,
# found by importing them in a bare venv: most are pulled in by modules these import but the step never runs.
FASTGEN_DEPS = [
    "omegaconf", "hydra-core", "attrs", "loguru", "einops", "boto3", "requests", "ftfy", "imageio", "scipy",
    "diffusers", "transformers", "wandb", "pandas", "psutil", "webdataset", "av", "timm",
]  # fmt: skip
OUR_DEPS = ["numpy", "click", "h5py", "pillow", "scipy", "requests", "tqdm", "safetensors"]

# The networks both sides build: EDMPrecond kwargs that EDM's (ours) and FastGen's EDMPrecond share, EDM's DDPM++
# preset (dmd.edm.presets) with the CIFAR-10 teacher's labels and augmentation, dropout 0.
DDPMPP = dict(
    presets.DDPMPP, label_dim=10, sigma_data=0.5, augment_dim=9, dropout=0.0, num_blocks=4, attn_resolutions=[16]
)
NETWORKS = {
    "tiny": dict(
        DDPMPP, img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], attn_resolutions=[8]
    ),
    "cifar": dict(DDPMPP, img_resolution=32, img_channels=3),  # the preset's 128 channels x [2, 2, 2]
}
TITLES = {"tiny": "tiny 16x16, 4 blocks per level", "cifar": "CIFAR-10 DDPM++ 55.7M"}
FAKE_STEPS = 5  # TTUR: fake-score/discriminator updates per generator update, both sides


def feature_taps(config, heads):
    """FastGen's Discriminator_EDM arguments for a network of NETWORKS: the levels whose block3 output it reads, their
    resolutions, their width. `heads` 'config': its CIFAR-10 config's three taps on that network (its levels are all
    256 wide), else the bottleneck alone (the tiny network's levels differ in width)."""
    arch = NETWORKS[config]
    levels = len(arch["channel_mult"])
    taps = list(range(levels)) if heads == "config" and config == "cifar" else [levels - 1]
    res = [arch["img_resolution"] >> i for i in range(levels)]
    return dict(feature_indices=taps, all_res=res, in_channels=arch["model_channels"] * arch["channel_mult"][-1])


def task_device(task):
    """The task's device, with CUDA's TF32 and cuDNN autotuning on, as both trainers set them (dmd.build.setup_device,
    FastGen's set_cuda_backend)."""
    import torch

    device = torch.device(task["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# In-memory real images for our discriminator, standing for dmd's BatchStream (FastGen's side gets its real batch in
# memory too, so neither side's data loading is timed).
class FixedBatch:
    def __init__(self, x, labels):
        self.x, self.labels = x, labels  # (B, C, H, W) in [-1, 1], (B,) class indices

    def next(self, device):
        return self.x.to(device), self.labels.to(device)


# One side of a group: our step (dmd.build.build_parts + dmd.steps), built as `dmd train` builds it.
class Ours:
    def __init__(self, arch, precision, batch, device, folder, gan_features, divergence, real):
        import torch

        from dmd.build import build_parts, load_teacher
        from dmd.config import TrainConfig
        from dmd.edm.precond import build_network
        from dmd.edm.writer import save_network_pickle

        kwargs = dict(arch, use_fp16=False, sigma_min=0, sigma_max=float("inf"))
        pickle = Path(folder) / "teacher.pkl"
        if not pickle.exists():
            save_network_pickle(build_network("EDMPrecond", kwargs), pickle)
        cfg = TrainConfig(
            model_path=str(pickle),
            output_dir=str(Path(folder) / "run"),
            real_data="(in memory)",  # never opened: the stream below stands for it
            batch_size=batch,
            max_steps=1,
            recipe="dmd2" if divergence == "rkl" else "fdistill",
            lambda_reg=0.0,
            fake_steps_per_gen=FAKE_STEPS,
            gan_weight_gen=3e-3,
            gan_weight_disc=1e-2,
            gan_features=gan_features,
            divergence=divergence,
            precision=precision,
            device=device.type,
            workers=0,
        )
        mu_real, teacher, _ = load_teacher(cfg, device)
        stream = FixedBatch(*(t.to(device) for t in real))  # on the device once, as FastGen's batch
        self.parts, _ = build_parts(cfg, mu_real, teacher, None, None, stream, device)
        self.teacher, self.device, self.gen = teacher, device, None
        self.params = sum(p.numel() for p in self.parts.G.parameters())
        self.head_params = sum(p.numel() for p in self.parts.head.parameters())
        self.x = torch.randn(1, arch["img_channels"], arch["img_resolution"], arch["img_resolution"], device=device)

    def forward_once(self):
        import torch

        labels = torch.eye(10, device=self.device)[:1]
        self.teacher(self.x, torch.ones(1, device=self.device), labels)

    def generator_update(self, k):
        from dmd.steps import generator_step

        self.gen = generator_step(self.parts, k)

    def fake_updates(self, k):
        from dmd.steps import fake_score_step

        fake_score_step(self.parts, k, self.gen)


# The other side: FastGen's DMD2Model / FdistillModel from its method config, stepped by its Trainer.train_step.
class FastGen:
    def __init__(self, network, precision, batch, device, heads, divergence, real):
        import torch
        from fastgen.callbacks.callback import CallbackDict
        from fastgen.configs.callbacks import GradClip_CALLBACK
        from fastgen.methods import DMD2Model, FdistillModel
        from fastgen.networks.discriminators import Discriminator_EDM
        from fastgen.networks.EDM.network import EDMPrecond
        from fastgen.trainer import Trainer
        from fastgen.utils import LazyCall
        from omegaconf import DictConfig

        if divergence == "rkl":
            from fastgen.configs.methods.config_dmd2 import create_config
        else:
            from fastgen.configs.methods.config_f_distill import create_config
        arch, config = NETWORKS[network], create_config()
        model_cfg = config.model
        if divergence != "rkl":
            model_cfg.f_distill.f_div = divergence
        model_cfg.net = LazyCall(EDMPrecond)(**arch, sigma_shift=0.0, label_dropout=0, r_timestep=False)
        model_cfg.discriminator = LazyCall(Discriminator_EDM)(**feature_taps(network, heads))
        model_cfg.device = device.type
        model_cfg.precision = "float32"  # weights, optimiser states and data; bf16 by autocast, as its EDM configs
        model_cfg.precision_amp = "bfloat16" if precision == "bf16" else None
        model_cfg.pretrained_model_path = ""  # random weights, as its tests
        model_cfg.student_update_freq = 1 + FAKE_STEPS  # iterations 0 mod 6 update G, the 5 others mu_fake + D
        model_cfg.input_shape = [arch["img_channels"], arch["img_resolution"], arch["img_resolution"]]
        self.model = (DMD2Model if divergence == "rkl" else FdistillModel)(model_cfg)
        self.model.on_train_begin()
        self.model.init_optimizers()
        # Its trainer without the logging callbacks: the grad-clip callback alone changes the work of a step.
        config.trainer.callbacks = DictConfig(GradClip_CALLBACK)
        config.trainer.fsdp, config.trainer.grad_accum_rounds = False, 1
        self.trainer = Trainer.__new__(Trainer)
        self.trainer.config = config
        self.trainer.callbacks = CallbackDict(config=config, trainer=self.trainer)
        x_real, labels = real
        self.data = dict(
            real=x_real.to(device),
            condition=torch.nn.functional.one_hot(labels, 10).float().to(device),
            neg_condition=torch.zeros(batch, 10, device=device),
        )
        self.device = device
        named = list(self.model.net.named_parameters())
        self.params = sum(p.numel() for n, p in named if "logvar" not in n)
        self.extra_params = sum(p.numel() for n, p in named if "logvar" in n)
        self.head_params = sum(p.numel() for p in self.model.discriminator.parameters())
        self.x = torch.randn(1, arch["img_channels"], arch["img_resolution"], arch["img_resolution"], device=device)

    def forward_once(self):
        import torch

        labels = torch.eye(10, device=self.device)[:1]
        t = torch.ones(1, device=self.device, dtype=self.model.net.noise_scheduler.t_precision)
        self.model.teacher(self.x, t, condition=labels)

    def iteration(self, i):
        self.trainer.train_step(self.model, self.model, self.data, i, 0)

    def generator_update(self, k):
        self.iteration((1 + FAKE_STEPS) * k)

    def fake_updates(self, k):
        for i in range(1, 1 + FAKE_STEPS):
            self.iteration((1 + FAKE_STEPS) * k + i)


def build_side(spec, batch, device, folder, heads):
    """A side from its spec {'side': 'ours' | 'fastgen', 'gan_features', 'divergence'}, on a fixed real batch."""
    import torch

    arch = NETWORKS[spec["config"]]
    g = torch.Generator().manual_seed(0)
    res, channels = arch["img_resolution"], arch["img_channels"]
    real = (torch.rand(batch, channels, res, res, generator=g) * 2 - 1, torch.randint(10, (batch,), generator=g))
    torch.manual_seed(0)
    if spec["side"] == "ours":
        return Ours(arch, spec["precision"], batch, device, folder, spec["gan_features"], spec["divergence"], real)
    return FastGen(spec["config"], spec["precision"], batch, device, heads, spec["divergence"], real)


def counted(fn, device):
    """FLOPs of fn() by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    sync(device)
    return counter.get_total_flops()


def timed(side, k, device):
    start = time.perf_counter()
    side.generator_update(k)
    side.fake_updates(k)
    sync(device)
    return time.perf_counter() - start


def run_group(task):
    """Build a group's sides in this process, count, warm up and time them interleaved; return their results."""
    import torch

    device = task_device(task)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        sides = {s["name"]: build_side(s, task["batch"], device, folder, task["heads"]) for s in task["sides"]}
        for name, side in sides.items():
            with torch.no_grad():
                forward = counted(side.forward_once, device)
            flops_g = counted(lambda side=side: side.generator_update(0), device)
            flops_fake = counted(lambda side=side: side.fake_updates(0), device)
            params = [side.params, getattr(side, "extra_params", 0), side.head_params]
            results[name] = dict(forward=forward, flops_g=flops_g, flops_fake=flops_fake, params=params, times=[])
            for k in range(1, 1 + task["warmup"] if task["rounds"] else 1):
                timed(side, k, device)
        names = list(sides)
        for r in range(task["rounds"]):
            for name in names if r % 2 == 0 else names[::-1]:
                results[name]["times"].append(timed(sides[name], 1 + task["warmup"] + r, device))
    return results


def run_memory(task):
    """Peak memory of one side built in this fresh process and stepped twice: (peak GiB, GiB before building).
    Both sides' packages are imported before the baseline is read, so that it holds both."""
    import fastgen.methods  # noqa: F401
    import fastgen.trainer  # noqa: F401
    import torch

    import dmd.build  # noqa: F401
    import dmd.steps  # noqa: F401

    device = task_device(task)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with tempfile.TemporaryDirectory() as folder:
        side = build_side(task["sides"][0], task["batch"], device, folder, task["heads"])
        for k in range(2):
            timed(side, k, device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, before


def in_process(mode, task):
    """Run `mode` ('group' or 'memory') of `task` in a fresh process of this script; its JSON result."""
    cmd = [sys.executable, __file__, f"--{mode}", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {json.dumps(task)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def groups(args, config, precision):
    """The interleaved groups of one network and precision: (method title, [side specs])."""
    base = dict(config=config, precision=precision)
    out = []
    if "dmd2" in args.methods:
        sides = [
            dict(base, name="ours, fake features (DMD2's)", side="ours", gan_features="fake", divergence="rkl"),
            dict(base, name="ours, teacher features", side="ours", gan_features="teacher", divergence="rkl"),
            dict(base, name="FastGen DMD2Model", side="fastgen", divergence="rkl"),
        ]
        out.append(("DMD2", sides))
    if "fdistill" in args.methods:
        for div in args.divergences:
            sides = [
                dict(base, name="ours, teacher features", side="ours", gan_features="teacher", divergence=div),
                dict(base, name="FastGen FdistillModel", side="fastgen", divergence=div),
            ]
            out.append((f"f-distill {div}", sides))
    return out


def spread(values):
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def print_group(title, config, precision, batch, results, memory, rounds):
    """Table rows of one group: FastGen's is the reference of the speed ratios."""
    reference = next(r for name, r in results.items() if name.startswith("FastGen"))
    for name, r in results.items():
        flops = r["flops_g"] + r["flops_fake"]
        cells = [TITLES[config], precision, batch, title, name, f"{r['params'][0] / 1e6:.3f}"]
        cells += [f"{r['forward'] / 1e9:.3f}", f"{r['flops_g'] / 1e9:.2f}", f"{r['flops_fake'] / 1e9:.2f}"]
        cells += [f"{flops / 1e9:.2f}"]
        if rounds:
            t = statistics.median(r["times"])
            ratios = [a / b for a, b in zip(reference["times"], r["times"])]
            cells += [f"{batch / t:.2f}", spread(r["times"]), f"{flops / t / 1e9:.1f}"]
            cells += ["1 (reference)" if r is reference else spread(ratios)]
        else:
            cells += ["n/a"] * 4
        mem = memory.get(name)
        cells += ["n/a" if mem is None else f"{mem[0] - mem[1]:.2f}" if mem[1] else f"{mem[0]:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def print_notes(checks):
    print("\nChecks (same network on both sides):")
    for line in checks:
        print(f"- {line}")
    print(
        """
What differs per step (FLOPs above are counted, not estimated):
- GAN features: DMD2 and `ours, fake features` read mu_fake's encoder, trained by the discriminator loss (an encoder
  backward on B fake + B real images in each fake update); FastGen and `ours, teacher features` read the frozen
  teacher's, without gradient in the fake updates (only the head trains there). In the generator update FastGen
  takes the features from the teacher forward that gives the DM target (one teacher pass, kept for the backward);
  so does ours (the DM loss's teacher pass: encoder with autograd, decoder without), so with equal heads the G
  update columns are equal.
- Discriminator head: ours reads the 8x8 bottleneck (DMD2's head); FastGen's CIFAR-10 config reads the block3
  features of all three levels (32, 16, 8) with one head each (--fastgen-heads bottleneck: the 8x8 alone).
- Fake updates: FastGen samples fresh G outputs in all 5; ours reuses the generator update's samples in the first.
- Optimisers: ours one fused AdamW on mu_fake + head, gradients clipped at 10 for G and for mu_fake + head; FastGen
  separate AdamW (foreach, weight decay 0.01) for mu_fake and the discriminator, clipping G's gradients alone (its
  grad-clip callback, 10, with a non-finite check per parameter that reads each back to the host), LR schedulers.
- TTUR: FastGen's student_update_freq 5 (its default) makes 4 fake updates per G update; here 6, for 5 like ours.
- bf16: ours runs the U-Nets in bf16 inside the preconditioner, weights fp32; FastGen autocasts the whole step to
  bf16 (precision float32, precision_amp bfloat16, as its EDM configs), weights fp32.
- No EMA on either side (FastGen's CIFAR-10 experiment keeps 3, one parameter lerp each per G update); no data
  loading timed on either side; losses' weights differ (DMD2's 3e-3 / 1e-2 against FastGen's 1e-3 / 1): no effect
  on speed."""
    )


def main_in_venv(args):
    import torch

    cuda = args.device == "cuda"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", end="")
    print(f" ({torch.cuda.get_device_name()})" if cuda else f", load average {os.getloadavg()[0]:.2f}")
    timing = f"{args.rounds} interleaved rounds after {args.warmup} warm-up" if args.rounds else "FLOPs only"
    print(f"FastGen {args.fastgen}; TTUR {FAKE_STEPS}; {timing}; FastGen's heads: {args.fastgen_heads}\n")
    print("| network | precision | batch | method | side | params M | GFLOP fwd (1 img) | GFLOP G update |", end="")
    print(" GFLOP fake updates | GFLOP step | img/s | s/step median [range] | GFLOP/s | speed vs FastGen |", end="")
    print(" peak GiB |")
    print("| --- | --- | ---: | --- | --- |" + " ---: |" * 11, flush=True)
    checks = []
    for config in args.configs:
        batch = args.batch or (8 if config == "tiny" else 56 if cuda else 2)
        for precision in args.precisions:
            for title, sides in groups(args, config, precision):
                task = dict(sides=sides, batch=batch, device=args.device, heads=args.fastgen_heads)
                results = in_process("group", dict(task, rounds=args.rounds, warmup=args.warmup))
                memory = {}
                if args.rounds and not args.no_memory:
                    for s in sides:
                        memory[s["name"]] = in_process("memory", dict(task, sides=[s]))
                print_group(title, config, precision, batch, results, memory, args.rounds)
                checks.append(check_line(config, title, results))
    print_notes(checks)
    if not cuda and not args.no_memory and args.rounds:
        print("\npeak GiB on the CPU: RSS high-water mark of a fresh process less its RSS after the imports.")


def check_line(config, title, results):
    """One line: parameter counts and per-forward FLOPs of both sides' networks, equal or not."""
    ours = next(r for name, r in results.items() if name.startswith("ours"))
    theirs = next(r for name, r in results.items() if name.startswith("FastGen"))
    same = ours["params"][0] == theirs["params"][0] and ours["forward"] == theirs["forward"]
    return (
        f"{TITLES[config]}, {title}: {'equal' if same else 'DIFFERENT'}: params {ours['params'][0]:,} ours, "
        f"{theirs['params'][0]:,} FastGen (+{theirs['params'][1]} in its unused logvar_linear); forward "
        f"{ours['forward'] / 1e9:.4f} vs {theirs['forward'] / 1e9:.4f} GFLOP per image; discriminator head params "
        f"{ours['params'][2]:,} ours, {theirs['params'][2]:,} FastGen"
    )


def ensure_venv(venv, fastgen):
    """The venv's python, the venv created and filled first where it is missing or cannot import both sides."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = venv_env(fastgen)
    probe = "import torch, fastgen.methods, fastgen.trainer, dmd.steps"
    if subprocess.run([str(python), "-c", probe], env=env, capture_output=True).returncode != 0:
        print(f"installing torch, FastGen's and dmd's dependencies into {venv}", flush=True)
        pip = [str(python), "-m", "pip", "install", "torch", *FASTGEN_DEPS, *OUR_DEPS]
        subprocess.run(pip, check=True)
        subprocess.run([str(python), "-c", probe], env=env, check=True)
    return python


def venv_env(fastgen):
    paths = [str(ROOT), str(fastgen), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def names(choices):
        def parse(text):
            values = [v for v in text.split(",") if v]
            bad = [v for v in values if v not in choices]
            if bad or not values:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
            return values

        return parse

    parser.add_argument("--fastgen", type=Path, help="a checkout of NVlabs/FastGen (the folder holding fastgen/)")
    parser.add_argument("--venv", type=Path, help="the virtual environment to run in (created if missing)")
    parser.add_argument("--configs", type=names(list(NETWORKS)), default=["tiny"], help="tiny,cifar")
    parser.add_argument("--precisions", type=names(["fp32", "bf16"]), default=["fp32", "bf16"], help="fp32,bf16")
    parser.add_argument("--methods", type=names(["dmd2", "fdistill"]), default=["dmd2", "fdistill"])
    parser.add_argument("--divergences", type=names(["js", "kl"]), default=["js"], help="f-distill's: js,kl")
    parser.add_argument("--batch", type=int, help="images per step (default 8 tiny; cifar 2 on CPU, 56 on CUDA)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (0: FLOPs and parameters only)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the FLOP-counting one")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--fastgen-heads", choices=["config", "bottleneck"], default="config")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # one interleaved group (JSON), in a fresh process
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # one side's peak memory (JSON), in a fresh process
    args = parser.parse_args()
    if args.group is None and args.memory is None:
        if args.fastgen is None or not (args.fastgen / "fastgen" / "methods").is_dir():
            parser.error(f"--fastgen: {args.fastgen} is not a FastGen checkout (no fastgen/methods in it)")
        if args.venv is None:
            parser.error("--venv: give the virtual environment to run in (it is created if missing)")
        if args.batch is not None and args.batch < 1 or args.rounds < 0 or args.warmup < 0:
            parser.error("--batch must be at least 1, --rounds and --warmup at least 0")
    return args


def main():
    args = parse_args()
    if args.group is not None:
        print(json.dumps(run_group(json.loads(args.group))))
        return
    if args.memory is not None:
        print(json.dumps(run_memory(json.loads(args.memory))))
        return
    venv = args.venv.absolute()
    if os.environ.get("DMD_PEERS_VENV") != str(venv):  # not yet re-run in the venv with both checkouts importable
        python = ensure_venv(venv, args.fastgen.resolve())
        env = dict(venv_env(args.fastgen.resolve()), DMD_PEERS_VENV=str(venv))
        os.execve(python, [str(python), __file__, *sys.argv[1:]], env)
    main_in_venv(args)


if __name__ == "__main__":
    main()
