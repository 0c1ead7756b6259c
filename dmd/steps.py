"""The two updates of one DMD / DMD2 training step: the generator step and the fake-score step.

Generator step: distribution matching (+ DMD2's GAN loss) on G's samples at the step's level, plus regression of the
one-step G(z_ref) onto the teacher's y_ref; one G call covers both parts, each row at its own sigma. Fake-score step
(`fake_steps_per_gen` times): mu_fake denoises G's samples, the generator step's batch first and then fresh batches of
the updated G; with the GAN, the head and mu_fake also learn to tell G's samples from real images. Every random draw
of step s is a function of (seed, s, stream name) alone (dmd/batches.py), so a resumed run and K processes repeat a
single uninterrupted process. The loop (dmd/train.py) owns logging, checkpoints and the order of the steps.
"""

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dmd.batches import RankRows, draw_generator_inputs, draw_index, draw_noise, spread, step_generator, take
from dmd.edm2.encoders import final_latents
from dmd.utils.common import one_hot
from dmd.utils.training import average_gradients, clip_and_step

# The per-step statistics, averaged over each --log-every window into stats.jsonl (loss_fake and loss_disc: means
# over the fake-score steps of a step; h_min, h_max: the extremes of f-distill's weights of the DM term over the
# global batch, h_mean: the mean of h(r) they were divided by; all 1 for rkl, DMD2's unweighted term).
STAT_NAMES = ("loss_G", "loss_dm", "loss_reg", "loss_gan", "loss_fake", "loss_disc", "grad_norm_G", "grad_norm_fake")
STAT_NAMES += ("h_min", "h_mean", "h_max")


class BatchError(RuntimeError):
    """A dataset row that cannot be used (a NaN pair, an unreadable image), found as it is read; names the flag."""


# What the two updates work on, built once by train(): the networks (G_ddp / fake_ddp: their DDP wrappers under
# torchrun, else the networks themselves), losses, optimisers, data streams, and this rank's share of the batch.
@dataclass
class StepParts:
    cfg: Any  # TrainConfig
    mu_real: torch.nn.Module
    G: torch.nn.Module
    G_ddp: torch.nn.Module
    mu_fake: torch.nn.Module
    fake_ddp: torch.nn.Module
    head: Optional[torch.nn.Module]  # DMD2's discriminator head, or None without the GAN
    opt_G: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    fake_params: list  # mu_fake's and the head's parameters: one AdamW, as DMD2 has
    dm_loss: Any  # DistributionMatchingLoss, on this rank's rows
    fake_loss: Any  # FakeScoreLoss
    reg_loss: Any  # RegressionLoss / MSERegressionLoss, or None at --lambda-reg 0
    gan_loss: Any  # GANLoss, or None
    fdistill: Any  # FDistillWeights of --divergence, or None for rkl (DMD2's unweighted DM term)
    pair_stream: Any  # BatchStream of teacher pairs, or None
    real_stream: Any  # BatchStream of real images (or raw latents, with `encoder`), or None
    encoder: Any  # the teacher's EncoderInfo if it runs on VAE latents (its real data are then raw latents), or None
    rows: slice  # this rank's rows of the global batch
    n: int  # global batch
    device: torch.device


# What the generator step leaves for the fake-score step and the grids: G's samples x (B, C, H, W) for the global
# batch's labels c, the teacher pairs it regressed on, and mu_real / mu_fake at the DM loss's noised samples.
@dataclass
class GeneratorOutputs:
    losses: dict  # loss_G, loss_dm, loss_reg, loss_gan (0-d device tensors)
    weights: dict  # h_min, h_mean, h_max of f-distill's weights (0-d device tensors; 1 for rkl)
    norm: torch.Tensor  # G's gradient norm before clipping
    bad: torch.Tensor  # 1.0 if the step was skipped (non-finite), else 0.0
    z: torch.Tensor  # this rank's z (B, C, H, W) at level `level`
    c: Optional[torch.Tensor]  # the global batch's one-hot labels (n, label_dim) or None
    level: int
    x: torch.Tensor  # G's samples of the DM part, this rank's rows (empty at --lambda-dm 0)
    aux: Optional[dict]  # the DM loss's p_real / p_fake (global batch), or None
    pairs: Optional[tuple]  # (G(z_ref), y_ref, c_ref) of the regression part, or None


def renormalize(net):
    """EDM2's forced weight normalisation of a student after its optimizer stepped (see Precond.as_student_); EDM's
    networks have none."""
    normalize = getattr(net, "normalize_weights_", None)
    if normalize is not None:
        normalize()


def next_batch(stream, flag, device):
    """The next batch of a stream; BatchError naming the flag for a bad row (a NaN, found as it is read)."""
    from dmd.data import PairFileError
    from dmd.images import ImageDatasetError

    try:
        return stream.next(device)
    except (PairFileError, ImageDatasetError) as e:
        raise BatchError(f"{flag}: {e}") from e


def generated(G, z, c, cfg, step, stream, level, rows, n):
    """G's input at `level` for this rank's rows z (B, C, H, W): sigma_0 z, or, past level 0, made by G itself
    without gradients (backward simulation) with the step's noise between levels; and that level's sigmas (B,)."""
    from dmd.generator import simulate_input

    def noise(k):
        return draw_noise(cfg.seed, step, f"{stream}-noise{k}", (n, *z.shape[1:]), rows, z.device)

    x = simulate_input(G, z, c, cfg.generator_sigmas, level, noise)
    return x, torch.full((x.shape[0],), cfg.generator_sigmas[level], device=x.device)


def micro_batches(rows, size, count):
    """`count` consecutive slices of at most `size` rows of the slice `rows`, the last ones empty once it runs out."""
    return [
        slice(min(rows.start + i * size, rows.stop), min(rows.start + (i + 1) * size, rows.stop)) for i in range(count)
    ]


def split(cfg, *lengths):
    """Rows per micro-batch and the number of micro-batches for batches of `lengths` rows, split alike by --batch-gpu
    (a remainder makes a smaller last micro-batch); one micro-batch of everything without it."""
    size = cfg.batch_gpu or max(*lengths, 1)
    return size, max(1, *(-(-length // size) for length in lengths))


def shifted(rows, offset):
    """The slice `rows` moved by `offset`: global rows of the batch -> this rank's local rows."""
    return slice(rows.start + offset, rows.stop + offset)


def accumulating(net, last):
    """DDP's no_sync() for all but the last micro-batch of an update: their gradients add up locally and are reduced
    over ranks once, in the last backward."""
    no_sync = getattr(net, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def dm_loss_on(loss, rows):
    """The DM loss with its denoisers run on `rows` of the global batch (a micro-batch): the same draws of the whole
    batch, the networks on those rows alone."""
    loss = copy.copy(loss)
    loss.mu_real, loss.mu_fake = RankRows(loss.mu_real.net, rows), RankRows(loss.mu_fake.net, rows)
    return loss


def gan_term(p, x, c, aux, step, rows, n):
    """G's GAN loss per sample (b,) of its samples x (b, C, H, W), `rows` of the global batch of n, and the
    discriminator's logits (b,) at the DM loss's noised samples `aux` for f-distill (None without it).

    --gan-features fake (DMD2): the GAN noises x with its own draws, and f-distill's logits take one more pass of
    mu_fake's encoder, without gradient, at the DM loss's x_t. teacher (FastGen): the GAN reads the frozen teacher's
    bottleneck at the DM loss's x_t from the DM loss's own pass of mu_real (no second encoder pass), with its gradient
    to x, and its detached logits serve f-distill.
    """
    if p.cfg.gan_features == "fake":
        gan_gen = step_generator(p.cfg.seed, step, "gan", p.device)
        loss, _ = p.gan_loss.generator(x, c, generator=gan_gen, rows=rows, n=n)
        if p.fdistill is None:
            return loss, None
        with torch.no_grad():
            return loss, p.gan_loss.at(aux["x_t"][rows], aux["sigma"][rows], c)
    loss, logs = p.gan_loss.generator(x, c, features=aux["h_real"][rows], sigma=aux["sigma"][rows])
    return loss, logs["logits_fake"]


def generator_step(p, step):
    """One update of G: lambda_dm * DM + lambda_reg * regression + gan_weight_gen * GAN; return GeneratorOutputs.

    Regression only (lambda_dm 0) runs G on the pairs alone. The rank's rows and pairs go through G in --batch-gpu
    micro-batches (one without it), each loss scaled by its micro-batch's share of the rows, so the gradients add up
    to the whole batch's mean before the one optimizer step; every draw is of the global batch, as without them.
    """
    cfg, rows, n, device = p.cfg, p.rows, p.n, p.device
    levels = len(cfg.generator_sigmas)
    level = draw_index(cfg.seed, step, "level", levels) if levels > 1 else 0  # shared by all ranks
    z, c = draw_generator_inputs(p.mu_real, cfg.seed, step, "G", n, device)  # global batch (n, ...)
    dm_rows = rows if cfg.lambda_dm > 0 else slice(rows.start, rows.start)
    ref = None
    if p.reg_loss is not None:
        z_ref, y_ref, k_ref = next_batch(p.pair_stream, "--data-path", device)
        ref = (z_ref, y_ref, one_hot(k_ref, p.mu_real.label_dim, device=device))
    B, B_ref = dm_rows.stop - dm_rows.start, 0 if ref is None else len(ref[0])
    size, count = split(cfg, B, B_ref)
    zero = torch.zeros((), device=device)
    losses = dict(loss_G=zero, loss_dm=zero, loss_reg=zero, loss_gan=zero)
    one = torch.ones((), device=device)
    weights = dict(h_min=one, h_mean=one, h_max=one)
    xs, x_refs, aux = [], [], None
    for i, (r, r_ref) in enumerate(
        zip(micro_batches(dm_rows, size, count), micro_batches(slice(0, B_ref), size, count))
    ):
        with accumulating(p.G_ddp, last=i == count - 1):
            c_r = take(c, r)
            x_in, sigma_in = generated(p.G, z[r], c_r, cfg, step, "G", level, r, n)
            c_in = c_r
            if ref is not None:
                z_ref, y_ref, c_ref = (t[r_ref] for t in ref)
                x_ref_in, sigma_ref = generated(p.G, z_ref, c_ref, cfg, step, "ref", 0, slice(None), None)
                x_in, sigma_in = torch.cat([x_in, x_ref_in]), torch.cat([sigma_in, sigma_ref])
                c_in = None if c is None else torch.cat([c_r, c_ref])
            x_all = p.G_ddp(x_in, sigma_in, c_in)  # (b + b_ref, C, H, W): the micro-batch's rows, then its pairs
            x, x_ref = x_all[: r.stop - r.start], x_all[r.stop - r.start :]
            loss_dm = loss_gan = loss_reg = zero
            if r.stop > r.start:
                share = (r.stop - r.start) / B
                dm_gen = step_generator(cfg.seed, step, "dm", device)
                loss_dm, aux_r = dm_loss_on(p.dm_loss, r)(spread(x, r, n), c, generator=dm_gen)
                aux = {k: aux_r[k] if aux is None else aux[k] + aux_r[k] for k in ("p_real", "p_fake")}
                if p.gan_loss is not None:
                    loss_gan, logits = gan_term(p, x, c_r, aux_r, step, r, n)
                    loss_gan = loss_gan.mean() * share
                if p.fdistill is None:
                    loss_dm = loss_dm[r].mean() * share
                else:  # one micro-batch holds the rank's rows (config refuses --batch-gpu that splits them)
                    w, weights = p.fdistill(logits, aux_r["t"][r])
                    loss_dm = (w * loss_dm[r]).mean() * share
            if r_ref.stop > r_ref.start:
                loss_reg = p.reg_loss(x_ref, y_ref).mean() * ((r_ref.stop - r_ref.start) / B_ref)
            loss_G = cfg.lambda_dm * loss_dm + cfg.lambda_reg * loss_reg + cfg.gan_weight_gen * loss_gan
            loss_G.backward()
        parts = dict(loss_G=loss_G, loss_dm=loss_dm, loss_reg=loss_reg, loss_gan=loss_gan)
        losses = {k: losses[k] + v.detach() for k, v in parts.items()}
        xs.append(x.detach())
        x_refs.append(x_ref.detach())
    norm, bad = clip_and_step(p.opt_G, p.G.parameters(), cfg.grad_clip, losses["loss_G"])
    renormalize(p.G)
    pairs = None if ref is None else (torch.cat(x_refs), *ref[1:])
    return GeneratorOutputs(losses, weights, norm, bad, z[rows], c, level, torch.cat(xs), aux, pairs)


def samples_at(p, z, c, step, stream, level, chunks):
    """G's samples at `level` of this rank's rows, without gradients, in the micro-batches `chunks` (global rows):
    G's input at that level by backward simulation from z (n, C, H, W; global batch, this rank's rows used) with the
    step's `stream` noise, then one G call. Return (B, C, H, W)."""
    with torch.no_grad():
        x = []
        for r in chunks:
            x_in, sigma_in = generated(p.G, z[r], take(c, r), p.cfg, step, stream, level, r, p.n)
            x.append(p.G(x_in, sigma_in, take(c, r)))
    return torch.cat(x)


def fake_score_step(p, step, gen):
    """`fake_steps_per_gen` updates of mu_fake (and the GAN head): the first on G's samples of the generator step
    `gen` (GeneratorOutputs), the others on fresh samples of the updated G. Return the mean fake-score and
    discriminator losses, the last gradient norm and whether any update was skipped (device tensors).

    --fake-score-levels all (DMD2): the samples are at the level the step drew (backward simulation), so mu_fake
    learns the mixture of all levels' samples. last: only the final level's; the first update takes the generator
    step's samples if it drew the last level, else the updated G's final-level samples from the step's own z (new
    noise streams between the levels), and the others sample the final level. Each update goes in the generator
    step's --batch-gpu micro-batches, its gradients added up before the step.
    """
    cfg, rows, n, device = p.cfg, p.rows, p.n, p.device
    levels, B = len(cfg.generator_sigmas), rows.stop - rows.start
    final_only = cfg.fake_score_levels == "last"
    chunks = micro_batches(rows, *split(cfg, B))
    x_fake, c_fake = spread(gen.x.detach(), rows, n), gen.c
    if final_only and gen.level != levels - 1:
        x_last = samples_at(p, spread(gen.z, rows, n), gen.c, step, "G-last", levels - 1, chunks)
        x_fake = spread(x_last, rows, n)
    zero = torch.zeros((), device=device)
    loss_fake_sum, loss_disc_sum, norm, bad = zero, zero, zero, zero
    for k in range(cfg.fake_steps_per_gen):
        if k > 0:
            z, c_fake = draw_generator_inputs(p.mu_real, cfg.seed, step, f"fake{k}", n, device)
            if final_only or levels == 1:
                level = levels - 1
            else:
                level = draw_index(cfg.seed, step, f"fake-level{k}", levels)
            x_fake = spread(samples_at(p, z, c_fake, step, f"fake{k}", level, chunks), rows, n)
        if p.gan_loss is not None:
            x_real, k_real = next_batch(p.real_stream, "--real-data", device)  # this rank's B real images
            if p.encoder is not None:  # raw (B, 2C, h, w) -> final latents (B, C, h, w), a fresh eps at every use
                eps = draw_noise(
                    cfg.seed, step, f"real-eps{k}", (n, x_real.shape[1] // 2, *x_real.shape[2:]), rows, device
                )
                x_real = final_latents(x_real, eps, p.encoder)
            c_real = one_hot(k_real, p.mu_real.label_dim, device=device)
        loss_k, loss_fake_k, loss_disc_k = zero, zero, zero
        for i, r in enumerate(chunks):
            share = (r.stop - r.start) / B
            with accumulating(p.fake_ddp, last=i == len(chunks) - 1):
                fake_gen = step_generator(cfg.seed, step, f"fake-loss{k}", device)
                loss_fake = p.fake_loss(RankRows(p.fake_ddp, r), x_fake, c_fake, generator=fake_gen)[r].mean() * share
                loss_disc = zero
                if p.gan_loss is not None:
                    local = shifted(r, -rows.start)
                    disc_gen = step_generator(cfg.seed, step, f"disc{k}", device)
                    loss_disc = (
                        p.gan_loss.discriminator(
                            x_fake[r],
                            take(c_fake, r),
                            x_real[local],
                            take(c_real, local),
                            generator=disc_gen,
                            rows=r,
                            n=n,
                        )[0].mean()
                        * share
                    )
                loss = loss_fake + cfg.gan_weight_disc * loss_disc
                loss.backward()
            loss_k, loss_fake_k = loss_k + loss.detach(), loss_fake_k + loss_fake.detach()
            loss_disc_k = loss_disc_k + loss_disc.detach()
        if p.head is not None:
            average_gradients(p.head)  # DDP reduces mu_fake's gradients, not the head's
        norm, bad_k = clip_and_step(p.opt_fake, p.fake_params, cfg.grad_clip, loss_k)
        renormalize(p.mu_fake)
        bad = torch.maximum(bad, bad_k)
        loss_fake_sum, loss_disc_sum = loss_fake_sum + loss_fake_k, loss_disc_sum + loss_disc_k
    k_fake = cfg.fake_steps_per_gen
    return loss_fake_sum / k_fake, loss_disc_sum / k_fake, norm, bad
