"""DMD and DMD2 training: a one-step (or few-step) generator G distilled from a frozen EDM teacher mu_real with a
learned fake score mu_fake.

`train(cfg)` reads as setup (run folder, teacher, data, students, losses), the loop and its maintenance. One step = a
generator step (lambda_dm * distribution matching + lambda_reg * regression on teacher pairs + the GAN loss of DMD2
on mu_fake's bottleneck), then `fake_steps_per_gen` fake-score steps (denoising loss on generated images, plus the
discriminator loss on real images when the GAN is on), both in dmd/steps.py, then maintenance (EMA, logs, grids, FID,
checkpoints). Every random draw of step s is a function of (seed, s) alone (dmd/batches.py), so a resumed run
repeats an uninterrupted one bit for bit and K processes reproduce one process at the same global batch (dropout,
off by default, draws per rank). SIGINT/SIGTERM end the run after the current step with a checkpoint.
"""

import errno
import inspect
import math
import shlex
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dmd.batches import BatchStream, RankRows, rank_rows, step_seed, take
from dmd.checkpoint import (
    CheckpointError,
    RunLock,
    check_same_run,
    data_fingerprint,
    find_latest_state,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    restore,
    save_snapshot,
    save_training_state,
    snapshot_path,
    state_path,
)
from dmd.steps import STAT_NAMES, BatchError, StepParts, fake_score_step, generated, generator_step
from dmd.utils import distributed as dist
from dmd.utils.common import make_grid
from dmd.utils.io import atomic_save_image, atomic_write_text
from dmd.utils.logger import (
    LoggerError,
    NeptuneLogger,
    StatsLogger,
    TensorBoardLogger,
    WandbLogger,
    check_trackers,
    format_head,
    format_stats,
)
from dmd.utils.training import STOP_CHECK_STEPS, BadSteps, StopSignals, Window, memory_gib, update_ema


class TrainError(RuntimeError):
    """A training run that cannot start or go on; the message names the flag or file at fault."""


# ----------------------------------------------------------------------------
# Setup helpers.


def open_datasets(cfg, teacher):
    """The pair file of --data-path and the real images of --real-data (each None without), checked against the
    teacher; TrainError naming the flag on failure."""
    from dmd.data import PairDataset, PairFileError
    from dmd.images import ImageDataset, ImageDatasetError

    pairs = real = None
    try:
        if cfg.data_path is not None:
            pairs = PairDataset(cfg.data_path)
            pairs.check_compatible(teacher)
    except PairFileError as e:
        raise TrainError(f"--data-path: {e}") from e
    try:
        if cfg.real_data is not None:
            real = ImageDataset(cfg.real_data, xflip=cfg.xflip)
            real.check_compatible(teacher)
    except ImageDatasetError as e:
        raise TrainError(f"--real-data: {e}") from e
    return pairs, real


def open_stream(dataset, batch_size, flag, what, cfg, device):
    """A resumable BatchStream of `dataset` (None without one); TrainError naming `flag` if no batch fits."""
    if dataset is None:
        return None
    from dmd.data import PairFileError
    from dmd.images import ImageDatasetError

    errors = (PairFileError, ImageDatasetError)
    stream = BatchStream(dataset, batch_size, cfg.seed, cfg.workers, pin_memory=device.type == "cuda", errors=errors)
    if stream.steps_per_epoch == 0:
        raise TrainError(f"{flag}: {len(dataset)} {what} hold no batch of {batch_size} per process")
    return stream


def load_teacher(cfg, device):
    """Load mu_real from --network (frozen, in eval mode, on `device`); return it and the file's sha256."""
    from dmd.edm.persistence import NetworkLoadError, load_network
    from dmd.utils.download import DownloadError, open_url, sha256_file

    try:
        # Rank 0 downloads a URL teacher, the others then read the cache.
        local = dist.main_first(
            partial(open_url, cfg.model_path, cache_dir=cfg.cache_dir, progress=cfg.progress and dist.is_main())
        )
        net = load_network(local, key="ema", device=device)
    except (OSError, NetworkLoadError, DownloadError) as e:
        raise TrainError(f"--network: cannot load a teacher from {cfg.model_path} ({e})") from e
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
    """DDP wrapper under torchrun, the bare network otherwise.

    Buffers (EDM's fixed frequencies and tables) never change, so they are not re-sent before every forward: with
    `forward_sync_buffers=False` where this torch has it (`broadcast_buffers`, its old name, is deprecated there and
    warned in every rank's log), else `broadcast_buffers=False`.
    """
    if not dist.is_initialized():
        return net
    ids = [device.index] if device.type == "cuda" else None
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in DDP_ARGUMENTS else "broadcast_buffers"
    return DistributedDataParallel(ZeroAugment(net), device_ids=ids, gradient_as_bucket_view=True, **{no_sync: False})


DDP_ARGUMENTS = inspect.signature(DistributedDataParallel).parameters


def build_losses(cfg, mu_real, mu_fake, rows, device):
    """The losses: distribution matching and fake-score on this rank's `rows`, and DMD2's GAN (None when off) with
    its discriminator head."""
    from dmd.losses import DistributionMatchingLoss, FakeScoreLoss, KarrasGrid

    grid = KarrasGrid(T=cfg.num_timesteps).to(device)  # on the device once, not copied at every lookup
    dm_loss = DistributionMatchingLoss(RankRows(mu_real, rows), RankRows(mu_fake, rows), grid, cfg.t_min, cfg.t_max)
    fake_loss = FakeScoreLoss(grid, sigma_sampling=cfg.fake_sigma_sampling)
    gan_loss = None
    if cfg.gan_weight_gen > 0:
        from dmd.gan import DiscriminatorHead, GANLoss

        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank, and the run's RNG untouched
            torch.manual_seed(step_seed(cfg.seed, 0, "head"))
            head = DiscriminatorHead.for_network(mu_fake).to(device)
        gan_loss = GANLoss(mu_fake, head, grid, max_index=max(1, round(cfg.gan_t_max * grid.T)))
    return dm_loss, fake_loss, gan_loss


def build_regression(cfg, device):
    """The regression loss of --regression-distance (None at --lambda-reg 0)."""
    from dmd.losses import MSERegressionLoss, RegressionLoss
    from dmd.lpips import LPIPS

    if cfg.lambda_reg == 0:
        return None
    if cfg.regression_distance == "mse":
        return MSERegressionLoss()
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
    return RegressionLoss(lpips)


def setup_fid(cfg, teacher, device):
    """Load the FID detector and reference statistics of --fid-every now, not at the first FID, and check that they
    fit each other and the teacher (None if FID is off).

    Without --fid-ref the reference is EDM's CIFAR-10 statistics, which describe no other data: a teacher of another
    shape must name its own, or every "best" snapshot would be chosen against CIFAR-10.
    """
    if cfg.fid_every == 0:
        return None
    from dmd.fid import CIFAR10_REF_URL, FIDError, detect, load_detector, load_ref

    shape = (teacher.img_resolution, teacher.img_channels, teacher.label_dim)
    if cfg.fid_ref is None and (shape[:2] != (32, 3) or shape[2] not in (0, 10)):
        raise TrainError(
            f"--fid-every needs --fid-ref for this teacher ({shape[0]}x{shape[0]}, {shape[1]} channels, {shape[2]} "
            "classes): the default reference is EDM's CIFAR-10 statistics; make the data's with `python -m dmd fid "
            "ref --data DATASET --dest REF.npz`"
        )
    try:
        load = partial(load_detector, cfg.fid_detector, cache_dir=cfg.cache_dir, device=device, flag="--fid-detector")
        detector = dist.main_first(load)
    except FIDError as e:
        raise TrainError(f"--fid-detector: {e}") from e
    try:
        ref = dist.main_first(partial(load_ref, cfg.fid_ref or CIFAR10_REF_URL, cache_dir=cfg.cache_dir))
    except FIDError as e:
        raise TrainError(f"--fid-ref: {e}") from e
    try:  # two black images through the detector: its features must be the reference's
        dim = detect(detector, np.zeros((2, shape[0], shape[0], shape[1]), np.uint8), device).shape[1]
    except Exception as e:  # the detector is the user's file: whatever stops it is that file's fault
        raise TrainError(f"--fid-detector: the detector fails on {shape[0]}x{shape[0]} images ({e})") from e
    if dim != ref[0].shape[0]:
        raise TrainError(
            f"--fid-ref holds statistics of {ref[0].shape[0]}-d features but --fid-detector gives {dim}-d features; "
            "make the reference with the same detector"
        )
    return detector, ref


def compute_fid(cfg, net, fid, device):
    """FID of `net` as the run's generator (eval mode, no grad) over seeds 0..fid_num-1; the same on every rank."""
    from dmd.fid import generator_fid
    from dmd.generate import DMDGenerator

    detector, ref = fid
    generator = DMDGenerator(net=net, sigmas=list(cfg.generator_sigmas))
    return generator_fid(
        lambda seeds, class_ids: generator.generate_batch(seeds=seeds, class_ids=class_ids),
        ref,
        seeds=range(cfg.fid_num),
        label_dim=net.label_dim,
        detector=detector,
        batch_size=cfg.batch_size,
        device=device,
    )


def save_grid(path, rows, n, *, step, kimg, labels):
    """Write the sample grid: one row per entry of `rows` ({name: images}), `n` images each, classes named from
    `labels` ({name: one-hot (B, label_dim), or None when unconditional}), the step and kimg in the title."""
    images = torch.cat([r[:n].detach().float().cpu() for r in rows.values()])
    class_ids = None
    if all(labels[name] is not None for name in rows):
        class_ids = torch.cat([labels[name][:n].argmax(1).cpu() for name in rows])
    grid = make_grid(images, nrow=n, row_labels=list(rows), class_ids=class_ids, title=f"step {step}, {kimg:.3f} kimg")
    atomic_save_image(grid, path)
    return grid


def snapshot_info(cfg, step):
    """The fields besides the weights that every snapshot of this run carries."""
    return dict(generator_sigmas=cfg.generator_sigmas, step=step, config=cfg.to_dict())


def write_checkpoint(run_dir, cfg, step, *, nets, streams, run):
    """Write training-state-{step} and network-snapshot-{step} (the EMA of G if any), then prune old ones.

    `nets` holds G, mu_fake, G_ema, the head and the optimisers, `streams` the data streams by state key, `run` the
    identity and counters a state records. A write that fails (a full disk) leaves the previous checkpoints as they
    were and stops the run with one line.
    """
    positions = {key: None if stream is None else stream.state_dict() for key, stream in streams.items()}
    try:
        save_training_state(state_path(run_dir, step), **nets, step=step, positions=positions, run=run)
        save_snapshot(snapshot_path(run_dir, step), nets["G_ema"] or nets["G"], **snapshot_info(cfg, step))
    except OSError as e:
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
        last = find_latest_state(run_dir)
        raise TrainError(
            f"cannot write the checkpoint of step {step} in {run_dir}: {reason}; the last complete checkpoint, "
            f"{last or 'none'}, is intact (free space, then continue with --resume auto)"
        ) from e
    prune_checkpoints(run_dir, cfg.keep_last)


def open_logger(cfg, run_dir, start_step, images_per_step, summary):
    """On rank 0: start the trackers asked for, write config.json, cut stats.jsonl back to `start_step`, print the
    run's `summary` lines (None: none) and write the whole config to log.txt; None on other ranks. A tracker that
    cannot start fails before any file of the run is written."""
    if not dist.is_main():
        return None
    trackers = []
    try:
        if cfg.log_neptune:
            trackers.append(NeptuneLogger(cfg.to_dict()))
        if cfg.log_tensorboard:
            # Events of earlier files past the state's step are of steps this run redoes: TensorBoard hides them.
            trackers.append(TensorBoardLogger(run_dir, purge_step=start_step * images_per_step + 1))
        if cfg.log_wandb:
            trackers.append(WandbLogger(run_dir, cfg.to_dict()))
    except Exception:
        for tracker in trackers:
            tracker.close()
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.to_json(), run_dir / "config.json")
    logger = StatsLogger(run_dir, trackers, hide=losses_off(cfg))
    logger.truncate_after(start_step)
    logger.echo(f"Training config:\n{cfg.to_json()}", console=False)  # every setting: log.txt and config.json
    for line in summary or ():
        logger.echo(line)
    return logger


def _count(value):
    """A parameter count in words: 55.7M, 312.5k."""
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"


def run_summary(cfg, teacher, pairs, real, device):
    """The run at a glance, as EDM's train.py prints it before training: teacher, data, method, processes and
    batch, precision and device, output folder (config.json and log.txt hold every setting)."""
    world, B = dist.get_world_size(), cfg.batch_size
    classes = f"{teacher.label_dim} classes" if teacher.label_dim else "unconditional"
    unet = type(getattr(teacher, "model", teacher)).__name__
    params = _count(sum(p.numel() for p in teacher.parameters()))
    data = []
    if pairs is not None:
        data.append(f"{len(pairs):,} teacher pairs ({cfg.data_path})")
    if real is not None:
        data.append(f"{real.num_images:,} real images ({cfg.real_data}{', x-flipped too' if cfg.xflip else ''})")
    losses = [name for name, on in (("DM", cfg.lambda_dm), ("regression", cfg.lambda_reg)) if on]
    losses += ["GAN"] if cfg.gan_weight_gen else []
    sigmas = ", ".join(f"{s:g}" for s in cfg.generator_sigmas)
    steps = "one step" if len(cfg.generator_sigmas) == 1 else f"{len(cfg.generator_sigmas)} steps"
    duration = f"{cfg.max_steps:,} steps" if cfg.max_steps is not None else f"{cfg.epochs} epochs of the pairs"
    rows = {
        "Teacher": f"{type(teacher).__name__} ({unet}), {teacher.img_resolution}x{teacher.img_resolution}, "
        f"{teacher.img_channels} channels, {classes}, {params} parameters ({cfg.model_path})",
        "Data": "; ".join(data) or "none (distribution matching needs no data)",
        "Method": f"--recipe {cfg.recipe}: {' + '.join(losses)}, {cfg.fake_steps_per_gen} fake-score step(s) per G "
        f"step; G in {steps} (sigmas {sigmas}); {duration}",
        "Batch": f"{B} per process x {world} process(es) = global batch {B * world}",
        "Precision": f"{cfg.precision} on {device.type}" + (f" ({dist.backend()})" if world > 1 else ""),
        "Output": f"{cfg.output_dir} (config.json and log.txt hold every setting)",
    }
    width = max(map(len, rows)) + 2
    return [f"{key + ':':<{width}}{value}" for key, value in rows.items()]


def recorded_elapsed(state, path):
    """The training time in seconds a state records (0 in states written before it was recorded)."""
    value = state.get("elapsed_s", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise TrainError(f"--resume: {path}: elapsed_s {value!r} is not a duration in seconds")
    return float(value)


def clock_fields(done, n, elapsed_s):
    """The fields every stats.jsonl record carries: images seen, the run's training time (across resumes), and the
    wall clock as Unix time (EDM's `timestamp`)."""
    return dict(kimg=done * n / 1000, elapsed_s=elapsed_s, timestamp=time.time())


def final_line(run_dir, done, num_steps, stopped):
    """The run's last console line: its newest snapshot and the command that samples from it."""
    snapshots = list_checkpoints(run_dir, "network-snapshot")
    end = f"{'Stopped' if stopped else 'Finished'} at step {done}/{num_steps}"
    if not snapshots:
        return f"{end}; no network snapshot was written (the last steps were not finite)"
    network, outdir, grid = (shlex.quote(str(p)) for p in (snapshots[-1], run_dir / "samples", run_dir / "samples.png"))
    command = f"python -m dmd generate --network {network} --output-dir {outdir} --seeds 0-63 --grid {grid}"
    return f"{end}; snapshot {snapshots[-1]}; sample with: {command}"


# ----------------------------------------------------------------------------
# The loop.


def losses_off(cfg):
    """The losses a run has switched off: left out of its console lines and trackers (stats.jsonl keeps them, at 0)."""
    off = set() if cfg.lambda_reg > 0 else {"loss_reg"}
    off |= set() if cfg.lambda_dm > 0 else {"loss_dm", "loss_fake"}
    off |= set() if cfg.gan_weight_gen > 0 else {"loss_gan", "loss_disc"}
    return off


def set_hyperparameters(opt, lr, cfg):
    """Give every parameter group of an AdamW the run's settings (a restored optimiser state brings its own)."""
    for group in opt.param_groups:
        group.update(lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_parts(cfg, mu_real, reg_loss, pair_stream, real_stream, device):
    """The students G and mu_fake (copies of the teacher; all three U-Nets in the run's precision, not the pickle's
    fp16), their losses and optimisers as the StepParts of the two updates, and the EMA of G (or None)."""
    from dmd.edm.precond import copy_network

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    G, mu_fake = student_copy(mu_real, cfg.dropout, device), student_copy(mu_real, cfg.dropout, device)
    for net in (mu_real, G, mu_fake):
        prepare_network(net, dtype, cfg)
    G_ema = copy_network(G).to(device).eval().requires_grad_(False) if cfg.ema_halflife_kimg > 0 else None
    rows, n = rank_rows(cfg.batch_size), cfg.batch_size * dist.get_world_size()
    dm_loss, fake_loss, gan_loss = build_losses(cfg, mu_real, mu_fake, rows, device)
    head = None if gan_loss is None else gan_loss.head
    fake_params = list(mu_fake.parameters()) + ([] if head is None else list(head.parameters()))  # DMD2: one AdamW
    adamw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)  # fused: skips a bad step on the device
    opt_G = torch.optim.AdamW(G.parameters(), lr=cfg.lr_gen, **adamw)
    opt_fake = torch.optim.AdamW(fake_params, lr=cfg.lr_fake, **adamw)
    parts = StepParts(
        cfg=cfg,
        mu_real=mu_real,
        G=G,
        G_ddp=G,
        mu_fake=mu_fake,
        fake_ddp=mu_fake,
        head=head,
        opt_G=opt_G,
        opt_fake=opt_fake,
        fake_params=fake_params,
        dm_loss=dm_loss,
        fake_loss=fake_loss,
        reg_loss=reg_loss,
        gan_loss=gan_loss,
        pair_stream=pair_stream,
        real_stream=real_stream,
        rows=rows,
        n=n,
        device=device,
    )
    return parts, G_ema


def grid_rows(parts, gen, step):
    """The rows of a training grid ({name: this rank's images}) and their labels ({name: one-hot or None}): G's
    samples, mu_real and mu_fake at the DM loss's noised samples, and G(z_ref) beside y_ref when it regresses."""
    cfg, rows, G = parts.cfg, parts.rows, parts.G
    c = take(gen.c, rows)
    x = gen.x
    if cfg.lambda_dm == 0:  # regression only: G's samples of the step's z were not made; make them now
        with torch.no_grad():
            x = G(*generated(G, gen.z, c, cfg, step, "G", gen.level, rows, parts.n), c)
    images, labels = {"G(z)": x}, {"G(z)": c}
    if gen.aux is not None:
        images.update({"mu_real(x_t)": gen.aux["p_real"][rows], "mu_fake(x_t)": gen.aux["p_fake"][rows]})
        labels.update({"mu_real(x_t)": c, "mu_fake(x_t)": c})
    if gen.pairs is not None:
        x_ref, y_ref, c_ref = gen.pairs
        images.update({"G(z_ref)": x_ref, "y_ref": y_ref})
        labels.update({"G(z_ref)": c_ref, "y_ref": c_ref})
    return images, labels


# What the checks before a run found: the run folder and resume source, the teacher and the data (checked against
# each other), the run's length, global batches and fingerprints, and the changes a resume makes.
@dataclass
class Inputs:
    run_dir: Path
    resume_path: Optional[Path]  # the training state to continue, or None for a new run
    state: Optional[dict]  # its contents
    changes: dict  # {field: (old, new)} of a resume
    mu_real: torch.nn.Module  # the teacher, frozen
    pairs: Any  # PairDataset or None
    real: Any  # ImageDataset or None
    streams: dict  # {state key: BatchStream or None}: data_position (pairs), real_position (real images)
    num_steps: int
    n: int  # global batch
    batches: dict  # the global batches a training state records
    fingerprints: dict  # teacher, pairs, real: what the run reads
    start: int  # the step the run starts at
    elapsed_before: float  # the training time in seconds the resumed state records (0 for a new run)
    reg_loss: Any  # the regression loss, its LPIPS weights loaded (None at --lambda-reg 0)
    fid: Optional[tuple]  # (detector, reference statistics) of --fid-every, or None


def on_main(fn):
    """Call fn() on rank 0 alone; a CheckpointError it raises is raised on every rank, so that no rank waits for one
    that stopped."""
    error = None
    if dist.is_main():
        try:
            fn()
        except CheckpointError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)


def check_inputs(cfg, device):
    """Check the run folder (no live run in it), the resume source, the teacher and the data against each other, and
    load what the run will need (LPIPS weights, the FID detector and reference, downloading URLs), before any
    training or write; return what they are as Inputs."""
    run_dir = Path(cfg.output_dir)
    on_main(RunLock(run_dir).check)
    check_trackers(cfg.log_neptune, cfg.log_tensorboard, cfg.log_wandb)
    resume_path = resolve_resume(cfg, run_dir)
    state = None if resume_path is None else load_training_state(resume_path, auto=cfg.resume == "auto")
    mu_real, teacher_sha256 = load_teacher(cfg, device)
    pairs, real = open_datasets(cfg, mu_real)
    B, B_reg = cfg.batch_size, cfg.reg_batch_size or cfg.batch_size
    reg_flag = "--reg-batch-size" if cfg.reg_batch_size else "--batch-size"
    pair_stream = open_stream(pairs, B_reg, reg_flag, "pairs", cfg, device)
    real_stream = open_stream(real, B, "--batch-size", "real images", cfg, device)
    num_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * pair_stream.steps_per_epoch
    world = dist.get_world_size()
    batches = {"batch_size": B * world, "reg_batch_size": B_reg * world}  # global batches, fixed in a run
    fingerprints = {"teacher": teacher_sha256}
    for key, path in (("pairs", cfg.data_path), ("real", cfg.real_data)):
        if path is not None:
            fingerprints[key] = data_fingerprint(path)
    changes = {}
    if state is not None:
        changes = check_same_run(state, resume_path, cfg, global_batch=batches, fingerprints=fingerprints)
    return Inputs(
        run_dir=run_dir,
        resume_path=resume_path,
        state=state,
        changes=changes,
        mu_real=mu_real,
        pairs=pairs,
        real=real,
        streams={"data_position": pair_stream, "real_position": real_stream},  # by their keys in a training state
        num_steps=num_steps,
        n=B * world,
        batches=batches,
        fingerprints=fingerprints,
        start=0 if state is None else state["step"],
        elapsed_before=0.0 if state is None else recorded_elapsed(state, resume_path),
        reg_loss=build_regression(cfg, device),
        fid=setup_fid(cfg, mu_real, device),
    )


def train(cfg, dry_run=False, summary=True):
    """Run DMD (or DMD2) training as `cfg` says; return the last step and whether a signal stopped the run early.

    With `dry_run`, check the inputs (run folder, resume source, teacher, pairs, real images and that they fit) and
    return before any training work or any file is written. `summary` False keeps the run's summary off the console
    (the demo prints its own). The run folder is locked while the run trains (checkpoint.RunLock).
    """
    device = setup_device(cfg)
    inputs = check_inputs(cfg, device)
    if dry_run or inputs.start >= inputs.num_steps:  # nothing to train: the run folder stays as it is
        return {"step": inputs.start, "start": inputs.start, "num_steps": inputs.num_steps, "stopped": False}
    lock = RunLock(inputs.run_dir)
    on_main(lock.acquire)
    try:
        return run(cfg, inputs, device, summary)
    finally:
        lock.release()
        dist.shutdown()


def run(cfg, inputs, device, summary):
    """Build the students, restore a resumed run's state, train to the last step with maintenance; see train()."""
    run_dir, state, start, num_steps, n = inputs.run_dir, inputs.state, inputs.start, inputs.num_steps, inputs.n
    streams, mu_real, resume_path = inputs.streams, inputs.mu_real, inputs.resume_path

    # The students, their losses and optimisers, restored from the training state if the run resumes.
    parts, G_ema = build_parts(
        cfg, mu_real, inputs.reg_loss, streams["data_position"], streams["real_position"], device
    )
    fid = inputs.fid
    nets = dict(G=parts.G, mu_fake=parts.mu_fake, G_ema=G_ema, head=parts.head)
    nets.update(opt_G=parts.opt_G, opt_fake=parts.opt_fake)
    if state is not None:
        restore(state, resume_path, **nets, streams=streams)
    set_hyperparameters(parts.opt_G, cfg.lr_gen, cfg)  # a change allowed on resume reaches the optimiser
    set_hyperparameters(parts.opt_fake, cfg.lr_fake, cfg)
    best_fid = float("inf") if state is None else state["best_fid"]
    lines = run_summary(cfg, mu_real, inputs.pairs, inputs.real, device) if summary else None
    logger = open_logger(cfg, run_dir, start, n, lines)
    if logger is not None and state is not None:
        changes = inputs.changes.items()
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes if k not in ("resume", "allow_change"))
        logger.echo(f"Resuming from {resume_path} at step {start}" + (f"; changed: {changed}" if changed else ""))
    elif logger is not None and cfg.resume == "auto":
        logger.echo(f"No training state in {run_dir}: starting at step 0")
    counts = BadSteps(device, total=0 if state is None else state["bad_steps"])

    def elapsed():
        """The run's training time: what the resumed state recorded plus this process's time in the loop."""
        return inputs.elapsed_before + time.monotonic() - loop_start

    def checkpoint(step):
        run = dict(config=cfg.to_dict(), sigma_G=float(cfg.generator_sigmas[0]), bad_steps=counts.read()[1])
        run.update(best_fid=float(best_fid), global_batch=inputs.batches, fingerprints=inputs.fingerprints)
        run.update(elapsed_s=elapsed())
        write_checkpoint(run_dir, cfg, step, nets=nets, streams=streams, run=run)

    parts.G_ddp, parts.fake_ddp = wrap_ddp(parts.G, device), wrap_ddp(parts.mu_fake, device)
    beta_ema = 0.5 ** (n / (cfg.ema_halflife_kimg * 1000)) if G_ema is not None else None
    zero = torch.zeros((), device=device)
    use_dm, hide = cfg.lambda_dm > 0, losses_off(cfg)
    window, done, saved = Window(device, STAT_NAMES), start, start
    show_bar = dist.is_main() and cfg.progress
    bar = tqdm(initial=start, total=num_steps, unit="step", disable=not show_bar, dynamic_ncols=True)
    loop_start = time.monotonic()
    try:
        with StopSignals(device) as stop:
            for step in range(start, num_steps):
                torch.manual_seed(step_seed(cfg.seed, step, f"rank{dist.get_rank()}"))  # dropout, if any

                # Generator step.
                gen = generator_step(parts, step)

                # Fake-score step (regression-only training, lambda_dm 0, has no use for mu_fake and skips it).
                loss_fake, loss_disc, norm_fake, bad_fake = (
                    fake_score_step(parts, step, gen.x, gen.c) if use_dm else (zero, zero, zero, zero)
                )

                # Maintenance: EMA, statistics, grid, FID, checkpoint, stop conditions. The statistics stay on the
                # device and are read (one transfer, one all-reduce) at logging steps only.
                done = step + 1
                counts.add(torch.maximum(gen.bad, bad_fake))
                if G_ema is not None:
                    update_ema(G_ema, parts.G, beta_ema)
                window.add([*gen.losses.values(), loss_fake, loss_disc, gen.norm, norm_fake])
                log_now = done % cfg.log_every == 0 or done == num_steps
                if log_now:
                    means = window.flush(n)  # on every rank: it all-reduces
                    streak, bad_total = counts.read()
                    if logger is not None:
                        stats = dict(means, **clock_fields(done, n, elapsed()), s_per_kimg=1000 / means["img_per_s"])
                        stats.update(
                            lr_gen=parts.opt_G.param_groups[0]["lr"], lr_fake=parts.opt_fake.param_groups[0]["lr"]
                        )
                        stats.update(mem_gib=memory_gib(device), bad_steps=bad_total)
                        logger.log(done, stats)
                        logger.echo(format_stats(done, num_steps, stats, hide=hide))
                    if streak >= cfg.max_bad_steps:
                        last = find_latest_state(run_dir)
                        raise TrainError(
                            f"stopping at step {done}: {streak} steps in a row had a non-finite loss or gradient "
                            f"(--max-bad-steps {cfg.max_bad_steps}); last good checkpoint: {last or 'none'}"
                        )
                if logger is not None and cfg.image_every and done % cfg.image_every == 0:
                    images, labels = grid_rows(parts, gen, step)
                    grid_path, kimg = run_dir / f"grid-{done:06d}.png", done * n / 1000
                    grid = save_grid(grid_path, images, min(cfg.batch_size, 8), step=done, kimg=kimg, labels=labels)
                    logger.image(done, kimg, "samples", grid)
                if fid is not None and done % cfg.fid_every == 0:
                    value = compute_fid(cfg, G_ema or parts.G, fid, device)
                    if logger is not None:
                        record = dict(fid=value, **clock_fields(done, n, elapsed()))
                        logger.log(done, record)
                        best = " (best)" if value < best_fid else ""
                        logger.echo(f"{format_head(done, num_steps, record)} | FID {value:.3f}{best}")
                        if value < best_fid:
                            snapshot = run_dir / "network-snapshot-best.pt"
                            save_snapshot(snapshot, G_ema or parts.G, **snapshot_info(cfg, done))
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
        bar.close()  # before the last line, so that the line is the last the console shows
        if logger is not None:
            logger.echo(final_line(run_dir, done, num_steps, stopped))
    except Exception as e:
        if logger is not None:  # the CLI prints our errors as this line; unexpected ones keep their type
            known = isinstance(e, (TrainError, BatchError, LoggerError, OSError))
            logger.echo(f"Error: {e}" if known else f"Error: {type(e).__name__}: {e}", console=False)
        raise
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return {"step": done, "start": start, "num_steps": num_steps, "stopped": stopped}
