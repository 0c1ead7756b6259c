"""DMD training: a one-step generator G distilled from a frozen EDM teacher mu_real with a learned fake score mu_fake.

One step = a generator step (lambda_dm * distribution matching + lambda_reg * LPIPS regression on teacher pairs),
then `fake_steps_per_gen` fake-score steps (denoising loss on generated images), then maintenance (EMA, logs, grids,
checkpoints). Every random draw of step s is a function of (seed, s) alone: the global batch's noise is drawn from
the step seed and each rank takes its slice, and the pairs follow a DistributedSampler whose position is saved, so a
resumed run repeats an uninterrupted one bit for bit and K processes reproduce one process at the same global batch
(dropout, off by default, draws per rank). SIGINT/SIGTERM end the run after the current step with a checkpoint.
"""

import errno
import hashlib
import resource
import signal
import threading
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dmd.checkpoint import (
    check_same_run,
    file_fingerprint,
    find_latest_state,
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    restore,
    save_snapshot,
    save_training_state,
    snapshot_path,
    state_path,
)
from dmd.utils import distributed as dist
from dmd.utils.common import make_grid, one_hot
from dmd.utils.io import atomic_save_image, atomic_write_text
from dmd.utils.logger import NeptuneLogger, StatsLogger, format_stats


class TrainError(RuntimeError):
    """A training run that cannot start or go on; the message names the flag or file at fault."""


# ----------------------------------------------------------------------------
# Randomness and data.


def step_seed(seed, step, stream):
    """A 63-bit seed from (run seed, step, stream name)."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed, step, stream, device="cpu"):
    """A generator for one stream of one step: the same draws on every rank and after a resume."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, stream))


def draw_generator_inputs(net, seed, step, stream, n, device):
    """Draw the global batch's z (n, C, H, W) and one-hot labels (n, label_dim) or None, uniform over classes, on
    `device` (its generator type fixes the numbers: CPU and CUDA runs differ, K processes equal one)."""
    g = step_generator(seed, step, stream, device)
    z = torch.randn((n, net.img_channels, net.img_resolution, net.img_resolution), generator=g, device=device)
    labels = torch.randint(net.label_dim, (n,), generator=g, device=device) if net.label_dim > 0 else None
    return z, one_hot(labels, net.label_dim, device=device)


def rank_rows(batch_size):
    """This rank's rows of the global batch."""
    rank = dist.get_rank()
    return slice(rank * batch_size, (rank + 1) * batch_size)


def take(c, rows):
    """Rows of optional class labels."""
    return None if c is None else c[rows]


def spread(x, rows, n):
    """Place this rank's rows x (B, ...) at `rows` of a zero global batch (n, ...), keeping x's gradient."""
    return torch.cat([x.new_zeros((rows.start, *x.shape[1:])), x, x.new_zeros((n - rows.stop, *x.shape[1:]))])


# A denoiser evaluated on this rank's rows of a global batch, zeros elsewhere. The losses draw their noise for the
# whole global batch from a generator seeded by the step, so every rank (and a single process) sees the same draws
# for the same sample, while each rank runs the network on its own rows only.
class RankRows:
    def __init__(
        self,
        net,  # denoiser net(x, sigma, class_labels), possibly DDP-wrapped
        rows,  # slice of the global batch this rank owns
    ):
        self.net, self.rows = net, rows

    def __call__(self, x, sigma, class_labels=None):
        out = self.net(x[self.rows], sigma[self.rows], take(class_labels, self.rows))
        return spread(out.to(x.dtype), self.rows, x.shape[0])


# Pair batches in the order of a DistributedSampler (shuffled per epoch from the run seed), resumable at any batch.
class PairStream:
    def __init__(
        self,
        dataset,  # PairDataset
        batch_size,  # pairs per rank and step
        seed,  # shuffling seed; the permutation of epoch e is a function of (seed, e)
        workers=0,  # DataLoader worker processes
        pin_memory=False,  # page-locked batches, so the copy to a GPU overlaps compute
    ):
        self.dataset, self.batch_size, self.workers, self.pin_memory = dataset, batch_size, workers, pin_memory
        self.sampler = DistributedSampler(
            dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True, seed=seed, drop_last=True
        )
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.epoch, self.index, self._batches = 0, 0, None

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, position):
        self.epoch, self.index, self._batches = int(position["epoch"]), int(position["index"]), None

    def next(self, device):
        """Return the next batch (z_ref (B, C, H, W), y_ref (B, C, H, W), class indices (B,)) on `device`."""
        if self._batches is None:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            starts = range(self.index * self.batch_size, self.steps_per_epoch * self.batch_size, self.batch_size)
            batches = [order[i : i + self.batch_size] for i in starts]
            loader = DataLoader(
                self.dataset, batch_sampler=batches, num_workers=self.workers, pin_memory=self.pin_memory
            )
            self._batches = iter(loader)
        z_ref, y_ref, labels = next(self._batches)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        return tuple(t.to(device, non_blocking=True) for t in (z_ref, y_ref, labels))


def next_pairs(stream, device):
    """The next pair batch; TrainError naming --data-path for a bad row (a NaN, found as it is read)."""
    from dmd.data import PairFileError

    try:
        return stream.next(device)
    except PairFileError as e:
        raise TrainError(f"--data-path: {e}") from e


# ----------------------------------------------------------------------------
# Setup helpers.


def open_pairs(cfg):
    """Open the pair file of --data-path (None without one); TrainError naming the flag on failure."""
    if cfg.data_path is None:
        return None
    from dmd.data import PairDataset, PairFileError

    try:
        return PairDataset(cfg.data_path)
    except PairFileError as e:
        raise TrainError(f"--data-path: {e}") from e


def load_teacher(cfg, device):
    """Load mu_real from --model-path (frozen, in eval mode, on `device`); return it and the file's sha256."""
    from dmd.edm.persistence import NetworkLoadError, load_network
    from dmd.utils.download import DownloadError, open_url, sha256_file

    try:
        # Rank 0 downloads a URL teacher, the others then read the cache.
        local = dist.main_first(partial(open_url, cfg.model_path, cache_dir=cfg.cache_dir, progress=dist.is_main()))
        net = load_network(local, key="ema", device=device)
    except (OSError, NetworkLoadError, DownloadError) as e:
        raise TrainError(f"--model-path: cannot load a teacher from {cfg.model_path} ({e})") from e
    return net.eval().requires_grad_(False), sha256_file(local)


def student_copy(teacher, dropout, device):
    """A trainable copy of the teacher with its dropout replaced (G and mu_fake train with dropout 0 by default).

    The copy never runs in fp16 (use_fp16 off even for an fp16 teacher: fp16 training diverges without loss scaling,
    DMD2 found); its compute dtype is the run's --precision, set by `prepare_network`.
    """
    from dmd.edm.precond import build_network

    net = build_network(type(teacher).__name__, {**teacher.init_kwargs, "dropout": dropout, "use_fp16": False})
    net.load_state_dict(teacher.state_dict())
    return net.to(device).train().requires_grad_(True)


def setup_device(cfg):
    """Join torchrun's process group if any and return this rank's device; on CUDA TF32 on, cuDNN autotuning on
    (every step has the same shapes)."""
    device = dist.setup_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def prepare_network(net, dtype, cfg):
    """Set a network's U-Net compute dtype (bf16 inside the preconditioner, fp32 around it) and the opt-in
    --channels-last memory layout and --compile (torch.compile of the U-Net's forward; state-dict keys unchanged)."""
    from dmd.edm.precond import set_compute_dtype

    set_compute_dtype(net, dtype)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:
        net.model.compile()
    return net


# A network called with zero augment labels when its U-Net has an augment mapping (EDM's CIFAR-10 teacher has one):
# the output is the same as without them (map_augment has no bias), but its weight then takes part in every
# backward, so DDP needs no search for unused parameters.
class ZeroAugment(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.augment_dim = net.model.map_augment.in_features if net.model.map_augment is not None else 0

    def forward(self, x, sigma, class_labels=None):
        if self.augment_dim == 0:
            return self.net(x, sigma, class_labels)
        zeros = x.new_zeros((x.shape[0], self.augment_dim))
        return self.net(x, sigma, class_labels, augment_labels=zeros)


def wrap_ddp(net, device):
    """DDP wrapper under torchrun, the bare network otherwise."""
    if not dist.is_initialized():
        return net
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        ZeroAugment(net), device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True
    )


def build_losses(cfg, mu_real, mu_fake, rows, device):
    """The three losses: distribution matching and fake-score on this rank's `rows`, regression (or None)."""
    from dmd.losses import DistributionMatchingLoss, FakeScoreLoss, KarrasGrid, MSERegressionLoss, RegressionLoss
    from dmd.lpips import LPIPS

    grid = KarrasGrid(T=cfg.num_timesteps).to(device)  # on the device once, not copied at every lookup
    dm_loss = DistributionMatchingLoss(RankRows(mu_real, rows), RankRows(mu_fake, rows), grid, cfg.t_min, cfg.t_max)
    fake_loss = FakeScoreLoss(grid, sigma_sampling=cfg.fake_sigma_sampling)
    if cfg.lambda_reg == 0:
        return dm_loss, fake_loss, None
    if cfg.regression_distance == "mse":
        return dm_loss, fake_loss, MSERegressionLoss()
    weights = dict(vgg_weights=cfg.lpips_vgg, lin_weights=cfg.lpips_lin, cache_dir=cfg.cache_dir)
    try:
        lpips = LPIPS(**weights, pretrained=cfg.lpips_pretrained).to(device)
        lpips.compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # 0.6% off fp32
        if cfg.channels_last:
            lpips.to(memory_format=torch.channels_last)
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainError(
            f"--lpips-vgg / --lpips-lin: cannot load the LPIPS weights ({e}); without internet access give local "
            "files with --lpips-vgg PATH --lpips-lin PATH, or train with --regression-distance mse"
        ) from e
    return dm_loss, fake_loss, RegressionLoss(lpips)


def setup_fid(cfg, device):
    """Load the FID detector and reference statistics of --fid-every now, not at the first FID (None if off)."""
    if cfg.fid_every == 0:
        return None
    from dmd.fid import CIFAR10_REF_URL, FIDError, load_detector, load_ref

    try:
        detector = dist.main_first(partial(load_detector, cfg.fid_detector, cache_dir=cfg.cache_dir, device=device))
    except FIDError as e:
        raise TrainError(f"--fid-detector: {e}") from e
    try:
        ref = dist.main_first(partial(load_ref, cfg.fid_ref or CIFAR10_REF_URL, cache_dir=cfg.cache_dir))
    except FIDError as e:
        raise TrainError(f"--fid-ref: {e}") from e
    return detector, ref


def compute_fid(cfg, net, fid, device):
    """FID of `net` as a one-step generator (eval mode, no grad) over seeds 0..fid_num-1; the same on every rank."""
    from dmd.fid import generator_fid
    from dmd.generate import DMDGenerator

    detector, ref = fid
    generator = DMDGenerator(net=net, sigma_G=cfg.generator_sigma)
    return generator_fid(
        lambda seeds, class_ids: generator.generate_batch(seeds=seeds, class_ids=class_ids),
        ref,
        seeds=range(cfg.fid_num),
        label_dim=net.label_dim,
        detector=detector,
        batch_size=cfg.batch_size,
        device=device,
    )


def update_ema(G_ema, G, beta):
    """G_ema <- beta G_ema + (1 - beta) G, parameters and buffers."""
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.lerp_(p, 1 - beta)
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def clip_and_step(opt, params, max_norm, loss):
    """Clip the gradients and step, unless the loss or the gradient norm is non-finite on any rank; then zero the
    gradients. Return (grad norm, 1.0 if the step was skipped else 0.0) as device tensors.

    No host sync: the fused AdamW skips its whole update (moments, step count, weight decay) on the device when its
    `found_inf` is non-zero, the mechanism torch's GradScaler uses.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    bad = dist.all_reduce_max((~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float())  # 0-d
    opt.found_inf = bad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, bad


def memory_gib(device):
    """Peak memory: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_grid(path, rows, n):
    """Write the labelled sample grid: one row per entry of `rows` ({label: tensor}), `n` images each."""
    images = torch.cat([r[:n].detach().float().cpu() for r in rows.values()])
    atomic_save_image(make_grid(images, nrow=n, row_labels=list(rows)), path)


def check_pairs(pairs, teacher):
    """Raise TrainError naming --data-path if the pair file does not fit the teacher."""
    from dmd.data import PairFileError

    if pairs is None:
        return
    try:
        pairs.check_compatible(teacher)
    except PairFileError as e:
        raise TrainError(f"--data-path: {e}") from e


def snapshot_info(cfg, step):
    """The fields besides the weights that every snapshot of this run carries."""
    return dict(sigma_G=cfg.generator_sigma, step=step, config=cfg.to_dict())


def write_checkpoint(run_dir, cfg, step, *, nets, stream, run):
    """Write training-state-{step} and network-snapshot-{step} (the EMA of G if any), then prune old ones.

    `nets` holds G, mu_fake, G_ema and the optimisers, `run` the identity and counters a state records. A write
    that fails (a full disk) leaves the previous checkpoints as they were and stops the run with one line.
    """
    position = None if stream is None else stream.state_dict()
    try:
        save_training_state(state_path(run_dir, step), **nets, step=step, data_position=position, run=run)
        save_snapshot(snapshot_path(run_dir, step), nets["G_ema"] or nets["G"], **snapshot_info(cfg, step))
    except OSError as e:
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
        last = find_latest_state(run_dir)
        raise TrainError(
            f"cannot write the checkpoint of step {step} in {run_dir}: {reason}; the last complete checkpoint, "
            f"{last or 'none'}, is intact (free space, then continue with --resume auto)"
        ) from e
    prune_checkpoints(run_dir, cfg.keep_last)


# SIGINT / SIGTERM only raise a flag; the loop sees it between steps (on every rank at once) and writes a checkpoint.
STOP_CHECK_STEPS = 10  # Under torchrun the ranks agree on a stop every this many steps (and at logging steps).


class StopSignals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device):
        self.device, self.flag, self.previous = device, False, {}

    def _handle(self, signum, frame):
        self.flag = True
        signal.signal(signum, self.previous[signum])  # A second signal acts at once.

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, agree=True):
        """Whether to stop now. One process: whether it got a signal. Under torchrun, every rank must stop at the
        same step, so the ranks agree (an all-reduce) only at steps where `agree` is true, and say no otherwise."""
        if not dist.is_initialized():
            return self.flag
        return agree and bool(dist.all_reduce_mean(torch.tensor(float(self.flag), device=self.device)) > 0)


# Means of the per-step statistics since the last logging step, summed on the device, read at logging steps.
class Window:
    NAMES = ("loss_G", "loss_dm", "loss_reg", "loss_fake", "grad_norm_G", "grad_norm_fake")

    def __init__(self, device):
        self.device, self.sum, self.steps, self.start = device, None, 0, time.perf_counter()

    def add(self, values):
        """Add one step's values on this rank (scalar tensors in the order of NAMES)."""
        step = torch.stack([v.detach().to(torch.float64) for v in values])
        self.sum = step if self.sum is None else self.sum + step
        self.steps += 1

    def flush(self, images_per_step):
        """Return the window's means over steps and ranks with the throughput, and start a new window."""
        means = dist.all_reduce_mean(self.sum).cpu() / self.steps
        stats = {k: float(v) for k, v in zip(self.NAMES, means)}
        stats["img_per_s"] = images_per_step * self.steps / (time.perf_counter() - self.start)
        self.__init__(self.device)
        return stats


# Skipped (non-finite) steps: the streak and the total, counted on the device; the same on every rank.
class BadSteps:
    def __init__(self, device, total=0):
        self.streak = torch.zeros((), device=device)
        self.total = torch.tensor(float(total), device=device)

    def add(self, bad):
        """Count one step; `bad` (0-d) is 1.0 if any of its optimiser steps was skipped."""
        self.streak = (self.streak + 1) * bad
        self.total = self.total + bad

    def read(self):
        """(steps in a row skipped up to now, skipped steps in all) as ints: a host sync."""
        streak, total = torch.stack([self.streak, self.total]).tolist()
        return int(streak), int(total)


def open_logger(cfg, run_dir, start_step):
    """On rank 0: print the config, write config.json, cut stats.jsonl back to `start_step`; None on other ranks."""
    dist.print0(f"Training config:\n{cfg.to_json()}")
    if not dist.is_main():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.to_json(), run_dir / "config.json")
    logger = StatsLogger(run_dir, NeptuneLogger(cfg.to_dict()) if cfg.log_neptune else None)
    logger.truncate_after(start_step)
    return logger


# ----------------------------------------------------------------------------
# The loop.


def set_hyperparameters(opt, lr, cfg):
    """Give every parameter group of an AdamW the run's settings (a restored optimiser state brings its own)."""
    for group in opt.param_groups:
        group.update(lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train(cfg, dry_run=False):
    """Run DMD training as `cfg` says; return the last step and whether a signal stopped the run early.

    With `dry_run`, check the inputs (run folder, resume source, teacher, pairs and that they fit) and return
    before any training work or any file is written.
    """
    from dmd.edm.precond import copy_network
    from dmd.generator import one_step

    # Setup: the run folder, the resume source, the teacher and the pairs are checked before any work.
    device = setup_device(cfg)
    run_dir = Path(cfg.output_dir)
    resume_path = resolve_resume(cfg, run_dir)
    state = None if resume_path is None else load_training_state(resume_path, auto=cfg.resume == "auto")
    pairs = open_pairs(cfg)
    mu_real, teacher_sha256 = load_teacher(cfg, device)
    check_pairs(pairs, mu_real)
    B, B_reg = cfg.batch_size, cfg.reg_batch_size or cfg.batch_size
    stream = None
    if pairs is not None:
        stream = PairStream(pairs, B_reg, cfg.seed, cfg.workers, pin_memory=device.type == "cuda")
        if stream.steps_per_epoch == 0:
            flag = "--reg-batch-size" if cfg.reg_batch_size else "--batch-size"
            raise TrainError(f"{flag}: {len(pairs)} pairs hold no batch of {B_reg} per process")
    num_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * stream.steps_per_epoch
    n, rows = B * dist.get_world_size(), rank_rows(B)
    batches = {"batch_size": n, "reg_batch_size": B_reg * dist.get_world_size()}  # global batches, fixed in a run
    fingerprints = {"teacher": teacher_sha256}
    if pairs is not None:
        fingerprints["pairs"] = file_fingerprint(cfg.data_path)
    changes = {}
    if state is not None:
        changes = check_same_run(state, resume_path, cfg, global_batch=batches, fingerprints=fingerprints)
    if dry_run:
        return {"step": 0 if state is None else state["step"], "stopped": False}

    # The students: copies of the teacher, all three U-Nets in the run's precision (not the pickle's fp16).
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    G, mu_fake = student_copy(mu_real, cfg.dropout, device), student_copy(mu_real, cfg.dropout, device)
    for net in (mu_real, G, mu_fake):
        prepare_network(net, dtype, cfg)
    G_ema = copy_network(G).to(device).eval().requires_grad_(False) if cfg.ema_halflife_kimg > 0 else None
    adamw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)  # fused: skips a bad step on the device
    opt_G = torch.optim.AdamW(G.parameters(), lr=cfg.lr_gen, **adamw)
    opt_fake = torch.optim.AdamW(mu_fake.parameters(), lr=cfg.lr_fake, **adamw)
    dm_loss, fake_loss, reg_loss = build_losses(cfg, mu_real, mu_fake, rows, device)
    fid = setup_fid(cfg, device)
    nets = dict(G=G, mu_fake=mu_fake, G_ema=G_ema, opt_G=opt_G, opt_fake=opt_fake)
    start = 0 if state is None else restore(state, resume_path, **nets, stream=stream)
    set_hyperparameters(opt_G, cfg.lr_gen, cfg)  # a change allowed on resume reaches the optimiser
    set_hyperparameters(opt_fake, cfg.lr_fake, cfg)
    best_fid = float("inf") if state is None else state["best_fid"]
    logger = open_logger(cfg, run_dir, start)
    if state is not None:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items() if k not in ("resume", "allow_change"))
        dist.print0(f"Resuming from {resume_path} at step {start}" + (f"; changed: {changed}" if changed else ""))
    elif cfg.resume == "auto":
        dist.print0(f"No training state in {run_dir}: starting at step 0")
    counts = BadSteps(device, total=0 if state is None else state["bad_steps"])

    def checkpoint(step):
        run = dict(config=cfg.to_dict(), sigma_G=float(cfg.generator_sigma), bad_steps=counts.read()[1])
        run.update(best_fid=float(best_fid), global_batch=batches, fingerprints=fingerprints)
        write_checkpoint(run_dir, cfg, step, nets=nets, stream=stream, run=run)

    G_ddp, fake_ddp = wrap_ddp(G, device), wrap_ddp(mu_fake, device)
    beta_ema = 0.5 ** (n / (cfg.ema_halflife_kimg * 1000)) if G_ema is not None else None
    zero = torch.zeros((), device=device)
    use_dm = cfg.lambda_dm > 0
    window, done, saved = Window(device), start, start
    bar = tqdm(initial=start, total=num_steps, unit="step", disable=not dist.is_main(), dynamic_ncols=True)
    try:
        with StopSignals(device) as stop:
            for step in range(start, num_steps):
                torch.manual_seed(step_seed(cfg.seed, step, f"rank{dist.get_rank()}"))  # dropout, if any

                # Generator step: distribution matching on G(z) plus LPIPS regression of G(z_ref) onto y_ref.
                # Regression-only training (lambda_dm 0) runs G on the pairs alone.
                z, c = draw_generator_inputs(mu_real, cfg.seed, step, "G", n, device)  # global batch (n, ...)
                z_in, c_in = (z[rows], take(c, rows)) if use_dm else (z[:0], take(c, slice(0)))
                B_dm = z_in.shape[0]  # B, or 0 without distribution matching
                if reg_loss is not None:
                    z_ref, y_ref, k_ref = next_pairs(stream, device)
                    c_ref = one_hot(k_ref, mu_real.label_dim, device=device)
                    z_in, c_in = torch.cat([z_in, z_ref]), None if c is None else torch.cat([c_in, c_ref])
                x_all = one_step(G_ddp, z_in, c_in, sigma=cfg.generator_sigma)  # (B_dm + B_reg or B_reg, C, H, W)
                x, x_ref = x_all[:B_dm], x_all[B_dm:]
                loss_dm, aux = zero, None
                if use_dm:
                    dm_gen = step_generator(cfg.seed, step, "dm", device)
                    loss_dm, aux = dm_loss(spread(x, rows, n), c, generator=dm_gen)
                    loss_dm = loss_dm[rows].mean()
                loss_reg = zero if reg_loss is None else reg_loss(x_ref, y_ref).mean()
                loss_G = cfg.lambda_dm * loss_dm + cfg.lambda_reg * loss_reg
                loss_G.backward()
                norm_G, bad = clip_and_step(opt_G, G.parameters(), cfg.grad_clip, loss_G)

                # Fake-score step: mu_fake denoises G's samples, x first, then fresh batches from the updated G.
                # Regression-only training (lambda_dm 0) has no use for mu_fake and skips it.
                x_fake = spread(x.detach(), rows, n) if use_dm else None
                c_fake, loss_fake_sum, norm_fake = c, zero, zero
                for k in range(cfg.fake_steps_per_gen if use_dm else 0):
                    if k > 0:
                        z, c_fake = draw_generator_inputs(mu_real, cfg.seed, step, f"fake{k}", n, device)
                        with torch.no_grad():
                            x_fake = spread(one_step(G, z[rows], take(c_fake, rows), cfg.generator_sigma), rows, n)
                    fake_gen = step_generator(cfg.seed, step, f"fake-loss{k}", device)
                    loss_fake = fake_loss(RankRows(fake_ddp, rows), x_fake, c_fake, generator=fake_gen)[rows].mean()
                    loss_fake.backward()
                    norm_fake, bad_fake = clip_and_step(opt_fake, mu_fake.parameters(), cfg.grad_clip, loss_fake)
                    bad, loss_fake_sum = torch.maximum(bad, bad_fake), loss_fake_sum + loss_fake.detach()

                # Maintenance: EMA, statistics, grid, checkpoint, stop conditions. The statistics stay on the device
                # and are read (one transfer, one all-reduce) at logging steps only.
                done = step + 1
                counts.add(bad)
                if G_ema is not None:
                    update_ema(G_ema, G, beta_ema)
                window.add([loss_G, loss_dm, loss_reg, loss_fake_sum / cfg.fake_steps_per_gen, norm_G, norm_fake])
                log_now = done % cfg.log_every == 0 or done == num_steps
                if log_now:
                    means = window.flush(n)  # on every rank: it all-reduces
                    streak, bad_total = counts.read()
                    if logger is not None:
                        stats = dict(means, kimg=done * n / 1000, mem_gib=memory_gib(device), bad_steps=bad_total)
                        logger.log(done, stats)
                        bar.write(format_stats(done, num_steps, stats))
                    if streak >= cfg.max_bad_steps:
                        last = find_latest_state(run_dir)
                        raise TrainError(
                            f"stopping at step {done}: {streak} steps in a row had a non-finite loss or gradient "
                            f"(--max-bad-steps {cfg.max_bad_steps}); last good checkpoint: {last or 'none'}"
                        )
                if logger is not None and cfg.image_every and done % cfg.image_every == 0:
                    if not use_dm:
                        with torch.no_grad():
                            x = one_step(G, z[rows], take(c, rows), cfg.generator_sigma)
                    rows_out = {"G(z)": x}
                    if aux is not None:
                        rows_out.update({"mu_real(x_t)": aux["p_real"][rows], "mu_fake(x_t)": aux["p_fake"][rows]})
                    if reg_loss is not None:
                        rows_out.update({"G(z_ref)": x_ref, "y_ref": y_ref})
                    save_grid(run_dir / f"grid-{done:06d}.png", rows_out, n=min(B, 8))
                if fid is not None and done % cfg.fid_every == 0:
                    value = compute_fid(cfg, G_ema or G, fid, device)
                    if logger is not None:
                        logger.log(done, {"fid": value})
                        bar.write(f"step {done}: FID {value:.3f}" + (" (best)" if value < best_fid else ""))
                        if value < best_fid:
                            save_snapshot(run_dir / "network-snapshot-best.pt", G_ema or G, **snapshot_info(cfg, done))
                    best_fid = min(best_fid, value)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and counts.read()[0] == 0:
                    if dist.is_main():
                        checkpoint(done)
                    saved = done
                bar.update(1)
                if stop.requested(agree=log_now or done % STOP_CHECK_STEPS == 0):
                    break
            stopped = done < num_steps
        if done != saved and counts.read()[0] == 0 and dist.is_main():
            checkpoint(done)
        dist.barrier()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
        dist.shutdown()
    return {"step": done, "stopped": stopped}
