"""What a training run is built from, made from its config and checked before any work: the teacher, the data and
its batch streams, the students G and mu_fake with their losses and optimisers, the regression loss's LPIPS, the FID
detector and reference, and the DDP wrappers. dmd/train.py runs what this builds.
"""

import inspect
import warnings
from functools import partial

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dmd.batches import BatchStream, RankRows, rank_rows, step_seed
from dmd.steps import StepParts
from dmd.utils import distributed as dist


class TrainError(RuntimeError):
    """A training run that cannot start or go on; the message names the flag or file at fault."""


def open_datasets(cfg, teacher):
    """The pair file of --data-path and the real data of --real-data (each None without), checked against the
    teacher; TrainError naming the flag on failure. Real data are images in EDM's format (ImageDataset) or, for a
    latent EDM2 teacher, raw VAE latents in EDM2's encoded format (EncodedDataset); each kind refuses the other
    kind's teacher, images for a latent one with the command that encodes them."""
    from dmd.data import PairDataset, PairFileError
    from dmd.encoded import EncodedDataset, holds_latents
    from dmd.images import ImageDataset, ImageDatasetError

    pairs = real = None
    try:
        if cfg.data_path is not None:
            pairs = PairDataset(cfg.data_path)
            pairs.check_compatible(teacher)
    except PairFileError as e:
        raise TrainError(f"--data-path: {e}") from e
    try:
        if cfg.real_data is not None and holds_latents(cfg.real_data):
            if cfg.xflip:
                raise TrainError(
                    f"--xflip: {cfg.real_data} holds VAE latents, and a mirrored latent is not the latent of the "
                    "mirrored image (EDM2 trains its latent networks unflipped); run without --xflip"
                )
            real = EncodedDataset(cfg.real_data)
        elif cfg.real_data is not None:
            real = ImageDataset(cfg.real_data, xflip=cfg.xflip)
        if real is not None:
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
    """Load the teacher of --network and the real score mu_real (frozen, in eval mode, on `device`): the teacher
    itself, or with --guide-network the guided denoiser D_guide + w (D - D_guide), the target DMD and DMD2 distil
    with guidance (as they do with CFG for text-to-image). Return mu_real, the teacher (which G and mu_fake copy,
    never the guide) and the fingerprints {'teacher': sha256, 'guide': sha256} of the files."""
    from dmd.edm.persistence import NetworkLoadError, load_network
    from dmd.edm.sampler import load_guided
    from dmd.utils.download import DownloadError, open_url, sha256_file

    try:
        # Rank 0 downloads a URL teacher, the others then read the cache.
        local = dist.main_first(
            partial(open_url, cfg.model_path, cache_dir=cfg.cache_dir, progress=cfg.progress and dist.is_main())
        )
        net = load_network(local, key="ema", device=device)
    except (OSError, NetworkLoadError, DownloadError) as e:
        raise TrainError(f"--network: cannot load a teacher from {cfg.model_path} ({e})") from e
    try:
        guided = partial(load_guided, net, cfg.guide_network, cfg.guidance, cache_dir=cfg.cache_dir, device=device)
        mu_real, guide_sha256 = dist.main_first(guided)
    except ValueError as e:
        raise TrainError(str(e)) from None
    fingerprints = {"teacher": sha256_file(local), **({"guide": guide_sha256} if guide_sha256 else {})}
    return mu_real.eval().requires_grad_(False), net, fingerprints


def student_copy(teacher, dropout, device):
    """A trainable copy of the teacher with its dropout replaced (G and mu_fake train with dropout 0 by default).

    The copy never runs in fp16 (use_fp16 off even for an fp16 teacher: fp16 training diverges without loss scaling,
    DMD2 found); its compute dtype is the run's --precision, set by `prepare_network`.
    """
    from dmd.edm.precond import build_network

    net = build_network(type(teacher).__name__, {**teacher.init_kwargs, "dropout": dropout, "use_fp16": False})
    net.load_state_dict(teacher.state_dict())
    if hasattr(teacher, "encoder_info"):  # EDM2: a latent teacher's students run on its latents
        net.encoder_info = teacher.encoder_info
    net = net.to(device).train().requires_grad_(True)
    as_student = getattr(net, "as_student_", None)  # EDM2: forced weight normalisation after each step (steps.py)
    return net if as_student is None else as_student()


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
    from dmd.edm.sampler import GuidedDenoiser

    if isinstance(net, GuidedDenoiser):  # a guided teacher: both of its networks
        prepare_network(net.net, dtype, cfg)
        prepare_network(net.guide, dtype, cfg)
        return net
    set_compute_dtype(net, dtype)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:
        net.backbone.compile()
    return net


# A network called with zero augment labels when its U-Net has an augment mapping (EDM's CIFAR-10 teacher has one):
# the output is the same as without them (map_augment has no bias), but its weight then takes part in every
# backward, so DDP needs no search for unused parameters.
class ZeroAugment(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.augment_dim = net.init_kwargs.get("augment_dim", 0)  # EDM2's networks have none

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


def shard_fsdp(net, blocks=()):
    """--fsdp: shard a network's parameters, and so its gradients and AdamW moments, over the torchrun ranks with
    FSDP2's fully_shard, in place of DDP's full copy on every rank; the bare network without torchrun.

    Each of `blocks` is one unit, gathered whole just before it runs and freed after, so that a rank holds 1/K of
    the network plus one block at a time; the root unit holds the rest and is freed after each call too, so that
    between calls a network's parameters are its shards (the EMA update pairs G's with G_ema's). FSDP2 shards every
    weight along its dim 0, the output channels, so EDM2's forced weight normalisation (a norm per output channel)
    stays local to each rank's shard. A student's `bottleneck`, which the GAN calls instead of the forward, gathers
    as the forward does.
    """
    if not dist.is_initialized():
        return net
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 cannot shard 0-d parameters (EDM2's gains): they stay whole on every rank, their gradients averaged as
    # each is accumulated, as DDP would.
    scalars = {p for p in net.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce_mean(p.grad) and None)
    for block in blocks:
        fully_shard(block, ignored_params=scalars)
    fully_shard(net, reshard_after_forward=True, ignored_params=scalars)  # root default: whole after a no-grad call
    if hasattr(net, "bottleneck"):
        register_fsdp_forward_method(net, "bottleneck")
    return net


def unet_blocks(net):
    """The blocks of a student's U-Net encoder and decoder, in both families: FSDP's units."""
    return [*net.backbone.enc.values(), *net.backbone.dec.values()]


def build_losses(cfg, mu_real, mu_fake, rows, device, teacher=None):
    """The losses: distribution matching and fake-score on this rank's `rows`, and DMD2's GAN (None when off) with
    its discriminator head on mu_fake's bottleneck, or with --gan-features teacher on the frozen `teacher`'s (the
    teacher itself, never a guided mu_real; None: mu_real is the teacher), which G's step then takes from the DM
    loss's pass of mu_real."""
    from dmd.losses import DistributionMatchingLoss, FakeScoreLoss, KarrasGrid

    grid = KarrasGrid(T=cfg.num_timesteps).to(device)  # on the device once, not copied at every lookup
    shared = cfg.gan_weight_gen > 0 and cfg.gan_features == "teacher"  # G's GAN term reads mu_real's features
    dm_loss = DistributionMatchingLoss(
        RankRows(mu_real, rows), RankRows(mu_fake, rows), grid, cfg.t_min, cfg.t_max, bottleneck=shared
    )
    fake_loss = FakeScoreLoss(grid, sigma_sampling=cfg.fake_sigma_sampling)
    gan_loss = None
    if cfg.gan_weight_gen > 0:
        from dmd.gan import DiscriminatorHead, GANLoss

        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank, and the run's RNG untouched
            torch.manual_seed(step_seed(cfg.seed, 0, "head"))
            features = mu_fake if cfg.gan_features == "fake" else mu_real if teacher is None else teacher
            head = DiscriminatorHead.for_network(features).to(device)
        max_index = max(1, round(cfg.gan_t_max * grid.T))
        gan_loss = GANLoss(features, head, grid, max_index=max_index, train_features=cfg.gan_features == "fake")
    return dm_loss, fake_loss, gan_loss


def load_vae_codec(cfg, teacher, device):
    """The LatentCodec (VAE) of a latent teacher, which decodes grids and FID images (None for a pixel teacher);
    TrainError naming --vae if it does not load or fit."""
    from dmd.edm2.vae import VAEError, load_codec

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    load = partial(load_codec, teacher, cfg.vae, cache_dir=cfg.cache_dir, device=device, dtype=dtype)
    try:
        return dist.main_first(load)
    except VAEError as e:
        raise TrainError(str(e)) from None


def build_regression(cfg, device, latent=False):
    """The regression loss of --regression-distance (None at --lambda-reg 0). LPIPS compares pixels: a `latent`
    teacher's pairs are latents, which regress with MSE (decoding both through the VAE every step would cost two VAE
    decoder passes and a backward through one)."""
    from dmd.losses import MSERegressionLoss, RegressionLoss
    from dmd.lpips import LPIPS

    if cfg.lambda_reg == 0:
        return None
    if cfg.regression_distance == "mse":
        return MSERegressionLoss()
    if latent:
        raise TrainError(
            "--regression-distance lpips compares pixels, but this teacher's pairs are VAE latents: give "
            "--regression-distance mse (the regression then runs in latent space)"
        )
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


def setup_fid(cfg, teacher, device, codec=None):
    """Load the FID detector and reference statistics of --fid-every now, not at the first FID, and check that they
    fit each other and the teacher's images (the VAE `codec`'s pixels for a latent teacher; None if FID is off).

    Without --fid-ref the reference is EDM's CIFAR-10 statistics, which describe no other data: a teacher of another
    shape must name its own, or every "best" snapshot would be chosen against CIFAR-10.
    """
    if cfg.fid_every == 0:
        return None
    from dmd.fid import CIFAR10_REF_URL, FIDError, detect, load_detector, load_ref

    shape = (teacher.img_resolution, teacher.img_channels, teacher.label_dim)
    if codec is not None:  # scored as decoded RGB images
        shape = (codec.pixel_resolution(teacher.img_resolution), 3, teacher.label_dim)
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
        load = partial(load_ref, cfg.fid_ref or CIFAR10_REF_URL, cache_dir=cfg.cache_dir, flag="--fid-ref")
        ref = dist.main_first(load)
    except FIDError as e:
        raise TrainError(str(e)) from e
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


def build_parts(cfg, mu_real, teacher, reg_loss, pair_stream, real_stream, device):
    """The students G and mu_fake (copies of the teacher; all U-Nets in the run's precision, not the pickle's fp16),
    their losses and optimisers as the StepParts of the two updates, and the EMAs of G ({--ema name: copy of G}, in
    --ema's order; empty without). mu_real is the teacher, or the teacher guided.

    With --fsdp, G, mu_fake, the EMAs of G and DMD2's head are sharded before their optimisers see them. mu_real (and
    the guide) stay whole on every rank: frozen, they have no gradients or AdamW moments to shard, and sharded they
    would be gathered again at every one of their calls.
    """
    from dmd.edm.precond import copy_network
    from dmd.edm2.vae import latent_info

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    G, mu_fake = student_copy(teacher, cfg.dropout, device), student_copy(teacher, cfg.dropout, device)
    for net in (mu_real, G, mu_fake):
        prepare_network(net, dtype, cfg)
    emas = {name: copy_network(G).to(device).eval().requires_grad_(False) for name in cfg.ema}
    if cfg.fsdp:  # the EMAs sharded as G is, so that the EMA update stays local to each rank's shards
        for net in (G, mu_fake, *emas.values()):
            shard_fsdp(net, unet_blocks(net))
    rows, n = rank_rows(cfg.batch_size), cfg.batch_size * dist.get_world_size()
    dm_loss, fake_loss, gan_loss = build_losses(cfg, mu_real, mu_fake, rows, device, teacher)
    head = None if gan_loss is None else gan_loss.head
    fdistill = None
    if cfg.divergence != "rkl":
        from dmd.fdistill import FDistillWeights

        index_range = dm_loss.grid.index_range(cfg.t_min, cfg.t_max)
        fdistill = FDistillWeights(cfg.divergence, index_range, cfg.fdistill_ratio_ema, device)
    if head is not None and cfg.fsdp:  # sharded too: mu_fake's AdamW and clipping take one kind of tensor
        # Its logits are a view, which FSDP2 warns of in every step for fear of in-place ops; the losses make none.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        shard_fsdp(head)
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
        fdistill=fdistill,
        pair_stream=pair_stream,
        real_stream=real_stream,
        encoder=latent_info(teacher),
        rows=rows,
        n=n,
        device=device,
    )
    return parts, emas
