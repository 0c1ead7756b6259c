"""The demo's teacher: a tiny class-conditional EDM (EDMPrecond + DDPM++ SongUNet) trained on the 16x16 digits.

Trained with EDM's loss (log-normal sigma, P_mean -1.2, P_std 1.2, weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2),
Adam and an EMA with EDM's ramp-up, every random draw seeded, and saved in EDM's pickle layout, so the demo loads it
exactly as it would load a released EDM network. `python -m dmd demo train-teacher` retrains it, to the same bytes with
the same torch version, thread count and CPU kernels (AVX512; dmd.demo.SHIPPED_TEACHER_SHA256).
"""

import copy
import math

import torch

from dmd.demo.config import TeacherConfig
from dmd.demo.digits import NUM_CLASSES, RESOLUTION, load_digits
from dmd.edm.presets import DDPMPP
from dmd.utils.common import one_hot

# EDMPrecond kwargs: EDM's DDPM++ preset shrunk to digits (1 channel, 16x16, 10 classes, no augmentation pipe).
TEACHER_KWARGS = dict(
    DDPMPP,
    img_resolution=RESOLUTION,
    img_channels=1,
    label_dim=NUM_CLASSES,
    use_fp16=False,
    sigma_min=0,
    sigma_max=float("inf"),
    sigma_data=0.5,
    model_channels=16,
    channel_mult=[1, 2, 2],
    channel_mult_emb=4,
    num_blocks=1,
    attn_resolutions=[],  # The deepest level (4x4) still attends: SongUNet's first decoder block always does.
    dropout=0.1,
    augment_dim=0,
)


def build_teacher(seed=0):
    """Build a freshly initialised teacher network, its weights drawn from `seed`."""
    from dmd.edm.precond import EDMPrecond

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return EDMPrecond(**TEACHER_KWARGS)


def ema_beta(batch_size, cur_nimg, halflife_kimg, rampup_ratio):
    """EDM's EMA decay per step: half-life min(halflife_kimg * 1000, rampup_ratio * images seen), in images."""
    halflife_nimg = min(halflife_kimg * 1000, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def train_teacher(out_path, cfg=TeacherConfig(), progress=True):
    """Train the demo teacher on the digits with EDM's loss and save its EMA as an EDM pickle; return the EMA net."""
    from tqdm import tqdm

    from dmd.edm.writer import save_network_pickle
    from dmd.losses import FakeScoreLoss, KarrasGrid
    from dmd.utils.training import update_ema

    images, labels = load_digits()
    net = build_teacher(cfg.seed).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # FakeScoreLoss with log-normal sigma is EDM's denoising loss (per sample); here it trains on real digits.
    edm_loss = FakeScoreLoss(KarrasGrid(), sigma_sampling="lognormal", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(cfg.seed)
    num_steps = math.ceil(cfg.kimg * 1000 / cfg.batch_size)
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(num_steps), desc="teacher", unit="step", disable=not progress)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # Dropout draws from the global RNG.
        for step in bar:
            if len(order) < cfg.batch_size:  # Reshuffle once the current epoch cannot fill a batch.
                order = torch.randperm(len(images), generator=g)
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            loss = edm_loss(net, images[idx], one_hot(labels[idx], NUM_CLASSES), generator=g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            cur_nimg = step * cfg.batch_size
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(cur_nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
            opt.step()
            cur_nimg += cfg.batch_size
            update_ema(ema, net, ema_beta(cfg.batch_size, cur_nimg, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    save_network_pickle(ema, out_path)
    return ema
