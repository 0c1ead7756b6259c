"""Atomic writes: file modes follow the umask, and a full disk names the file and leaves the old one untouched."""

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch

import dmd.utils.io as io
from dmd.utils.io import DiskFullError, atomic_path, atomic_save_image, atomic_torch_save, atomic_write_text

WRITERS = {
    "atomic_path": lambda path: _write_bytes(path, b"abc"),
    "atomic_torch_save": lambda path: atomic_torch_save({"w": torch.arange(4)}, path),
    "atomic_save_image": lambda path: atomic_save_image(PIL.Image.new("RGB", (4, 4)), path),
    "atomic_write_text": lambda path: atomic_write_text("abc\n", path),
}


def _write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_modes_follow_the_umask(tmp_path, umask, writer):
    path = tmp_path / "out"
    WRITERS[writer](path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o600)
    WRITERS[writer](path)  # a replaced file gets the mode of a new one
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out"]


def _disk_fills_after(budget):
    """An `open` for io.py whose binary writes fail with ENOSPC once `budget` bytes are written, as a full disk's do."""

    class FillingFile:
        def __init__(self, file):
            self.file = file
            self.written = 0

        def write(self, data):
            if self.written + len(data) > budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    return lambda path, mode="r": FillingFile(open(path, mode)) if "w" in mode else open(path, mode)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "training-state-000100.pt"
    atomic_torch_save({"w": torch.arange(10)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(10))  # saved through the file object
    before = path.read_bytes()
    monkeypatch.setattr(io, "open", _disk_fills_after(2000), raising=False)
    # torch.save turns the failed write into a RuntimeError without errno; atomic_torch_save recovers the ENOSPC.
    with pytest.raises(DiskFullError) as info:
        atomic_torch_save({"w": torch.zeros(10000)}, path)
    assert str(info.value) == f"{path}: no space left on device while writing; the previous file, if any, is untouched"
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert isinstance(info.value, OSError)  # caught by every `except OSError` that caught the raw error
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temp file left


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota")])
def test_full_disk_or_quota_in_any_writer_or_fsync(tmp_path, monkeypatch, code, reason):
    path = tmp_path / "stats.jsonl"
    atomic_write_text("old\n", path)
    with pytest.raises(DiskFullError, match=f"^{re.escape(str(path))}: {reason}"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise OSError(code, os.strerror(code))

    def full_fsync(fd):
        raise OSError(code, os.strerror(code))  # delayed allocation (NFS, ext4) reports a full disk only here

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_fsync)
        with pytest.raises(DiskFullError, match=f"^{re.escape(str(path))}: {reason}"):
            atomic_write_text("new\n", path)
    # An enclosing atomic_path names its own file, not the temp file the inner one was writing.
    outer = tmp_path / "pairs.h5"
    with pytest.raises(DiskFullError, match=f"^{re.escape(str(outer))}: {reason}"):
        with atomic_path(outer) as tmp, atomic_path(tmp) as inner:
            raise OSError(code, os.strerror(code), str(inner))
    with pytest.raises(PermissionError):  # other errors pass through unchanged
        with atomic_path(path):
            raise PermissionError(errno.EACCES, "denied")
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["stats.jsonl"]


_TINY_FS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    from dmd.utils.io import DiskFullError, atomic_torch_save
    path = os.path.join(sys.argv[1], "state.pt")
    atomic_torch_save({"w": torch.arange(100)}, path)
    before = open(path, "rb").read()
    try:
        atomic_torch_save({"w": torch.zeros(1 << 16)}, path)  # 256 kB into a 64 kB filesystem
        message = None
    except DiskFullError as e:
        message = str(e)
    intact = open(path, "rb").read() == before
    print(json.dumps({"message": message, "intact": intact, "files": os.listdir(sys.argv[1])}))
    """
)


def test_disk_full_on_a_real_tiny_filesystem(tmp_path):
    # A 64 kB tmpfs in a private mount namespace: no root needed where user namespaces are allowed, nothing to unmount.
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    private = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount_tmpfs = 'mount -t tmpfs -o size=64k tmpfs "$1"'
    if subprocess.run([*private, mount_tmpfs, "sh", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs in a user namespace is not permitted here")
    result = subprocess.run(
        [*private, f'{mount_tmpfs} && exec "$2" -c "$3" "$1"', "sh", str(mount), sys.executable, _TINY_FS_SCRIPT],
        capture_output=True,
        text=True,
        cwd=Path(io.__file__).parents[2],  # the repository root, so the script imports this dmd
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = f"{mount}/state.pt: no space left on device while writing; the previous file, if any, is untouched"
    assert report == {"message": expected, "intact": True, "files": ["state.pt"]}


def test_a_name_at_the_filesystem_limit_is_written_and_one_past_it_is_refused_first(tmp_path):
    longest = tmp_path / ("g" * 251 + ".png")  # 255 bytes: the temporary file beside it must fit too
    atomic_save_image(PIL.Image.new("RGB", (4, 4)), longest)
    assert longest.is_file() and [p.name for p in tmp_path.iterdir()] == [longest.name]
    io.check_name_length(longest)
    with pytest.raises(ValueError, match="is 256 bytes; its filesystem takes 255"):
        io.check_name_length(tmp_path / "new" / ("g" * 252 + ".png"))


def test_long_output_names_are_refused_before_any_work(tmp_path):
    from click.testing import CliRunner

    from dmd.cli import main

    grid = tmp_path / ("g" * 300 + ".png")
    args = ["generate", "--network", "missing.pkl", "--output-dir", str(tmp_path / "out"), "--grid", str(grid)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is 304 bytes; its filesystem takes 255" in result.output
    assert not (tmp_path / "out").exists()
