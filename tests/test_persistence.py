import collections
import copyreg
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Call, numpy1_spelling, pickled_array

from dmd.edm import persistence, writer
from dmd.edm.persistence import (
    NetworkLoadError,
    PersistentStub,
    UnsafePickleError,
    load_network,
    network_fingerprint,
    read_network_pickle,
    stub_state_dict,
)
from dmd.edm.precond import build_network, set_compute_dtype
from dmd.edm.writer import MODULE_SRC, save_network_pickle
from dmd.edm2 import EncoderInfo

FIXTURES = Path(__file__).parent / "fixtures"
EDM2 = FIXTURES / "edm2"
NAMES = {"edm_ddpmpp_cond": "EDMPrecond", "vp_ddpmpp_cond": "VPPrecond"}
TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
TINY_NETS = {
    "EDMPrecond": dict(TINY_SONG, label_dim=10, augment_dim=9),
    "VPPrecond": dict(TINY_SONG),
    "VEPrecond": dict(TINY_SONG, embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1]),
    "iDDPMPrecond": dict(TINY_SONG, model_type="DhariwalUNet", label_dim=10),
}
TINY_EDM2 = dict(  # edm2_img_cond's kwargs
    img_resolution=8,
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
    logvar_channels=8,
)


def _tiny(class_name):
    torch.manual_seed(1)
    net = build_network(class_name, dict(TINY_NETS[class_name], img_resolution=8, img_channels=3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # EDM's zero inits would hide a weight that did not round-trip
    return net


def _patched(tmp_path, old, new, fixture=FIXTURES / "edm_ddpmpp_cond.pkl"):
    """A copy of a fixture (EDM's by default) with the first occurrence of `old` replaced by the same-length `new`."""
    data = fixture.read_bytes()
    assert len(old) == len(new) and old in data
    path = tmp_path / "patched.pkl"
    path.write_bytes(data.replace(old, new, 1))
    return path


def _walk(node, prefix="", out=None):
    """{module path: (class name, state keys in order)} of a stub tree."""
    out = {} if out is None else out
    out[prefix] = (node.class_name if isinstance(node, PersistentStub) else type(node).__name__, list(node.state))
    for name, child in node.state["_modules"].items():
        if child is not None:
            _walk(child, f"{prefix}{name}.", out)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_into_our_classes(name):
    ref = np.load(FIXTURES / f"{name}.npz")
    stubs = read_network_pickle(FIXTURES / f"{name}.pkl")
    state_dict = stub_state_dict(stubs["ema"])
    assert list(state_dict) == ref["state_dict_keys"].tolist()  # the walker alone gives EDM's ema.state_dict()

    net = load_network(FIXTURES / f"{name}.pkl")
    assert type(net).__name__ == NAMES[name]
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state_dict.items())
    with torch.no_grad():
        out = net(torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"]), torch.from_numpy(ref["labels"]))
    assert (out - torch.from_numpy(ref["out"])).abs().max() <= 1e-5 * np.abs(ref["out"]).max()


def test_walker_skips_none_and_non_persistent_entries():
    def stub(module):
        state = module.__getstate__()
        state["_modules"] = {k: None if c is None else stub(c) for k, c in state["_modules"].items()}
        return PersistentStub(type(module).__name__, state)

    net = torch.nn.Module()
    net.register_buffer("kept", torch.ones(2))
    net.register_buffer("dropped", torch.zeros(2), persistent=False)
    net.register_buffer("unset", None)
    net.lin = torch.nn.Linear(2, 3, bias=False)  # bias is a None parameter
    net.register_module("skip", None)
    state_dict = stub_state_dict(stub(net))
    assert list(state_dict) == list(net.state_dict()) == ["kept", "lin.weight"]
    assert state_dict["lin.weight"] is net.lin.weight


def test_torch_storage_loader_is_never_called(monkeypatch):
    # torch.storage._load_from_bytes unpickles with weights_only=False; ours must decode the blobs without it.
    def refuse(blob):
        raise AssertionError("torch.storage._load_from_bytes was called")

    monkeypatch.setattr(torch.storage, "_load_from_bytes", refuse)
    assert len(stub_state_dict(read_network_pickle(FIXTURES / "edm_ddpmpp_cond.pkl")["ema"])) == 149


def test_edm2_pickle_loads_with_its_encoder():
    data = read_network_pickle(EDM2 / "edm2_latent_cond.pkl")
    assert isinstance(data, dict) and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    assert data["loss_fn"].class_name == "EDM2Loss" and data["loss_fn"].state["P_mean"] == -0.4

    assert load_network(EDM2 / "edm2_img_cond.pkl").encoder_info == EncoderInfo("StandardRGBEncoder")
    info = load_network(EDM2 / "edm2_latent_cond.pkl").encoder_info
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])  # EDM2's defaults: final_std / raw_std
    bias = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale
    expected = EncoderInfo(
        "StabilityVAEEncoder", "stabilityai/sd-vae-ft-mse", tuple(scale.tolist()), tuple(bias.tolist()), 8
    )
    assert info == expected
    assert "dnnlib" not in sys.modules and "torch_utils" not in sys.modules
    with pytest.raises(NetworkLoadError, match="'loss_fn' is a EDM2Loss, not one of the networks we build .*Precond"):
        load_network(EDM2 / "edm2_latent_cond.pkl", key="loss_fn")


def test_edm2_pickle_written_by_numpy_1(tmp_path):
    # EDM2's releases were written by numpy 1.x, which names numpy.core.multiarray._reconstruct for an array.
    path = tmp_path / "numpy1.pkl"
    data = (EDM2 / "edm2_latent_cond.pkl").read_bytes()
    path.write_bytes(numpy1_spelling(data))
    assert b"numpy.core.multiarray" in path.read_bytes()
    assert load_network(path).encoder_info == load_network(EDM2 / "edm2_latent_cond.pkl").encoder_info


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"StabilityVAEEncoder", b"StabilityXAEEncoder", "'encoder' is a StabilityXAEEncoder, not one of EDM2's"),
        (b"\x8c\x02f4", b"\x8c\x02i4", "the encoder's 'scale' is not 4 floats"),
    ],
)
def test_edm2_encoder_is_checked(tmp_path, old, new, message):
    path = _patched(tmp_path, old, new, fixture=EDM2 / "edm2_latent_cond.pkl")
    with pytest.raises(NetworkLoadError, match=f"^{re.escape(str(path))}: {message}"):
        load_network(path)


def test_edm2_shape_mismatch_is_summarised(tmp_path):
    # The network's _init_kwargs patched to model_channels=32 (the U-Net's own persistent copy keeps 16).
    path = _patched(tmp_path, b"j,\x08\x00\x00K\x10", b"j,\x08\x00\x00K\x20", fixture=EDM2 / "edm2_img_cond.pkl")
    with pytest.raises(NetworkLoadError) as error:
        load_network(path)
    message = str(error.value)
    assert re.match(
        rf"{re.escape(str(path))}: the weights do not fit the Precond .* size mismatch in \d+ of 63", message
    )
    assert len(message) < 500


@pytest.mark.parametrize("class_name", list(TINY_NETS))
def test_save_load_round_trip_is_bit_identical(tmp_path, class_name):
    net = _tiny(class_name)
    path = tmp_path / "network.pkl"
    save_network_pickle(net, path)
    loaded = load_network(path)

    assert type(loaded) is type(net) and loaded.init_kwargs == net.init_kwargs
    assert list(loaded.state_dict()) == list(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert net.training and all(p.requires_grad for p in net.parameters())  # the caller's network is untouched
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    labels = torch.eye(10)[[3, 7]] if net.label_dim else None
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net.eval()(x, sigma, labels))
    assert [p.name for p in tmp_path.iterdir()] == ["network.pkl"]  # no temp file left behind
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules


def test_same_weights_give_the_same_bytes(tmp_path):
    # torch names each nested storage blob by its memory address, so two copies of one network pickled differently.
    first, second, reloaded = tmp_path / "first.pkl", tmp_path / "second.pkl", tmp_path / "reloaded.pkl"
    save_network_pickle(_tiny("EDMPrecond"), first)
    save_network_pickle(_tiny("EDMPrecond"), second)
    save_network_pickle(load_network(first), reloaded)  # a third copy, built from the file's own _init_kwargs
    assert first.read_bytes() == second.read_bytes() == reloaded.read_bytes()
    net = _tiny("EDMPrecond")
    assert all(torch.equal(a, b) for a, b in zip(load_network(second).state_dict().values(), net.state_dict().values()))
    with torch.no_grad():
        net.model.enc["8x8_conv"].weight[0, 0, 0, 0] += 1  # one changed weight changes the file
    save_network_pickle(net, second)
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_storage_blob_is_torchs_legacy_format(dtype):
    # A blob is what torch.save(storage, _use_new_zipfile_serialization=False) writes, with key "0" for the address,
    # so that torch's own loader (EDM's path: torch.storage._load_from_bytes) reads it.
    storage = torch.arange(5).to(dtype)[1:]._typed_storage()  # a view: the whole storage is written, as torch does
    f = io.BytesIO()
    torch.save(storage, f, _use_new_zipfile_serialization=False)
    key = str(storage._untyped_storage._cdata)
    torchs = f.getvalue().replace(b"X" + struct.pack("<I", len(key)) + key.encode(), b"X\x01\x00\x00\x000")
    blob = writer._storage_blob(storage)
    assert blob == torchs
    loaded = torch.storage._load_from_bytes(blob)
    assert torch.equal(torch.tensor([], dtype=dtype).set_(loaded), torch.arange(5).to(dtype))


def test_compute_dtype_is_not_written(tmp_path):
    # A run's bf16 override is no part of the network; written as a torch.dtype, our own loader refused the file.
    net = set_compute_dtype(_tiny("EDMPrecond"), torch.bfloat16)
    save_network_pickle(net, tmp_path / "network.pkl")
    assert "compute_dtype" not in read_network_pickle(tmp_path / "network.pkl")["ema"].state
    assert load_network(tmp_path / "network.pkl").compute_dtype is None and net.compute_dtype is torch.bfloat16


def test_written_pickle_has_edms_layout(tmp_path):
    path = tmp_path / "network.pkl"
    save_network_pickle(load_network(FIXTURES / "edm_ddpmpp_cond.pkl"), path)
    ours, edm = read_network_pickle(path), read_network_pickle(FIXTURES / "edm_ddpmpp_cond.pkl")
    assert list(ours) == list(edm) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]

    # Same module tree, class names and attribute names in the same order, so EDM's forward finds what it reads.
    ours_tree, edm_tree = _walk(ours["ema"]), _walk(edm["ema"])
    assert list(ours_tree) == list(edm_tree)
    root_class, root_keys = ours_tree.pop("")
    assert (root_class, [k for k in root_keys if k != "use_bf16"]) == edm_tree.pop("")  # use_bf16 is ours alone
    assert ours_tree == edm_tree
    assert ours["ema"].state["_init_kwargs"].items() >= edm["ema"].state["_init_kwargs"].items()
    assert ours["ema"].state["_init_args"] == () and ours["ema"].state["training"] is False

    # Each persistent object is reconstruct(meta) with EDM's meta dict.
    metas = []

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return lambda meta: metas.append(meta) or meta
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recording(f).load()
    assert len(metas) == sum(kind != "_ModuleDictState" for kind, _ in _walk(ours["ema"]).values())
    assert all(list(m) == ["type", "version", "module_src", "class_name", "state"] for m in metas)
    assert {(m["type"], m["version"], m["module_src"]) for m in metas} == {("class", 6, MODULE_SRC)}


def _evil_streams(sentinel):
    """Hand-written pickle streams {'ema': <call>} whose call would create `sentinel`."""
    shell = f"touch {sentinel}"
    calls = {
        "os.system": f"cos\nsystem\n(V{shell}\ntR",
        "builtins.eval": f"cbuiltins\neval\n(V__import__('os').system('{shell}')\ntR",
        "subprocess.Popen": f"csubprocess\nPopen\n((Vtouch\nV{sentinel}\nltR",
    }
    return {name: f"(dVema\n{call}s.".encode() for name, call in calls.items()}


@pytest.mark.parametrize("global_name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_code_in_a_pickle_is_refused_before_it_runs(tmp_path, global_name):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_evil_streams(sentinel)[global_name])
    with pytest.raises(UnsafePickleError, match=f"{re.escape(str(path))}: .* the global '{global_name}'"):
        load_network(path)
    assert not sentinel.exists()


# dnnlib.util.EasyDict, the top level of EDM2's pickles; `_dnnlib()` lets pickle name it so while a test writes.
class EasyDict(dict):
    pass


EasyDict.__module__ = "dnnlib.util"


@contextmanager
def _dnnlib():
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    package = types.ModuleType("dnnlib")
    package.util = util
    sys.modules.update({"dnnlib": package, "dnnlib.util": util})
    try:
        yield
    finally:
        for name in ("dnnlib", "dnnlib.util"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("route", ["call", "object array", "numpy.load"])
def test_code_in_an_edm2_pickle_is_refused_before_it_runs(tmp_path, route):
    sentinel = tmp_path / "SENTINEL"
    run = Call(os.system, f"touch {sentinel}")
    refused = (UnsafePickleError, f"the global '{os.system.__module__}.system'")
    if route == "call":
        scale = run
    elif route == "object array":  # numpy unpickles an object array's items, calls included
        scale, refused = (
            pickled_array((1,), "O", [run]),
            (NetworkLoadError, "sets the state of an object made by numpy"),
        )
    else:  # numpy.load(allow_pickle=True) of a file that pickles the call
        np.save(tmp_path / "run.npy", np.array([run], dtype=object), allow_pickle=True)
        scale, refused = Call(np.load, str(tmp_path / "run.npy"), None, True), (UnsafePickleError, "'numpy.load'")
    encoder = Persistent("StabilityVAEEncoder", {"vae_name": "stabilityai/sd-vae-ft-mse", "scale": scale})
    path = tmp_path / "evil.pkl"
    with _dnnlib():
        path.write_bytes(_dumps(EasyDict(encoder=encoder)))
    error, phrase = refused
    with pytest.raises(error, match=f"^{re.escape(str(path))}: .*{re.escape(phrase)}"):
        load_network(path)
    assert not sentinel.exists()


def test_code_in_a_nested_tensor_blob_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    blob = io.BytesIO()
    torch.save(Call(os.system, f"touch {sentinel}"), blob, _use_new_zipfile_serialization=False)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Call(torch.storage._load_from_bytes, blob.getvalue())}))
    with pytest.raises(UnsafePickleError, match=r"evil.pkl: refusing to load a nested tensor blob: .*system"):
        load_network(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("cut", [0.5, 0.999, 0])
def test_truncated_pickle(tmp_path, cut):
    data = (FIXTURES / "edm_ddpmpp_cond.pkl").read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(NetworkLoadError, match=f"{re.escape(str(path))}: not a readable network pickle"):
        load_network(path)


def test_wrong_persistence_version(tmp_path):
    path = _patched(tmp_path, b"\x8c\x07version\x94K\x06", b"\x8c\x07version\x94K\x05")
    with pytest.raises(NetworkLoadError, match="patched.pkl: EDM persistence version 5, this loader reads version 6"):
        load_network(path)


def test_unknown_class_name(tmp_path):
    path = _patched(tmp_path, b"\x8c\nEDMPrecond", b"\x8c\nXYZPrecond")
    with pytest.raises(
        NetworkLoadError,
        match="patched.pkl: 'ema' is a XYZPrecond, not one of the networks we build \\(EDMPrecond, VPPrecond",
    ):
        load_network(path)


def test_missing_or_wrong_key():
    path = FIXTURES / "edm_ddpmpp_cond.pkl"
    with pytest.raises(
        NetworkLoadError, match="no 'teacher' entry .*available: augment_pipe, dataset_kwargs, ema, loss"
    ):
        load_network(path, key="teacher")
    with pytest.raises(NetworkLoadError, match="'loss_fn' is a EDMLoss, not one of the networks"):
        load_network(path, key="loss_fn")
    with pytest.raises(NetworkLoadError, match="'dataset_kwargs' holds a dict, not a network"):
        load_network(path, key="dataset_kwargs")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"num_blocks": 2}, "56 missing .*, 6 unexpected"), ({"model_channels": 32}, "size mismatch")],
)
def test_weights_that_do_not_fit(monkeypatch, change, message):
    # Build a different architecture than the pickle describes; the weights then cannot load strictly.
    monkeypatch.setattr(persistence, "build_network", lambda name, kwargs: build_network(name, {**kwargs, **change}))
    with pytest.raises(
        NetworkLoadError, match=f"edm_ddpmpp_cond.pkl: the weights do not fit the EDMPrecond .*: {message}"
    ):
        load_network(FIXTURES / "edm_ddpmpp_cond.pkl")


def test_load_over_http_and_fingerprint(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/edm_ddpmpp_cond.pkl"
    try:
        net = load_network(url, cache_dir=tmp_path)
        fingerprint = network_fingerprint(url, cache_dir=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    local = load_network(FIXTURES / "edm_ddpmpp_cond.pkl")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), local.state_dict().values()))
    expected = hashlib.sha256((FIXTURES / "edm_ddpmpp_cond.pkl").read_bytes()).hexdigest()
    assert fingerprint == network_fingerprint(FIXTURES / "edm_ddpmpp_cond.pkl") == expected
    assert len(list((tmp_path / "downloads").iterdir())) == 1


def test_save_refuses_a_bare_unet(tmp_path):
    with pytest.raises(ValueError, match="writes one of EDMPrecond, .* not SongUNet"):
        save_network_pickle(_tiny("EDMPrecond").model, tmp_path / "unet.pkl")
    assert not (tmp_path / "unet.pkl").exists()


# Hostile pickles: small files, using only the allowed globals, that must fail fast with one clear error.


# A persistent object as EDM pickles it; _HostilePickler writes it as reconstruct(meta), whatever its fields hold.
@dataclass
class Persistent:
    class_name: object
    state: object


def _module(params=None, buffers=None, modules=None, **attrs):
    """The parts of a torch Module's __getstate__() the loader reads."""
    return dict(_parameters=params or {}, _buffers=buffers or {}, _modules=modules or {}, **attrs)


def _network(class_name, init_kwargs, **module):
    """A preconditioner as EDM pickles it: a module with its constructor kwargs."""
    return Persistent(class_name, _module(**module, _init_args=(), _init_kwargs=init_kwargs))


def _stub_tree(module, tensor):
    """`module` (built on any device) as Persistent objects whose every tensor is `tensor(shape)`."""
    return Persistent(
        type(module).__name__,
        _module(
            params={k: tensor(v.shape) for k, v in module._parameters.items() if v is not None},
            buffers={k: tensor(v.shape) for k, v in module._buffers.items() if v is not None},
            modules={k: _stub_tree(c, tensor) for k, c in module._modules.items() if c is not None},
        ),
    )


# Writes Persistent objects the way EDM's persistence does and torch ModuleDicts with only their modules. Protocol 3
# has bytes but no frames, so raw opcodes can be spliced into its output.
class _HostilePickler(pickle.Pickler):
    def __init__(self, file, reconstruct):
        super().__init__(file, protocol=3)
        self.reconstruct = reconstruct

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            meta = dict(type="class", version=6, module_src="", class_name=obj.class_name, state=obj.state)
            return self.reconstruct, (meta,)
        if isinstance(obj, torch.nn.ModuleDict):
            return copyreg.__newobj__, (torch.nn.ModuleDict,), _module(modules=obj._modules)
        return NotImplemented


def _dumps(obj, splice=None):
    """Pickle `obj`; `splice` = (marker string, raw opcodes) puts the opcodes where the marker was."""
    f = io.BytesIO()
    with writer._reconstruct_global() as reconstruct:
        _HostilePickler(f, reconstruct).dump(obj)
    data = f.getvalue()
    if splice:
        marker, raw = splice
        token = b"X" + struct.pack("<I", len(marker)) + marker.encode()  # BINUNICODE
        assert data.count(token) == 1
        data = data.replace(token, raw)
    return data


def _legacy_blob(numel, payload, header_numel=None):
    """A nested storage blob laid out as torch.save(storage, _use_new_zipfile_serialization=False) writes it: five
    pickles, the element count, the data. It declares `numel` float32 elements and holds `payload`."""
    f = io.BytesIO()
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
    main = pickle.Pickler(f, protocol=2)
    main.persistent_id = lambda obj: ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is ... else None
    main.dump(...)
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel if header_numel is None else header_numel) + payload)
    return f.getvalue()


def _bombs():
    """{name: (pickle bytes, a phrase the NetworkLoadError must contain)}. Each is small, uses only the allowed
    globals, and once made the loader allocate gigabytes, spin for minutes, crash, or end in a raw traceback."""
    tiny = dict(TINY_SONG, img_resolution=8, img_channels=3)
    load_blob, rebuild = torch.storage._load_from_bytes, torch._utils._rebuild_tensor_v2
    one = torch.zeros(1)

    # One child under two names per level: 2**30 paths through 30 modules.
    twice = Persistent("Linear", _module(params={"weight": torch.ones(1)}))
    for _ in range(30):
        twice = Persistent("UNetBlock", _module(modules={"a": twice, "b": twice}))
    # The same with two distinct objects per level that share one state dict.
    pair = [Persistent("Linear", _module(params={"weight": torch.ones(1)}))] * 2
    for _ in range(30):
        state = _module(modules={"a": pair[0], "b": pair[1]})
        pair = [Persistent("UNetBlock", state), Persistent("UNetBlock", state)]
    loop = torch.nn.ModuleDict()
    loop["self"] = loop
    around = torch.nn.ModuleDict()
    around._modules["down"] = Persistent("UNetBlock", _module(modules={"up": around}))
    chain = None
    for _ in range(60):
        chain = Persistent("UNetBlock", _module(modules={"inner": chain}))
    with torch.device("meta"):
        wide = build_network("EDMPrecond", dict(tiny, model_channels=4096))  # ~10**10 parameters
    expanded = _stub_tree(wide, lambda shape: one.expand(shape))  # every tensor a stride-0 view of one float
    expanded.state.update(_init_args=(), _init_kwargs=dict(tiny, model_channels=4096))
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what a network pickle holds
        warnings.simplefilter("ignore", UserWarning)
        small = torch.FloatStorage(1)
    pairs = [(f"k{i}", None) for i in range(10_000)]
    blob = _legacy_blob(2**16, bytes(2**18))
    edm2 = dict(TINY_EDM2, img_resolution=8)

    def vae(**state):
        return EasyDict(encoder=Persistent("StabilityVAEEncoder", state))

    bombs = {
        "repeated_child": ({"ema": _network("EDMPrecond", tiny, modules={"model": twice})}, "repeats a module"),
        "shared_state": ({"ema": _network("EDMPrecond", tiny, modules={"a": pair[0], "b": pair[1]})}, "repeats a"),
        "cycle": ({"ema": _network("EDMPrecond", tiny, modules={"model": loop})}, "cycle"),
        "cycle_through_a_stub": ({"ema": _network("EDMPrecond", tiny, modules={"model": around})}, "cycle"),
        "deep_modules": ({"ema": _network("EDMPrecond", tiny, modules={"model": chain})}, "more than 32 deep"),
        "iddpm_steps": ({"ema": _network("iDDPMPrecond", dict(tiny, model_type="DhariwalUNet", M=10**8))}, "'M'"),
        "iddpm_steps_text": ({"ema": _network("iDDPMPrecond", dict(tiny, M="1000"))}, "'M' must be an integer"),
        "wide_declared": ({"ema": _network("EDMPrecond", dict(tiny, model_channels=1024))}, "missing"),
        "wide_expanded": ({"ema": expanded}, "their storages hold"),
        "wider_than_sane": ({"ema": _network("EDMPrecond", dict(tiny, model_channels=10**6))}, "'model_channels'"),
        "zero_img_channels": ({"ema": _network("EDMPrecond", dict(tiny, img_channels=0))}, "'img_channels'"),
        "zero_model_channels": ({"ema": _network("EDMPrecond", dict(tiny, model_channels=0))}, "'model_channels'"),
        "zero_channel_mult": ({"ema": _network("EDMPrecond", dict(tiny, channel_mult=[1, 0]))}, "'channel_mult'"),
        "odd_resolution": ({"ema": _network("EDMPrecond", dict(tiny, img_resolution=7))}, "power of two"),
        "class_name_list": ({"ema": Persistent(["EDMPrecond"], _module())}, "class_name is a list, not a string"),
        "class_name_int": ({"ema": Persistent(7, _module())}, "class_name is a int, not a string"),
        "state_not_a_dict": ({"ema": Persistent("EDMPrecond", [1, 2])}, "is a list, not a dict"),
        "kwargs_not_a_dict": ({"ema": Persistent("EDMPrecond", _module(_init_kwargs=[1]))}, "_init_kwargs"),
        "child_not_a_module": ({"ema": _network("EDMPrecond", tiny, modules={"model": 5})}, "is a int, not a module"),
        "modules_not_a_dict": ({"ema": _network("EDMPrecond", tiny, modules=[1])}, "not a module in EDM"),
        "param_not_a_tensor": ({"ema": _network("EDMPrecond", tiny, params={"w": "x"})}, "not a tensor"),
        "view_past_its_storage": (
            {"ema": Call(rebuild, small, 0, (10**9,), (1,), False, collections.OrderedDict())},
            "reaches past its storage",
        ),
        "tensor_state_regrown": (  # Tensor.__setstate__ calls set_, which grows the storage to the new size
            {"ema": Call(rebuild, small, 0, (1,), (1,), False, None, state=(small, 0, (10**9,), (1,)))},
            "sets the state of",
        ),
        "blob_declares_more": ({"ema": Call(load_blob, _legacy_blob(2**31, bytes(4)))}, "declares 2147483648"),
        "blob_header_lies": ({"ema": Call(load_blob, _legacy_blob(2**31, bytes(4), header_numel=1))}, "declares"),
        "blob_decoded_again": ({"ema": [Call(load_blob, blob) for _ in range(10_000)]}, "more tensor data than"),
        "void_scalar": ({"ema": Call(persistence._numpy_scalar(), np.dtype("V2000000000"))}, "numpy scalar"),
        "ordered_dict_copies": ({"ema": [Call(collections.OrderedDict, pairs) for _ in range(2_000)]}, "OrderedDict"),
        # EDM2: an EasyDict at the top, numpy arrays in the encoder, EDM2's Precond.
        "edm2_array_declared_huge": (
            vae(scale=pickled_array((10**10,), "f4", bytes(16))),
            "declares 10000000000 elements",
        ),
        "edm2_array_of_objects": (vae(scale=pickled_array((2,), "O", [1, 2])), "not a plain numeric array"),
        "edm2_array_of_voids": (vae(scale=pickled_array((1,), "V2000000000", b"")), "not a plain numeric array"),
        "edm2_array_made_oddly": (
            vae(scale=pickled_array((1,), "f4", bytes(4), (np.ndarray, (10**9,), b"b"))),
            "never make",
        ),
        "edm2_easydict_copies": ([Call(EasyDict, pairs) for _ in range(2_000)], "not a readable network pickle"),
        "edm2_wider_than_sane": (
            EasyDict(ema=_network("Precond", dict(edm2, model_channels=10**6))),
            "'model_channels'",
        ),
        "edm2_logvar_wide": (EasyDict(ema=_network("Precond", dict(edm2, logvar_channels=10**9))), "'logvar_channels'"),
        "edm2_no_heads": (EasyDict(ema=_network("Precond", dict(edm2, channels_per_head=0))), "'channels_per_head'"),
        "edm2_wide_declared": (EasyDict(ema=_network("Precond", dict(edm2, model_channels=1024))), "missing"),
        "edm2_bad_balance": (EasyDict(ema=_network("Precond", dict(edm2, label_balance="x"))), "'label_balance'"),
    }
    with _dnnlib():
        data = {name: (_dumps(obj), phrase) for name, (obj, phrase) in bombs.items()}
    # Raw streams: a tuple nested 10**6 deep as a dict key (hashing it overflowed the C stack), lists nested 10**5
    # deep in the kwargs (raw RecursionError), a bytes opcode declaring 4 GiB, and 600,000 opcodes (OrderedDict()s).
    deep_list = ("@@DEEP@@", b"(" * 10**5 + b"l" * 10**5)
    data["deep_kwargs"] = (_dumps({"ema": _network("EDMPrecond", dict(tiny, x="@@DEEP@@"))}, deep_list), "deeper")
    data["bytes_declared_huge"] = (b"\x80\x03}X\x03\x00\x00\x00emaB\x00\x00\x00\x01s.", "not a readable")
    data["call_flood"] = (b"\x80\x03ccollections\nOrderedDict\nq\x00(" + b"h\x00)R" * 200_000 + b"l.", "opcodes")
    data["deep_tuple_key"] = (b"\x80\x03}" + b")" + b"\x85" * 10**6 + b"K\x01s.", "deeper than")
    return data


# Loads each file named on the command line in a fork of its own (torch warmed up once), under an address-space limit
# of what the imports take plus {limit_mib} MiB (lifted to report) and a 10 s alarm that kills the fork, printing one
# JSON line per file: [path, the NetworkLoadError's text or 'loaded' or 'raw ' and what else ended it, seconds].
_LOAD_UNDER_A_LIMIT = """
import json, os, resource, signal, sys, time
from dmd.edm.persistence import NetworkLoadError, load_network
load_network(sys.argv[1])  # once here, so that every fork starts with torch warmed up
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
for path in sys.argv[1:]:
    if os.fork():
        code = os.waitstatus_to_exitcode(os.wait()[1])
        if code:
            ended = "still running after 10 s" if code == -signal.SIGALRM else f"exit code {{code}}"
            print(json.dumps([path, "raw " + ended, 0.0]), flush=True)
        continue
    resource.setrlimit(resource.RLIMIT_AS, (size + ({limit_mib} << 20), resource.RLIM_INFINITY))
    signal.alarm(10)
    start = time.monotonic()
    try:
        load_network(path)
        outcome = "loaded"
    except NetworkLoadError as e:
        outcome = str(e)
    except BaseException as e:
        outcome = "raw " + type(e).__name__ + ": " + str(e)[:200]
    seconds = time.monotonic() - start
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps([path, outcome, seconds]), flush=True)
    os._exit(0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets RLIMIT_AS")
def test_small_hostile_pickles_fail_fast_within_a_memory_limit(tmp_path):
    # The blob bombs patch _legacy_blob's layout; torch's own loader reads the honest version of it.
    storage = torch.load(io.BytesIO(_legacy_blob(3, struct.pack("<3f", 1, 2, 3))), weights_only=True)
    assert torch.equal(torch.empty(0).set_(storage._untyped_storage), torch.tensor([1.0, 2.0, 3.0]))

    paths, phrases = [str(FIXTURES / "edm_ddpmpp_cond.pkl")], {}
    for name, (data, phrase) in _bombs().items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        paths.append(str(path))
        phrases[str(path)] = phrase
    large = {
        "wide_expanded",
        "blob_decoded_again",
        "ordered_dict_copies",
        "edm2_easydict_copies",
        "deep_tuple_key",
        "deep_kwargs",
        "call_flood",
    }
    assert all(Path(path).stat().st_size < 5000 for path in phrases if Path(path).stem not in large)

    # 512 MiB over what the imports take: the EDM fixture loads within it, several bombs once took gigabytes.
    script = _LOAD_UNDER_A_LIMIT.format(limit_mib=512)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300, cwd=FIXTURES.parents[1]
        )
        stdout, stderr = proc.stdout, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr = e.stdout.decode() if e.stdout else "", "timed out after 300 s"
    results = {path: (outcome, seconds) for path, outcome, seconds in map(json.loads, stdout.splitlines())}
    assert paths[0] in results and results[paths[0]][0] == "loaded", stderr

    failures = []
    for path, phrase in phrases.items():
        outcome, seconds = results.get(path, (f"no result ({stderr})", 0.0))
        if not (outcome.startswith(f"{path}: ") and phrase in outcome and len(outcome) < 500 and seconds < 5):
            failures.append(f"{Path(path).stem}: {outcome[:300]!r} after {seconds:.1f} s (wanted {phrase!r})")
    assert not failures, "\n".join(failures)


def test_integer_weights_are_refused(tmp_path):
    # Loaded with assign=True, each tensor keeps the file's dtype; an integer one would make an integer weight.
    with torch.device("meta"):
        net = build_network("Precond", TINY_EDM2)
    stubs = _stub_tree(net, lambda shape: torch.zeros(shape, dtype=torch.int8))
    stubs.state.update(_init_args=(), _init_kwargs=TINY_EDM2)
    path = tmp_path / "integers.pkl"
    with _dnnlib():
        path.write_bytes(_dumps(EasyDict(ema=stubs)))
    with pytest.raises(NetworkLoadError, match=r"the Precond .*: 63 tensors \(unet.out_gain, .*\) are not floating"):
        load_network(path)


def test_shape_mismatch_is_summarised(tmp_path):
    # The network's _init_kwargs patched to model_channels=32 (the key is a memo reference there; the U-Net's own
    # persistent copy keeps 16): nearly every tensor has the wrong shape.
    path = _patched(tmp_path, b"j\xf3\r\x00\x00K\x10", b"j\xf3\r\x00\x00K\x20")
    with pytest.raises(NetworkLoadError) as error:
        load_network(path)
    message = str(error.value)
    assert re.match(rf"{re.escape(str(path))}: .* size mismatch in \d+ of 149 tensors, e\.g\. '", message), message
    assert len(message) < 500


@pytest.mark.parametrize("kind", ["dmd-snapshot", "dmd-training-state"])
def test_dmd_files_point_to_dmd_generator(tmp_path, kind):
    from dmd.checkpoint import save_snapshot

    path = tmp_path / "network.pt"
    if kind == "dmd-snapshot":
        save_snapshot(path, _tiny("EDMPrecond"), generator_sigmas=(80.0,), step=0, config={})
    else:
        torch.save({"format": kind, "version": 1, "G": _tiny("EDMPrecond").state_dict()}, path)
    with pytest.raises(
        NetworkLoadError, match=f"^{re.escape(str(path))}: a {kind} written by dmd train, .*DMDGenerator"
    ):
        load_network(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(NetworkLoadError, match=f"^{re.escape(str(other))}: a torch.save file, not an EDM network"):
        load_network(other)


def test_an_edm2_network_is_not_written_as_an_edm_pickle(tmp_path):
    """It was written as a file no loader reads ("sets the state of a dmd.edm2.layers.MPFourier")."""
    net = load_network(EDM2 / "edm2_img_cond.pkl")
    with pytest.raises(ValueError, match="save_network_pickle writes one of EDMPrecond, .*, not Precond"):
        save_network_pickle(net, tmp_path / "edm2.pkl")
    assert not (tmp_path / "edm2.pkl").exists()
