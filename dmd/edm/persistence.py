"""Read EDM's and EDM2's network pickles without running any of their code (dmd/edm/writer.py writes EDM's layout).

EDM and EDM2 pickle every network as `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries
the defining module's whole source, which their loaders `exec`. We never do: a restricted unpickler resolves only the
handful of globals such a pickle names (edm-format.md 1.4; EDM2 adds `dnnlib.util.EasyDict` and numpy arrays), turns
each persistent object into an inert `PersistentStub`, walks the stubs into a state dict, and loads that into our own
class built from `_init_kwargs`.

A file is distrusted throughout, so that a small one cannot exhaust memory or time: its opcodes are scanned before it
runs (count, nesting, what BUILD may touch), every allowed global checks its arguments, the walk refuses cycles and
shared modules, and the network is built on the meta device and compared with the file's tensors before it is built
for real, so that it never holds more than the file's own tensor data. `read_array_pickle` applies the same checks to
pickles of numpy arrays alone (EDM2's FID reference statistics).
"""

import collections
import contextlib
import io
import itertools
import math
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from dmd.edm.precond import PRECONDITIONERS, build_network, check_init_kwargs
from dmd.edm2.encoders import EncoderInfo
from dmd.generator import SNAPSHOT_FORMAT, STATE_FORMAT
from dmd.utils.download import open_url, sha256_file

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version; EDM's loader asserts equality
_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# Bounds on what one network pickle may ask of the loader. EDM's largest network (ImageNet-64 ADM: 318 modules nested
# 4 deep, 553 tensors) pickles to ~56,000 opcodes nested ~30 deep; a file far beyond these is broken or hostile.
MAX_OPCODES = 500_000  # opcodes of the stream, so also objects and calls
MAX_NESTING = 1_000  # objects inside objects (hashing a tuple nested ~10**6 deep overflows the C stack)
MAX_MODULE_DEPTH = 32  # modules inside modules
MAX_TENSORS = 100_000  # tensor storages decoded, and entries of the state dict
MAX_KEY_CHARS = 1 << 24  # characters of all state-dict keys together
MAX_ARRAY_ELEMENTS = 1 << 16  # elements of one numpy array (EDM2's encoder holds two of 4 elements)
# The globals of a pickle of plain containers and numpy arrays, as numpy 1.x and 2 spell them (EDM2's reference
# statistics, dataset-refs/*.pkl, need nothing else).
ARRAY_GLOBALS = (
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
)


class NetworkLoadError(RuntimeError):
    """A network pickle is corrupt, hostile, or not a network we can build; the message names the file."""


class UnsafePickleError(NetworkLoadError):
    """A pickle names a global outside the short list an EDM network pickle needs; raised before anything runs."""


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


# Stands in for dnnlib.util.EasyDict, the top level of EDM2's pickles: a dict made empty (NEWOBJ) and filled by
# SETITEMS. Called with arguments (REDUCE), which EDM2's pickles never do, a dict would copy whatever it is given.
class _EasyDict(dict):
    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise TypeError("dnnlib.util.EasyDict is called with arguments")
        super().__init__()


# What the global numpy.ndarray resolves to: the type argument numpy's pickles hand _reconstruct, callable by nothing.
_NDARRAY = object()


# What a numpy array in a pickle may be: its dtype's kind, and how many elements it holds along an axis and in all.
@dataclass(frozen=True)
class ArrayLimits:
    kinds: str  # numpy dtype kinds allowed: 'biuf' any plain number, 'f' floats only
    noun: str  # what those are, for the error line: 'numeric', 'float'
    max_axis: int  # elements along any one axis
    max_elements: int  # elements in all


NETWORK_ARRAYS = ArrayLimits("biuf", "numeric", MAX_ARRAY_ELEMENTS, MAX_ARRAY_ELEMENTS)


# A numpy array as numpy pickles it: made empty by _reconstruct(ndarray, (0,), b'b'), then given its state
# (version, shape, dtype, fortran order, bytes) by BUILD. numpy's own __setstate__ never sees the state: it is
# checked (a plain array within `limits` whose bytes are all there) and copied into `array`.
class PickledArray:
    def __init__(self, path, limits):
        self.path = path
        self.limits = limits
        self.array = None  # the np.ndarray, once BUILD has set it

    def __setstate__(self, state):
        version, shape, dtype, fortran, data = state if isinstance(state, tuple) and len(state) == 5 else (None,) * 5
        plain = isinstance(dtype, np.dtype) and dtype.kind in self.limits.kinds and dtype.itemsize <= 8
        shaped = isinstance(shape, tuple) and len(shape) <= 8 and all(map(_is_count, shape))
        if not (version == 1 and plain and shaped and isinstance(fortran, bool) and isinstance(data, bytes)):
            raise NetworkLoadError(f"{self.path}: a numpy array is not a plain {self.limits.noun} array")
        numel, limits = math.prod(shape), self.limits
        if (
            numel > limits.max_elements
            or max(shape, default=0) > limits.max_axis
            or len(data) != numel * dtype.itemsize
        ):
            raise NetworkLoadError(
                f"{self.path}: a numpy array declares {numel} elements of {dtype} and holds {len(data)} bytes; arrays "
                f"here hold their bytes, at most {limits.max_axis} per axis and {limits.max_elements} in all"
            )
        order = "F" if fortran else "C"
        self.array = np.frombuffer(data, dtype).reshape(shape, order=order).astype(dtype.newbyteorder("="))


def _clip(text, limit=120):
    """Return str(text) cut to `limit` characters, so that no name or value from a file can bloat an error line."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value):
    """Whether value is a non-negative int (bool excluded), as sizes, strides and offsets must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A binary file that refuses reads past its end. pickle's readers allocate the length an opcode declares before they
# read, so 20 bytes declaring a 4 GiB bytes object would otherwise allocate 4 GiB.
class _Bounded:
    def __init__(self, f):
        self.f = f
        start = f.tell()
        self.end = f.seek(0, io.SEEK_END)
        f.seek(start)

    def read(self, n=-1):
        left = self.end - self.f.tell()
        n = left if n is None or n < 0 else n
        if n > left:
            raise ValueError(f"an opcode declares {n} bytes where {left} remain")
        return self.f.read(n)

    def readline(self):
        return self.f.readline()

    def tell(self):
        return self.f.tell()


# What BUILD (set an object's state) may act on, with the deepest state it may set there: EDM's pickles use it only on
# ModuleDicts and on numpy dtypes (a flat tuple), EDM2's also on numpy arrays (a tuple holding the shape and a dtype).
# A tensor's __setstate__ calls set_, which grows the storage to any size it is given, so every other target is
# refused before the stream runs. Items are only ever added to plain containers, OrderedDicts and EDM2's EasyDict.
_BUILDABLE = {
    ("new", "torch.nn.modules.container.ModuleDict"): MAX_NESTING,
    ("call", "numpy.dtype"): 1,
    ("call", "numpy._core.multiarray._reconstruct"): 3,
    ("call", "numpy.core.multiarray._reconstruct"): 3,
}
_FILLABLE = {None, ("call", "collections.OrderedDict"), ("new", "dnnlib.util.EasyDict")}
_FILLERS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}
_STRINGS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _effect(op):
    """(objects taken from the stack top, or from under the mark; whether a marked slice is taken; objects pushed)."""
    marked = pickletools.markobject in op.stack_before
    fixed = op.stack_before.index(pickletools.markobject) if marked else len(op.stack_before)
    return fixed, marked, len(op.stack_after)


_EFFECTS = {op.name: _effect(op) for op in pickletools.opcodes}  # each opcode's documented stack effect


def _origin(name, arg, inputs):
    """Where the object opcode `name` pushes comes from: ('global', name) for a global, ('call' / 'new', name) for
    what calling or instantiating one made, ('str', text) for a short string, None for anything else."""
    if name in _STRINGS:
        return ("str", arg) if isinstance(arg, str) and len(arg) <= 200 else None
    if name in ("GLOBAL", "INST"):
        return ("global" if name == "GLOBAL" else "call", arg.replace(" ", "."))
    if name == "STACK_GLOBAL":
        (_, module), (_, qualname) = inputs
        return (
            ("global", f"{module[1]}.{qualname[1]}")
            if module and qualname and module[0] == qualname[0] == "str"
            else None
        )
    callee = inputs[0][1] if inputs else None
    if name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ") and callee and callee[0] == "global":
        return ("call" if name == "REDUCE" else "new", callee[1])
    return None


def _described(origin):
    """An origin (see _origin) in words, for an error line."""
    kind, name = origin or (None, None)
    words = {"call": f"an object made by {name}", "new": f"a {name}", "global": f"the global {name}", "str": "a string"}
    return words.get(kind, "a plain value")


def _scan(f, path, what="an EDM network pickle"):
    """Check the pickle stream in `f` without running it: at most MAX_OPCODES opcodes, objects nested at most
    MAX_NESTING deep, and BUILD or added items only where _BUILDABLE / _FILLABLE allow them (errors say that `what`
    never does otherwise).

    The stack is simulated with one (nesting depth, origin) per object, from each opcode's documented stack effect.
    Depth is exact for tuples, which are built at once from their items, and those are what hashing recurses into.
    """
    stack, marks, memo = [], [], {}
    for count, (op, arg, _) in enumerate(pickletools.genops(f), 1):
        if count > MAX_OPCODES:
            raise NetworkLoadError(f"{path}: the pickle has more than {MAX_OPCODES} opcodes")
        if op.name == "MARK":
            marks.append(len(stack))
            continue
        fixed, marked, pushed = _EFFECTS[op.name]
        items = []
        if marked:  # everything above the last mark, then `fixed` objects under it
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
        if fixed > len(stack):
            raise ValueError(f"{op.name} finds too few objects on the stack")
        inputs = stack[len(stack) - fixed :] + items
        del stack[len(stack) - fixed :]

        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = inputs[0] if inputs else stack[-1]
            stack += inputs
            continue
        if op.name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
            stack += inputs * 2 if op.name == "DUP" else [memo.get(arg, (0, None))]
            continue
        if op.name == "BUILD" or op.name in _FILLERS:
            (depth, origin), added = inputs[0], inputs[1:]
            added_depth = max((d for d, _ in added), default=0)
            limit = _BUILDABLE.get(origin, -1) if op.name == "BUILD" else MAX_NESTING if origin in _FILLABLE else -1
            if added_depth > limit:
                action = "sets the state of" if op.name == "BUILD" else "adds items to"
                raise NetworkLoadError(f"{path}: the pickle {action} {_described(origin)}, which {what} never does")
            result = (max(depth, added_depth + 1), origin)
        else:
            result = (1 + max((d for d, _ in inputs), default=-1), _origin(op.name, arg, inputs))
        if result[0] > MAX_NESTING:
            raise NetworkLoadError(f"{path}: the pickle nests objects deeper than {MAX_NESTING} levels")
        stack += [result] * pushed


# pickle.Unpickler that resolves only the globals of an EDM or EDM2 network pickle (or fewer: `names`), refuses
# everything else by name, and checks the arguments of every call it allows; _scan has checked the stream's shape
# before it runs.
class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path, size, arrays=NETWORK_ARRAYS, names=None):
        super().__init__(file)
        self.path = path  # named in every error
        self.size = size  # bytes in the file: its decoded tensor data cannot be more
        self.arrays = arrays  # ArrayLimits of its numpy arrays
        self.storages = 0
        self.storage_bytes = 0
        self.allowed = {
            _RECONSTRUCT: self._reconstruct,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_storage,
            ("torch.nn.modules.container", "ModuleDict"): _ModuleDictState,
            ("collections", "OrderedDict"): self._ordered_dict,
            ("numpy", "dtype"): self._numpy_dtype,
            ("numpy._core.multiarray", "scalar"): self._numpy_scalar,  # written by numpy 2
            ("numpy.core.multiarray", "scalar"): self._numpy_scalar,  # written by numpy 1 (the 2022 releases)
            ("dnnlib.util", "EasyDict"): _EasyDict,  # EDM2's top level
            ("numpy", "ndarray"): _NDARRAY,  # EDM2's latent encoder holds float32 arrays
            ("numpy._core.multiarray", "_reconstruct"): self._numpy_array,  # written by numpy 2
            ("numpy.core.multiarray", "_reconstruct"): self._numpy_array,  # written by numpy 1 (EDM2's releases)
        }
        if names is not None:
            self.allowed = {name: self.allowed[name] for name in names}

    def find_class(self, module, name):
        # Runs when the stream names a global, i.e. before any REDUCE could call it.
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"{self.path}: refusing to load, the pickle names the global '{module}.{name}'")
        return self.allowed[(module, name)]

    def _reconstruct(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise NetworkLoadError(f"{self.path}: unsupported persistent object (EDM's meta is a dict of type 'class')")
        version = meta.get("version")
        if version != PERSISTENCE_VERSION:
            shown = _clip(version, 20) if isinstance(version, int) else f"a {type(version).__name__}"
            raise NetworkLoadError(
                f"{self.path}: EDM persistence version {shown}, this loader reads version {PERSISTENCE_VERSION}"
            )
        class_name, state = meta.get("class_name"), meta.get("state")
        if not isinstance(class_name, str):
            raise NetworkLoadError(
                f"{self.path}: a persistent object's class_name is a {type(class_name).__name__}, not a string"
            )
        if not isinstance(state, dict):
            raise NetworkLoadError(
                f"{self.path}: the state of a persistent {_clip(class_name)} is a {type(state).__name__}, not a dict"
            )
        return PersistentStub(class_name=class_name, state=state)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
        # torch's own rebuild calls Tensor.set_, which grows a storage too small for the view instead of refusing it.
        if not isinstance(storage, torch.TypedStorage):
            raise NetworkLoadError(f"{self.path}: a tensor's storage is a {type(storage).__name__}")
        shaped = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 8
        if not (shaped and _is_count(offset) and all(map(_is_count, size + stride))):
            raise NetworkLoadError(f"{self.path}: a tensor has a malformed offset, size or stride")
        if not isinstance(requires_grad, bool) or backward_hooks or metadata:
            raise NetworkLoadError(f"{self.path}: a tensor carries hooks or metadata, which network weights never do")
        reach = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset  # elements used
        if reach > storage._size():  # ._size: .size() warns that TypedStorage is deprecated
            raise NetworkLoadError(
                f"{self.path}: a tensor of size {list(size)} reaches past its storage of {storage._size()} elements"
            )
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool) or backward_hooks:
            raise NetworkLoadError(f"{self.path}: a parameter is not a plain tensor")
        return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)

    def _load_storage(self, blob):
        # Each storage is a nested legacy torch.save blob. torch's own loader for it would unpickle with
        # weights_only=False, and its legacy format allocates the size a blob declares before reading any data, so
        # the blob's layout is checked first and then decoded with the weights-only loader.
        if not isinstance(blob, bytes):
            raise NetworkLoadError(f"{self.path}: a tensor blob is a {type(blob).__name__}, not bytes")
        self.storages += 1
        if self.storages > MAX_TENSORS:
            raise NetworkLoadError(f"{self.path}: the pickle holds more than {MAX_TENSORS} tensor storages")
        self.storage_bytes += _blob_nbytes(blob, self.path)
        if self.storage_bytes > self.size:  # a blob decoded more than once
            raise NetworkLoadError(f"{self.path}: the pickle decodes more tensor data than the file holds")
        try:
            storage = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            raise NetworkLoadError(f"{self.path}: a tensor storage is corrupt ({type(e).__name__})") from e
        if not isinstance(storage, torch.TypedStorage):
            raise NetworkLoadError(f"{self.path}: a tensor blob holds a {type(storage).__name__}, not a storage")
        return storage

    def _ordered_dict(self, *args):
        # EDM's OrderedDicts are made empty and filled by SETITEMS; a copy per call of a list in the file could turn
        # one list into a million.
        if args:
            raise NetworkLoadError(f"{self.path}: the pickle calls OrderedDict with arguments, which EDM's never does")
        return collections.OrderedDict()

    def _numpy_dtype(self, spec, align=False, copy=False):
        # EDM's pickles name a dtype by a short string ('f8'); a field list, built anew per call, could be huge.
        if not (isinstance(spec, str) and len(spec) <= 16):
            raise NetworkLoadError(
                f"{self.path}: a numpy dtype is named by a {type(spec).__name__}, not a short string"
            )
        return np.dtype(spec, align, copy)

    def _numpy_scalar(self, dtype, data=None):
        # numpy allocates a scalar of the dtype's size, and a void dtype can claim gigabytes: numbers only.
        number = isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.itemsize <= 16
        if not (number and isinstance(data, bytes) and len(data) == dtype.itemsize):
            raise NetworkLoadError(f"{self.path}: a numpy scalar of dtype {_clip(dtype, 40)} is not a plain number")
        return _numpy_scalar()(dtype, data)

    def _numpy_array(self, subtype, shape, dtype):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and sets the real one by BUILD.
        if not (subtype is _NDARRAY and shape == (0,) and dtype == b"b"):
            raise NetworkLoadError(f"{self.path}: a numpy array is made in a way numpy's own pickles never make one")
        return PickledArray(self.path, self.arrays)


def _numpy_scalar():
    """numpy's scalar reconstructor, which moved from numpy.core to numpy._core in numpy 2."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


_BLOB_HEAD = 4096  # bytes of a storage blob its five pickles may take (they take ~300)


# Reads the pickles heading a nested legacy torch.save blob: a storage class becomes its dtype (not callable, so
# nothing is built from it), a persistent id comes back as it is, and every other global is refused.
class _BlobHeadUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path
        self.storages = []  # the persistent ids met

    def find_class(self, module, name):
        storage_type = getattr(torch, name, None) if module == "torch" and name.endswith("Storage") else None
        if not (isinstance(storage_type, type) and issubclass(storage_type, torch.storage._LegacyStorage)):
            raise UnsafePickleError(
                f"{self.path}: refusing to load a nested tensor blob: it names the global '{module}.{name}'"
            )
        return storage_type._dtype  # as torch's legacy loader reads it (.dtype warns that TypedStorage is deprecated)

    def persistent_load(self, pid):
        self.storages.append(pid)
        return pid


def _blob_nbytes(blob, path):
    """Return the data size of the one storage in a nested legacy torch.save blob, after checking that the blob holds
    exactly that: five pickles (magic number, protocol, system info, the storage's id, its key), the element count
    as an int64, then the elements (torch.serialization._legacy_save)."""
    head = io.BytesIO(blob[:_BLOB_HEAD])
    unpickler = _BlobHeadUnpickler(head, path)
    records = []
    try:
        for _ in range(5):
            start = head.tell()
            _scan(_Bounded(head), path)
            head.seek(start)
            records.append(unpickler.load())
        magic, protocol, _, root, keys = records
        kind, dtype, key, _, numel, view = root
    except NetworkLoadError:
        raise
    except Exception as e:
        raise NetworkLoadError(f"{path}: a tensor blob is not a torch.save of one storage ({type(e).__name__})") from e
    legacy = (magic, protocol) == (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION)
    one = len(unpickler.storages) == 1 and root is unpickler.storages[0] and keys == [key] and view is None
    if not (legacy and one and kind == "storage" and isinstance(dtype, torch.dtype) and _is_count(numel)):
        raise NetworkLoadError(f"{path}: a tensor blob is not a torch.save of one storage")
    data = len(blob) - head.tell() - 8
    if blob[head.tell() : head.tell() + 8] != struct.pack("<q", numel) or data != numel * dtype.itemsize:
        raise NetworkLoadError(
            f"{path}: a tensor blob declares {numel} elements of {dtype} but holds {max(data, 0)} bytes"
        )
    return data


def _torch_file_error(path):
    """The error line for a torch.save zip: dmd's own snapshots and training states are read by DMDGenerator."""
    kind = None
    with contextlib.suppress(Exception), zipfile.ZipFile(path) as archive:
        member = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        with archive.open(member) as f:
            head = io.BytesIO(f.read(1 << 16))  # dmd writes the format as the dict's first entry
        strings = [arg for _, arg, _ in itertools.islice(pickletools.genops(head), 64) if isinstance(arg, str)]
        kind = strings[strings.index("format") + 1]
    if kind in (SNAPSHOT_FORMAT, STATE_FORMAT):
        return (
            f"{path}: a {kind} written by dmd train, not an EDM network pickle; load it with "
            "dmd.generate.DMDGenerator or `python -m dmd generate --network`"
        )
    return (
        f"{path}: a torch.save file, not an EDM network pickle (dmd.generate.DMDGenerator reads dmd's snapshots, "
        "training states and the port's checkpoints)"
    )


def read_network_pickle(path):
    """Unpickle an EDM network pickle safely: persistent objects come back as `PersistentStub`s, tensors as tensors."""
    return _safe_load(path, "an EDM network pickle", "network pickle", _torch_file_error)


def read_array_pickle(path, limits, what):
    """Unpickle a pickle of plain containers (dicts, lists, tuples, numbers, strings) and numpy arrays, such as EDM2's
    reference statistics, without running any of it: numpy arrays come back as `PickledArray`s (`.array`), each
    within `limits`. Any other global, a stream of another shape, or an array outside `limits` or without its bytes
    raises NetworkLoadError naming the file and saying what `what` (e.g. 'an EDM2 reference pickle') never holds.
    """
    return _safe_load(path, what, "pickle", arrays=limits, names=ARRAY_GLOBALS)


def _safe_load(path, what, readable, zip_error=None, **unpickler):
    """Scan the pickle at `path` (errors say what `what` never does), then unpickle it with
    _SafeUnpickler(**unpickler); whatever else stops it is one NetworkLoadError: not a readable `readable`. A zip is
    refused first with zip_error(path) where one is given."""
    try:
        with open(path, "rb") as f:
            if zip_error is not None and f.read(4) == b"PK\x03\x04":  # a torch.save zip, never a pickle
                raise NetworkLoadError(zip_error(path))
            f.seek(0)
            _scan(_Bounded(f), path, what)
            f.seek(0)
            return _SafeUnpickler(f, path, os.fstat(f.fileno()).st_size, **unpickler).load()
    except NetworkLoadError:
        raise
    except Exception as e:
        raise NetworkLoadError(f"{path}: not a readable {readable}, truncated or corrupt? ({type(e).__name__})") from e


def stub_state_dict(stub, path="<stub>"):
    """Walk a stub tree into the state dict `module.state_dict()` would give: same keys, order and tensors.

    A network's modules form a tree, so the walk refuses a cycle, a module or module dict met twice (a graph that
    repeats one child under two names per level multiplies into 2**depth keys), nesting deeper than
    MAX_MODULE_DEPTH, and more than MAX_TENSORS tensors or MAX_KEY_CHARS characters of keys. Errors name `path`.
    """
    state_dict = collections.OrderedDict()
    seen = set()  # ids of every state dict and _parameters / _buffers / _modules dict met so far
    key_chars = 0

    def visit(node, prefix, ancestors):
        nonlocal key_chars
        where = f"{path}: module '{_clip(prefix[:-1])}'" if prefix else f"{path}: the network"
        if not isinstance(node, (PersistentStub, _ModuleDictState)):
            raise NetworkLoadError(f"{where} is a {type(node).__name__}, not a module")
        state = getattr(node, "state", None)
        parts = [state.get(name) for name in ("_parameters", "_buffers", "_modules")] if isinstance(state, dict) else []
        if not parts or not all(isinstance(part, dict) for part in parts):
            raise NetworkLoadError(
                f"{where} is not a module in EDM's layout (no _parameters, _buffers, _modules dicts)"
            )
        if id(state) in ancestors:
            raise NetworkLoadError(f"{where} contains itself: the module graph has a cycle")
        if any(id(d) in seen for d in (state, *parts)):
            raise NetworkLoadError(f"{where} repeats a module met before; a network's modules form a tree")
        if len(ancestors) > MAX_MODULE_DEPTH:
            raise NetworkLoadError(f"{where} nests modules more than {MAX_MODULE_DEPTH} deep")
        seen.update(id(d) for d in (state, *parts))
        params, buffers, modules = parts
        skip = state.get("_non_persistent_buffers_set", set())
        if not isinstance(skip, (set, frozenset)):
            raise NetworkLoadError(f"{where} has a _non_persistent_buffers_set that is a {type(skip).__name__}")
        for kind, entries in (("parameter", params), ("buffer", buffers)):
            for name, tensor in entries.items():
                if tensor is None or (kind == "buffer" and name in skip):
                    continue
                if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
                    raise NetworkLoadError(
                        f"{where} has a {kind} {_clip(name, 40)!r} that is a {type(tensor).__name__}, not a tensor"
                    )
                key_chars += len(prefix) + len(name)
                if len(state_dict) >= MAX_TENSORS or key_chars > MAX_KEY_CHARS:
                    raise NetworkLoadError(
                        f"{path}: the network has more than {MAX_TENSORS} tensors or {MAX_KEY_CHARS} characters of keys"
                    )
                state_dict[prefix + name] = tensor
        for name, child in modules.items():
            if child is not None:
                if not isinstance(name, str):
                    raise NetworkLoadError(f"{where} names a child module by a {type(name).__name__}")
                visit(child, f"{prefix}{name}.", ancestors | {id(state)})

    visit(stub, "", frozenset())
    return state_dict


def _some(keys, what, shown=3):
    """'N what (first, second, third, ...)': a count of `keys` and the first few, as one short phrase."""
    names = ", ".join(_clip(k, 60) for k in keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} {what} ({names})" if keys else f"0 {what}"


def _check_weights(path, class_name, shapes, state_dict):
    """Check that `state_dict` (the file's tensors) has exactly the keys and `shapes` of the network its kwargs
    describe, and that its tensors hold their own data: the network built next then holds no more than the file."""
    misfit = f"{path}: the weights do not fit the {class_name} its _init_kwargs describe"
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        raise NetworkLoadError(f"{misfit}: {_some(missing, 'missing')}, {_some(unexpected, 'unexpected')}")
    integral = [k for k, t in state_dict.items() if not t.is_floating_point()]
    if integral:
        raise NetworkLoadError(f"{misfit}: {_some(integral, 'tensors')} are not floating point")
    wrong = [k for k, shape in shapes.items() if state_dict[k].shape != shape]
    if wrong:
        k = wrong[0]
        raise NetworkLoadError(
            f"{misfit}: size mismatch in {len(wrong)} of {len(shapes)} tensors, e.g. '{_clip(k, 60)}' is "
            f"{list(state_dict[k].shape)} in the file, {list(shapes[k])} in the network"
        )
    # Stride-0 or overlapping views of a small storage can take any shape; the network built from them would not.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_dict.values()}
    claimed = sum(t.numel() * t.element_size() for t in state_dict.values())
    if claimed > sum(storages.values()):
        raise NetworkLoadError(
            f"{path}: the tensors claim {claimed / 2**20:.1f} MiB but their storages hold "
            f"{sum(storages.values()) / 2**20:.1f} MiB; a network pickle stores every tensor's own data"
        )


# Makes the factories our layers draw their weights from (torch.rand, torch.ones, ...) return meta tensors unless
# told a device, so that a network built inside holds shapes only. Unlike `with torch.device("meta")` it leaves
# torch.as_tensor / torch.tensor alone: the preconditioners compute their sigma constants on the CPU from those.
class _MetaFactories(torch.overrides.TorchFunctionMode):
    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def load_network(
    source: Union[str, os.PathLike],
    *,
    key: str = "ema",
    cache_dir: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
) -> torch.nn.Module:
    """Load network `key` of an EDM or EDM2 pickle (path, file:// or http(s):// URL) into our classes, in eval mode,
    frozen.

    `source` is a model EDM or EDM2 released, a snapshot of their training or a file `save_network_pickle` wrote;
    URLs are downloaded once into `cache_dir` (else $DMD_CACHE_DIR, else ~/.cache/dmd). The network is rebuilt from
    the pickle's `_init_kwargs` as one of our `EDMPrecond`, `VPPrecond`, `VEPrecond`, `iDDPMPrecond` (EDM's interface)
    or EDM2's `Precond` (dmd.edm2.networks), its weights loaded strictly, each in the dtype the file stores it in
    (EDM2's releases: float16, which EDM2's own sampler uses as such), and moved to `device`. An EDM2 pickle's
    `encoder` is read as data into `net.encoder_info` (dmd.edm2.EncoderInfo). No code from the file runs: a global
    outside the few an EDM or EDM2 network pickle needs raises UnsafePickleError, any other bad file (dmd's own
    torch.save files included: `DMDGenerator` reads those) NetworkLoadError naming it. A missing local file raises
    FileNotFoundError, a failed download dmd.utils.download.DownloadError.

    Example:
        from dmd.edm import edm_sampler, load_network
        net = load_network("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
        latents = torch.randn(8, net.img_channels, net.img_resolution, net.img_resolution)  # (8, 3, 32, 32)
        labels = torch.eye(net.label_dim)[torch.arange(8)]  # one-hot, classes 0-7
        images = edm_sampler(net, latents, labels)  # EDM's 18-step Heun sampler: (8, 3, 32, 32) float64
    """
    path = open_url(source, cache_dir=cache_dir)
    data = read_network_pickle(path)
    if not isinstance(data, dict) or key not in data:
        names = sorted(map(str, data))[:10] if isinstance(data, dict) else None
        available = ", ".join(_clip(k, 40) for k in names) if names is not None else f"a {type(data).__name__}"
        raise NetworkLoadError(f"{path}: no '{key}' entry in the pickle (available: {available})")
    stub = data[key]
    if not isinstance(stub, PersistentStub):
        raise NetworkLoadError(f"{path}: '{key}' holds a {type(stub).__name__}, not a network")
    if not isinstance(stub.class_name, str) or stub.class_name not in PRECONDITIONERS:
        raise NetworkLoadError(
            f"{path}: '{key}' is a {_clip(stub.class_name, 40)}, not one of the networks we build "
            f"({', '.join(PRECONDITIONERS)})"
        )
    init_args = stub.state.get("_init_args") if isinstance(stub.state, dict) else None
    init_kwargs = stub.state.get("_init_kwargs") if isinstance(stub.state, dict) else None
    if not isinstance(init_args, tuple) or not isinstance(init_kwargs, dict):
        raise NetworkLoadError(f"{path}: '{key}' is not a module in EDM's layout (no _init_args and _init_kwargs)")
    if init_args:
        raise NetworkLoadError(f"{path}: '{key}' was built with positional arguments, which EDM networks never take")
    state_dict = stub_state_dict(stub, path)
    try:
        check_init_kwargs(init_kwargs)
        with _MetaFactories():  # shapes only, nothing allocated or drawn: the file's tensors are checked first
            net = build_network(stub.class_name, init_kwargs)
    except Exception as e:  # the kwargs come from the file, so whatever stops the build is the file's fault
        raise NetworkLoadError(f"{path}: cannot build '{key}' ({stub.class_name}): {_clip(e, 300)}") from e
    _check_weights(path, stub.class_name, {k: v.shape for k, v in net.state_dict().items()}, state_dict)
    # assign: the network takes the file's tensors in place of its meta ones, dtype included. EDM2's layers cast each
    # weight to float32 before use, but scale it by its gain (out_gain, emb_gain) in the gain's own dtype: EDM2
    # samples its float16 releases with that rounding, 1e-4 of the output, and so do we. Students are built in
    # float32, as EDM2 trains.
    net.load_state_dict(state_dict, strict=True, assign=True)
    if "encoder" in data:
        net.encoder_info = _encoder_info(path, data["encoder"], net.img_channels)
    return net.eval().requires_grad_(False).to(device)


def _encoder_info(path, encoder, img_channels):
    """Return the EncoderInfo of an EDM2 pickle's `encoder` entry, its attributes read as data; NetworkLoadError naming
    the file if it is not one of EDM2's encoders with sane attributes."""
    if not (isinstance(encoder, PersistentStub) and isinstance(encoder.state, dict)):
        raise NetworkLoadError(f"{path}: 'encoder' holds a {type(encoder).__name__}, not an EDM2 encoder")
    attributes = {k: v.array if isinstance(v, PickledArray) else v for k, v in encoder.state.items()}
    try:
        return EncoderInfo.from_attributes(encoder.class_name, attributes, img_channels)
    except ValueError as e:
        raise NetworkLoadError(f"{path}: {e}") from e


def network_fingerprint(source: Union[str, os.PathLike], *, cache_dir: Union[str, os.PathLike, None] = None) -> str:
    """Return the sha256 hex digest of a network file (path or URL), to record which teacher a run used."""
    return sha256_file(open_url(source, cache_dir=cache_dir))
