"""Memory per GPU to distil EDM2 teachers with DMD and DMD2: a markdown table, counted, never timed.

    python benchmarks/memory.py               # the tables and the CPU check (about a minute on a 2-core CPU)
    python benchmarks/memory.py --no-check    # the tables alone

Every number is for `dmd train --precision bf16`: the U-Nets compute in bf16 while every weight of G, mu_fake and
DMD2's discriminator head stays fp32 (master weights; `set_compute_dtype` changes the compute dtype only), as do
their gradients and AdamW's two moments (exp_avg, exp_avg_sq, each the parameter's dtype). The teacher is frozen and
keeps the dtype of its pickle, fp16 for EDM2's releases (`load_network` loads each weight as the file stores it).

Teachers: EDM2's ImageNet-512 sizes XS..XXL (SD-VAE latents, 64x64x4) and ImageNet-64 sizes S..XL (pixels, 64x64x3),
1000 classes, with the architecture NVlabs/edm2's `train_edm2.py` presets give them: model_channels 128..448 and
its UNet defaults, channel_mult [1,2,3,4], 3 blocks per level, attention at 16x16 and 8x8 (the presets set only the
width and dropout). Recipes: DMD as DM loss + fake-score steps 1:1 (`--lambda-reg 0`: the LPIPS regression is left
out, see below), DMD2 as `--recipe dmd2` (DM + GAN through mu_fake's encoder and the head, 5 fake-score steps per G
step; each fake-score update frees its activations before the next, so 5 cost no more memory than 1).

Per GPU, with DDP (`torchrun`): weights (teacher + G + mu_fake [+ head]); gradients of G and mu_fake [+ head] (DDP's
gradient buckets, `gradient_as_bucket_view`, hold both for the whole run; one process without torchrun frees each
network's after its update); AdamW state; and the activations of the heavier of the two updates:
  generator step: G's forward kept for its backward, the DM loss (mu_real and mu_fake without gradients, nothing
      kept), and for DMD2 the GAN loss through mu_fake's encoder (frozen: only what the input gradient needs is kept);
  fake-score step: mu_fake's forward and backward on B generated images, and for DMD2 the discriminator's encoder
      pass on B generated + B real images.
The activations are the bytes autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage
counted once, weights and buffers excluded), measured on the meta device (shapes only, no memory) with the real
networks and losses (dmd.edm2, dmd.build.build_losses) at the real configuration, at batch 1 and 2 and extended
linearly in the batch (every saved tensor is either batch-independent, e.g. the bf16 copies of the normalised
weights, or proportional to it; the script checks the line against a measurement at batch 32). Not counted: what
lives only for a moment (the gradients of activations during backward, the no-grad forwards' own activations, AdamW's
and clipping's temporaries, cuDNN workspaces, the allocator's fragmentation); the CPU check below measures how much
that adds on a small network. `--fsdp` over 8 GPUs is projected, not measured: G's and mu_fake's weights, gradients
and AdamW state divided by 8, the teacher replicated, the activations unchanged, plus the unsharded weights and
gradients of the largest U-Net block (fp32), which FSDP gathers while it computes that block.

With a guide (`--guide-network`) add its weights (fp16), the "guide" column: the guide of EDM2's best-FID guided
preset in `generate_images.py` (classifier-free guidance by the unconditional XS; autoguidance of S by XS, of XXL by
M, of ImageNet-64 S by XS). It runs without gradients. The regression loss (`--lambda-reg > 0`) runs G on R more
images (`--reg-batch-size`, default B): G's activations per image apply to B + R images, plus LPIPS's VGG-16 at 224.
Each EMA of G (`--ema`) adds G's weights once more.

The CPU check runs one real generator step and one real fake-score step (dmd.build.build_parts, dmd.steps) of a
small EDM2 network in a fresh process and reads its peak resident memory above the memory it held before each step
(VmHWM after resetting it through /proc/self/clear_refs, with glibc's malloc returning freed blocks at once), against
this script's estimate for that step: the network's gradients + the saved activations.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dmd.build import build_losses, build_parts
from dmd.config import TrainConfig, resolve_recipe
from dmd.edm.precond import build_network, set_compute_dtype
from dmd.edm2.networks import Block
from dmd.generator import one_step

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
BATCHES = (1, 2, 4, 8, 16, 32)
GPU_GIB = 81559 / 1024  # what an 80 GB H100 or A100 offers (nvidia-smi: 81,559 MiB)
FIT_GIB = 0.9 * GPU_GIB  # the rest for the CUDA context, cuDNN workspaces, gradients in flight, fragmentation
FSDP_GPUS = 8


# One EDM2 network: its preset's name, its space, its width, and the constructor kwargs the rest shares.
@dataclass(frozen=True)
class EDM2Size:
    name: str  # EDM2's size letter(s)
    space: str  # 'img512' (latents) or 'img64' (pixels)
    channels: int  # model_channels of the train_edm2.py preset
    label_dim: int = 1000  # 0 for the unconditional guides of classifier-free guidance

    def kwargs(self):
        return dict(
            img_resolution=64,  # ImageNet-512 runs on 64x64 latents
            img_channels=4 if self.space == "img512" else 3,
            label_dim=self.label_dim,
            model_channels=self.channels,
            channel_mult=[1, 2, 3, 4],
            num_blocks=3,
            attn_resolutions=[16, 8],
            dropout=0.0,  # the students' (--dropout 0); the teacher runs in eval mode
        )

    def __str__(self):
        return f"EDM2-{self.name} {self.space}" + ("" if self.label_dim else " uncond")


def size(space, name, label_dim=1000):
    return EDM2Size(name, space, dict(XS=128, S=192, M=256, L=320, XL=384, XXL=448)[name], label_dim)


# The teachers and the guide of EDM2's best-FID guided preset for each (None: EDM2 publishes none).
XS_UNCOND = size("img512", "XS", label_dim=0)
TEACHERS = (
    (size("img512", "XS"), XS_UNCOND),
    (size("img512", "S"), size("img512", "XS")),
    (size("img512", "M"), XS_UNCOND),
    (size("img512", "L"), XS_UNCOND),
    (size("img512", "XL"), XS_UNCOND),
    (size("img512", "XXL"), size("img512", "M")),
    (size("img64", "S"), size("img64", "XS")),
    (size("img64", "M"), None),
    (size("img64", "L"), None),
    (size("img64", "XL"), None),
)
RECIPES = ("dmd", "dmd2")


def train_config(recipe, batch, **overrides):
    """The TrainConfig of a bf16 run of `recipe` (no regression) at `batch` per process; paths are placeholders."""
    options = dict(model_path="teacher.pkl", output_dir="run", max_steps=1, batch_size=batch, precision="bf16")
    options.update(lambda_reg=0.0, real_data="real.zip" if recipe == "dmd2" else None, **overrides)
    return TrainConfig(**resolve_recipe(recipe, options))


def nbytes(tensors, trainable=False):
    """Bytes of the tensors (only those that require grad if `trainable`)."""
    return sum(t.numel() * t.element_size() for t in tensors if t.requires_grad or not trainable)


def build_networks(kwargs, device):
    """The teacher (fp16 as EDM2's pickles, frozen, eval) and the students G, mu_fake (fp32, training, as
    dmd.build.student_copy makes them), every U-Net computing in bf16."""
    with torch.device(device):
        teacher = build_network("Precond", dict(kwargs, use_fp16=True)).half().eval().requires_grad_(False)
        G, mu_fake = (build_network("Precond", dict(kwargs, use_fp16=False)).as_student_() for _ in range(2))
    for net in (teacher, G, mu_fake):
        set_compute_dtype(net, torch.bfloat16)
    return teacher, G, mu_fake


# Counts the bytes autograd saves for backward inside `part(name)` blocks, each storage once, under the part that
# saved it first; the weights and buffers of `modules` are left out (they are counted as weights).
class SavedBytes:
    def __init__(self, modules):
        self.exclude = {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}
        self.storages = {}  # storage address -> (bytes, part, a tensor on it: kept alive, so the address stays unique)

    @contextlib.contextmanager
    def part(self, name):
        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in self.exclude and storage._cdata not in self.storages:
                self.storages[storage._cdata] = (storage.nbytes(), name, t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def bytes(self, *parts):
        return sum(n for n, part, _ in self.storages.values() if part in parts)


def step_activations(teacher, G, mu_fake, batch, device):
    """Saved bytes of each recipe's (generator step, fake-score step) at `batch`: {recipe: (gen, fake)}, and the
    head's weight bytes. One DMD2 step is measured, its parts called as dmd.steps calls them: DMD's steps are its
    parts without the GAN (the GAN's parts run last, so whatever they share with the others is counted there)."""
    cfg = train_config("dmd2", batch)
    with torch.device(device):
        dm_loss, fake_loss, gan_loss = build_losses(cfg, teacher, mu_fake, slice(0, batch), device)
    nets = [teacher, G, mu_fake, gan_loss.head]
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    z, x_real = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    c = torch.zeros(batch, teacher.label_dim, device=device)

    gen = SavedBytes(nets)  # generator step: G's sample, the DM loss, then the GAN's generator loss
    with gen.part("dm"):
        x = one_step(G, z, c)
        dm_loss(x, c)
    with gen.part("gan"):
        gan_loss.generator(x, c)
    fake = SavedBytes(nets)  # fake-score step on G's detached samples, then the discriminator
    with fake.part("fake"):
        fake_loss(mu_fake, x.detach(), c)
    with fake.part("gan"):
        gan_loss.discriminator(x.detach(), c, x_real, c)
    saved = dict(dmd=(gen.bytes("dm"), fake.bytes("fake")), dmd2=(gen.bytes("dm", "gan"), fake.bytes("fake", "gan")))
    return saved, nbytes(gan_loss.head.parameters())


# What one teacher and recipe hold per GPU: the fixed parts in bytes, and activations a + b B per phase.
@dataclass
class Footprint:
    teacher: int  # frozen teacher's weights and buffers (fp16)
    students: int  # G + mu_fake [+ head] weights and buffers (fp32)
    trained: int  # bytes of their trainable parameters (= their gradients' bytes)
    largest_block: int  # trainable bytes of the largest U-Net block (what FSDP gathers at once)
    act_gen: tuple  # (a, b): generator step saves a + b B bytes
    act_fake: tuple  # (a, b): fake-score step

    def fixed(self, fsdp=1):
        """Weights + gradients + AdamW's two moments, the students' sharded over `fsdp` GPUs (plus one gathered
        block's weights and gradients when sharded)."""
        sharded = (self.students + 3 * self.trained) / fsdp
        return self.teacher + sharded + (2 * self.largest_block if fsdp > 1 else 0)

    def activations(self, batch):
        return max(a + b * batch for a, b in (self.act_gen, self.act_fake))

    def total(self, batch, fsdp=1):
        return self.fixed(fsdp) + self.activations(batch)


def line(points):
    """(a, b) of the line a + b B through {B: bytes} measured at B = 1 and 2."""
    return points[1] - (points[2] - points[1]), points[2] - points[1]


def footprints(teacher_size, device="meta"):
    """{recipe: Footprint} of one teacher: its networks built on `device` (meta: shapes only), the activations
    measured at batch 1 and 2."""
    teacher, G, mu_fake = build_networks(teacher_size.kwargs(), device)
    measured = {B: step_activations(teacher, G, mu_fake, B, device) for B in (1, 2)}
    head = measured[1][1]
    largest_block = max(nbytes(m.parameters(), trainable=True) for m in G.modules() if isinstance(m, Block))
    result = {}
    for recipe in RECIPES:
        extra = head if recipe == "dmd2" else 0
        result[recipe] = Footprint(
            teacher=nbytes([*teacher.parameters(), *teacher.buffers()]),
            students=nbytes([*G.parameters(), *G.buffers(), *mu_fake.parameters(), *mu_fake.buffers()]) + extra,
            trained=nbytes([*G.parameters(), *mu_fake.parameters()], trainable=True) + extra,
            largest_block=largest_block,
            act_gen=line({B: saved[recipe][0] for B, (saved, _) in measured.items()}),
            act_fake=line({B: saved[recipe][1] for B, (saved, _) in measured.items()}),
        )
    return result


def guide_bytes(guide):
    if guide is None:
        return None
    with torch.device("meta"):
        net = build_network("Precond", dict(guide.kwargs(), use_fp16=True)).half()
    return nbytes([*net.parameters(), *net.buffers()])


def gib(n, spec=".1f"):
    return "-" if n is None else format(n / GIB, spec)


def cell(n):
    return gib(n) + ("" if n <= FIT_GIB * GIB else " x")


def print_tables(rows):
    """rows: (teacher size, guide size or None, recipe, Footprint)."""
    print(
        "| teacher | recipe | params M | teacher fp16 | G + mu_fake [+ head] fp32 | gradients fp32 | AdamW fp32 |",
        end="",
    )
    print(" activations G step: fixed + per image | fake-score step: fixed + per image | guide fp16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for teacher, guide, recipe, f in rows:
        params = f.teacher / 2 / 1e6  # fp16: 2 bytes a weight
        acts = [f"{gib(a, '.2f')} + {gib(b, '.3f')}" for a, b in (f.act_gen, f.act_fake)]
        guide_text = "none published" if guide is None else f"{gib(guide_bytes(guide), '.2f')} ({guide.name}"
        guide_text += "" if guide is None else (" uncond)" if guide.label_dim == 0 else ")")
        cells = [str(teacher), recipe.upper(), f"{params:.0f}", gib(f.teacher, ".2f"), gib(f.students, ".2f")]
        cells += [gib(f.trained, ".2f"), gib(2 * f.trained, ".2f"), *acts, guide_text]
        print("| " + " | ".join(cells) + " |")
    for fsdp, title in ((1, "DDP (or one GPU)"), (FSDP_GPUS, f"--fsdp over {FSDP_GPUS} GPUs, projected")):
        print(f"\nTotal GiB per GPU, {title}, at per-GPU batch B (x: over {FIT_GIB:.1f} GiB, 90% of an 80 GB GPU's")
        print(f"{GPU_GIB:.1f} GiB):\n")
        print("| teacher | recipe | fixed | " + " | ".join(f"B={B}" for B in BATCHES) + " | largest B that fits |")
        print("| --- | --- | ---: |" + " ---: |" * len(BATCHES) + " ---: |")
        for teacher, _, recipe, f in rows:
            fits = [B for B in BATCHES if f.total(B, fsdp) <= FIT_GIB * GIB]
            cells = [str(teacher), recipe.upper(), gib(f.fixed(fsdp))]
            cells += [cell(f.total(B, fsdp)) for B in BATCHES]
            cells.append(str(max(fits)) if fits else "none")
            print("| " + " | ".join(cells) + " |")


def check_line(teacher_size, found, batch=32):
    """The activations measured at `batch` against the lines through batch 1 and 2 (`found`: footprints())."""
    saved, _ = step_activations(*build_networks(teacher_size.kwargs(), "meta"), batch, "meta")
    for recipe in RECIPES:
        f = found[recipe]
        for name, measured, (a, b) in zip(("G step", "fake-score step"), saved[recipe], (f.act_gen, f.act_fake)):
            print(
                f"- {teacher_size}, {recipe.upper()}, {name}, batch {batch}: measured {gib(measured, '.3f')} GiB, ",
                end="",
            )
            print(f"line {gib(a + b * batch, '.3f')} GiB")


# The CPU check's network: EDM2's architecture at a width whose activations, not the process's noise, dominate a
# step's peak, and small enough for a step in seconds.
CHECK_SIZE = dict(
    img_resolution=32,
    img_channels=3,
    label_dim=10,
    model_channels=64,
    channel_mult=[1, 2, 3, 4],
    num_blocks=3,
    attn_resolutions=[16, 8],
    dropout=0.0,
)
CHECK_BATCH = 4


def memory_kib(field):
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def measure_peaks(recipe):
    """Run one real step of `recipe` on CPU (warm-up: AdamW's state, the allocator), then another, and return the
    peak resident bytes of its generator step and of its fake-score step, each above the bytes held before it."""
    from dmd.steps import fake_score_step, generator_step

    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = train_config(recipe, CHECK_BATCH, fake_steps_per_gen=1)
    with torch.device(device):
        teacher = build_network("Precond", dict(CHECK_SIZE, use_fp16=True)).half()
    teacher.eval().requires_grad_(False)
    shape = (CHECK_BATCH, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)

    class RealImages:  # the real-image stream's interface: a batch of images and labels
        def next(self, device):
            return torch.randn(shape, device=device), torch.randint(teacher.label_dim, (CHECK_BATCH,), device=device)

    real = RealImages() if recipe == "dmd2" else None
    parts, _ = build_parts(cfg, teacher, teacher, None, None, real, device)

    def peak(fn, *args):
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # VmHWM := VmRSS
        before = memory_kib("VmRSS")
        out = fn(*args)
        return out, 1024 * (memory_kib("VmHWM") - before)

    for step in range(2):  # the first step makes AdamW's state; the second is measured
        out, gen = peak(generator_step, parts, step)
        _, fake = peak(fake_score_step, parts, step, out)
    return gen, fake


def cpu_check():
    """The CPU check's table: measured peaks of a small network's real steps against the estimate."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
    env["PYTHONPATH"] = str(ROOT)
    teacher, G, mu_fake = build_networks(CHECK_SIZE, "meta")
    saved, head = step_activations(teacher, G, mu_fake, CHECK_BATCH, "meta")
    print(f"\nCPU check: EDM2 architecture at {CHECK_SIZE['img_resolution']}x{CHECK_SIZE['img_resolution']}x", end="")
    print(
        f"{CHECK_SIZE['img_channels']}, model_channels {CHECK_SIZE['model_channels']}, batch {CHECK_BATCH}, bf16 ",
        end="",
    )
    print(f"({nbytes(G.parameters()) / 4 / 1e6:.1f}M parameters):\n")
    print(
        "| recipe | update | estimate MiB (gradients + saved activations) | measured peak MiB | measured / estimate |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for recipe in RECIPES:
        cmd = [sys.executable, __file__, "--check-row", recipe]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.splitlines()[-1])
        (gen, fake), head = saved[recipe], head if recipe == "dmd2" else 0
        estimates = nbytes(G.parameters(), True) + gen, nbytes(mu_fake.parameters(), True) + head + fake
        for update, estimate, peak in zip(("generator", "fake-score"), estimates, measured):
            print(
                f"| {recipe.upper()} | {update} | {estimate / 2**20:.1f} | {peak / 2**20:.1f} | {peak / estimate:.2f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="skip the CPU check (a real step in a subprocess)")
    parser.add_argument("--check-row", choices=RECIPES, help=argparse.SUPPRESS)  # one CPU check, in a subprocess
    args = parser.parse_args()
    if args.check_row is not None:
        print(json.dumps(measure_peaks(args.check_row)))
        return
    print(f"torch {torch.__version__}; bytes counted on the meta device (no memory, no GPU needed)\n")
    found = {teacher: footprints(teacher) for teacher, _ in TEACHERS}
    print_tables(
        [(teacher, guide, recipe, found[teacher][recipe]) for teacher, guide in TEACHERS for recipe in RECIPES]
    )
    largest = TEACHERS[5][0]  # EDM2-XXL
    print("\nThe activations at batch 32 measured, against the lines through batch 1 and 2:\n")
    check_line(largest, found[largest])
    if not args.no_check:
        cpu_check()


if __name__ == "__main__":
    main()
