"""Write our EDM networks as EDM network pickles, deterministically: the same network gives the same bytes.

EDM's loader rebuilds the file with EDM's own classes (the embedded source only imports EDM's `training.networks`);
dmd reads it with its safe loader (dmd/edm/persistence.py). Only EDM's preconditioners are written: an EDM2 network
has no layout here that EDM2's loader and ours both read, so `dmd export` is the way to share one.
"""

import collections
import contextlib
import copy
import io
import os
import pickle
import struct
import sys
import types
from typing import Union

import torch

from dmd.edm.persistence import _RECONSTRUCT, PERSISTENCE_VERSION, NetworkLoadError
from dmd.utils.io import atomic_path

# What we write as `module_src`. EDM's loader execs it and looks `class_name` up in the result, so importing EDM's
# own classes lets EDM read our pickles too; our loader never executes it.
MODULE_SRC = "from training.networks import *  # written by dmd; EDM's own classes rebuild these objects\n"
EDM_PRECONDITIONERS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")


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


def _storage_blob(storage):
    """The nested blob torch's pickling of `storage` (a TypedStorage) holds, except that its key is "0".

    torch writes torch.save(storage, _use_new_zipfile_serialization=False): five protocol-2 pickles (magic number,
    protocol version, system info, the storage's persistent id, the list of keys), the element count as an int64,
    then the elements in native byte order. It keys the storage by its memory address, so the same weights pickled
    twice gave different bytes; the key only pairs the persistent id with the data, and any string serves.
    """
    key, untyped = "0", storage._untyped_storage.cpu()
    numel = storage._size()
    system = {
        "protocol_version": torch.serialization.PROTOCOL_VERSION,
        "little_endian": sys.byteorder == "little",
        "type_sizes": {
            "short": torch.serialization.SHORT_SIZE,
            "int": torch.serialization.INT_SIZE,
            "long": torch.serialization.LONG_SIZE,
        },
    }
    f = io.BytesIO()
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, system):
        pickle.dump(header, f, protocol=2)
    root = pickle.Pickler(f, protocol=2)
    storage_type = getattr(torch, storage._pickle_storage_type())  # e.g. torch.FloatStorage, a global in the stream
    root.persistent_id = lambda obj: ("storage", storage_type, key, "cpu", numel, None) if obj is storage else None
    root.dump(storage)
    pickle.dump([key], f, protocol=2)
    f.write(struct.pack("<q", numel))
    f.write(torch.empty(0, dtype=torch.uint8).set_(untyped).numpy().tobytes())  # (nbytes,): the raw elements
    return f.getvalue()


def _interned(value):
    """`value` with every string in its plain lists, tuples and dicts interned (new containers, other objects kept).

    pickle writes a string met before as a reference to it, by object identity, so equal strings from different
    sources (a class's name, a literal kwarg, a kwarg read back from a file) would make the bytes depend on how the
    network was built; interned, every equal string is one object.
    """
    if type(value) is str:
        return sys.intern(value)
    if type(value) in (list, tuple):
        return type(value)(map(_interned, value))
    if type(value) in (dict, collections.OrderedDict):
        return type(value)((_interned(k), _interned(v)) for k, v in value.items())
    return value


# pickle.Pickler writing each of our modules the way EDM's persistent classes reduce themselves (edm-format.md 1.2),
# and each tensor storage as torch does but under a fixed key, so that the same weights always give the same bytes.
class _EDMPickler(pickle.Pickler):
    def __init__(self, file, reconstruct):
        super().__init__(file, protocol=4)
        self.reconstruct = reconstruct  # the global named in the stream

    def reducer_override(self, obj):
        # A tensor's storage becomes _load_from_bytes(blob) as in torch but keyed "0", our modules reconstruct(meta);
        # torch containers (ModuleDict), tensors themselves and the rest pickle as usual.
        if isinstance(obj, torch.storage.TypedStorage):
            return torch.storage._load_from_bytes, (_storage_blob(obj),)
        if not (isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("dmd.edm.")):
            return NotImplemented
        state = _interned(obj.__getstate__())
        # A run's override of the U-Net dtype (dmd train --precision) is not part of the network, and a torch.dtype
        # in the stream would be a global no network pickle names.
        state.pop("compute_dtype", None)
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


def save_network_pickle(net: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write `net` atomically as an EDM network pickle {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}.

    `net` is one of our preconditioners (else ValueError). A frozen eval-mode CPU copy is written as 'ema', the other
    entries empty, and the caller's network is left untouched. `load_network` reads the weights back bit for bit; the
    embedded source only imports EDM's `training.networks`, so that EDM's own loader rebuilds it with EDM's classes.
    The same class, kwargs and weights always give the same bytes, so a file's sha256 identifies its network.
    """
    if type(net).__name__ not in EDM_PRECONDITIONERS:
        raise ValueError(
            f"save_network_pickle writes one of {', '.join(EDM_PRECONDITIONERS)}, not {type(net).__name__}"
        )
    # As EDM's training loop does: a frozen eval-mode CPU copy, so the caller's network is left untouched.
    ema = copy.deepcopy(net).cpu().eval().requires_grad_(False)
    data = dict(ema=ema, loss_fn=None, augment_pipe=None, dataset_kwargs={})
    with _reconstruct_global() as reconstruct, atomic_path(path) as tmp, open(tmp, "wb") as f:
        _EDMPickler(f, reconstruct).dump(data)
