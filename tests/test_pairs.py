"""make_pairs: pairs equal EDM's sampler for the same seeds, survive SIGKILL, refuse foreign files, and torchrun."""

import errno
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dmd import data
from dmd.cli import main
from dmd.data import PairDataset, PairFileError, create_pair_file, write_port_layout
from dmd.edm.persistence import load_network, network_fingerprint
from dmd.edm.sampler import StackedRandomGenerator, edm_sampler
from dmd.pairs import make_pairs
from dmd.utils.common import one_hot

FIXTURES = Path(__file__).parent / "fixtures"
TEACHER = FIXTURES / "edm_ddpmpp_cond.pkl"
OTHER_TEACHER = FIXTURES / "vp_ddpmpp_cond.pkl"
REPO = Path(__file__).parents[1]


def _make(out, num, **kwargs):
    return make_pairs(TEACHER, out, num, device="cpu", progress=False, **kwargs)


def _contents(path):
    """Every dataset of a pair file and its attributes (teacher_source aside), for equality checks."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][:] for k in ("latents", "images", "labels", "seeds")}
        attrs = {k: v for k, v in f.attrs.items() if k != "teacher_source"}
    return data, attrs


def _assert_same_file(a, b):
    data_a, attrs_a = _contents(a)
    data_b, attrs_b = _contents(b)
    assert attrs_a.keys() == attrs_b.keys() and all(np.array_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key], err_msg=key)


def _subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_pairs_equal_edm_reference(tmp_path):
    """Seeds 0-3 reproduce EDM's own sampler run stored with the fixture (18 deterministic Heun steps)."""
    ref = np.load(FIXTURES / "edm_ddpmpp_cond.npz")
    out = _make(tmp_path / "pairs.h5", 4, seeds=ref["sampler_seeds"].tolist(), batch_size=2)
    latents, images, labels, seeds = PairDataset(out).read_rows(0, 4)
    assert seeds.tolist() == ref["sampler_seeds"].tolist()
    # Bit-exact on CPUs with AVX2 and up; torch's scalar normal sampler (ATEN_CPU_CAPABILITY=default) rounds
    # differently, by up to 1.1e-6 measured (tests/test_sampler.py says more).
    torch.testing.assert_close(latents, torch.from_numpy(ref["sampler_latents"]).float(), rtol=0, atol=2e-6)
    assert labels.tolist() == ref["sampler_class_idx"].tolist()
    scale = np.abs(ref["sampler_out"]).max()
    np.testing.assert_allclose(images.numpy(), ref["sampler_out"], rtol=0, atol=1e-4 * scale)
    _, attrs = _contents(out)
    assert attrs["teacher_sha256"] == network_fingerprint(TEACHER)
    assert (attrs["num_steps"], attrs["sigma_max"], attrs["rho"], attrs["S_churn"]) == (18, 80.0, 7.0, 0.0)
    assert (attrs["num_complete"], attrs["resolution"], attrs["channels"], attrs["label_dim"]) == (4, 8, 3, 10)


@pytest.mark.parametrize("class_balanced", [False, True])
def test_pairs_equal_edm_sampler(tmp_path, class_balanced):
    seeds = list(range(20, 26))
    out = _make(tmp_path / "pairs.h5", 6, seeds=seeds, batch_size=6, num_steps=3, class_balanced=class_balanced)
    latents, images, labels, _ = PairDataset(out).read_rows(0, 6)

    net = load_network(TEACHER, device="cpu").eval()
    rnd = StackedRandomGenerator("cpu", seeds)
    want_latents = rnd.randn([6, 3, 8, 8], device="cpu")
    want_labels = rnd.randint(10, size=[6], device="cpu")
    if class_balanced:
        want_labels = torch.arange(6) % 10
    with torch.no_grad():
        want_images = edm_sampler(net, want_latents, one_hot(want_labels, 10), rnd.randn_like, num_steps=3)
    torch.testing.assert_close(latents, want_latents, rtol=0, atol=0)
    assert labels.tolist() == want_labels.tolist()
    torch.testing.assert_close(images, want_images.float(), rtol=0, atol=0)


def test_sigkill_mid_run_resumes_to_uninterrupted_file(tmp_path):
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    args = ["make-pairs", "--network", str(TEACHER), "--out", str(killed), "--num", "16", "--batch", "4"]
    args += ["--steps", "4", "--seeds", "100-199", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "dmd", *args], env=_subprocess_env(), stderr=subprocess.PIPE)
    num_complete, deadline = 0, time.monotonic() + 120
    while num_complete < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        if killed.exists():
            try:
                with h5py.File(killed, "r", locking=False) as f:  # The writer holds HDF5's file lock.
                    num_complete = int(f.attrs["num_complete"])
            except OSError:
                continue
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert 4 <= PairDataset(killed).num_pairs < 16

    resumed = subprocess.run([sys.executable, "-m", "dmd", *args], env=_subprocess_env(), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    _make(whole, 16, seeds="100-199", batch_size=4, num_steps=4)
    _assert_same_file(killed, whole)


def test_resume_refuses_another_teacher_setting_or_seed_list(tmp_path):
    out = _make(tmp_path / "pairs.h5", 4, num_steps=3)
    before = _contents(out)
    for kwargs, message in [
        (dict(network=OTHER_TEACHER), "was made with teacher_sha256="),
        (dict(num_steps=4), "was made with num_steps=3 but this run has num_steps=4"),
        (dict(S_churn=1.0), "was made with S_churn=0.0 but this run has S_churn=1.0"),
        (dict(class_balanced=True), "was made with class_balanced=False"),
        (dict(seeds="1-4"), "was made for a different seed list"),
        (dict(seeds="0-2,9,10"), "was made for a different seed list"),
        (dict(num=3), r"was made for a different seed list \(--num/--seeds\): its 4 seeds are not the first of this"),
    ]:
        args = dict(network=TEACHER, out=out, num=4, num_steps=3, device="cpu", progress=False)
        with pytest.raises(PairFileError, match=f"pair file .*pairs.h5 {message}"):
            make_pairs(**{**args, **kwargs})
    _make(out, 4, num_steps=3)  # Same settings on a complete file: nothing to do, nothing changes.
    after = _contents(out)
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0]) and before[1].keys() == after[1].keys()


def test_extending_the_seed_list_grows_the_file(tmp_path, capsys):
    # Batches of 2 throughout: a row's floats depend on the batch it was sampled in (tests/test_sampler.py).
    grown, whole = _make(tmp_path / "grown.h5", 4, num_steps=3, batch_size=2), tmp_path / "whole.h5"
    _make(grown, 6, num_steps=3, batch_size=2)  # a larger --num: seeds 0-3 are the first of 0-5
    assert "grown.h5: grown from 4 to 6 planned pairs, its 4 complete pairs kept" in capsys.readouterr().out
    _assert_same_file(grown, _make(whole, 6, num_steps=3, batch_size=2))
    _make(grown, 8, seeds="0-5,20,30", num_steps=3, batch_size=2)  # an extended --seeds
    _make(whole, 8, seeds="0-5,20,30", num_steps=3, batch_size=2)
    _assert_same_file(grown, whole)
    assert [p.name for p in tmp_path.iterdir()] == ["grown.h5", "whole.h5"]  # no temporary file left


# make-pairs growing a 4-pair file to 8 (batches of 4), killed with SIGKILL at argv[1]: when the grown copy is
# complete, just before it replaces the old file, or just after.
_KILLED_GROW = """
import os, signal, sys
from dmd import data
from dmd.pairs import make_pairs

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

real_replace = os.replace
os.replace = die if sys.argv[1] == "before replace" else lambda *args: die(real_replace(*args))
make_pairs(sys.argv[2], sys.argv[3], 8, num_steps=3, batch_size=4, device="cpu", progress=False)
"""


def test_sigkill_while_growing_keeps_every_complete_row(tmp_path):
    whole = _make(tmp_path / "whole.h5", 8, num_steps=3, batch_size=4)
    for point in ("before replace", "after replace"):
        out = _make(tmp_path / point / "pairs.h5", 4, num_steps=3, batch_size=4)
        before = out.read_bytes()
        killed = subprocess.run(
            [sys.executable, "-c", _KILLED_GROW, point, str(TEACHER), str(out)],
            env=_subprocess_env(),
            capture_output=True,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        if point == "after replace":  # the grown file: the same 4 complete rows, 8 planned
            grown = PairDataset(out)
            assert (grown.num_pairs, len(data.read_seeds(out))) == (4, 8)
            for a, b in zip(grown.read_rows(0, 4), PairDataset(whole).read_rows(0, 4)):
                assert torch.equal(a, b)
            grown.close()
        else:
            assert out.read_bytes() == before  # the old file, untouched
        _make(out, 8, num_steps=3, batch_size=4)  # the same command again finishes the grown file
        _assert_same_file(out, whole)


def test_make_pairs_command_errors(tmp_path):
    runner = CliRunner()
    base = ["make-pairs", "--network", str(TEACHER), "--num", "2", "--steps", "2", "--device", "cpu"]
    port = tmp_path / "port.h5"
    write_port_layout(port, np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 8)), [0], [0])
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\0" * 100)
    for out, message in [(port, "port.h5 was not written by make-pairs"), (corrupt, "cannot open pair file")]:
        result = runner.invoke(main, [*base, "--out", str(out)])
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "x.h5"), "--seeds", "0"])
    assert result.exit_code == 1 and "--seeds gives 1 seeds but --num asks for 2" in result.output
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "x.h5"), "--seeds", "a-b"])
    assert result.exit_code == 1 and "--seeds: cannot parse" in result.output
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "x.h5"), "--seeds", "0,99999999999999999999"])
    assert result.exit_code == 1 and "Error: --seeds: 99999999999999999999 does not fit in 64 bits" in result.output


def _memory_limit(num_bytes):
    """preexec_fn: cap the address space of a child, so that building a huge list fails fast instead of swapping."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (num_bytes, num_bytes))

    return limit


def test_huge_seed_range_is_never_expanded(tmp_path):
    """`--seeds 0-4000000000 --num 3` uses 3 seeds; today it builds all 4e9 (MemoryError under an 8 GB cap)."""
    out = tmp_path / "pairs.h5"
    args = ["make-pairs", "--network", str(TEACHER), "--out", str(out), "--num", "3", "--steps", "2", "--device", "cpu"]
    args += ["--seeds", "5-4000000000"]
    result = subprocess.run(
        [sys.executable, "-m", "dmd", *args],
        env=_subprocess_env(),
        capture_output=True,
        preexec_fn=_memory_limit(8 << 30),
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert PairDataset(out).read_rows(0, 3)[3].tolist() == [5, 6, 7]


def _fail_write(monkeypatch, call, rows_written):
    """Make the `call`-th row write (1: the seeds at creation) put `rows_written` rows on disk and then hit a full
    disk, as os.pwrite does on a real one."""
    real, calls = data._RowLayout.write, []

    def write(self, fd, first, rows):
        calls.append(first)
        if len(calls) == call:
            real(self, fd, first, rows[:rows_written])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, fd, first, rows)

    monkeypatch.setattr(data._RowLayout, "write", write)


def test_disk_full_mid_run_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    out, whole = tmp_path / "full.h5", tmp_path / "whole.h5"
    args = ["make-pairs", "--network", str(TEACHER), "--out", str(out), "--num", "16", "--batch", "4"]
    args += ["--steps", "2", "--seeds", "100-199", "--device", "cpu"]
    _fail_write(monkeypatch, 9, 2)  # Writes: seeds, then latents/images/labels per batch; 9 = images of batch 3.
    result = CliRunner().invoke(main, args)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.count("Error") == 1
    assert re.fullmatch(
        "Error: pair file .*full.h5: no space left on device after 8 complete pairs; "
        "free space and rerun the same command to resume",
        last,
    )
    assert PairDataset(out).num_pairs == 8
    monkeypatch.undo()
    assert CliRunner().invoke(main, args).exit_code == 0
    _make(whole, 16, seeds="100-199", batch_size=4, num_steps=2)
    _assert_same_file(out, whole)


def test_disk_full_at_creation_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "pairs" / "new.h5"
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: SimpleNamespace(free=100_000))
    with pytest.raises(PairFileError, match=r"new.h5: 100 pairs need 221 kB but its disk has 100 kB free; free space"):
        _make(out, 100, num_steps=2)
    monkeypatch.undo()
    _fail_write(monkeypatch, 1, 0)  # The disk fills between the check and the seeds' write.
    with pytest.raises(PairFileError, match="new.h5: no space left on device while writing it, so it was not created"):
        _make(out, 100, num_steps=2)
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped where mounting is not permitted, as in CI without root)."""
    path = tmp_path / "tiny"
    path.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


# Runs make-pairs as a user would, except that another process fills the disk as soon as sampling starts.
_FILL_THEN_MAKE = """
import shutil, sys
from pathlib import Path
import dmd.pairs
from dmd.cli import main

real, filler = dmd.pairs.sample_pairs, Path(sys.argv[1])

def sample_pairs(*args, **kwargs):
    if not filler.exists():
        free = shutil.disk_usage(filler.parent).free
        filler.write_bytes(bytes(max(free - 100_000, 0)))
    return real(*args, **kwargs)

dmd.pairs.sample_pairs = sample_pairs
main(sys.argv[2:])
"""


def test_disk_full_on_a_real_tiny_disk(tmp_path, tiny_disk):
    """On a real full disk make-pairs ends with one line, today it segfaults (exit 139): at creation, and mid-run with
    the complete rows kept so that the same command resumes to the uninterrupted file."""
    out, filler, whole = tiny_disk / "pairs.h5", tiny_disk / "filler", tmp_path / "whole.h5"
    base = [sys.executable, "-m", "dmd", "make-pairs", "--network", str(TEACHER), "--out", str(out), "--steps", "2"]
    base += ["--batch", "64", "--device", "cpu"]
    run = partial(subprocess.run, env=_subprocess_env(), capture_output=True, text=True)
    result = run([*base, "--num", "3000"])  # 4.7 MB on a 2 MiB disk
    assert result.returncode == 1 and list(tiny_disk.iterdir()) == []
    assert re.search(
        r"Error: pair file .*pairs.h5: 3000 pairs need 4.\d+ MB but its disk has 2.\d+ MB free", result.stderr
    )

    args = [*base, "--num", "1200"]  # 1.9 MB: fits an empty disk, not one the filler leaves 100 kB of
    result = run([sys.executable, "-c", _FILL_THEN_MAKE, str(filler), *args[3:]])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    done = re.fullmatch(
        r"Error: pair file .*pairs.h5: no space left on device after (\d+) complete pairs; "
        "free space and rerun the same command to resume",
        last,
    )
    assert done and int(done[1]) < 1200 and PairDataset(out).num_pairs == int(done[1])
    filler.unlink()
    result = run(args)
    assert result.returncode == 0, result.stderr[-2000:]
    _make(whole, 1200, batch_size=64, num_steps=2)
    _assert_same_file(out, whole)


def test_check_compatible_with_teacher(tmp_path):
    net = load_network(TEACHER, device="cpu")
    PairDataset(_make(tmp_path / "pairs.h5", 2, num_steps=2)).check_compatible(net)
    wrong = tmp_path / "wrong.h5"
    create_pair_file(wrong, channels=3, resolution=16, label_dim=10, seeds=[0], attrs={})
    with pytest.raises(PairFileError, match="wrong.h5 has resolution 16 but the teacher has 8"):
        PairDataset(wrong).check_compatible(net)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path):
    two, one = tmp_path / "two.h5", tmp_path / "one.h5"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    # "--" ends torchrun's own options: its argparse would take "--num" for an ambiguous "--numa-binding".
    launcher += ["--master_port", str(_free_port()), "-m", "dmd", "--"]
    args = ["make-pairs", "--network", str(TEACHER), "--out", str(two), "--num", "5", "--batch", "2", "--steps", "3"]
    result = subprocess.run([*launcher, *args, "--device", "cpu"], env=_subprocess_env(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    _make(one, 5, batch_size=2, num_steps=3)
    _assert_same_file(two, one)


def test_a_schedule_that_cannot_run_is_refused_before_the_file_is_made(tmp_path):
    with pytest.raises(ValueError, match="--sigma-min 100.0 must be positive and below --sigma-max 80.0"):
        _make(tmp_path / "p.h5", 4, sigma_min=100.0)
    assert not (tmp_path / "p.h5").exists()  # it used to be written, with pairs sampled upwards in noise


def test_edm2_teacher_pairs_are_edm2s_samples_guided_or_not(tmp_path):
    """make-pairs on an EDM2 teacher reproduces EDM2's own sampler seed for seed, and with --guide-network and
    --guidance its guided sampler (fixtures computed by EDM2's generate_images.py: 8 Heun steps, seeds 0-3)."""
    edm2 = FIXTURES / "edm2"
    ref = np.load(edm2 / "edm2_img_cond.npz")
    base = ["make-pairs", "--network", str(edm2 / "edm2_img_cond.pkl"), "--num", "4", "--steps", "8", "--no-progress"]
    guide = ["--guide-network", str(edm2 / "edm2_img_guide.pkl"), "--guidance", "1.7"]
    for name, extra, key in (("plain.h5", [], "sampler_out"), ("guided.h5", guide, "guided_out")):
        result = CliRunner().invoke(main, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        latents, images, labels, _ = PairDataset(tmp_path / name).read_rows(0, 4)
        np.testing.assert_array_equal(labels.numpy(), ref["sampler_class_idx"])
        np.testing.assert_array_equal(latents.numpy(), ref["sampler_latents"])
        error = np.abs(images.numpy() - ref[key]).max() / np.abs(ref[key]).max()
        assert error < 1e-4, (key, error)
    attrs = data.read_pair_attrs(tmp_path / "guided.h5")
    assert attrs["guidance"] == 1.7 and attrs["guide_sha256"] == network_fingerprint(edm2 / "edm2_img_guide.pkl")
    assert "guidance" not in data.read_pair_attrs(tmp_path / "plain.h5")  # unguided files keep their old layout
    # Another guidance, or none, is another teacher: refused, naming the setting.
    for extra, key in ((guide[:3] + ["2.0"], "guidance"), ([], "guide_sha256")):
        result = CliRunner().invoke(main, [*base, *extra, "--num", "6", "--out", str(tmp_path / "guided.h5")])
        assert result.exit_code == 1 and f"was made with {key}=" in result.output, result.output
    latent_guide = ["--guide-network", str(edm2 / "edm2_latent_cond.pkl"), "--guidance", "2"]
    bad = CliRunner().invoke(main, [*base, *latent_guide, "--out", str(tmp_path / "x.h5")])
    assert bad.output == (
        f"Error: --guide-network {edm2 / 'edm2_latent_cond.pkl'}: the guiding network works on 8x8x4 images, the "
        "network on 8x8x3; they must match\n"
    )
    assert not (tmp_path / "x.h5").exists()
