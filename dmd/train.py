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
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from dmd.batches import step_seed, take
from dmd.build import (
    TrainError,
    build_parts,
    build_regression,
    load_teacher,
    load_vae_codec,
    open_datasets,
    open_stream,
    setup_device,
    setup_fid,
    wrap_ddp,
)
from dmd.checkpoint import (
    CheckpointError,
    RunLock,
    best_snapshot_path,
    check_same_run,
    data_fingerprint,
    ema_suffix,
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
from dmd.config import ema_beta
from dmd.edm2.vae import latent_info
from dmd.generator import SigmaError, check_sigmas
from dmd.steps import STAT_NAMES, BatchError, fake_score_step, generated, generator_step
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


def compute_fid(cfg, net, fid, device, codec=None):
    """FID of `net` as the run's generator (eval mode, no grad) over seeds 0..fid_num-1, a latent generator's
    samples decoded by the VAE `codec`; the same on every rank."""
    from dmd.fid import generator_fid
    from dmd.generate import DMDGenerator

    detector, ref = fid
    generator = DMDGenerator(net=net, sigmas=list(cfg.generator_sigmas), vae=codec)
    return generator_fid(
        lambda seeds, class_ids: generator.generate_batch(seeds=seeds, class_ids=class_ids),
        ref,
        seeds=range(cfg.fid_num),
        label_dim=net.label_dim,
        detector=detector,
        batch_size=cfg.batch_size,
        device=device,
    )


def fid_fields(values):
    """The stats.jsonl fields of one FID evaluation ({network name: FID}): `fid` for a run's one network,
    fid_<name> per EMA with several."""
    if len(values) == 1:
        return {"fid": next(iter(values.values()))}
    return {f"fid_{name}": value for name, value in values.items()}


def fid_text(values, best):
    """The console's FID part: 'FID 12.345 (best)', or per EMA 'FID 0.9999 12.345 (best), 0.99995 13.001'."""
    parts = []
    for name, value in values.items():
        named = f"{name} " if len(values) > 1 else ""
        parts.append(f"{named}{value:.3f}" + (" (best)" if value < best[name] else ""))
    return "FID " + ", ".join(parts)


def save_grid(path, rows, n, *, step, kimg, labels, codec=None):
    """Write the sample grid: one row per entry of `rows` ({name: images}), `n` images each, classes named from
    `labels` ({name: one-hot (B, label_dim), or None when unconditional}), the step and kimg in the title; a latent
    run's rows decoded by the VAE `codec`."""
    images = torch.cat([r[:n].detach().float() for r in rows.values()])
    images = (images if codec is None else codec.decode_to_unit(images)).cpu()
    class_ids = None
    if all(labels[name] is not None for name in rows):
        class_ids = torch.cat([labels[name][:n].argmax(1).cpu() for name in rows])
    grid = make_grid(images, nrow=n, row_labels=list(rows), class_ids=class_ids, title=f"step {step}, {kimg:.3f} kimg")
    atomic_save_image(grid, path)
    return grid


def snapshot_info(cfg, step):
    """The fields besides the weights that every snapshot of this run carries."""
    return dict(generator_sigmas=cfg.generator_sigmas, step=step, config=cfg.to_dict())


def inference_networks(G, emas):
    """The networks a run snapshots and scores, {name: network}: its EMAs by --ema name, or G alone (name None)."""
    return dict(emas) if emas else {None: G}


def write_checkpoint(run_dir, cfg, step, *, nets, streams, run):
    """Write training-state-{step} and network-snapshot-{step} (one per EMA of G, or G without one), then prune old
    ones. Every rank calls it (--fsdp's shards are gathered), rank 0 writes.

    `nets` holds G, mu_fake, the EMAs ({name: network}), the head and the optimisers, `streams` the data streams by
    state key, `run` the identity and counters a state records. A write that fails (a full disk) leaves the previous
    checkpoints as they were and stops the run with one line.
    """
    positions = {key: None if stream is None else stream.state_dict() for key, stream in streams.items()}
    try:
        save_training_state(state_path(run_dir, step), **nets, step=step, positions=positions, run=run)
        for name, net in inference_networks(nets["G"], nets["emas"]).items():
            path = snapshot_path(run_dir, step, ema_suffix(cfg.ema, name))
            save_snapshot(path, net, **snapshot_info(cfg, step), ema=name)
    except OSError as e:
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
        last = find_latest_state(run_dir)
        raise TrainError(
            f"cannot write the checkpoint of step {step} in {run_dir}: {reason}; the last complete checkpoint, "
            f"{last or 'none'}, is intact (free space, then continue with --resume auto)"
        ) from e
    if dist.is_main():
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
    unet = type(teacher.backbone).__name__
    params = _count(sum(p.numel() for p in teacher.parameters()))
    data = []
    if pairs is not None:
        data.append(f"{len(pairs):,} teacher pairs ({cfg.data_path})")
    if real is not None:
        what = "real VAE latents" if latent_info(teacher) else "real images"  # the teacher fixes the data's kind
        data.append(f"{real.num_images:,} {what} ({cfg.real_data}{', x-flipped too' if cfg.xflip else ''})")
    losses = [name for name, on in (("DM", cfg.lambda_dm), ("regression", cfg.lambda_reg)) if on]
    losses += ["GAN"] if cfg.gan_weight_gen else []
    sigmas = ", ".join(f"{s:g}" for s in cfg.generator_sigmas)
    steps = "one step" if len(cfg.generator_sigmas) == 1 else f"{len(cfg.generator_sigmas)} steps"
    duration = f"{cfg.max_steps:,} steps" if cfg.max_steps is not None else f"{cfg.epochs} epochs of the pairs"
    guided = f"; guided by {cfg.guide_network}, w = {cfg.guidance:g}" if cfg.guide_network else ""
    space, info = f"{teacher.img_channels} channels", latent_info(teacher)
    if info is not None:
        space = f"{teacher.img_channels}-channel latents of {info.vae_name} (decoded by {cfg.vae or info.vae_name})"
    rows = {
        "Teacher": f"{type(teacher).__name__} ({unet}), {teacher.img_resolution}x{teacher.img_resolution}, "
        f"{space}, {classes}, {params} parameters ({cfg.model_path}){guided}",
        "Data": "; ".join(data) or "none (distribution matching needs no data)",
        "Method": f"--recipe {cfg.recipe}: {' + '.join(losses)}, {cfg.fake_steps_per_gen} fake-score step(s) per G "
        f"step; G in {steps} (sigmas {sigmas}); {duration}",
        "Batch": f"{B} per process x {world} process(es) = global batch {B * world}"
        + (f"; at most {cfg.batch_gpu} per pass (--batch-gpu), gradients accumulated" if cfg.batch_gpu else ""),
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


def final_line(run_dir, done, num_steps, stopped, emas=()):
    """The run's last console line: its newest snapshot (of the first of its EMAs `emas`) and the command that
    samples from it."""
    snapshots = list_checkpoints(run_dir, "network-snapshot", ema_suffix(emas, emas[0]) if emas else "")
    end = f"{'Stopped' if stopped else 'Finished'} at step {done}/{num_steps}"
    if not snapshots:
        return f"{end}; no network snapshot was written (the last steps were not finite)"
    network, outdir, grid = (shlex.quote(str(p)) for p in (snapshots[-1], run_dir / "samples", run_dir / "samples.png"))
    command = f"python -m dmd generate --network {network} --output-dir {outdir} --seeds 0-63 --grid {grid}"
    return f"{end}; snapshot {snapshots[-1]}; sample with: {command}"


# ----------------------------------------------------------------------------
# The loop.


def losses_off(cfg):
    """The losses a run has switched off: left out of its console lines and trackers (stats.jsonl keeps them, at 0;
    f-distill's weights at 1)."""
    off = set() if cfg.lambda_reg > 0 else {"loss_reg"}
    off |= set() if cfg.lambda_dm > 0 else {"loss_dm", "loss_fake"}
    off |= set() if cfg.gan_weight_gen > 0 else {"loss_gan", "loss_disc"}
    off |= set() if cfg.divergence != "rkl" else {"h_min", "h_mean", "h_max"}  # all 1: DMD2's unweighted DM term
    return off


def set_hyperparameters(opt, lr, cfg):
    """Give every parameter group of an AdamW the run's settings (a restored optimiser state brings its own)."""
    for group in opt.param_groups:
        group.update(lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


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
    mu_real: torch.nn.Module  # the real score: the teacher, or the teacher guided (--guide-network); frozen
    teacher: torch.nn.Module  # the teacher itself, which G and mu_fake copy
    pairs: Any  # PairDataset or None
    real: Any  # ImageDataset or None
    streams: dict  # {state key: BatchStream or None}: data_position (pairs), real_position (real images)
    num_steps: int
    n: int  # global batch
    batches: dict  # the global batches a training state records
    fingerprints: dict  # teacher, guide, pairs, real: what the run reads
    start: int  # the step the run starts at
    elapsed_before: float  # the training time in seconds the resumed state records (0 for a new run)
    reg_loss: Any  # the regression loss, its LPIPS weights loaded (None at --lambda-reg 0)
    codec: Any  # a latent teacher's VAE (LatentCodec), which decodes grids and FID images; None on pixels
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
    # --fsdp: the state's tensors stay in the file, mapped, so K ranks share one copy in the page cache.
    state = None if resume_path is None else load_training_state(resume_path, auto=cfg.resume == "auto", mmap=cfg.fsdp)
    mu_real, teacher, fingerprints = load_teacher(cfg, device)
    try:  # inside the teacher's noise range, where it declares one (VP: ~0.001 to ~152)
        check_sigmas(cfg.generator_sigmas, "--generator-sigmas", mu_real)
    except SigmaError as e:
        raise TrainError(str(e)) from None
    pairs, real = open_datasets(cfg, teacher)  # the teacher, not mu_real: a guided one has no encoder_info
    B, B_reg = cfg.batch_size, cfg.reg_batch_size or cfg.batch_size
    reg_flag = "--reg-batch-size" if cfg.reg_batch_size else "--batch-size"
    pair_stream = open_stream(pairs, B_reg, reg_flag, "pairs", cfg, device)
    real_stream = open_stream(real, B, "--batch-size", "real images", cfg, device)
    num_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * pair_stream.steps_per_epoch
    world = dist.get_world_size()
    batches = {"batch_size": B * world, "reg_batch_size": B_reg * world}  # global batches, fixed in a run
    if cfg.fsdp and world > 1 and cfg.fid_every and cfg.fid_num % (B * world):
        raise TrainError(
            f"--fsdp with --fid-every needs --fid-num a multiple of --batch-size x processes ({B * world}): each call "
            "of the sharded G gathers it on every process, so every process must make as many FID batches"
        )
    for key, path in (("pairs", cfg.data_path), ("real", cfg.real_data)):
        if path is not None:
            fingerprints[key] = data_fingerprint(path)
    changes = {}
    if state is not None:
        changes = check_same_run(state, resume_path, cfg, global_batch=batches, fingerprints=fingerprints)
    codec = load_vae_codec(cfg, teacher, device)
    return Inputs(
        run_dir=run_dir,
        resume_path=resume_path,
        state=state,
        changes=changes,
        mu_real=mu_real,
        teacher=teacher,
        pairs=pairs,
        real=real,
        streams={"data_position": pair_stream, "real_position": real_stream},  # by their keys in a training state
        num_steps=num_steps,
        n=B * world,
        batches=batches,
        fingerprints=fingerprints,
        start=0 if state is None else state["step"],
        elapsed_before=0.0 if state is None else recorded_elapsed(state, resume_path),
        reg_loss=build_regression(cfg, device, latent=codec is not None),
        codec=codec,
        fid=setup_fid(cfg, mu_real, device, codec),
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
    pair_stream, real_stream = streams["data_position"], streams["real_position"]
    parts, emas = build_parts(cfg, mu_real, inputs.teacher, inputs.reg_loss, pair_stream, real_stream, device)
    fid, codec = inputs.fid, inputs.codec
    nets = dict(G=parts.G, mu_fake=parts.mu_fake, emas=emas, head=parts.head, fdistill=parts.fdistill)
    nets.update(opt_G=parts.opt_G, opt_fake=parts.opt_fake)
    if state is not None:
        restore(state, resume_path, **nets, streams=streams)
    set_hyperparameters(parts.opt_G, cfg.lr_gen, cfg)  # a change allowed on resume reaches the optimiser
    set_hyperparameters(parts.opt_fake, cfg.lr_fake, cfg)
    scored = inference_networks(parts.G, emas)  # what --fid-every scores, each with its best FID so far
    best_fid = {name: float("inf") for name in scored}
    if state is not None:  # a state before several EMAs records its one network's best as best_fid
        best_fid.update(state.get("best_fids") or {next(iter(scored)): state["best_fid"]})
    lines = run_summary(cfg, inputs.teacher, inputs.pairs, inputs.real, device) if summary else None
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
        best_fids = {name: float(value) for name, value in best_fid.items()}  # best_fid: the first's, as before
        run.update(best_fid=next(iter(best_fids.values())), best_fids=best_fids)
        run.update(global_batch=inputs.batches, fingerprints=inputs.fingerprints)
        run.update(elapsed_s=elapsed())
        write_checkpoint(run_dir, cfg, step, nets=nets, streams=streams, run=run)

    if not cfg.fsdp:  # sharded networks reduce their gradients themselves
        parts.G_ddp, parts.fake_ddp = wrap_ddp(parts.G, device), wrap_ddp(parts.mu_fake, device)
    betas_ema = {name: ema_beta(name, n) for name in emas}
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
                    fake_score_step(parts, step, gen) if use_dm else (zero, zero, zero, zero)
                )

                # Maintenance: EMA, statistics, grid, FID, checkpoint, stop conditions. The statistics stay on the
                # device and are read (one transfer, one all-reduce) at logging steps only.
                done = step + 1
                counts.add(torch.maximum(gen.bad, bad_fake))
                for name, G_ema in emas.items():
                    update_ema(G_ema, parts.G, betas_ema[name])
                window.add([*gen.losses.values(), loss_fake, loss_disc, gen.norm, norm_fake, *gen.weights.values()])
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
                if cfg.image_every and done % cfg.image_every == 0 and (logger is not None or cfg.fsdp):
                    images, labels = grid_rows(parts, gen, step)  # on every rank with --fsdp: G's calls gather
                    if logger is not None:
                        grid_path, kimg = run_dir / f"grid-{done:06d}.png", done * n / 1000
                        columns = min(cfg.batch_size, 8)
                        grid = save_grid(grid_path, images, columns, step=done, kimg=kimg, labels=labels, codec=codec)
                        logger.image(done, kimg, "samples", grid)
                if fid is not None and done % cfg.fid_every == 0:
                    values = {name: compute_fid(cfg, net, fid, device, codec) for name, net in scored.items()}
                    if logger is not None:
                        record = dict(fid_fields(values), **clock_fields(done, n, elapsed()))
                        logger.log(done, record)
                        logger.echo(f"{format_head(done, num_steps, record)} | {fid_text(values, best_fid)}")
                    for name, value in values.items():
                        if value < best_fid[name]:  # the same value on every rank
                            snapshot = best_snapshot_path(run_dir, ema_suffix(cfg.ema, name))
                            save_snapshot(snapshot, scored[name], **snapshot_info(cfg, done), ema=name)
                            best_fid[name] = value
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and counts.read()[0] == 0:
                    checkpoint(done)
                    saved = done
                bar.update(1)
                if stop.requested(agree=log_now or done % STOP_CHECK_STEPS == 0):
                    break
            stopped = done < num_steps
        if done != saved and counts.read()[0] == 0:
            checkpoint(done)
        dist.barrier()
        bar.close()  # before the last line, so that the line is the last the console shows
        if logger is not None:
            logger.echo(final_line(run_dir, done, num_steps, stopped, cfg.ema))
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
