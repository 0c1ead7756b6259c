"""Reading a generator from any file `dmd` knows, detected from the file itself:
  - our `network-snapshot-*.pt` (inference weights, the generator's sigma list stored with them);
  - our `training-state-*.pt` (its first EMA of G if the run kept any, else G; `ema=` picks another, 'none' G; the
    run's generator sigmas);
  - a run folder of `dmd train`: its newest `network-snapshot-NNNNNN.pt` (of the first EMA, or of `ema=`'s);
  - a folder written by `dmd export` (model.safetensors + config.json), or one on the Hugging Face Hub,
    `hf://user/repo` or `hf://user/repo@revision` (dmd/export.py);
  - an EDM network pickle (its 'ema' network, used as a one-step generator at sigma_G = 80);
  - the unofficial port's released checkpoint, a torch.save dict whose 'model_g' holds an EDMPrecond state dict.
Every network is built from its recorded kwargs only after its tensors are checked against the shapes those kwargs
give, and every noise list is checked (`check_sigmas`) against the network's range, so a bad file is one line.
`read_network` returns the network, its sigmas and what the file records; dmd/generate.py samples it.
"""

import json
import os
import re
import reprlib
import zipfile
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from dmd.edm.presets import DDPMPP
from dmd.generator import FORMAT_VERSION, SIGMA_G, SNAPSHOT_FORMAT, STATE_FORMAT, SigmaError, check_sigmas

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
