import functools
import hashlib
import http.server
import io
import os
import pickle
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd.edm import persistence
from dmd.edm.persistence import (
    MODULE_SRC,
    NetworkLoadError,
    PersistentStub,
    UnsafePickleError,
    load_network,
    network_fingerprint,
    read_network_pickle,
    save_network_pickle,
    stub_state_dict,
)
from dmd.edm.precond import build_network

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = {"edm_ddpmpp_cond": "EDMPrecond", "vp_ddpmpp_cond": "VPPrecond"}
TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
TINY_NETS = {
    "EDMPrecond": dict(TINY_SONG, label_dim=10, augment_dim=9),
    "VPPrecond": dict(TINY_SONG),
    "VEPrecond": dict(TINY_SONG, embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1]),
    "iDDPMPrecond": dict(TINY_SONG, model_type="DhariwalUNet", label_dim=10),
}


# Pickles as a call of `func(*args)`, the way a malicious pickle smuggles code in.
class Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _tiny(class_name):
    torch.manual_seed(1)
    net = build_network(class_name, dict(TINY_NETS[class_name], img_resolution=8, img_channels=3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # EDM's zero inits would hide a weight that did not round-trip
    return net


def _patched(tmp_path, old, new):
    """A copy of the EDM fixture with the first occurrence of `old` replaced by the same-length `new`."""
    data = (FIXTURES / "edm_ddpmpp_cond.pkl").read_bytes()
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
