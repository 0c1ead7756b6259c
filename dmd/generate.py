"""One-step generation: `DMDGenerator` loads any network `dmd` knows and maps per-seed noise to images.

Sources, detected from the file itself:
  - our `network-snapshot-*.pt` (inference weights, the generator's sigma list stored with them);
  - our `training-state-*.pt` (G_ema if the run kept an EMA, else G);
  - an EDM network pickle (its 'ema' network, used as a one-step generator at sigma_G = 80);
  - the unofficial port's released checkpoint, a torch.save dict whose 'model_g' holds an EDMPrecond state dict.

Seeds work as in EDM's generate.py: each image has its own `StackedRandomGenerator` stream, drawn in the order latent
(C, R, R), then label (randint(label_dim), conditional networks only), then one noise per sampler step. A seed thus
gives the same image whatever the batch it is in, and with `num_steps` an EDM teacher gives EDM's own samples.
"""

import operator
import os
import zipfile
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dmd.edm.presets import DDPMPP
from dmd.generator import FORMAT_VERSION, SIGMA_G, SNAPSHOT_FORMAT, STATE_FORMAT, sample
from dmd.utils import distributed
from dmd.utils.common import make_grid, one_hot, parse_int_list, resolve_device, to_uint8
from dmd.utils.io import atomic_path, atomic_save_image

# The port trained its generator at index 998 of a 1000-level Karras grid (sigma_min 0.002, sigma_max 80, rho 7)
# instead of at 80; its released weights expect that input scale.
PORT_SIGMA_G = 79.56382521581216


class GeneratorLoadError(RuntimeError):
    """A file is not a network `DMDGenerator` can load; the message names the file."""


def _strip_prefixes(state_dict):
    """Drop the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes a saved state dict may carry."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def port_init_kwargs(state_dict, path):
    """Infer the EDMPrecond + DDPM++ kwargs of the port's generator from its state dict's key names and shapes."""
    convs = [k for k in state_dict if k.startswith("model.enc.") and k.endswith("_conv.weight")]
    if len(convs) != 1 or "model.map_layer0.weight" not in state_dict:
        raise GeneratorLoadError(f"{path}: 'model_g' is not the state dict of an EDMPrecond with a DDPM++ SongUNet")
    resolution = int(convs[0].split(".")[2].split("x")[0])  # 'model.enc.32x32_conv.weight' -> 32
    model_channels, img_channels = state_dict[convs[0]].shape[:2]  # (model_channels, img_channels, 3, 3)
    emb_channels, noise_channels = state_dict["model.map_layer0.weight"].shape

    # One level per halving of the resolution; its width is that of its first block, its depth the number of blocks.
    channel_mult, attn_resolutions, level_res = [], [], resolution
    while f"model.enc.{level_res}x{level_res}_block0.conv1.weight" in state_dict:
        block0 = f"model.enc.{level_res}x{level_res}_block0"
        channel_mult.append(state_dict[f"{block0}.conv1.weight"].shape[0] // model_channels)
        if f"{block0}.qkv.weight" in state_dict:
            attn_resolutions.append(level_res)
        level_res //= 2
    level0 = f"model.enc.{resolution}x{resolution}_block"
    num_blocks = len({k.split(".")[2] for k in state_dict if k.startswith(level0)})  # '32x32_block0', ...

    def in_features(key):
        return state_dict[key].shape[1] if key in state_dict else 0

    return dict(
        DDPMPP,
        img_resolution=resolution,
        img_channels=int(img_channels),
        label_dim=in_features("model.map_label.weight"),
        augment_dim=in_features("model.map_augment.weight"),
        model_channels=int(model_channels),
        channel_mult=channel_mult,
        channel_mult_emb=int(emb_channels // model_channels),
        channel_mult_noise=int(noise_channels // model_channels),
        num_blocks=num_blocks,
        attn_resolutions=attn_resolutions,
        dropout=0.13,
    )


def _build(path, class_name, init_kwargs, state_dict):
    """Build a network and load its weights strictly; GeneratorLoadError naming `path` if they do not fit (or if
    its constructor kwargs are out of the sane ranges, so a hostile file cannot make the build spin or allocate)."""
    from dmd.edm.precond import build_network, check_init_kwargs

    try:
        if not isinstance(init_kwargs, dict):
            raise TypeError(f"init_kwargs is a {type(init_kwargs).__name__}, not a dict")
        check_init_kwargs(init_kwargs)
        net = build_network(class_name, init_kwargs)
        net.load_state_dict(state_dict, strict=True)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GeneratorLoadError(f"{path}: the weights do not fit {class_name}: {' '.join(str(e).split())}") from e
    return net


def _from_torch_file(path):
    """Build the network of one of our snapshots or training states, or of the port's checkpoint: (net, sigmas)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GeneratorLoadError(f"{path}: not a readable torch file, truncated or corrupt ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise GeneratorLoadError(f"{path}: holds a {type(data).__name__}, not a dmd snapshot or training state")
    kind = data.get("format")
    if kind in (SNAPSHOT_FORMAT, STATE_FORMAT):
        if data.get("version", 0) > FORMAT_VERSION:
            raise GeneratorLoadError(f"{path}: {kind} version {data['version']}; this dmd reads up to {FORMAT_VERSION}")
        try:
            if kind == SNAPSHOT_FORMAT:
                state_dict = data["state_dict"]
            else:
                state_dict = data["G_ema"] if data.get("G_ema") is not None else data["G"]
            class_name, init_kwargs = data["class_name"], data["init_kwargs"]
            sigmas = [float(s) for s in data.get("generator_sigmas", [data["sigma_G"]])]  # one-step files: sigma_G
        except KeyError as e:
            raise GeneratorLoadError(f"{path}: {kind} without the entry {e}") from e
        except (TypeError, ValueError) as e:
            raise GeneratorLoadError(f"{path}: {kind} with malformed noise levels (sigma_G, generator_sigmas)") from e
        return _build(path, class_name, init_kwargs, state_dict), sigmas
    if "model_g" in data:
        state_dict = _strip_prefixes(data["model_g"])
        return _build(path, "EDMPrecond", port_init_kwargs(state_dict, path), state_dict), [PORT_SIGMA_G]
    keys = ", ".join(sorted(map(str, data))[:8])
    raise GeneratorLoadError(f"{path}: not a dmd snapshot, training state or port checkpoint (keys: {keys})")


def load_generator(
    source: Union[str, os.PathLike],
    *,
    cache_dir: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[torch.nn.Module, List[float]]:
    """Load a network from any supported file (path or URL): return (net in eval mode, frozen, generator sigmas).

    The file is one of `DMDGenerator`'s sources (a dmd snapshot or training state, an EDM network pickle, the port's
    checkpoint), recognised by its contents; the sigmas are the file's (80 for an EDM pickle, 79.56 for the port's).
    A missing file, a failed download, a file that is none of these or weights that do not fit raise GeneratorLoadError
    naming the file.
    """
    from dmd.edm.persistence import NetworkLoadError, load_network
    from dmd.utils.download import DownloadError, open_url

    try:
        path = open_url(source, cache_dir=cache_dir)
    except (DownloadError, FileNotFoundError) as e:
        raise GeneratorLoadError(str(e)) from e
    with open(path, "rb") as f:
        head = f.read(1)
    if zipfile.is_zipfile(path):  # torch.save's format
        net, sigmas = _from_torch_file(path)
    elif head == b"\x80":  # a pickle (protocol >= 2), as EDM writes its networks
        try:
            net, sigmas = load_network(path, cache_dir=cache_dir), [SIGMA_G]
        except NetworkLoadError as e:
            raise GeneratorLoadError(str(e)) from e
    else:
        raise GeneratorLoadError(
            f"{path}: not a dmd snapshot, training state, port checkpoint (torch.save zip) or EDM pickle"
        )
    return net.eval().requires_grad_(False).to(device), sigmas


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
    `training-state-*.pt` of `dmd train`, an EDM network pickle, or the port's checkpoint, as a local path or an
    http(s):// or file:// URL (downloaded once into `cache_dir`, else $DMD_CACHE_DIR, else ~/.cache/dmd). `device`
    None or 'auto' picks cuda when available. Or wrap a network in memory, `DMDGenerator(net=G)`: it is not moved,
    and `device` defaults to its parameters'. The noise levels default to the file's (a dmd file's own list, 80 for
    an EDM pickle, 79.56 for the port's checkpoint) and to 80 with `net=`; `sigma_G=` replaces them by one level,
    `sigmas=` by a decreasing list such as [80, 1.5]. Bad arguments raise ValueError, unloadable files
    GeneratorLoadError.

    `generate_batch` returns (N, C, R, R) float32 images in [-1, 1]. The attributes `net` (in eval mode and frozen
    when it was loaded from a file), `device` and `sigmas`, and the properties `sigma_G`, `label_dim`, `img_channels`
    and `img_resolution` describe what was loaded.

    Example:
        G = DMDGenerator("runs/dmd-cifar10/network-snapshot-best.pt")
        images = G.generate_batch(seeds=range(16), class_ids=3)  # (16, 3, 32, 32), class 3, one image per seed
        teacher = DMDGenerator("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        reference = teacher.generate_batch(seeds=range(16), num_steps=18)  # EDM's sampler, EDM's own images
    """

    def __init__(
        self,
        network_path: Union[str, os.PathLike, None] = None,  # Snapshot, training state, EDM pickle or port checkpoint.
        device: Union[str, torch.device, None] = None,  # None/'auto': cuda when available, else cpu.
        cache_dir: Union[str, os.PathLike, None] = None,  # Download cache for URLs.
        sigma_G: Optional[float] = None,  # One-step noise level overriding the file's (80 for EDM pickles).
        net: Optional[torch.nn.Module] = None,  # An in-memory network instead of network_path (e.g. G_ema).
        sigmas: Optional[Sequence[float]] = None,  # The generator's noise levels, e.g. [80, 1.5]; None: the file's.
    ) -> None:
        if (network_path is None) == (net is None):
            raise ValueError("DMDGenerator needs exactly one of network_path and net")
        if sigma_G is not None and sigmas is not None:
            raise ValueError("give sigma_G (one step) or sigmas (the list), not both")
        if net is None:
            self.device = resolve_device(device)
            net, stored = load_generator(network_path, cache_dir=cache_dir, device=self.device)
        else:
            self.device = next(net.parameters()).device if device is None else torch.device(device)
            stored = [SIGMA_G]
        self.net = net
        if sigmas is None:
            sigmas = stored if sigma_G is None else [sigma_G]
        self.sigmas = [float(s) for s in sigmas]
        if not self.sigmas or any(s <= 0 for s in self.sigmas) or self.sigmas != sorted(self.sigmas, reverse=True):
            raise ValueError(f"generator sigmas must be positive and decreasing, not {self.sigmas}")

    @property
    def sigma_G(self) -> float:
        """The first noise level (the only one of a one-step generator)."""
        return self.sigmas[0]

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
        """Images from unscaled noise z (B, C, R, R) and class indices (B,) or None, clamped to [-1, 1]; randn_like
        gives the fresh noise between the levels of a few-step generator (per seed, after the latent and label)."""
        c = None if labels is None else one_hot(labels, self.label_dim, self.device)
        if num_steps is None:
            x = sample(self.net, z, c, self.sigmas, noise=lambda level: randn_like(z))
        else:
            from dmd.edm.sampler import edm_sampler

            x = edm_sampler(self.net, z, c, randn_like=randn_like, num_steps=num_steps, **sampler_kwargs)
        return x.float().clamp(-1, 1)

    def generate_batch(
        self,
        seeds: Union[str, Sequence[int], None] = None,
        class_ids: Union[int, Sequence[int], torch.Tensor, None] = None,
        latents: Optional[torch.Tensor] = None,
        batch_size: Optional[int] = None,
        num_steps: Optional[int] = None,
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
        (sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise) as its other settings. The network runs in eval
        mode under torch.inference_mode(), and its training flag is restored afterwards.
        """
        from dmd.edm.sampler import StackedRandomGenerator

        if (seeds is None) == (latents is None):
            raise ValueError("generate_batch needs exactly one of seeds and latents")
        if sampler_kwargs and num_steps is None:
            raise ValueError(f"sampler settings {sorted(sampler_kwargs)} need num_steps (they set EDM's sampler)")
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
                        out.append(self._sample(latents[lo:hi], labels, torch.randn_like, num_steps, sampler_kwargs))
                        continue
                    rnd = StackedRandomGenerator(self.device, seeds[lo:hi])
                    z = rnd.randn([hi - lo, *shape], device=self.device)
                    if self.label_dim > 0:
                        drawn = rnd.randint(self.label_dim, size=[hi - lo], device=self.device)  # keeps EDM's stream
                        labels = drawn if labels is None else labels
                    out.append(self._sample(z, labels, rnd.randn_like, num_steps, sampler_kwargs))
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

    pixels = np.asarray(PIL.Image.open(path))
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() - 127.5) / 127.5


def rank_batches(seeds, batch_size):
    """EDM's split of seeds over ranks: ceil(n / (batch * world)) * world batches, rank k takes every world-th one."""
    world = distributed.get_world_size()
    num_batches = max((len(seeds) - 1) // (batch_size * world) + 1, 1) * world
    batches = torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)
    return [b.tolist() for b in batches[distributed.get_rank() :: world]]


def load_on_ranks(network, *, device, cache_dir=None, sigma_G=None):
    """Build a DMDGenerator on every rank, rank 0 first so a URL is downloaded once."""
    return distributed.main_first(partial(DMDGenerator, network, device=device, cache_dir=cache_dir, sigma_G=sigma_G))


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
):
    """Write one PNG per seed (quantised exactly as EDM does) and optionally a grid; return the list of paths."""
    from tqdm import tqdm

    seeds = parse_int_list(seeds)
    if not seeds:
        raise ValueError("--seeds is empty")
    if class_idx is not None and class_balanced:
        raise ValueError("--class and --class-balanced exclude each other")
    device = distributed.setup_device(device)
    generator = load_on_ranks(network, device=device, cache_dir=cache_dir)
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
        n, label_dim = len(seeds), generator.label_dim
        nrow = int(np.ceil(np.sqrt(n)))
        classes = None  # each image's class where the command fixed it; drawn classes are not known here
        if class_balanced:
            classes = torch.as_tensor(seeds) % label_dim
            nrow = label_dim * max(1, round(np.sqrt(n) / label_dim)) if label_dim <= n else nrow  # columns: classes
        elif class_idx is not None:
            classes = class_idx
        row_labels = [seed_span(seeds[i : i + nrow]) for i in range(0, n, nrow)]
        title = f"{Path(str(network)).name}, {'one step' if num_steps is None else f'{num_steps} steps'}"
        title += ", classes drawn from the seeds" if label_dim and classes is None else ""
        images = torch.cat([read_png(p) for p in paths])
        atomic_save_image(make_grid(images, nrow, row_labels, class_ids=classes, title=title), grid)
    distributed.print0(f"{len(seeds)} images in {outdir}" + (f", grid {grid}" if grid is not None else ""))
    return paths
