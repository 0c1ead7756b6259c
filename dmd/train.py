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
from contextlib import nullcontext
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
    """Draw the global batch's z (n, C, H, W) and one-hot labels (n, label_dim) or None, uniform over classes."""
    g = step_generator(seed, step, stream)
    z = torch.randn((n, net.img_channels, net.img_resolution, net.img_resolution), generator=g)
    labels = torch.randint(net.label_dim, (n,), generator=g) if net.label_dim > 0 else None
    return z.to(device), one_hot(labels, net.label_dim, device=device)


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
    ):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
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
            self._batches = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers))
        z_ref, y_ref, labels = next(self._batches)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        return z_ref.to(device), y_ref.to(device), labels.to(device)


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
    """A trainable copy of the teacher with its dropout replaced (G and mu_fake train with dropout 0 by default)."""
    from dmd.edm.precond import build_network

    net = build_network(type(teacher).__name__, {**teacher.init_kwargs, "dropout": dropout})
    net.load_state_dict(teacher.state_dict())
    return net.to(device).train().requires_grad_(True)


def setup_device(cfg):
    """Join torchrun's process group if any and return this rank's device; TF32 on, bf16 refused off CUDA."""
    device = dist.setup_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.precision == "bf16" and device.type != "cuda":
        raise TrainError("--precision bf16 needs a CUDA device (CPU runs use fp32)")
    return device


def wrap_ddp(net, device):
    """DDP wrapper under torchrun, the bare network otherwise (augment mappings are unused, hence the search)."""
    if not dist.is_initialized():
        return net
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def build_losses(cfg, mu_real, mu_fake, rows, device):
    """The three losses: distribution matching and fake-score on this rank's `rows`, regression (or None)."""
    from dmd.losses import DistributionMatchingLoss, FakeScoreLoss, KarrasGrid, MSERegressionLoss, RegressionLoss
    from dmd.lpips import LPIPS

    grid = KarrasGrid(T=cfg.num_timesteps)
    dm_loss = DistributionMatchingLoss(RankRows(mu_real, rows), RankRows(mu_fake, rows), grid, cfg.t_min, cfg.t_max)
    fake_loss = FakeScoreLoss(grid, sigma_sampling=cfg.fake_sigma_sampling)
    if cfg.lambda_reg == 0:
        return dm_loss, fake_loss, None
    if cfg.regression_distance == "mse":
        return dm_loss, fake_loss, MSERegressionLoss()
    weights = dict(vgg_weights=cfg.lpips_vgg, lin_weights=cfg.lpips_lin, cache_dir=cfg.cache_dir)
    try:
        lpips = LPIPS(**weights, pretrained=cfg.lpips_pretrained).to(device)
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


def clip_and_check(params, max_norm, loss):
    """Clip the gradients, and return (grad norm, whether the loss and the norm are finite on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
    return norm, bool(dist.all_reduce_mean(finite.float()) == 1)


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

    def requested(self):
        """Whether any rank got a stop signal."""
        return bool(dist.all_reduce_mean(torch.tensor(float(self.flag), device=self.device)) > 0)


# Means of the per-step statistics since the last logging step.
class Window:
    NAMES = ("loss_G", "loss_dm", "loss_reg", "loss_fake", "grad_norm_G", "grad_norm_fake")

    def __init__(self):
        self.sum, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, values):
        """Add one step's values, a tensor (len(NAMES),) already averaged over ranks."""
        self.sum = self.sum + values.double().cpu()
        self.steps += 1

    def flush(self, images_per_step):
        """Return the window's means with the throughput, and start a new window."""
        means = {k: float(v) for k, v in zip(self.NAMES, self.sum / self.steps)}
        means["img_per_s"] = images_per_step * self.steps / (time.perf_counter() - self.start)
        self.__init__()
        return means


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
    stream = None if pairs is None else PairStream(pairs, cfg.batch_size, cfg.seed, cfg.workers)
    if stream is not None and stream.steps_per_epoch == 0:
        raise TrainError(f"--batch-size: {len(pairs)} pairs hold no batch of {cfg.batch_size} per process")
    num_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * stream.steps_per_epoch
    B, n, rows = cfg.batch_size, cfg.batch_size * dist.get_world_size(), rank_rows(cfg.batch_size)
    fingerprints = {"teacher": teacher_sha256}
    if pairs is not None:
        fingerprints["pairs"] = file_fingerprint(cfg.data_path)
    changes = {}
    if state is not None:
        changes = check_same_run(state, resume_path, cfg, global_batch=n, fingerprints=fingerprints)
    if dry_run:
        return {"step": 0 if state is None else state["step"], "stopped": False}

    G, mu_fake = student_copy(mu_real, cfg.dropout, device), student_copy(mu_real, cfg.dropout, device)
    G_ema = copy_network(G).to(device).eval().requires_grad_(False) if cfg.ema_halflife_kimg > 0 else None
    adamw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_G = torch.optim.AdamW(G.parameters(), lr=cfg.lr_gen, **adamw)
    opt_fake = torch.optim.AdamW(mu_fake.parameters(), lr=cfg.lr_fake, **adamw)
    dm_loss, fake_loss, reg_loss = build_losses(cfg, mu_real, mu_fake, rows, device)
    fid = setup_fid(cfg, device)
    nets = dict(G=G, mu_fake=mu_fake, G_ema=G_ema, opt_G=opt_G, opt_fake=opt_fake)
    start = 0 if state is None else restore(state, resume_path, **nets, stream=stream)
    set_hyperparameters(opt_G, cfg.lr_gen, cfg)  # a change allowed on resume reaches the optimiser
    set_hyperparameters(opt_fake, cfg.lr_fake, cfg)
    bad_total = 0 if state is None else state["bad_steps"]
    best_fid = float("inf") if state is None else state["best_fid"]
    logger = open_logger(cfg, run_dir, start)
    if state is not None:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items() if k not in ("resume", "allow_change"))
        dist.print0(f"Resuming from {resume_path} at step {start}" + (f"; changed: {changed}" if changed else ""))
    elif cfg.resume == "auto":
        dist.print0(f"No training state in {run_dir}: starting at step 0")

    def checkpoint(step):
        run = dict(config=cfg.to_dict(), sigma_G=float(cfg.generator_sigma), bad_steps=bad_total)
        run.update(best_fid=float(best_fid), global_batch=n, fingerprints=fingerprints)
        write_checkpoint(run_dir, cfg, step, nets=nets, stream=stream, run=run)

    G_ddp, fake_ddp = wrap_ddp(G, device), wrap_ddp(mu_fake, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    beta_ema = 0.5 ** (n / (cfg.ema_halflife_kimg * 1000)) if G_ema is not None else None
    zero = torch.zeros((), device=device)
    use_dm = cfg.lambda_dm > 0
    window, bad_streak, done, saved = Window(), 0, start, start
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
                    z_ref, y_ref, k_ref = stream.next(device)
                    c_ref = one_hot(k_ref, mu_real.label_dim, device=device)
                    z_in, c_in = torch.cat([z_in, z_ref]), None if c is None else torch.cat([c_in, c_ref])
                with autocast:
                    x_all = one_step(G_ddp, z_in, c_in, sigma=cfg.generator_sigma)  # (B_dm + B or B_dm, C, H, W)
                    x, x_ref = x_all[:B_dm], x_all[B_dm:]
                    loss_dm, aux = zero, None
                    if use_dm:
                        dm_gen = step_generator(cfg.seed, step, "dm", device)
                        loss_dm, aux = dm_loss(spread(x, rows, n), c, generator=dm_gen)
                        loss_dm = loss_dm[rows].mean()
                    loss_reg = zero if reg_loss is None else reg_loss(x_ref, y_ref).mean()
                    loss_G = cfg.lambda_dm * loss_dm + cfg.lambda_reg * loss_reg
                loss_G.backward()
                norm_G, ok_G = clip_and_check(G.parameters(), cfg.grad_clip, loss_G)
                if ok_G:
                    opt_G.step()
                opt_G.zero_grad(set_to_none=True)

                # Fake-score step: mu_fake denoises G's samples, x first, then fresh batches from the updated G.
                # Regression-only training (lambda_dm 0) has no use for mu_fake and skips it.
                x_fake = spread(x.detach(), rows, n) if use_dm else None
                c_fake, ok_fake, loss_fake_sum, norm_fake = c, True, zero, zero
                for k in range(cfg.fake_steps_per_gen if use_dm else 0):
                    if k > 0:
                        z, c_fake = draw_generator_inputs(mu_real, cfg.seed, step, f"fake{k}", n, device)
                        with torch.no_grad(), autocast:
                            x_fake = spread(one_step(G, z[rows], take(c_fake, rows), cfg.generator_sigma), rows, n)
                    with autocast:
                        fake_gen = step_generator(cfg.seed, step, f"fake-loss{k}", device)
                        loss_fake = fake_loss(RankRows(fake_ddp, rows), x_fake, c_fake, generator=fake_gen)[rows].mean()
                    loss_fake.backward()
                    norm_fake, ok = clip_and_check(mu_fake.parameters(), cfg.grad_clip, loss_fake)
                    if ok:
                        opt_fake.step()
                    opt_fake.zero_grad(set_to_none=True)
                    ok_fake, loss_fake_sum = ok_fake and ok, loss_fake_sum + loss_fake.detach()

                # Maintenance: EMA, statistics, grid, checkpoint, stop conditions.
                done, good = step + 1, ok_G and ok_fake
                bad_streak, bad_total = 0 if good else bad_streak + 1, bad_total + (not good)
                if G_ema is not None:
                    update_ema(G_ema, G, beta_ema)
                values = [loss_G, loss_dm, loss_reg, loss_fake_sum / cfg.fake_steps_per_gen, norm_G, norm_fake]
                window.add(dist.all_reduce_mean(torch.stack([v.detach().float() for v in values])))
                if logger is not None and (done % cfg.log_every == 0 or done == num_steps):
                    stats = dict(window.flush(n), kimg=done * n / 1000, mem_gib=memory_gib(device), bad_steps=bad_total)
                    logger.log(done, stats)
                    bar.write(format_stats(done, num_steps, stats))
                if logger is not None and cfg.image_every and done % cfg.image_every == 0:
                    if not use_dm:
                        with torch.no_grad(), autocast:
                            x = one_step(G, z[rows], take(c, rows), cfg.generator_sigma)
                    rows_out = {"G(z)": x}
                    if aux is not None:
                        rows_out.update({"mu_real(x_t)": aux["p_real"][rows], "mu_fake(x_t)": aux["p_fake"][rows]})
                    if reg_loss is not None:
                        rows_out.update({"G(z_ref)": x_ref, "y_ref": y_ref})
                    save_grid(run_dir / f"grid-{done:06d}.png", rows_out, n=min(B, 8))
                if bad_streak >= cfg.max_bad_steps:
                    last = find_latest_state(run_dir)
                    raise TrainError(
                        f"stopping at step {done}: {bad_streak} steps in a row had a non-finite loss or gradient "
                        f"(--max-bad-steps {cfg.max_bad_steps}); last good checkpoint: {last or 'none'}"
                    )
                if fid is not None and done % cfg.fid_every == 0:
                    value = compute_fid(cfg, G_ema or G, fid, device)
                    if logger is not None:
                        logger.log(done, {"fid": value})
                        bar.write(f"step {done}: FID {value:.3f}" + (" (best)" if value < best_fid else ""))
                        if value < best_fid:
                            save_snapshot(run_dir / "network-snapshot-best.pt", G_ema or G, **snapshot_info(cfg, done))
                    best_fid = min(best_fid, value)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and bad_streak == 0:
                    if dist.is_main():
                        checkpoint(done)
                    saved = done
                bar.update(1)
                if stop.requested():
                    break
            stopped = done < num_steps
        if done != saved and bad_streak == 0 and dist.is_main():
            checkpoint(done)
        dist.barrier()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
        dist.shutdown()
    return {"step": done, "stopped": stopped}
