"""Teacher pairs: sample the EDM teacher from per-seed noise and store (z, y, label, seed) rows in a pair file.

Each pair has its own seed. Its `StackedRandomGenerator` stream is drawn exactly as EDM's generate.py draws it: the
latent z (C, R, R) first, then the label (randint(label_dim), conditional teachers only), then one noise per sampler
step, so a pair equals EDM's sample for the same seed and device. `--class-balanced` still draws the label (to keep
the stream) and then overrides it with row i -> class i % label_dim.
A latent teacher (EDM2 img512) makes its pairs in its own space, VAE latents, which the file records (`space`).

Under torchrun every rank samples its slice of each global batch and rank 0 writes the gathered rows, so the result
is one file, equal to what one process makes. The file on disk is the only state: a rerun resumes from its
`num_complete` with any number of processes.
"""

from functools import partial
from pathlib import Path

import numpy as np
import torch

from dmd.data import (
    DISK_FULL,
    PairFileError,
    PairWriter,
    create_pair_file,
    grow_pair_file,
    read_pair_attrs,
    read_seeds,
)
from dmd.utils import distributed
from dmd.utils.common import IntRanges, int_ranges, one_hot


def sample_pairs(net, seeds, first_row=0, class_balanced=False, device="cpu", **sampler_kwargs):
    """Sample pairs for `seeds` (rows first_row...): latents, images (B, C, R, R) float32, labels (B,) int64."""
    from dmd.edm.sampler import StackedRandomGenerator, edm_sampler

    b, c, r = len(seeds), net.img_channels, net.img_resolution
    if b == 0:  # A rank whose slice of the last global batch is empty still joins the gather.
        return torch.empty(0, c, r, r), torch.empty(0, c, r, r), torch.empty(0, dtype=torch.int64)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([b, c, r, r], device=device)
    labels = torch.full((b,), -1, dtype=torch.int64)
    if net.label_dim > 0:
        labels = rnd.randint(net.label_dim, size=[b], device=device)
        if class_balanced:
            labels = torch.arange(first_row, first_row + b, device=device) % net.label_dim
    with torch.no_grad():
        images = edm_sampler(net, latents, one_hot(labels, net.label_dim, device), rnd.randn_like, **sampler_kwargs)
    return latents.cpu(), images.float().cpu(), labels.cpu()


GUIDE_ATTRS = ("guide_sha256", "guidance")  # a guided teacher's attributes, absent from unguided files


def teacher_space(net):
    """What a teacher's samples are: 'pixels', or 'latents of VAE' for EDM2's latent teachers (a pair file of a
    latent teacher records it as its attribute `space`; files of pixel teachers have none)."""
    from dmd.edm2.vae import latent_info

    info = latent_info(net)
    return "pixels" if info is None else f"latents of {info.vae_name}"


def prepare_pair_file(out, *, seeds, shape, settings, teacher_source):
    """Create `out`, or check it was made by the same teacher and settings; return its number of complete rows.

    `shape` is (channels, resolution, label_dim) and `settings` the attributes that must match to resume. A file
    made for the same seeds resumes; one whose seeds are the first of a longer `seeds` (a larger --num, an extended
    --seeds) grows to plan the new ones, keeping its complete rows; any other seed list is refused.
    """
    out = Path(out)
    channels, resolution, label_dim = shape
    if not out.exists():
        attrs = {**settings, "teacher_source": str(teacher_source)}
        create_pair_file(out, channels=channels, resolution=resolution, label_dim=label_dim, seeds=seeds, attrs=attrs)
        return 0
    old = read_pair_attrs(out)
    wanted = {**settings, "channels": channels, "resolution": resolution, "label_dim": label_dim}
    wanted = {key: None for key in GUIDE_ATTRS} | wanted  # a guided file's guide must be this run's too
    for key, value in wanted.items():
        if old.get(key) != value:
            raise PairFileError(
                f"pair file {out} was made with {key}={old.get(key)!r} but this run has {key}={value!r}; "
                "refusing to append (choose another --out)"
            )
    planned, wanted = old["num_requested"], np.asarray(seeds, dtype=np.int64)
    if np.array_equal(read_seeds(out), wanted):
        return int(old["num_complete"])
    complete = grow_pair_file(out, wanted)  # refuses a list that does not begin with the file's seeds
    print(f"{out}: grown from {planned} to {len(wanted)} planned pairs, its {complete} complete pairs kept")
    return complete


def _gather_to_main(obj):
    """List of `obj` from every rank, in rank order, on rank 0 (None elsewhere); [obj] for one process."""
    if not distributed.is_initialized():
        return [obj]
    import torch.distributed as dist

    parts = [None] * distributed.get_world_size() if distributed.is_main() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def _load_teacher(network, cache_dir, device):
    """Load the teacher (eval mode, frozen) on every rank, rank 0 downloading first; return (net, local path)."""
    from dmd.edm.persistence import load_network
    from dmd.utils.download import open_url

    local = distributed.main_first(
        partial(open_url, network, cache_dir=cache_dir, progress=None if distributed.is_main() else False)
    )
    return load_network(local, device=device), local


def make_pairs(
    network,  # Teacher: EDM network pickle, path or URL.
    out,  # Pair file to write, or to resume.
    num,  # Number of pairs.
    seeds=None,  # Seed list or range string ('0-99999', never expanded beyond `num`); its first `num` are used.
    class_balanced=False,  # Labels cycle over classes (row i -> class i % label_dim) instead of drawn ones.
    batch_size=256,  # Pairs per sampler call, per process.
    num_steps=None,  # edm_sampler settings, stored in the file; None = the network family's (EDM 18, EDM2 32).
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=float("inf"),
    S_noise=1.0,
    guide_network=None,  # Guiding network (path or URL): every teacher call is D_guide + guidance (D - D_guide).
    guidance=1.0,  # Guidance weight w; 1 = the teacher alone.
    device="auto",  # 'auto', 'cpu', 'cuda', 'cuda:1'; under torchrun CUDA ranks use their local device.
    cache_dir=None,  # Download cache for a URL teacher.
    progress=True,  # tqdm progress bar with pairs/s on rank 0.
):
    """Make `num` teacher pairs into the pair file `out` (resuming it if it exists); return its path."""
    from tqdm import tqdm

    from dmd.edm.persistence import network_fingerprint
    from dmd.edm.sampler import check_schedule, default_steps, load_guided

    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    try:
        seeds = IntRanges([range(num)]) if seeds is None else int_ranges(seeds)
    except ValueError as e:
        raise ValueError(f"--seeds: {e}") from e
    if len(seeds) < num:
        raise ValueError(f"--seeds gives {len(seeds)} seeds but --num asks for {num}")
    seeds = seeds[:num]  # Still ranges: the file's check of the disk space comes before any list of num seeds.
    device = distributed.setup_device(device)
    net, local = _load_teacher(network, cache_dir, device)
    guided = partial(load_guided, net, guide_network, guidance, cache_dir=cache_dir, device=device)
    net, guide_sha256 = distributed.main_first(guided)  # the teacher itself without a guide
    num_steps = default_steps(net) if num_steps is None else num_steps
    check_schedule(net, num_steps, sigma_min, sigma_max, rho)  # before the file is made
    sampler_kwargs = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    sampler_kwargs.update(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    settings = {
        "teacher_sha256": network_fingerprint(local),
        **{k: (int(v) if k == "num_steps" else float(v)) for k, v in sampler_kwargs.items()},
        "class_balanced": bool(class_balanced),
        "rng_device": device.type,  # CUDA generators give other numbers than CPU ones for the same seed.
    }
    if guide_sha256 is not None:  # recorded only when guided, so that unguided files made before still resume
        settings.update(guide_sha256=guide_sha256, guidance=float(guidance))
    if teacher_space(net) != "pixels":  # the pairs are VAE latents, stored as the teacher makes them
        settings.update(space=teacher_space(net))

    # Rank 0 owns the file; its verdict (start row or error) goes to every rank so none is left waiting.
    start, error = 0, None
    if distributed.is_main():
        try:
            shape = (net.img_channels, net.img_resolution, net.label_dim)
            start = prepare_pair_file(out, seeds=seeds, shape=shape, settings=settings, teacher_source=network)
        except PairFileError as e:
            error = str(e)
    start, error = distributed.broadcast_object((start, error))
    if error is not None:
        raise PairFileError(error)

    # Global batches of batch_size * world rows; rank k samples the k-th slice, rank 0 appends them in order.
    rank, world = distributed.get_rank(), distributed.get_world_size()
    writer = PairWriter(out) if distributed.is_main() else None
    bar = tqdm(
        total=num, initial=start, unit="pair", desc=Path(out).name, disable=not (progress and writer is not None)
    )
    try:
        for first in range(start, num, batch_size * world):
            lo = min(first + rank * batch_size, num)
            hi = min(lo + batch_size, num)
            part = sample_pairs(net, seeds[lo:hi], lo, class_balanced, device, **sampler_kwargs)
            parts = _gather_to_main(part)
            if writer is not None:
                latents, images, labels = (torch.cat(column) for column in zip(*parts))
                writer.append(latents.numpy(), images.numpy(), labels.numpy())
                bar.update(len(latents))
    except OSError as e:  # The writer's rows go straight to the file, so a full disk is an OSError here.
        if writer is None or e.errno not in DISK_FULL:
            raise
        raise PairFileError(
            f"pair file {out}: {DISK_FULL[e.errno]} after {writer.num_complete} complete pairs; "
            "free space and rerun the same command to resume"
        ) from e
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    distributed.barrier()
    distributed.print0(f"{out}: {num} pairs complete ({num - start} made by this run)")
    return Path(out)
