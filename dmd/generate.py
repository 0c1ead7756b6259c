"""One-step generation: `DMDGenerator` loads any network `dmd` knows and maps per-seed noise to images.

Sources, detected from the file itself:
  - our `network-snapshot-*.pt` (inference weights, the generator's sigma list stored with them);
  - our `training-state-*.pt` (its first EMA of G if the run kept any, else G; `ema=` picks another, 'none' G);
  - a run folder of `dmd train`: its newest `network-snapshot-NNNNNN.pt` (of the first EMA, or of `ema=`'s);
  - a folder written by `dmd export` (model.safetensors + config.json), or one on the Hugging Face Hub,
    `hf://user/repo` or `hf://user/repo@revision` (dmd/export.py);
  - an EDM network pickle (its 'ema' network, used as a one-step generator at sigma_G = 80);
  - the unofficial port's released checkpoint, a torch.save dict whose 'model_g' holds an EDMPrecond state dict.
Every network is built from its recorded kwargs only after its tensors are checked against the shapes those kwargs
give, and every noise list is checked (`check_sigmas`) against the network's range, so a bad file is one line.

Seeds work as in EDM's generate.py: each image has its own `StackedRandomGenerator` stream, drawn in the order latent
(C, R, R), then label (randint(label_dim), conditional networks only), then one noise per sampler step. A seed thus
gives the same image whatever the batch it is in, and with `num_steps` an EDM teacher gives EDM's own samples.
"""

import collections
import json
import operator
import os
import re
import reprlib
import zipfile
from functools import partial
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dmd.edm.presets import DDPMPP
from dmd.edm2.vae import LatentCodec, latent_info
from dmd.generator import FORMAT_VERSION, SIGMA_G, SNAPSHOT_FORMAT, STATE_FORMAT, SigmaError, check_sigmas, sample
from dmd.utils import distributed
from dmd.utils.common import make_grid, one_hot, parse_int_list, resolve_device, to_uint8
from dmd.utils.io import atomic_path, atomic_save_image

# The port trained its generator at index 998 of a 1000-level Karras grid (sigma_min 0.002, sigma_max 80, rho 7)
# instead of at 80; its released weights expect that input scale.
PORT_SIGMA_G = 79.56382521581216


class GeneratorLoadError(RuntimeError):
    """A file is not a network `DMDGenerator` can load; the message names the file."""


RAW_G = "none"  # `ema=` / --ema naming G itself rather than one of its EMAs


def ema_name(ema):
    """The --ema name `ema` selects (parse_ema's normal form: '0.99990' -> '0.9999'), or RAW_G; ValueError naming
    --ema for a misspelt one."""
    from dmd.config import parse_ema

    text = str(ema).strip().lower()
    return RAW_G if text == RAW_G else parse_ema([text])[0]


def _choices(names):
    return ", ".join([*names, RAW_G])


def select_state_network(path, data, ema):
    """(--ema name, weights) of the network of a training state `ema` selects: None: its first EMA (G where the run
    kept none); RAW_G: G (name None); else the EMA of that --ema name. GeneratorLoadError listing the EMAs it holds
    for any other name."""
    from dmd.checkpoint import state_emas

    emas = state_emas(data)
    if not isinstance(emas, dict):
        raise GeneratorLoadError(f"{path}: its EMAs are a {type(emas).__name__}, not weights by --ema name")
    name = next(iter(emas), RAW_G) if ema is None else ema_name(ema)
    if name == RAW_G:
        return None, data["G"]
    if name not in emas:
        raise GeneratorLoadError(f"{path}: holds no EMA {ema!r} (--ema); choose one of {_choices(emas)} (G itself)")
    return name, emas[name]


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


def build_checked(path, class_name, init_kwargs, state_dict, encoder=None):
    """Build a network from a file's class name, kwargs and tensors, checked in that order before anything is
    allocated: the kwargs within their sane ranges (so a hostile file cannot make the build spin or allocate), then
    the tensors against the shapes the kwargs give (one line naming `path`, how many tensors misfit and one of them,
    as for EDM pickles), then the weights loaded strictly; then the recorded `encoder` (EDM2's latent space, or None)
    is attached. GeneratorLoadError naming `path` for any misfit."""
    from dmd.edm.persistence import NetworkLoadError, _check_weights, _MetaFactories
    from dmd.edm.precond import PRECONDITIONERS, build_network, check_init_kwargs
    from dmd.edm2.encoders import attach_encoder

    if not isinstance(class_name, str) or class_name not in PRECONDITIONERS:
        names = ", ".join(PRECONDITIONERS)
        raise GeneratorLoadError(f"{path}: network class {reprlib.repr(class_name)} is not one of {names}")
    if not isinstance(init_kwargs, dict):
        raise GeneratorLoadError(f"{path}: init_kwargs is a {type(init_kwargs).__name__}, not a dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise GeneratorLoadError(f"{path}: the weights are not a dict of named tensors")
    try:
        check_init_kwargs(init_kwargs)
        with _MetaFactories():  # shapes only
            shapes = {k: v.shape for k, v in build_network(class_name, init_kwargs).state_dict().items()}
    except Exception as e:  # the kwargs come from the file, so whatever stops the build is the file's fault
        raise GeneratorLoadError(f"{path}: cannot build {class_name}: {' '.join(str(e).split())[:300]}") from e
    try:
        _check_weights(path, class_name, shapes, state_dict)
        net = build_network(class_name, init_kwargs)
        net.load_state_dict(state_dict, strict=True)
    except NetworkLoadError as e:
        raise GeneratorLoadError(str(e)) from e
    except (RuntimeError, TypeError) as e:  # right shapes, wrong contents (a complex or string-typed tensor)
        raise GeneratorLoadError(f"{path}: the weights do not load: {' '.join(str(e).split())[:200]}") from e
    try:
        return attach_encoder(net, encoder)
    except ValueError as e:
        raise GeneratorLoadError(f"{path}: {e}") from e


def checked_sigmas(path, field, sigmas, net):
    """A file's noise list through `check_sigmas` against `net`'s range; GeneratorLoadError naming the file."""
    try:
        return check_sigmas(sigmas, f"{path}: {field}", net)
    except SigmaError as e:
        raise GeneratorLoadError(str(e)) from e


def stored_sigmas(data):
    """(field, noise levels) a snapshot or training state records: a snapshot's generator_sigmas (sigma_G in
    one-step files of earlier versions); a training state's config.generator_sigmas (its sigma_G is the first level
    only, so a few-step run's state would otherwise sample in one step)."""
    config = data.get("config")
    if "generator_sigmas" in data:
        return "generator_sigmas", data["generator_sigmas"]
    if data.get("format") == STATE_FORMAT and isinstance(config, dict) and "generator_sigmas" in config:
        return "config.generator_sigmas", config["generator_sigmas"]
    return "sigma_G", [data["sigma_G"]]


def _from_torch_file(path, ema=None):
    """Build the network of one of our snapshots or training states (`ema`: see select_state_network), or of the
    port's checkpoint: return (net, sigmas, info), info holding what a dmd file records besides the weights (empty
    for the port's)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GeneratorLoadError(f"{path}: not a readable torch file, truncated or corrupt ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise GeneratorLoadError(f"{path}: holds a {type(data).__name__}, not a dmd snapshot or training state")
    kind = data.get("format")
    if kind in (SNAPSHOT_FORMAT, STATE_FORMAT):
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise GeneratorLoadError(f"{path}: {kind} whose version is {reprlib.repr(version)}, not a number")
        if version > FORMAT_VERSION:
            raise GeneratorLoadError(f"{path}: {kind} version {version}; this dmd reads up to {FORMAT_VERSION}")
        try:
            if kind == SNAPSHOT_FORMAT:
                check_snapshot_ema(path, data, ema)
                name, state_dict = data.get("ema"), data["state_dict"]
            else:
                name, state_dict = select_state_network(path, data, ema)
            class_name, init_kwargs = data["class_name"], data["init_kwargs"]
            field, sigmas = stored_sigmas(data)
        except KeyError as e:
            raise GeneratorLoadError(f"{path}: {kind} without the entry {e}") from e
        net = build_checked(path, class_name, init_kwargs, state_dict, data.get("encoder"))
        info = {key: data.get(key) for key in ("format", "step", "config", "fingerprints", "global_batch")}
        info["ema"] = name  # which network of the run: an EMA's --ema name, None for G (or unrecorded)
        return net, checked_sigmas(path, field, sigmas, net), info
    if "model_g" in data:
        state_dict = _strip_prefixes(data["model_g"])
        net = build_checked(path, "EDMPrecond", port_init_kwargs(state_dict, path), state_dict)
        return net, [PORT_SIGMA_G], {}
    keys = ", ".join(sorted(map(str, data))[:8])
    raise GeneratorLoadError(f"{path}: not a dmd snapshot, training state or port checkpoint (keys: {keys})")


def check_snapshot_ema(path, data, ema):
    """Refuse an `ema` other than the one network a snapshot holds (its recorded --ema name; None: G itself)."""
    if ema is None:
        return
    held = data.get("ema", "unrecorded")
    if ema_name(ema) != (RAW_G if held is None else held):
        what = "G itself" if held is None else "one network" if "ema" not in data else f"the EMA {held}"
        raise GeneratorLoadError(
            f"{path}: a snapshot of {what} alone, not --ema {ema}; --ema selects among the networks of a training "
            "state or a run folder's snapshots"
        )


def resolve_network(source, ema=None):
    """The file or folder `source` names: a run folder of `dmd train` stands for its newest network snapshot (with
    several EMAs: of the first, or of the one `ema` names); any other source (a file, an exported folder, a URL,
    hf://user/repo) is returned as given. GeneratorLoadError for a folder that is neither, or without `ema`'s."""
    from dmd.checkpoint import list_checkpoints, snapshot_suffixes
    from dmd.export import CONFIG, HUB_PREFIX, WEIGHTS

    text = os.fspath(source)
    folder = Path(text).expanduser()
    if text.startswith(HUB_PREFIX) or not folder.is_dir() or (folder / WEIGHTS).is_file():
        return source
    suffixes = snapshot_suffixes(folder)
    if not suffixes:
        raise GeneratorLoadError(
            f"{folder}: a folder without a network snapshot (network-snapshot-NNNNNN.pt of `dmd train`) or an "
            f"exported model ({WEIGHTS} and {CONFIG} of `dmd export`)"
        )
    if suffixes == [""]:  # G or its one EMA: the snapshot itself checks `ema`
        return str(list_checkpoints(folder, "network-snapshot")[-1])
    names = [suffix[len("-ema") :] for suffix in suffixes if suffix]
    name = names[0] if ema is None else ema_name(ema)
    if ema is None:  # the run's first EMA, as config.json lists them
        try:
            listed = json.loads((folder / "config.json").read_text()).get("ema", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        name = next((n for n in listed if n in names), name)
    if name not in names:
        raise GeneratorLoadError(f"{folder}: no snapshots of an EMA {ema!r} (--ema); choose one of {', '.join(names)}")
    return str(list_checkpoints(folder, "network-snapshot", f"-ema{name}")[-1])


# What a source holds: the network, its noise levels, the file (or folder) they came from, and what a dmd file
# records besides the weights (format, step, config, fingerprints, global_batch, ema; empty for other sources).
class LoadedNetwork(NamedTuple):
    net: torch.nn.Module
    sigmas: List[float]
    path: str
    info: dict


def read_network(source, *, cache_dir=None, ema=None):
    """Load any source `DMDGenerator` takes (see the module docstring) on the CPU, `ema` selecting among a training
    state's or run folder's networks: a LoadedNetwork."""
    from dmd.edm.persistence import NetworkLoadError, load_network
    from dmd.export import HUB_PREFIX, hub_folder, load_export
    from dmd.utils.download import DownloadError, open_url

    source = resolve_network(source, ema)
    text = os.fspath(source)
    holds_one = f"{text}: holds one network; --ema selects among a training state's or a run folder's"
    if text.startswith(HUB_PREFIX) or Path(text).expanduser().is_dir():
        if ema is not None:
            raise GeneratorLoadError(holds_one)
        folder = hub_folder(text) if text.startswith(HUB_PREFIX) else Path(text).expanduser()
        return LoadedNetwork(*load_export(folder), path=text, info={})
    try:
        path = open_url(source, cache_dir=cache_dir)
    except (DownloadError, FileNotFoundError) as e:
        hub = f"; a Hub repository is written {HUB_PREFIX}{text}" if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else ""
        raise GeneratorLoadError(f"{e}{hub}") from e
    with open(path, "rb") as f:
        head = f.read(1)
    if zipfile.is_zipfile(path):  # torch.save's format
        net, sigmas, info = _from_torch_file(path, ema)
        if ema is not None and not info:  # the port's checkpoint
            raise GeneratorLoadError(holds_one)
    elif ema is not None:
        raise GeneratorLoadError(holds_one)
    elif head == b"\x80":  # a pickle (protocol >= 2), as EDM writes its networks
        try:
            net = load_network(path, cache_dir=cache_dir)
        except NetworkLoadError as e:
            raise GeneratorLoadError(str(e)) from e
        sigmas, info = checked_sigmas(path, "sigma_G", [SIGMA_G], net), {}
    else:
        raise GeneratorLoadError(
            f"{path}: not a dmd snapshot, training state, port checkpoint (torch.save zip) or EDM pickle"
        )
    return LoadedNetwork(net.eval().requires_grad_(False), sigmas, str(path), info)


def load_generator(
    source: Union[str, os.PathLike],
    *,
    cache_dir: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
    ema: Optional[str] = None,
) -> Tuple[torch.nn.Module, List[float]]:
    """Load a network from any supported source (path, folder, URL or hf://user/repo): return (net in eval mode,
    frozen, generator sigmas).

    The source is one of `DMDGenerator`'s (a dmd snapshot or training state, a run folder, an exported folder, an
    EDM network pickle, the port's checkpoint), recognised by its contents; the sigmas are the file's (80 for an EDM
    pickle, 79.56 for the port's). A missing file, a failed download, a file that is none of these or weights that
    do not fit raise GeneratorLoadError naming the file. `ema` as DMDGenerator's.
    """
    loaded = read_network(source, cache_dir=cache_dir, ema=ema)
    return loaded.net.to(device), loaded.sigmas


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
