"""Sharing a student: `dmd export` writes a generator as a folder that loads without dmd's checkpoints or training
code, and `DMDGenerator` reads such a folder back, from disk or from the Hugging Face Hub.

The folder (format 'dmd-export', version 1):
  model.safetensors  the generator's state dict (G_ema where the run kept an EMA): parameters float32, or bfloat16
                     with --dtype bf16 (half the size); buffers (resampling filters, Fourier frequencies) stay float32
  config.json        the network (class_name, init_kwargs), its noise levels (generator_sigmas), the space it runs in
                     (encoder: EDM2's latent-space attributes, null on pixels), the dtype, and what
                     the run recorded: teacher (name, sha256), training (recipe, step, kimg), fid (the value and its
                     protocol) and selection (how the snapshot was chosen); null where the run recorded nothing
  README.md          a model card: what it is, three lines of Python that sample it, its FID and selection, the
                     samples, and the licence inherited from the teacher
  samples.png        seeds 0-63 drawn from the written weights, so the grid shows what a user of the folder gets

A folder on the Hub is named 'hf://user/repo' or 'hf://user/repo@revision': the prefix keeps a repository id from
being taken for a relative path. Its two files are fetched at one commit by huggingface_hub into huggingface_hub's
own cache (HF_HOME, HF_HUB_CACHE), where HF_HUB_OFFLINE=1 finds them without the network.
"""

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from dmd.edm2.encoders import encoder_json
from dmd.edm2.vae import VAEError
from dmd.generate import describe_sampling, sample_grid
from dmd.generator import SNAPSHOT_FORMAT, STATE_FORMAT
from dmd.generator_files import GeneratorLoadError, build_checked, checked_sigmas, read_network
from dmd.utils.common import parse_json
from dmd.utils.io import atomic_path, atomic_save_image, atomic_write_text

EXPORT_FORMAT = "dmd-export"
EXPORT_VERSION = 1
WEIGHTS, CONFIG, CARD, SAMPLES = "model.safetensors", "config.json", "README.md", "samples.png"
HUB_PREFIX = "hf://"
SAMPLE_SEEDS = list(range(64))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MAX_CONFIG_BYTES = 1 << 20  # a config.json of ours is a few KiB
# The networks NVIDIA released with EDM (CC BY-NC-SA 4.0), by URL or by their file names.
_EDM_RELEASE = re.compile(r"(.*/edm/pretrained/|)(edm|baseline)-[a-z0-9]+-\d+x\d+-(cond|uncond)-(vp|ve|adm)\.pkl")
_HUB_ID = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(\S+))?")


class ExportError(RuntimeError):
    """A source that cannot be exported, a destination that cannot take the folder, or a failed upload."""


def _first_line(error):
    """An error's message as one line (huggingface_hub's span several)."""
    text = " ".join(str(error).split("\n")[0].split())
    return text[:300] or type(error).__name__


def _hub(error, what):
    """huggingface_hub, or `error` saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise error(f"{what} needs huggingface_hub: pip install 'dmd-distill[hub]'") from None
    return huggingface_hub


# ----------------------------------------------------------------------------
# Reading an exported folder, local or on the Hub.


def load_export(folder):
    """Return (net on the CPU in eval mode, frozen; its noise levels) of an exported folder, every part checked:
    config.json's JSON and fields, the network kwargs, the tensors' names and shapes, the noise levels against the
    network's range. GeneratorLoadError naming the file at fault."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GeneratorLoadError(f"{folder}: no {path.name}; a folder of `dmd export` holds {WEIGHTS} and {CONFIG}")
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise GeneratorLoadError(f"{config_path}: {config_path.stat().st_size} bytes, not a config of `dmd export`")
    try:
        config = parse_json(config_path.read_bytes(), str(config_path))
    except ValueError as e:
        raise GeneratorLoadError(str(e)) from e
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise GeneratorLoadError(f'{config_path}: not the config of `dmd export` (no "format": "{EXPORT_FORMAT}")')
    version = config.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise GeneratorLoadError(f"{config_path}: version {str(version)[:20]}; this dmd reads 1 to {EXPORT_VERSION}")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise GeneratorLoadError(f"{weights_path}: reading it needs safetensors: pip install safetensors") from None
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GeneratorLoadError(f"{weights_path}: not a readable safetensors file ({_first_line(e)})") from e
    net = build_checked(
        config_path, config.get("class_name"), config.get("init_kwargs"), state_dict, config.get("encoder")
    )
    sigmas = checked_sigmas(config_path, "generator_sigmas", config.get("generator_sigmas"), net)
    return net.eval().requires_grad_(False), sigmas


def parse_hub_id(text):
    """'hf://user/repo[@revision]' -> (repo id, revision or None); GeneratorLoadError for anything else."""
    match = _HUB_ID.fullmatch(text)
    if match is None:
        raise GeneratorLoadError(f"{text}: not a Hub repository; write hf://user/repo or hf://user/repo@revision")
    return match.group(1), match.group(2)


def hub_folder(text):
    """The local folder of the exported model at 'hf://user/repo[@revision]': its config.json and model.safetensors
    at one commit, downloaded into huggingface_hub's cache unless already there (HF_HUB_OFFLINE=1: only there)."""
    repo_id, revision = parse_hub_id(text)
    hub = _hub(GeneratorLoadError, f"{text}: loading from the Hugging Face Hub")
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG, WEIGHTS]))
    except (OSError, ValueError) as e:  # HTTP and cache errors are OSErrors, a malformed id a ValueError
        raise GeneratorLoadError(f"{text}: {_first_line(e)}") from e


# ----------------------------------------------------------------------------
# What the run recorded about the snapshot: teacher, training length, FID, selection.


def _get(mapping, key, kind):
    """mapping[key] if mapping is a dict and the value a `kind` (bools are not numbers), else None."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _public_name(location):
    """A file's name as a model card may show it: an http(s) URL as is, a local path by its name only (a path on
    the exporter's machine means nothing to others, and may say more than its owner wants)."""
    if not isinstance(location, str):
        return None
    return location if location.startswith(("http://", "https://")) else Path(location).name


def _stats_records(run_dir):
    """The records of the run's stats.jsonl (torn or foreign lines skipped); [] without one."""
    records = []
    try:
        with open(Path(run_dir) / "stats.jsonl", "rb") as f:
            for line in f:
                try:
                    record = parse_json(line, "stats.jsonl")
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
    except OSError:
        pass
    return records


def _newest_state_fingerprints(run_dir):
    """The fingerprints recorded by the run's newest training state (memory-mapped, nothing else read); {} if none."""
    from dmd.checkpoint import list_checkpoints

    states = list_checkpoints(run_dir, "training-state")
    if not states:
        return {}
    try:
        state = torch.load(states[-1], map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable state records nothing; the export goes on without it
        return {}
    return _get(state, "fingerprints", dict) or {}


def provenance(loaded):
    """What config.json and the card say about a snapshot or training state: teacher, training, fid, selection."""
    path, info = Path(loaded.path), loaded.info
    config, step, run_dir = _get(info, "config", dict) or {}, _get(info, "step", int), Path(loaded.path).parent
    fingerprints = _get(info, "fingerprints", dict) or _newest_state_fingerprints(run_dir)
    sha256 = _get(fingerprints, "teacher", str)
    teacher = {
        "name": _public_name(config.get("model_path")),
        "sha256": sha256 if sha256 and re.fullmatch(r"[0-9a-f]{64}", sha256) else None,
    }
    records = [r for r in _stats_records(run_dir) if r["step"] == step]
    kimg = next((r["kimg"] for r in records if _get(r, "kimg", (int, float)) is not None), None)
    batch = _get(_get(info, "global_batch", dict), "batch_size", int)
    if kimg is None and batch is not None and step is not None:  # a training state records its global batch
        kimg = step * batch / 1000
    training = {"recipe": _get(config, "recipe", str), "step": step, "kimg": kimg}

    fid = None
    several = len(_get(config, "ema", list) or ()) > 1  # stats.jsonl then scores each EMA as fid_<name>
    key = f"fid_{info.get('ema')}" if several else "fid"
    scores = [r[key] for r in records if _get(r, key, (int, float)) is not None and math.isfinite(r[key])]
    if scores:
        from dmd.fid import CIFAR10_REF_URL, DETECTOR_URL

        fid_num = _get(config, "fid_num", int)
        fid = {
            "value": scores[-1],
            "step": step,
            "num_images": fid_num,
            "seeds": f"0-{fid_num - 1}" if fid_num else None,
            "reference": _public_name(config.get("fid_ref") or CIFAR10_REF_URL),
            "detector": _public_name(config.get("fid_detector") or DETECTOR_URL),
        }
    return {"teacher": teacher, "training": training, "fid": fid, "selection": _selection(path, info, config, step)}


def _selection(path, info, config, step):
    """How the exported snapshot was chosen, in words."""
    from dmd.checkpoint import list_checkpoints

    if info.get("format") == STATE_FORMAT:
        which = f"its EMA {info['ema']}" if info.get("ema") else "G itself"
        return f"the generator of the training state of step {step} ({which})"
    if path.name.startswith("network-snapshot-best"):
        every = _get(config, "fid_every", int)
        return (
            f"the run's lowest FID among its evaluations{f' every {every} steps' if every else ''} "
            f"({path.name}); chosen by the FID it reports, so that number is optimistic for the run"
        )
    suffix = re.fullmatch(r"network-snapshot-\d+(-ema.+)?\.pt", path.name)
    newest = list_checkpoints(path.parent, "network-snapshot", (suffix and suffix.group(1)) or "")
    if newest and newest[-1].name == path.name:
        return f"the run's newest snapshot ({path.name}, step {step})"
    return f"the snapshot of step {step} ({path.name}), chosen by hand among the run's"


# ----------------------------------------------------------------------------
# Writing a folder.


def check_dest(dest):
    """Refuse, before any work, a destination that exists and is not an empty folder."""
    dest = Path(dest)
    if os.path.lexists(dest) and not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty folder; give a new DEST_DIR")


def check_repo_id(repo_id):
    """Refuse, before any work, a --push repository id the Hub would refuse (or huggingface_hub missing)."""
    hub = _hub(ExportError, "--push")
    try:
        hub.utils.validate_repo_id(repo_id)
    except ValueError as e:
        raise ExportError(f"--push {repo_id}: {_first_line(e)}") from e


def licence_of(teacher_name):
    """(Hub licence id, the card's sentence) inherited from the teacher: EDM's released networks are CC BY-NC-SA 4.0;
    of any other teacher dmd cannot know the terms, so the student's are the teacher's."""
    if teacher_name and _EDM_RELEASE.fullmatch(teacher_name):
        return "cc-by-nc-sa-4.0", (
            f"CC BY-NC-SA 4.0, inherited from the teacher `{Path(teacher_name).name}`, one of the networks NVIDIA "
            "released with EDM under that licence: non-commercial use, with attribution, derivatives under the same "
            "terms."
        )
    return "other", f"The same as the teacher's (`{teacher_name or 'not recorded'}`): this model is derived from it."


def _weights(net, dtype):
    """G's state dict for safetensors: parameters in `dtype`, buffers as they are (constants, not learnt weights,
    whose rounding would change the network beyond its weights')."""
    parameters = {name for name, _ in net.named_parameters()}
    return {k: (v.to(dtype) if k in parameters else v).detach().cpu().contiguous() for k, v in net.state_dict().items()}


def export_generator(
    source,  # A network snapshot or training state of `dmd train`, or its run folder (the newest snapshot).
    dest,  # Folder to create (absent or empty).
    *,
    dtype="fp32",  # 'fp32' or 'bf16': the parameters' precision in model.safetensors.
    repo_id=None,  # The Hub repository the folder is meant for, named in the card's code; None: a local path.
    device="cpu",  # Where samples.png is sampled.
    cache_dir=None,  # Download cache for a URL source.
    vae=None,  # A latent generator's VAE for samples.png (folder or Hub name); None: the name its file records.
    ema=None,  # A training state's or run folder's EMA by --ema name; 'none': G itself; None: the first.
):
    """Write the exported folder (module docstring) atomically: into a temporary folder beside `dest`, renamed onto
    it once complete, so `dest` is the whole folder or absent. Return (dest, its config)."""
    from safetensors.torch import save_file

    from dmd.generate import DMDGenerator

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    dest = Path(dest)
    check_dest(dest)
    loaded = read_network(source, cache_dir=cache_dir, ema=ema)
    if loaded.info.get("format") not in (SNAPSHOT_FORMAT, STATE_FORMAT):
        raise ExportError(f"{loaded.path}: not a snapshot or training state of `dmd train`, which `dmd export` takes")
    net = loaded.net
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "class_name": type(net).__name__,
        "init_kwargs": net.init_kwargs,
        "generator_sigmas": loaded.sigmas,
        "encoder": encoder_json(net),  # EDM2's latent space: DMDGenerator decodes with its VAE (None on pixels)
        "dtype": dtype,
        **provenance(loaded),
        "source": Path(loaded.path).name,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name[:40]}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)  # 0o777 less the umask, as any new folder
    try:
        with atomic_path(tmp / WEIGHTS) as path:
            save_file(_weights(net, DTYPES[dtype]), str(path), metadata={"format": "pt"})  # "pt": torch tensors
        atomic_write_text(json_text(config), tmp / CONFIG)
        # Sampled back from the folder as written: this checks it loads, and shows the bf16 rounding if any.
        generator = DMDGenerator(tmp, device=device, vae=vae, cache_dir=cache_dir)
        classes = torch.as_tensor(SAMPLE_SEEDS) % generator.label_dim if generator.label_dim else None
        images = generator.generate_batch(seeds=SAMPLE_SEEDS, class_ids=classes, batch_size=16).cpu()
        title = f"{config['source']}, {describe_sampling(generator.sigmas)}"
        grid = sample_grid(
            images, SAMPLE_SEEDS, generator.label_dim, classes, title, class_balanced=classes is not None
        )
        atomic_save_image(grid, tmp / SAMPLES)
        atomic_write_text(model_card(config, generator, repo_id or f"path/to/{dest.name}"), tmp / CARD)
        os.replace(tmp, dest)  # onto an absent or empty folder
    except VAEError as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"{dest}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, config


def json_text(value):
    """Indented JSON that any parser reads: an infinite float (EDMPrecond's sigma_max) as 1e999, which JSON's grammar
    allows and parsers read as infinity, instead of Python's non-standard Infinity."""
    marker = f"inf-{secrets.token_hex(8)}"

    def encode(v):
        if isinstance(v, float) and math.isinf(v):
            return f"-{marker}" if v < 0 else marker
        if isinstance(v, dict):
            return {k: encode(x) for k, x in v.items()}
        return [encode(x) for x in v] if isinstance(v, (list, tuple)) else v

    text = json.dumps(encode(value), indent=2, allow_nan=False)
    return text.replace(f'"-{marker}"', "-1e999").replace(f'"{marker}"', "1e999") + "\n"


def model_card(config, generator, where):
    """The README.md of an exported folder: what it is, how to sample it, its FID and selection, samples, licence."""
    teacher, training, fid = config["teacher"], config["training"], config["fid"]
    licence_id, licence = licence_of(teacher["name"])
    name = where if where.startswith("path/") else f"{HUB_PREFIX}{where}"
    label_dim, steps = generator.label_dim, describe_sampling(generator.sigmas)
    steps_word = "one" if len(generator.sigmas) == 1 else str(len(generator.sigmas))
    method = {"dmd": "DMD (Yin et al., CVPR 2024)", "dmd2": "DMD2 (Yin et al., NeurIPS 2024)"}
    R, C = generator.img_resolution, generator.img_channels
    kind = f"class-conditional ({label_dim} classes)" if label_dim else "unconditional"
    sha = f" (sha256 `{teacher['sha256']}`)" if teacher["sha256"] else ""
    lines = [
        "---",
        f"license: {licence_id}",
        "library_name: dmd-distill",
        "pipeline_tag: unconditional-image-generation",
        "tags: [diffusion-distillation, dmd, one-step-generation, edm]",
        "---",
        "",
        f"# A {steps_word}-step generator distilled from {Path(teacher['name'] or 'an EDM-family teacher').name}",
        "",
        f"A {kind} image generator of {R}x{R} images with {C} channels ({config['class_name']}, weights in "
        f"{config['dtype']}), distilled by {method.get(training['recipe'], 'distribution matching')} from the "
        f"EDM-family diffusion model `{teacher['name'] or 'not recorded'}`{sha} with "
        "[dmd-distill](https://pypi.org/project/dmd-distill/). It maps noise z ~ N(0, I) to an image in "
        f"{steps}: x = D(sigma_0 z; sigma_0)"
        + (", re-noised to each further sigma and denoised again." if len(generator.sigmas) > 1 else "."),
        "",
        "## Sampling",
        "",
        "```python",
        "from dmd import DMDGenerator",
        f'G = DMDGenerator("{name}")',
        f"images = G.generate_batch(seeds=range(16))  # (16, {C}, {R}, {R}) float32 in [-1, 1], one image per seed",
        "```",
        "",
        f"or `dmd generate --network {name} --output-dir out --seeds 0-63 --grid grid.png` (pip install "
        "'dmd-distill[hub]' for hf:// names). Seeds draw their noise (and their class, unless `class_ids` gives "
        "it) as EDM's generate.py does, so a seed gives the same image on any batch size.",
        "",
        "## Samples",
        "",
        f"![samples]({SAMPLES})",
        "",
        "Seeds 0-63" + (f", seed s of class s % {label_dim}" if label_dim else "") + ", sampled from these weights.",
        "",
        "## Evaluation",
        "",
    ]
    if fid is None:
        lines.append("The run recorded no FID for this snapshot (train with --fid-every to record one).")
    else:
        seeds = f"seeds {fid['seeds']}" + (f", seed s of class s % {label_dim}" if label_dim else "")
        lines.append(
            f"FID {fid['value']:.3f} at step {fid['step']}, as the training run computed it: {fid['num_images']} "
            f"generated images ({seeds}) against `{fid['reference']}`, with the features of `{fid['detector']}` "
            "and the statistics as EDM computes them."
            + (
                " The standard protocol uses 50,000 images; fewer bias FID upwards."
                if fid["num_images"] != 50000
                else ""
            )
        )
    kimg = f"{training['kimg']:g} kimg" if training["kimg"] is not None else "kimg not recorded"
    lines += [
        "",
        "## Training",
        "",
        f"- recipe: {training['recipe'] or 'not recorded'}; step {training['step']}, {kimg}",
        f"- teacher: `{teacher['name'] or 'not recorded'}`" + (f", sha256 `{teacher['sha256']}`" if sha else ""),
        f"- exported from `{config['source']}`: {config['selection']}",
        f"- noise levels: {', '.join(f'{s:g}' for s in generator.sigmas)}",
        "",
        "## Licence",
        "",
        licence,
        "",
    ]
    return "\n".join(lines)


def push(folder, repo_id, *, private=False):
    """Upload an exported folder to the Hub model repository `repo_id` (created if missing); return its URL."""
    hub = _hub(ExportError, "--push")
    api = hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload a dmd export"
        )
    except (OSError, ValueError) as e:  # HTTP errors and a missing token are OSErrors, a bad id a ValueError
        raise ExportError(f"--push {repo_id}: {_first_line(e)}") from e
    return str(url)
