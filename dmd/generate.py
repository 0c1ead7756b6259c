"""One-step generation: `DMDGenerator` loads any network `dmd` knows and maps per-seed noise to images.

Sources: every file dmd/generator_files.py reads (snapshots, training states, run folders, exported folders and
Hub repositories, EDM pickles, the port's checkpoint).

Seeds work as in EDM's generate.py: each image has its own `StackedRandomGenerator` stream, drawn in the order latent
(C, R, R), then label (randint(label_dim), conditional networks only), then one noise per sampler step. A seed thus
gives the same image whatever the batch it is in, and with `num_steps` an EDM teacher gives EDM's own samples.
"""

import collections
import operator
import os
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dmd.edm2.vae import LatentCodec, latent_info
from dmd.generator import SIGMA_G, check_sigmas, sample

# Re-exported: dmd.generate's API before the file readers moved to dmd/generator_files.py.
from dmd.generator_files import PORT_SIGMA_G as PORT_SIGMA_G  # noqa: F401
from dmd.generator_files import GeneratorLoadError as GeneratorLoadError  # noqa: F401
from dmd.generator_files import load_generator as load_generator  # noqa: F401
from dmd.generator_files import read_network, resolve_network
from dmd.utils import distributed
from dmd.utils.common import make_grid, one_hot, parse_int_list, resolve_device, to_uint8
from dmd.utils.io import atomic_path, atomic_save_image


def _seed(value):
    """A seed as an int: an int, a NumPy integer or a 0-d integer tensor; a float (0.5 used to become seed 0) is a
    ValueError."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"seeds must be integers, got {value!r}") from None


# Sampling of a loaded generator (one step, or its own few-step sigma list), per-seed reproducible; also samples an
# EDM teacher with `num_steps`.
class DMDGenerator:
    """Sample images from a one-step (or few-step) generator, or from an EDM teacher, reproducibly per seed.

    Build it from a file, `DMDGenerator(network_path, device=None, cache_dir=None)`: a `network-snapshot-*.pt` or
    `training-state-*.pt` of `dmd train` (or its run folder: the newest snapshot), a folder `dmd export` wrote, an EDM
    network pickle, or the port's checkpoint, as a local path or an http(s):// or file:// URL (downloaded once into
    `cache_dir`, else $DMD_CACHE_DIR, else ~/.cache/dmd); or an exported model on the Hugging Face Hub as
    'hf://user/repo' or 'hf://user/repo@revision' (huggingface_hub's own cache; HF_HUB_OFFLINE=1 reads only it).
    `device` None or 'auto' picks cuda when available. Or wrap a network in memory, `DMDGenerator(net=G)`: it is not
    moved, and `device` defaults to its parameters'. The noise levels default to the file's (a dmd file's own list,
    80 for an EDM pickle, 79.56 for the port's checkpoint) and to 80 with `net=`; `sigma_G=` replaces them by one
    level, `sigmas=` by a decreasing list such as [80, 1.5]; every list is checked with `check_sigmas` against the
    network's range. Bad arguments raise ValueError, unloadable files GeneratorLoadError. `ema=` picks the network
    of a training state (or of a run folder with several EMAs) by its `train --ema` name, '0.9999' or '10kimg', or
    'none' for G itself; None takes the run's first EMA (G where it kept none); a name it does not hold is a
    GeneratorLoadError listing those it does.

    `generate_batch` returns (N, C, R, R) float32 images in [-1, 1]. A network that runs on VAE latents (EDM2's
    img512 teachers and their students) is decoded by its VAE: `vae=` a folder saved with `save_pretrained`, a Hub
    name or a loaded `LatentCodec`; None: the name its file records ('stabilityai/sd-vae-ft-mse'), loaded at the first
    decode; `generate_batch(..., output='latents')` returns the latents themselves. The attributes `net` (in eval
    mode and frozen when it was loaded from a file), `device`, `sigmas` and `source` (the file or folder loaded; None
    with `net=`), and the properties `sigma_G`, `label_dim`, `img_channels` and `img_resolution` (the network's,
    latents for a latent network) describe what was loaded.

    Example:
        G = DMDGenerator("runs/dmd-cifar10/network-snapshot-best.pt")
        images = G.generate_batch(seeds=range(16), class_ids=3)  # (16, 3, 32, 32), class 3, one image per seed
        teacher = DMDGenerator("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        reference = teacher.generate_batch(seeds=range(16), num_steps=18)  # EDM's sampler, EDM's own images
    """

    def __init__(
        self,
        network_path: Union[str, os.PathLike, None] = None,  # Any source above: file, folder, URL, hf://user/repo.
        device: Union[str, torch.device, None] = None,  # None/'auto': cuda when available, else cpu.
        cache_dir: Union[str, os.PathLike, None] = None,  # Download cache for URLs.
        sigma_G: Optional[float] = None,  # One-step noise level overriding the file's (80 for EDM pickles).
        net: Optional[torch.nn.Module] = None,  # An in-memory network instead of network_path (e.g. G_ema).
        sigmas: Optional[Sequence[float]] = None,  # The generator's noise levels, e.g. [80, 1.5]; None: the file's.
        vae: Union[str, os.PathLike, LatentCodec, None] = None,  # A latent network's VAE; None: its file's name.
        ema: Optional[str] = None,  # A training state's or run folder's EMA by --ema name; 'none': G; None: first.
    ) -> None:

        if (network_path is None) == (net is None):
            raise ValueError("DMDGenerator needs exactly one of network_path and net")
        if ema is not None and net is not None:
            raise ValueError("ema= selects a network of a file: give it with network_path, not net")
        if sigma_G is not None and sigmas is not None:
            raise ValueError("give sigma_G (one step) or sigmas (the list), not both")
        if net is None:
            self.device = resolve_device(device)
            loaded = read_network(network_path, cache_dir=cache_dir, ema=ema)
            net, stored, self.source = loaded.net.to(self.device), loaded.sigmas, loaded.path
        else:
            self.device = next(net.parameters()).device if device is None else torch.device(device)
            stored, self.source = [SIGMA_G], None
        self.net = net
        self.latent = latent_info(net) is not None  # runs on VAE latents: images are decoded
        if vae is not None and not self.latent:
            raise ValueError("vae= is for networks that run on VAE latents; this one runs on pixels")
        self._codec = vae if isinstance(vae, LatentCodec) else None
        self._vae_source, self._cache_dir = (None if self._codec else vae), cache_dir
        if sigmas is not None:
            self.sigmas = check_sigmas(sigmas, "sigmas", net)
        elif sigma_G is not None:
            self.sigmas = check_sigmas([sigma_G], "sigma_G", net)
        else:
            self.sigmas = check_sigmas(stored, "the default sigma_G", net)  # a file's were checked as it loaded

    def __repr__(self) -> str:
        classes = self.label_dim or "unconditional"
        return (
            f"DMDGenerator(source={self.source!r}, net={type(self.net).__name__}, resolution={self.img_resolution}, "
            f"channels={self.img_channels}, classes={classes}, sigmas={self.sigmas}, device='{self.device}')"
        )

    @property
    def sigma_G(self) -> float:
        """The first noise level (the only one of a one-step generator)."""
        return self.sigmas[0]

    @property
    def codec(self):
        """The LatentCodec that decodes a latent network's samples (its VAE loaded at the first use), else None."""
        from dmd.edm2.vae import load_codec

        if self.latent and self._codec is None:
            self._codec = load_codec(self.net, self._vae_source, cache_dir=self._cache_dir, device=self.device)
        return self._codec

    @property
    def label_dim(self) -> int:
        """Number of classes of the network; 0 for an unconditional one."""
        return self.net.label_dim

    @property
    def img_channels(self) -> int:
        """Channels C of the images."""
        return self.net.img_channels

    @property
    def img_resolution(self) -> int:
        """Height and width R of the images."""
        return self.net.img_resolution

    def _class_ids(self, class_ids, n):
        """Resolve class_ids (None, an int, a list or a tensor) to (n,) int64 on the device, or None."""
        if class_ids is None:
            return None
        if self.label_dim == 0:
            raise ValueError("class_ids were given but the network is unconditional (label_dim 0)")
        ids = torch.as_tensor(class_ids, dtype=torch.int64, device=self.device).flatten()
        if ids.numel() == 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise ValueError(f"class_ids has {ids.numel()} entries for {n} images")
        if bool(((ids < 0) | (ids >= self.label_dim)).any()):
            raise ValueError(f"class_ids must lie in [0, {self.label_dim}), got {ids.unique().tolist()}")
        return ids

    def _sample(self, z, labels, randn_like, num_steps, sampler_kwargs):
        """Images from unscaled noise z (B, C, R, R) and class indices (B,) or None, clamped to [-1, 1] (a latent
        network's latents as they come); randn_like gives the fresh noise between the levels of a few-step generator
        (per seed, after the latent and label)."""
        c = None if labels is None else one_hot(labels, self.label_dim, self.device)
        if num_steps is None:
            x = sample(self.net, z, c, self.sigmas, noise=lambda level: randn_like(z))
        else:
            from dmd.edm.sampler import edm_sampler

            x = edm_sampler(self.net, z, c, randn_like=randn_like, num_steps=num_steps, **sampler_kwargs)
        return x.float() if self.latent else x.float().clamp(-1, 1)

    def generate_batch(
        self,
        seeds: Union[str, Sequence[int], None] = None,
        class_ids: Union[int, Sequence[int], torch.Tensor, None] = None,
        latents: Optional[torch.Tensor] = None,
        batch_size: Optional[int] = None,
        num_steps: Optional[int] = None,
        output: str = "pixels",
        **sampler_kwargs: float,
    ) -> torch.Tensor:
        """Generate (N, C, R, R) float32 images in [-1, 1] on the device from seeds or from unscaled latents.

        Give exactly one of `seeds` (a list of ints, or a string such as '0-63,100') and `latents` (N, C, R, R)
        unscaled N(0, I) noise. Each image draws its latent, then its label, then any further noise from its seed's
        generator, as EDM's generate.py does, so its draws depend on its seed, not on the batch; with `latents`, any
        further noise comes from torch's global RNG. `class_ids`: one class for every image (an int) or one per image
        (a list or tensor); None lets each seed draw its label, and latents on a class-conditional network need it.
        `batch_size`: images per network call (None: all at once). `num_steps`: None samples the generator at its
        sigmas; N runs `edm_sampler` in N steps (2N - 1 network calls), as for a teacher, with `sampler_kwargs`
        (sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise) as its other settings. A latent network's samples
        are decoded by its VAE (N, 3, 8R, 8R for SD's VAE), or returned as latents with `output='latents'`. The network
        runs in eval mode under torch.inference_mode(), and its training flag is restored afterwards.
        """
        from dmd.edm.sampler import StackedRandomGenerator

        if (seeds is None) == (latents is None):
            raise ValueError("generate_batch needs exactly one of seeds and latents")
        if sampler_kwargs and num_steps is None:
            raise ValueError(f"sampler settings {sorted(sampler_kwargs)} need num_steps (they set EDM's sampler)")
        if output not in ("pixels", "latents") or (output == "latents" and not self.latent):
            raise ValueError(f"output must be 'pixels' (or 'latents' for a latent network), not {output!r}")
        decode = self.codec.decode_to_unit if self.latent and output == "pixels" else (lambda x: x)
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if latents is not None:
            latents = torch.as_tensor(latents, dtype=torch.float32, device=self.device)
            if latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
                raise ValueError(f"latents must have shape (N, *{shape}), not {tuple(latents.shape)}")
            n = latents.shape[0]
            if self.label_dim > 0 and class_ids is None:
                raise ValueError("class_ids are needed with latents on a class-conditional network")
        else:
            seeds = parse_int_list(seeds) if isinstance(seeds, str) else [_seed(s) for s in seeds]
            n = len(seeds)
        ids = self._class_ids(class_ids, n)
        batch_size = batch_size or max(n, 1)

        was_training = self.net.training
        self.net.eval()  # dropout off: a sample depends on its seed only
        try:
            with torch.inference_mode():
                out = []
                for lo in range(0, n, batch_size):
                    hi = min(lo + batch_size, n)
                    labels = None if ids is None else ids[lo:hi]
                    if latents is not None:
                        x = self._sample(latents[lo:hi], labels, torch.randn_like, num_steps, sampler_kwargs)
                        out.append(decode(x))
                        continue
                    rnd = StackedRandomGenerator(self.device, seeds[lo:hi])
                    z = rnd.randn([hi - lo, *shape], device=self.device)
                    if self.label_dim > 0:
                        drawn = rnd.randint(self.label_dim, size=[hi - lo], device=self.device)  # keeps EDM's stream
                        labels = drawn if labels is None else labels
                    out.append(decode(self._sample(z, labels, rnd.randn_like, num_steps, sampler_kwargs)))
                images = torch.cat(out) if out else torch.empty(0, *shape, device=self.device)
        finally:
            self.net.train(was_training)
        return images


def png_path(outdir, seed, subdirs=False):
    """Where EDM's generate.py puts the image of `seed`: outdir/{seed:06d}.png, or in a folder per 1000 seeds."""
    outdir = Path(outdir)
    if subdirs:
        outdir = outdir / f"{seed - seed % 1000:06d}"
    return outdir / f"{seed:06d}.png"


def save_png(pixels, path):
    """Write an (H, W, C) uint8 image as an RGB or L PNG atomically.

    No fsync per image: 50k fsyncs would cost minutes, and a crash only loses whole images.
    """
    import PIL.Image

    image = PIL.Image.fromarray(pixels[:, :, 0], "L") if pixels.shape[2] == 1 else PIL.Image.fromarray(pixels, "RGB")
    with atomic_path(path, fsync=False) as tmp:
        image.save(tmp, format="PNG")


def read_png(path):
    """Read a PNG written by `save_png` back as a (1, C, H, W) float tensor that `to_uint8` maps to the same bytes."""
    import PIL.Image

    pixels = np.asarray(PIL.Image.open(path, formats=["PNG"]))  # decoded as what it must be, whatever its bytes
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() - 127.5) / 127.5


def rank_batches(seeds, batch_size):
    """EDM's split of seeds over ranks: ceil(n / (batch * world)) * world batches, rank k takes every world-th one."""
    world = distributed.get_world_size()
    num_batches = max((len(seeds) - 1) // (batch_size * world) + 1, 1) * world
    batches = torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)
    return [b.tolist() for b in batches[distributed.get_rank() :: world]]


def load_on_ranks(network, *, device, cache_dir=None, sigma_G=None, vae=None, ema=None):
    """Build a DMDGenerator on every rank, rank 0 first so a download (of the network, or of a latent network's VAE)
    happens once; a run folder's newest snapshot (of the EMA `ema`, with several) is named on rank 0."""
    resolved = resolve_network(network, ema)
    if resolved is not network:
        distributed.print0(f"{network}: a run folder; loading its newest snapshot, {Path(resolved).name}")

    def load():
        generator = DMDGenerator(resolved, device=device, cache_dir=cache_dir, sigma_G=sigma_G, vae=vae, ema=ema)
        generator.codec  # noqa: B018 (loads a latent network's VAE now, not at the first batch)
        return generator

    return distributed.main_first(load)


def load_guide(generator, sampler_kwargs, *, device, cache_dir=None):
    """`sampler_kwargs` with a guiding network given by path or URL (`guide`, the commands' --guide-network) loaded on
    every rank (rank 0 first) and checked against the generator's network; ValueError naming the flag if it does not
    load or fit."""
    from dmd.edm.sampler import load_guided

    guide = (sampler_kwargs or {}).get("guide")
    if not isinstance(guide, (str, os.PathLike)):
        return sampler_kwargs
    guidance = sampler_kwargs.get("guidance", 1.0)
    load = partial(load_guided, generator.net, guide, guidance, cache_dir=cache_dir, device=device)
    guided, _ = distributed.main_first(load)
    return dict(sampler_kwargs, guide=guided.guide)


def refuse_repeated_seeds(seeds, flag="--seeds"):
    """ValueError naming a seed given more than once: each seed is one image (one PNG name, one FID sample)."""
    counts = collections.Counter(seeds)
    repeated = [seed for seed, count in counts.items() if count > 1]
    if repeated:
        more = f" (and {len(repeated) - 1} other seeds)" if len(repeated) > 1 else ""
        raise ValueError(
            f"{flag} gives seed {repeated[0]} {counts[repeated[0]]} times{more}; each seed is one image: list it once"
        )


def describe_sampling(sigmas, num_steps=None, guidance=1.0):
    """How images are made, for titles and model cards: 'one step (sigma 80)', '2 steps (sigmas 80, 1.5)', or EDM's
    sampler in `num_steps` steps (guided, with its weight)."""
    if num_steps is not None:
        return f"EDM's sampler, {num_steps} steps" + (f", guidance {guidance:g}" if guidance != 1 else "")
    levels = ", ".join(f"{s:g}" for s in sigmas)
    return f"one step (sigma {levels})" if len(sigmas) == 1 else f"{len(sigmas)} steps (sigmas {levels})"


def seed_span(seeds):
    """A grid row's label: 'seed 8' for one seed, 'seeds 8-15' for a run of seeds, else the first and an ellipsis."""
    first, last = seeds[0], seeds[-1]
    if len(seeds) == 1:
        return f"seed {first}"
    return f"seeds {first}-{last}" if seeds == list(range(first, last + 1)) else f"seeds {first}, ..."


def generate_images(
    network,  # Anything DMDGenerator loads: path or URL.
    outdir,  # Folder for the PNGs.
    seeds="0-63",  # Seed list or range string.
    class_idx=None,  # One class for every image; None: drawn per seed (or cycled with class_balanced).
    class_balanced=False,  # Seed s gets class s % label_dim, as in the FID protocol.
    grid=None,  # Also write a grid of all images here: ceil(sqrt(n)) a row, or a multiple of the classes.
    batch_size=256,  # Images per network call, per process.
    num_steps=None,  # None: one step. N: sample with edm_sampler in N steps (an EDM teacher).
    sampler_kwargs=None,  # edm_sampler's other settings with num_steps (sigma_min, sigma_max, rho, S_churn, ...).
    subdirs=False,  # One folder per 1000 seeds, as EDM's --subdirs.
    device="auto",  # 'auto', 'cpu', 'cuda', 'cuda:1'; under torchrun CUDA ranks use their local device.
    cache_dir=None,  # Download cache for URLs.
    progress=True,  # tqdm bar on rank 0.
    vae=None,  # A latent network's VAE (folder or Hub name); None: the name its file records.
    ema=None,  # A training state's or run folder's EMA by --ema name; 'none': G itself; None: the first.
):
    """Write one PNG per seed (quantised exactly as EDM does) and optionally a grid; return the list of paths."""
    from tqdm import tqdm

    seeds = parse_int_list(seeds)
    if not seeds:
        raise ValueError("--seeds is empty")
    refuse_repeated_seeds(seeds)
    if class_idx is not None and class_balanced:
        raise ValueError("--class and --class-balanced exclude each other")
    device = distributed.setup_device(device)
    generator = load_on_ranks(network, device=device, cache_dir=cache_dir, vae=vae, ema=ema)
    sampler_kwargs = load_guide(generator, sampler_kwargs, device=device, cache_dir=cache_dir)
    if (class_balanced or class_idx is not None) and generator.label_dim == 0:
        raise ValueError("--class and --class-balanced need a class-conditional network")
    if class_idx is not None and class_idx >= generator.label_dim:
        raise ValueError(f"--class {class_idx} is out of range: the network has {generator.label_dim} classes")

    batches = rank_batches(seeds, batch_size)
    for batch in tqdm(batches, unit="batch", desc="generate", disable=not (progress and distributed.is_main())):
        if not batch:
            continue
        class_ids = class_idx
        if class_balanced:
            class_ids = torch.as_tensor(batch) % generator.label_dim
        images = generator.generate_batch(
            seeds=batch, class_ids=class_ids, num_steps=num_steps, **(sampler_kwargs or {})
        )
        for seed, pixels in zip(batch, to_uint8(images)):
            save_png(pixels, png_path(outdir, seed, subdirs))
    distributed.barrier()

    paths = [png_path(outdir, seed, subdirs) for seed in seeds]
    if grid is not None and distributed.is_main():
        images = torch.cat([read_png(p) for p in paths])
        guidance = (sampler_kwargs or {}).get("guidance", 1.0)
        title = f"{Path(generator.source).name}, {describe_sampling(generator.sigmas, num_steps, guidance)}"
        classes = torch.as_tensor(seeds) % generator.label_dim if class_balanced else class_idx
        atomic_save_image(sample_grid(images, seeds, generator.label_dim, classes, title, class_balanced), grid)
    distributed.print0(f"{len(seeds)} images in {outdir}" + (f", grid {grid}" if grid is not None else ""))
    return paths


def sample_grid(images, seeds, label_dim, classes, title, class_balanced=False):
    """A labelled grid of `images` (N, C, R, R) in [-1, 1] made from `seeds`: ceil(sqrt(N)) a row, or a multiple of
    the classes with `class_balanced`; rows named by their seeds, cells by their class where `classes` (one int or
    (N,)) gives it; None: each class drawn from its seed, which the title says."""
    n = len(seeds)
    nrow = int(np.ceil(np.sqrt(n)))
    if class_balanced and label_dim <= n:  # columns: the classes
        nrow = label_dim * max(1, round(np.sqrt(n) / label_dim))
    row_labels = [seed_span(seeds[i : i + nrow]) for i in range(0, n, nrow)]
    title += ", classes drawn from the seeds" if label_dim and classes is None else ""
    return make_grid(images, nrow, row_labels, class_ids=classes, title=title)
