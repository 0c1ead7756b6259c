"""Run folders and checkpoints of `dmd train`: plain tensors and JSON-like values, written atomically, read with
weights_only=True, and the checks that make a resumed run continue the same run.

A run folder holds config.json, stats.jsonl, grids, `training-state-NNNNNN.pt` (everything a resumed run needs) and
`network-snapshot-NNNNNN.pt` (inference weights for `DMDGenerator`: the EMA of G, or G without one; with several
EMAs one file per EMA, `network-snapshot-NNNNNN-ema<name>.pt`). A training state records, besides the weights,
optimisers, RNG states and data position, what defines the run: its config, the global batch, and fingerprints of
the teacher and the pair file. Resuming compares them with the new run's and refuses any difference that
`TrainConfig`'s resume rules (dmd/config.py) do not allow, naming the flags.
"""

import copy
import errno
import hashlib
import os
import random
import re
import socket
import time
import warnings
import zipfile
from pathlib import Path

import torch

from dmd.config import ConfigError, flag_name, resume_changes
from dmd.edm2.encoders import encoder_json
from dmd.generator import FORMAT_VERSION, SNAPSHOT_FORMAT, STATE_FORMAT
from dmd.utils import distributed as dist
from dmd.utils.io import atomic_torch_save

RUN_FILES = ("config.json", "stats.jsonl")  # Besides checkpoints and grids, what marks a folder as a run's.
LOCK_FILE = ".dmd-train.lock"  # Held (flock) by the one process training into a run folder.
STATE_KEYS = {  # Entry of a training state -> the type it must have.
    "format": str,
    "version": int,
    "class_name": str,
    "init_kwargs": dict,
    "G": dict,
    "mu_fake": dict,
    "opt_G": dict,
    "opt_fake": dict,
    "step": int,
    "rng": dict,
    "config": dict,
    "sigma_G": float,
    "bad_steps": int,
    "best_fid": float,
    "global_batch": dict,
    "fingerprints": dict,
}
_FINGERPRINT_BYTES = 1 << 20  # Bytes hashed at each end of a pair file (the whole of a smaller one).


class CheckpointError(RuntimeError):
    """A run folder or training state that cannot be used as asked; the message names the flag or file."""


def state_path(run_dir, step):
    return Path(run_dir) / f"training-state-{step:06d}.pt"


def snapshot_path(run_dir, step, suffix=""):
    return Path(run_dir) / f"network-snapshot-{step:06d}{suffix}.pt"


def best_snapshot_path(run_dir, suffix=""):
    return Path(run_dir) / f"network-snapshot-best{suffix}.pt"


def ema_suffix(names, name):
    """The file-name suffix of the snapshots of EMA `name` among a run's EMAs `names`: none for a run with at most
    one (today's names), '-ema0.9999' with several."""
    return f"-ema{name}" if len(names) > 1 else ""


def _step_of(path):
    return int(re.fullmatch(r"[a-z-]+?-(\d+)(-ema.+)?\.pt", Path(path).name).group(1))


def list_checkpoints(run_dir, prefix, suffix=""):
    """Return the `<prefix>-NNNNNN<suffix>.pt` files of a run folder, oldest step first."""
    if not Path(run_dir).is_dir():
        return []
    pattern = rf"{prefix}-\d+{re.escape(suffix)}\.pt"
    return sorted((p for p in Path(run_dir).glob(f"{prefix}-*.pt") if re.fullmatch(pattern, p.name)), key=_step_of)


def snapshot_suffixes(run_dir):
    """The suffixes of a run folder's step snapshots ('' and/or '-ema<name>' ones), sorted."""
    matches = (re.fullmatch(r"network-snapshot-\d+(-ema.+)?\.pt", p.name) for p in Path(run_dir).glob("*.pt"))
    return sorted({m.group(1) or "" for m in matches if m})


def find_latest_state(run_dir):
    """Return the newest training state of a run folder, or None."""
    states = list_checkpoints(run_dir, "training-state")
    return states[-1] if states else None


def run_contents(run_dir):
    """Names of what marks `run_dir` as holding a run (config, stats, checkpoints, grids); empty if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    for pattern in ("training-state-*.pt", "network-snapshot-*.pt", "grid-*.png"):
        count = len(list(run_dir.glob(pattern)))
        if count:
            found.append(f"{count} {pattern}")
    return found


def prune_checkpoints(run_dir, keep_last):
    """Delete all but the newest `keep_last` training states and snapshots of each EMA (0 keeps all)."""
    if keep_last == 0:
        return
    kinds = [("training-state", "")] + [("network-snapshot", suffix) for suffix in snapshot_suffixes(run_dir)]
    for prefix, suffix in kinds:
        for path in list_checkpoints(run_dir, prefix, suffix)[:-keep_last]:
            path.unlink()


# One run at a time in a run folder: the training process holds an exclusive flock on RUN/.dmd-train.lock for the
# life of the run, and writes its pid, host and start time into the file for the message that refuses a second one.
# A lock left by a run that was killed (kill -9, a lost node) is stale by construction: the kernel drops a flock when
# its holder exits in any way, so the next run takes the file over; the file's contents are only ever read while the
# lock is held by someone. A filesystem without flock (some NFS mounts) gives a warning and no protection.
class RunLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = None

    def _try(self, fd):
        """Take the lock on `fd` without waiting; False if another process holds it."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(
                f"{self.path}: this filesystem cannot lock files; one run at a time must write here", stacklevel=3
            )
            return True

    def _refuse(self, fd):
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        who = "another process"
        if len(holder) >= 3:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder[2])))
            who = f"process {holder[0]} on {holder[1]} (since {since})"
        raise CheckpointError(
            f"--output-dir {self.path.parent} is in use by {who}, a run training there; wait for it to end or stop "
            "it (a run that was killed holds no lock: its leftover lock file is taken over)"
        )

    def check(self):
        """Raise CheckpointError if a live process holds the folder's lock; takes nothing and writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            if not self._try(fd):
                self._refuse(fd)
        finally:
            os.close(fd)  # closing drops the probe's lock

    def acquire(self):
        """Take the folder's lock (making the folder) and record this process in it; CheckpointError if held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not self._try(fd):
            try:
                self._refuse(fd)
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
        self.fd = fd

    def release(self):
        """Drop the lock (the file stays: removing it would let two runs lock two different files)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def capture_rng():
    """Return the global RNG states of torch (CPU and CUDA) and Python."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def restore_rng(rng):
    """Restore what `capture_rng` returned (CUDA states only where the device count matches)."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])


def data_fingerprint(path):
    """A sha256 hex fingerprint of the data a run reads from `path`, cheap enough for every resume:

    - a ZIP (EDM's dataset format): every entry's name, size and CRC-32, from the central directory alone. The CRC is
      a checksum of the entry's whole content, so any changed byte counts, without one entry being read; times and
      compression do not count.
    - a folder (EDM's image-folder layout): every regular file's name and size, dataset.json whole, and the last
      4 KiB of every other file (the whole of a smaller one). A PNG, as EDM's tool and dmd write them, ends with the
      Adler-32 of all its pixel rows and the CRC-32 of its last image-data chunk, so any changed pixel counts; one
      read per file (a 50,000-image folder: see benchmarks/fingerprint.py). File times do not count, so a copy of
      the data resumes.
    - any other file (a pair file): `file_fingerprint`.
    """
    path = Path(path)
    if path.is_dir():
        tail = 4096
        digest = hashlib.sha256(b"folder\n")
        names, folders = [], [""]
        while folders:  # every regular file below `path`, symlinked folders not followed (as the readers list them)
            folder = folders.pop()
            with os.scandir(path / folder) as entries:
                for entry in entries:
                    name = f"{folder}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(f"{name}/")
                    elif entry.is_file():
                        names.append(name)
        for name in sorted(names):
            with open(path / name, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if name != "dataset.json":
                    f.seek(max(size - tail, 0))
                content = f.read()
            digest.update(f"{name}\0{size}\0".encode() + hashlib.sha256(content).digest())
        return digest.hexdigest()
    try:
        with zipfile.ZipFile(path) as z:
            entries = [(info.filename, info.file_size, info.CRC) for info in z.infolist()]
    except zipfile.BadZipFile:
        return file_fingerprint(path)
    digest = hashlib.sha256(b"zip\n")
    for name, size, crc in sorted(entries):
        digest.update(f"{name}\0{size}\0{crc:08x}\n".encode())
    return digest.hexdigest()


def legacy_data_fingerprint(path):
    """The fingerprint states written before content fingerprints recorded for real images: a ZIP's
    `file_fingerprint`, a folder's names and sizes alone. A resume accepts it once, then records data_fingerprint."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\n".encode())
    return digest.hexdigest()


def file_fingerprint(path):
    """sha256 of a file's size and of its first and last MiB: cheap for a 2 GB pair file, and any other file (or
    the same file with more rows complete) gets another value."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            f.seek(size - _FINGERPRINT_BYTES)
        digest.update(f.read())
    return digest.hexdigest()


def host_copy(value):
    """`value` (a tensor, or a state dict, nested as an optimiser's is) with its tensors on the CPU, for rank 0 to
    write; tensors already there are not copied. An FSDP shard (a DTensor) is gathered whole first, a collective
    every rank takes part in; the other ranks then drop it (None) at once: a whole EDM2-XXL state on every rank's
    host would not fit."""
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    if isinstance(value, torch.Tensor):
        value = dist.gather_shard(value)
        return value.detach().cpu() if dist.is_main() else None
    return value


def cpu_state_dict(net):
    """The state dict of `net` on the CPU (see host_copy)."""
    return host_copy(net.state_dict())


def save_snapshot(path, net, *, generator_sigmas, step, config, ema=None):
    """Write the inference weights of `net` with its network config and noise levels, the layout `DMDGenerator`
    reads (sigma_G, the first level, too, for readers of one-step snapshots), and which network it is (`ema`: the
    --ema name, None for G itself). Every rank calls it (a sharded network is gathered), rank 0 writes."""
    snapshot = {
        "format": SNAPSHOT_FORMAT,
        "version": FORMAT_VERSION,
        "class_name": dist.module_class(net).__name__,
        "init_kwargs": copy.deepcopy(net.init_kwargs),
        "state_dict": cpu_state_dict(net),
        "encoder": encoder_json(net),  # EDM2's latent space (None on pixels)
        "sigma_G": float(generator_sigmas[0]),
        "generator_sigmas": [float(s) for s in generator_sigmas],
        "step": int(step),
        "config": config,
        "ema": ema,
    }
    if dist.is_main():
        atomic_torch_save(snapshot, path)


def save_training_state(path, *, G, mu_fake, emas, head, opt_G, opt_fake, step, positions, run, fdistill=None):
    """Write everything a resumed run needs to continue bit for bit; `emas` holds the EMAs of G by --ema name,
    `positions` the data streams' positions (data_position: pairs, real_position: real images; None without), `run`
    the run's identity and counters (config, sigma_G, bad_steps, best_fid(s), global_batch, fingerprints), `fdistill`
    f-distill's FDistillWeights (its EMA of the ratio's bin means) or None. Every rank calls it (--fsdp's shards are
    gathered), rank 0 writes: whole tensors, so that a run resumes with or without --fsdp, on any number of ranks. The
    first EMA is also G_ema, as states before several EMAs had it (one copy of its tensors in the file: torch.save
    writes a storage once)."""
    ema_weights = {name: cpu_state_dict(net) for name, net in emas.items()}
    state = {
        "format": STATE_FORMAT,
        "version": FORMAT_VERSION,
        "class_name": dist.module_class(G).__name__,
        "init_kwargs": copy.deepcopy(G.init_kwargs),
        "encoder": encoder_json(G),
        "G": cpu_state_dict(G),
        "mu_fake": cpu_state_dict(mu_fake),
        "G_ema": next(iter(ema_weights.values()), None),
        "emas": ema_weights,
        "head": None if head is None else cpu_state_dict(head),  # DMD2's discriminator head
        "fdistill": None if fdistill is None else fdistill.state_dict(),  # f-distill's ratio bins
        "opt_G": host_copy(opt_G.state_dict()),
        "opt_fake": host_copy(opt_fake.state_dict()),
        "step": int(step),
        "rng": capture_rng(),
        **positions,
        **run,
    }
    if dist.is_main():
        atomic_torch_save(state, path)


def _read_state(path, mmap=False):
    """Read and check one training state (with `mmap`, its tensors stay on disk until used); CheckpointError saying
    what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable training state, truncated or corrupt ({type(e).__name__})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dmd training state")
    version = state.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has version {version}; this dmd reads up to {FORMAT_VERSION}")
    if version == 1:
        raise CheckpointError(
            f"{path} has format version 1, which did not record the run's teacher and pair fingerprints, so it "
            "cannot be checked to continue the same run; `generate` still reads its weights"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    wrong = [k for k, kind in STATE_KEYS.items() if k in state and not isinstance(state[k], kind)]
    if missing or wrong:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"bad {', '.join(wrong)}"] if wrong else []
        )
        raise CheckpointError(f"{path} is an incomplete training state ({'; '.join(problems)})")
    _check_config(state["config"], f"{path}: its settings")
    return state


def _check_config(config, where):
    """Raise CheckpointError naming `where` unless `config` (a dict from a file) is a valid TrainConfig; among the
    rest, its generator noise levels must be finite, positive, decreasing and few."""
    from dmd.config import TrainConfig

    try:
        TrainConfig.from_dict(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} are not valid: {' '.join(str(e).split())[:300]}") from None


def stored_config(run_dir, resume):
    """The settings (a config dict) of the run that --resume continues: those its training state records (for
    'auto' the newest in `run_dir`), else, for 'auto' in a run stopped before its first checkpoint, config.json's;
    None if the folder holds no run. The state's tensors are memory-mapped, not read."""
    from dmd.utils.common import parse_json

    if resume != "auto":
        return load_training_state(resume, mmap=True)["config"]
    path = find_latest_state(run_dir)
    if path is not None:
        return load_training_state(path, auto=True, mmap=True)["config"]
    config_json = Path(run_dir) / "config.json"
    if not config_json.is_file():
        return None
    try:
        with open(config_json, "rb") as f:
            config = parse_json(f.read(1 << 20), str(config_json))  # a config is ~2 kB
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume auto: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"--resume auto: {config_json} holds a {type(config).__name__}, not a run's settings")
    _check_config(config, f"--resume auto: {config_json}: the settings")
    return config


def load_training_state(path, *, auto=False, mmap=False):
    """Read a training state for --resume; with `auto` (the newest of a folder) a bad one names the newest good one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} does not exist")
    try:
        return _read_state(path, mmap=mmap)
    except CheckpointError as e:
        hint = ""
        if auto:
            older = [p for p in list_checkpoints(path.parent, "training-state") if _step_of(p) < _step_of(path)]
            good = next((p for p in reversed(older) if _is_readable(p)), None)
            hint = f"; the newest good state is {good}: resume from it with --resume {good}" if good else ""
        raise CheckpointError(f"--resume: {e}{hint}") from e


def _is_readable(path):
    try:
        _read_state(path)
        return True
    except CheckpointError:
        return False


def resolve_resume(cfg, run_dir):
    """The training state to resume from (None: start at step 0), after checking the run folder can take the run."""
    contents = run_contents(run_dir)
    if cfg.resume is None:
        if contents:
            raise CheckpointError(
                f"--output-dir {run_dir} already holds a run ({', '.join(contents)}); continue it with --resume auto, "
                "or give another --output-dir to start a new run"
            )
        return None
    if cfg.resume == "auto":
        return find_latest_state(run_dir)
    path = Path(cfg.resume)
    if contents and path.resolve().parent != Path(run_dir).resolve():
        raise CheckpointError(
            f"--output-dir {run_dir} already holds another run ({', '.join(contents)}); resume {path} into a new "
            "--output-dir"
        )
    later = [p for p in list_checkpoints(run_dir, "training-state") if path.is_file() and _step_of(p) > _step_of(path)]
    if later:
        raise CheckpointError(
            f"--resume {path}: {run_dir} holds later states ({later[-1].name}), which this run would overwrite or "
            "prune; resume into a new --output-dir"
        )
    return path


def check_same_run(state, path, cfg, *, global_batch, fingerprints):
    """Refuse a training state that belongs to another run; return the config changes to apply, {field: (old, new)}.

    `global_batch` maps the batch fields to their global sizes (per process x processes), which a run keeps even
    when it resumes on another number of processes. Real images fingerprinted the old way (names and sizes) are
    checked the old way.
    """
    for name, size in global_batch.items():
        if state["global_batch"].get(name) != size:
            flag, trained = flag_name(name), state["global_batch"].get(name)
            raise CheckpointError(
                f"--resume: {path} was trained at a global batch of {trained} ({flag} x processes), this run has "
                f"{size}; give {flag} {trained} / number of processes"
            )
    flags = {"teacher": "--network", "guide": "--guide-network", "pairs": "--data-path", "real": "--real-data"}
    for name, flag in flags.items():
        trained, given = state["fingerprints"].get(name), fingerprints.get(name)
        if trained == given or (name == "real" and given and trained == legacy_data_fingerprint(cfg.real_data)):
            continue
        if trained is None or given is None:
            what = f"without {flag}, this run gives one" if trained is None else f"with {flag}, this run gives none"
            raise CheckpointError(f"--resume: {path} was trained {what}; resume as the run was trained")
        raise CheckpointError(
            f"--resume: {path} was trained with another {name} file than {flag} gives (the file's fingerprint "
            "differs); resume with the run's own file"
        )
    try:
        return resume_changes(state["config"], cfg)
    except ConfigError as e:
        raise CheckpointError(f"--resume: {path}: {e}") from e


def _sharded_as(weights, live):
    """A state dict of whole tensors split over the ranks as the same entries of `live`, a network's own state dict,
    are (--fsdp's shards); as it is for a network that is not sharded."""
    return {k: dist.shard_like(v, live[k]) if k in live else v for k, v in weights.items()}


def _sharded_moments(saved, opt):
    """An optimiser state of whole tensors with each parameter's AdamW moments split as the parameter is (--fsdp);
    the step count stays one number, as FSDP keeps it. Parameters are numbered as `opt.state_dict()` numbers them."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for i, moments in saved["state"].items():
        state[i] = {k: v if k == "step" else dist.shard_like(v, params[i]) for k, v in moments.items()}
    return {**saved, "state": state}


def state_emas(state):
    """The EMAs of G a training state holds, {--ema name: weights} in the run's order: its `emas`, or in a state
    written before several EMAs, its G_ema under the name of the run's --ema-halflife-kimg."""
    if state.get("emas") is not None:
        return state["emas"]
    if state.get("G_ema") is None:
        return {}
    from dmd.config import upgrade_config

    config = state.get("config")
    names = upgrade_config(config).get("ema") if isinstance(config, dict) else None
    return {names[0] if names else "ema": state["G_ema"]}


def restore(state, path, *, G, mu_fake, emas, head, opt_G, opt_fake, streams, fdistill=None):
    """Load a training state into the run's objects (f-distill's ratio bins too, where both have them); return its
    step. `streams` maps the state's position entries to the run's data streams (or None). CheckpointError naming
    `path` if the state does not fit (another network, weights of other shapes, an optimiser state of another
    layout)."""
    if state["class_name"] != dist.module_class(G).__name__ or state["init_kwargs"] != G.init_kwargs:
        raise CheckpointError(f"--resume: {path} holds a different network than --network and --dropout build")
    saved_emas = state_emas(state)
    if not isinstance(saved_emas, dict):
        raise CheckpointError(f"--resume: {path}: its EMAs are a {type(saved_emas).__name__}, not weights by name")
    if list(saved_emas) != list(emas):
        held = ",".join(saved_emas) or "none"
        raise CheckpointError(f"--resume: {path} holds the EMAs {held}, --ema gives {','.join(emas) or 'none'}")
    if (state.get("head") is None) != (head is None):
        raise CheckpointError(f"--resume: {path} and the GAN settings disagree on whether the run has a discriminator")
    targets = [("G", G, state["G"]), ("mu_fake", mu_fake, state["mu_fake"]), ("head", head, state.get("head"))]
    targets += [(f"EMA {name}", net, saved_emas[name]) for name, net in emas.items()]
    for key, net, weights in targets:
        if net is None:
            continue
        try:
            net.load_state_dict(_sharded_as(weights, net.state_dict()), strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            first = " ".join(str(e).split())[:300]
            raise CheckpointError(f"--resume: {path}: the {key} weights do not fit the network ({first} ...)") from e
    for key, opt in (("opt_G", opt_G), ("opt_fake", opt_fake)):
        try:
            opt.load_state_dict(_sharded_moments(state[key], opt))
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"--resume: {path}: the {key} optimiser state does not fit ({e})") from e
    if fdistill is not None and state.get("fdistill") is not None:  # else the bins start at 1, as in a new run
        try:
            fdistill.load_state_dict(state["fdistill"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"--resume: {path}: the f-distill ratio bins are malformed ({e})") from e
    for key, stream in streams.items():
        if stream is not None and state.get(key) is not None:
            stream.load_state_dict(state[key])
    try:
        restore_rng(state["rng"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"--resume: {path}: the RNG states are malformed ({type(e).__name__})") from e
    return state["step"]
