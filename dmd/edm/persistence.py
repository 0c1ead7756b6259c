"""Read EDM's network pickles without running any of their code, and write our networks in the same layout.

EDM pickles every network as `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the
defining module's whole source, which EDM's loader `exec`s. We never do: a restricted unpickler resolves only the
handful of globals such a pickle names (edm-format.md 1.4), turns each persistent object into an inert
`PersistentStub`, walks the stubs into a state dict, and loads that into our own class built from `_init_kwargs`.
"""

import collections
import contextlib
import copy
import io
import pickle
import sys
import types
from dataclasses import dataclass

import numpy as np
import torch

from dmd.edm.precond import PRECONDITIONERS, build_network
from dmd.utils.download import open_url, sha256_file
from dmd.utils.io import atomic_path

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version; EDM's loader asserts equality
_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# What we write as `module_src`. EDM's loader execs it and looks `class_name` up in the result, so importing EDM's
# own classes lets EDM read our pickles too; our loader never executes it.
MODULE_SRC = "from training.networks import *  # written by dmd; EDM's own classes rebuild these objects\n"


class NetworkLoadError(RuntimeError):
    """A network pickle is missing, corrupt, or does not describe a network we can build."""


class UnsafePickleError(NetworkLoadError):
    """A pickle names a global outside the short list an EDM network pickle needs."""


# A persistent object as EDM pickled it: the undecorated class name and its `__getstate__()` dict. EDM's class is
# neither imported nor run; `load_network` builds ours from the name.
@dataclass
class PersistentStub:
    class_name: str  # e.g. 'EDMPrecond', 'UNetBlock', 'EDMLoss'
    state: dict  # torch Module bookkeeping (_parameters, _buffers, _modules, ...) + attributes + _init_kwargs


# Stands in for torch.nn.ModuleDict, which EDM pickles plainly (NEWOBJ + BUILD): it only keeps the state BUILD gives.
class _ModuleDictState:
    def __setstate__(self, state):
        self.state = state


# pickle.Unpickler that resolves only the globals of an EDM network pickle and refuses everything else by name.
class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path  # named in every error
        scalar = _numpy_scalar()
        self.allowed = {
            _RECONSTRUCT: self._reconstruct,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_storage,
            ("torch.nn.modules.container", "ModuleDict"): _ModuleDictState,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("numpy", "dtype"): np.dtype,
            ("numpy._core.multiarray", "scalar"): scalar,  # written by numpy 2
            ("numpy.core.multiarray", "scalar"): scalar,  # written by numpy 1 (the 2022 releases)
        }

    def find_class(self, module, name):
        # Runs when the stream names a global, i.e. before any REDUCE could call it.
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"{self.path}: refusing to load, the pickle names the global '{module}.{name}'")
        return self.allowed[(module, name)]

    def _reconstruct(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise NetworkLoadError(f"{self.path}: unsupported persistent object (EDM's meta is a dict of type 'class')")
        if meta.get("version") != PERSISTENCE_VERSION:
            raise NetworkLoadError(
                f"{self.path}: EDM persistence version {meta.get('version')!r}, this loader reads version "
                f"{PERSISTENCE_VERSION}"
            )
        return PersistentStub(class_name=meta["class_name"], state=meta["state"])

    def _load_storage(self, blob):
        # Each storage is a nested legacy torch.save blob; torch's own loader for it would unpickle with
        # weights_only=False, so decode it with the weights-only loader instead.
        try:
            storage = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            global_line = next((line for line in str(e).splitlines() if "GLOBAL" in line), None)
            if global_line:
                raise UnsafePickleError(f"{self.path}: refusing to load a nested tensor blob: {global_line}") from e
            raise NetworkLoadError(f"{self.path}: a tensor storage is corrupt ({type(e).__name__})") from e
        if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
            raise NetworkLoadError(f"{self.path}: a tensor blob holds a {type(storage).__name__}, not a storage")
        return storage


def _numpy_scalar():
    """numpy's scalar reconstructor, which moved from numpy.core to numpy._core in numpy 2."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


def read_network_pickle(path):
    """Unpickle an EDM network pickle safely: persistent objects come back as `PersistentStub`s, tensors as tensors."""
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, path).load()
    except NetworkLoadError:
        raise
    except Exception as e:
        raise NetworkLoadError(
            f"{path}: not a readable network pickle, truncated or corrupt? ({type(e).__name__})"
        ) from e


def stub_state_dict(stub):
    """Walk a stub tree into the state dict `module.state_dict()` would give: same keys, order and tensors."""
    state_dict = collections.OrderedDict()

    def visit(node, prefix):
        state = node.state  # PersistentStub or _ModuleDictState
        state_dict.update((prefix + k, v) for k, v in state["_parameters"].items() if v is not None)
        skip = state.get("_non_persistent_buffers_set", set())
        state_dict.update((prefix + k, v) for k, v in state["_buffers"].items() if v is not None and k not in skip)
        for name, child in state["_modules"].items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(stub, "")
    return state_dict


def load_network(source, *, key="ema", cache_dir=None, device="cpu"):
    """Load network `key` of an EDM pickle (path, file:// or http(s):// URL) into our classes, in eval mode, frozen."""
    path = open_url(source, cache_dir=cache_dir)
    data = read_network_pickle(path)
    if not isinstance(data, dict) or key not in data:
        available = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else f"a {type(data).__name__}"
        raise NetworkLoadError(f"{path}: no '{key}' entry in the pickle (available: {available})")
    stub = data[key]
    if not isinstance(stub, PersistentStub):
        raise NetworkLoadError(f"{path}: '{key}' holds a {type(stub).__name__}, not a network")
    if stub.class_name not in PRECONDITIONERS:
        raise NetworkLoadError(
            f"{path}: '{key}' is a {stub.class_name}, not one of the networks we build ({', '.join(PRECONDITIONERS)})"
        )
    try:
        state_dict = stub_state_dict(stub)
        init_args, init_kwargs = stub.state["_init_args"], stub.state["_init_kwargs"]
    except (KeyError, AttributeError, TypeError) as e:
        raise NetworkLoadError(f"{path}: '{key}' is not a module in EDM's layout ({type(e).__name__}: {e})") from e
    if init_args:
        raise NetworkLoadError(f"{path}: '{key}' was built with positional arguments, which EDM networks never take")
    try:
        net = build_network(stub.class_name, init_kwargs)
    except (ValueError, TypeError) as e:
        raise NetworkLoadError(f"{path}: cannot build '{key}' ({stub.class_name}): {e}") from e

    misfit = f"{path}: the weights do not fit the {stub.class_name} its _init_kwargs describe"
    expected = net.state_dict().keys()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise NetworkLoadError(
            f"{misfit}: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shapes differ
        raise NetworkLoadError(f"{misfit}: {' '.join(str(e).split())}") from e
    return net.eval().requires_grad_(False).to(device)


def network_fingerprint(source, *, cache_dir=None):
    """Return the sha256 hex digest of a network file (path or URL), to record which teacher a run used."""
    return sha256_file(open_url(source, cache_dir=cache_dir))


@contextlib.contextmanager
def _reconstruct_global():
    """Yield a function pickle can name as `torch_utils.persistence._reconstruct_persistent_obj`, for writing only.

    pickle refuses to name a global it cannot import, so while we write, a bare module holding a placeholder sits in
    sys.modules under that name (EDM's real one is used when EDM is already imported). Nothing is installed on disk.
    """
    module_name, func_name = _RECONSTRUCT
    if module_name in sys.modules:
        yield getattr(sys.modules[module_name], func_name)
        return

    def placeholder(meta):
        raise NetworkLoadError("dmd writes EDM pickles but never rebuilds them this way; use load_network")

    placeholder.__module__, placeholder.__name__, placeholder.__qualname__ = module_name, func_name, func_name
    module = types.ModuleType(module_name)
    setattr(module, func_name, placeholder)
    added = {module_name: module}
    if "torch_utils" not in sys.modules:
        added["torch_utils"] = types.ModuleType("torch_utils")
    sys.modules.update(added)
    try:
        yield placeholder
    finally:
        for name in added:
            sys.modules.pop(name, None)


# pickle.Pickler writing each of our modules the way EDM's persistent classes reduce themselves (edm-format.md 1.2).
class _EDMPickler(pickle.Pickler):
    def __init__(self, file, reconstruct):
        super().__init__(file, protocol=4)
        self.reconstruct = reconstruct  # the global named in the stream

    def reducer_override(self, obj):
        # Our modules become reconstruct(meta); torch containers (ModuleDict), tensors and the rest pickle as usual.
        if not (isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("dmd.edm.")):
            return NotImplemented
        state = obj.__getstate__()
        init_kwargs = state.pop("_init_kwargs", {})  # only the preconditioner records them; moved last, as in EDM
        state["_init_args"] = ()
        state["_init_kwargs"] = init_kwargs
        meta = {
            "type": "class",
            "version": PERSISTENCE_VERSION,
            "module_src": MODULE_SRC,
            "class_name": type(obj).__name__,
            "state": state,
        }
        return self.reconstruct, (meta,)


def save_network_pickle(net, path):
    """Write `net` atomically as an EDM network pickle {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}."""
    if type(net).__name__ not in PRECONDITIONERS:
        raise ValueError(f"save_network_pickle writes one of {', '.join(PRECONDITIONERS)}, not {type(net).__name__}")
    # As EDM's training loop does: a frozen eval-mode CPU copy, so the caller's network is left untouched.
    ema = copy.deepcopy(net).cpu().eval().requires_grad_(False)
    data = dict(ema=ema, loss_fn=None, augment_pipe=None, dataset_kwargs={})
    with _reconstruct_global() as reconstruct, atomic_path(path) as tmp, open(tmp, "wb") as f:
        _EDMPickler(f, reconstruct).dump(data)
