"""The pair file layer: our HDF5 layout, its crash-safe writer, the port's layout, conversion and clear errors."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dmd.cli import main
from dmd.data import (
    FORMAT_VERSION,
    PairDataset,
    PairFileError,
    PairWriter,
    convert_port_file,
    create_pair_file,
    read_pair_attrs,
    write_port_layout,
)

N, C, R, LABEL_DIM = 10, 3, 8, 10


def _pairs(n=N, seed=0):
    """Random stand-in pairs: latents, images (n, C, R, R) float32, labels (n,) int64, seeds (n,) int64."""
    g = np.random.default_rng(seed)
    latents = g.standard_normal((n, C, R, R)).astype(np.float32)
    images = (g.standard_normal((n, C, R, R)) * 0.5).astype(np.float32)
    labels = g.integers(0, LABEL_DIM, n)
    seeds = np.arange(100, 100 + n)
    return latents, images, labels, seeds


def _write_ours(path, latents, images, labels, seeds, batch=4, label_dim=LABEL_DIM):
    create_pair_file(path, channels=C, resolution=R, label_dim=label_dim, seeds=seeds, attrs={"teacher_sha256": "ab"})
    with PairWriter(path) as writer:
        for i in range(0, len(latents), batch):
            writer.append(latents[i : i + batch], images[i : i + batch], labels[i : i + batch])


def _assert_rows(ds, latents, images, labels):
    for i in range(len(latents)):
        latent, image, label = ds[i]
        assert latent.dtype == image.dtype == torch.float32 and label.dtype == torch.int64
        torch.testing.assert_close(latent, torch.from_numpy(latents[i]), rtol=0, atol=0)
        torch.testing.assert_close(image, torch.from_numpy(images[i]), rtol=0, atol=0)
        assert int(label) == int(labels[i])


def test_round_trip_our_layout(tmp_path):
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "pairs.h5"
    _write_ours(path, latents, images, labels, seeds)
    ds = PairDataset(path)
    assert (ds.layout, len(ds), ds.resolution, ds.channels, ds.label_dim) == ("dmd", N, R, C, LABEL_DIM)
    _assert_rows(ds, latents, images, labels)
    attrs = read_pair_attrs(path)
    assert attrs["format_version"] == FORMAT_VERSION and attrs["num_complete"] == attrs["num_requested"] == N
    assert attrs["teacher_sha256"] == "ab"
    with h5py.File(path) as f:
        assert f["latents"].chunks == (N, C, R, R) and f["labels"].dtype == np.int64
        np.testing.assert_array_equal(f["seeds"][:], seeds)
    with pytest.raises(IndexError):
        ds[N]


def test_dataloader_workers_read_all_rows(tmp_path):
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "pairs.h5"
    _write_ours(path, latents, images, labels, seeds)
    loader = torch.utils.data.DataLoader(PairDataset(path), batch_size=3, num_workers=2, shuffle=False)
    got = [torch.cat(column) for column in zip(*loader)]
    torch.testing.assert_close(got[0], torch.from_numpy(latents), rtol=0, atol=0)
    torch.testing.assert_close(got[1], torch.from_numpy(images), rtol=0, atol=0)
    assert got[2].tolist() == labels.tolist()


def test_port_layout_reads_like_ours(tmp_path):
    latents, images, labels, seeds = _pairs()
    _write_ours(tmp_path / "ours.h5", latents, images, labels, seeds)
    write_port_layout(tmp_path / "port.h5", latents, images, labels, seeds)
    ours, port = PairDataset(tmp_path / "ours.h5"), PairDataset(tmp_path / "port.h5")
    assert port.layout == "port" and len(port) == len(ours) == N
    assert (port.resolution, port.channels) == (ours.resolution, ours.channels)
    assert port.label_dim == labels.max() + 1  # Inferred from the largest class_idx.
    assert PairDataset(tmp_path / "port.h5", label_dim=LABEL_DIM).label_dim == LABEL_DIM
    _assert_rows(port, latents, images, labels)
    for a, b in zip(ours.read_rows(0, N), port.read_rows(0, N)):
        assert torch.equal(a, b)
    assert port.read_rows(0, N)[3].tolist() == seeds.tolist()


def test_convert_port_file_equals_ours(tmp_path):
    latents, images, labels, seeds = _pairs()
    write_port_layout(tmp_path / "port.h5", latents, images, labels, seeds)
    assert convert_port_file(tmp_path / "port.h5", tmp_path / "conv.h5", label_dim=LABEL_DIM, batch_size=4) == N
    _write_ours(tmp_path / "ours.h5", latents, images, labels, seeds)
    conv, ours = PairDataset(tmp_path / "conv.h5"), PairDataset(tmp_path / "ours.h5")
    assert (conv.layout, conv.label_dim) == ("dmd", LABEL_DIM)
    for a, b in zip(conv.read_rows(0, N), ours.read_rows(0, N)):
        assert torch.equal(a, b)
    assert read_pair_attrs(tmp_path / "conv.h5")["source_format"] == "port"
    with pytest.raises(PairFileError, match="already has our layout"):
        convert_port_file(tmp_path / "ours.h5", tmp_path / "again.h5")


def test_convert_pairs_command(tmp_path):
    latents, images, labels, seeds = _pairs()
    write_port_layout(tmp_path / "port.h5", latents, images, labels, seeds)
    result = CliRunner().invoke(main, ["convert-pairs", str(tmp_path / "port.h5"), str(tmp_path / "new.h5")])
    assert result.exit_code == 0, result.output
    assert PairDataset(tmp_path / "new.h5").read_rows(0, N)[3].tolist() == seeds.tolist()
    again = CliRunner().invoke(main, ["convert-pairs", str(tmp_path / "port.h5"), str(tmp_path / "new.h5")])
    assert again.exit_code != 0 and "new.h5 exists" in again.output
    missing = CliRunner().invoke(main, ["convert-pairs", str(tmp_path / "nope.h5"), str(tmp_path / "x.h5")])
    assert missing.exit_code != 0 and "nope.h5 does not exist" in missing.output


def test_reader_stops_at_num_complete(tmp_path):
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "partial.h5"
    create_pair_file(path, channels=C, resolution=R, label_dim=LABEL_DIM, seeds=seeds, attrs={})
    with PairWriter(path) as writer:
        writer.append(latents[:4], images[:4], labels[:4])
    ds = PairDataset(path)
    assert len(ds) == 4 and len(ds.read_rows(0, 4)[0]) == 4
    with pytest.raises(IndexError):
        ds[4]
    ds.close()  # HDF5 refuses a second, writable handle in the same process.
    with PairWriter(path) as writer, pytest.raises(PairFileError, match="exceed the planned 10"):
        writer.append(latents, images, labels)


def test_sigkill_while_writing_keeps_complete_rows(tmp_path):
    """A process killed after writing rows but before bumping num_complete leaves the earlier rows readable."""
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "killed.h5"
    np.savez(tmp_path / "pairs.npz", latents=latents, images=images, labels=labels)
    create_pair_file(path, channels=C, resolution=R, label_dim=LABEL_DIM, seeds=seeds, attrs={})
    script = f"""
        import os, signal
        import numpy as np
        from dmd.data import PairWriter
        d = np.load({str(tmp_path / "pairs.npz")!r})
        w = PairWriter({str(path)!r})
        w.append(d["latents"][:4], d["images"][:4], d["labels"][:4])
        w.file["latents"][4:8] = 7.0  # Rows of the next batch, never marked complete.
        w.file["images"][4:8] = 7.0
        os.kill(os.getpid(), signal.SIGKILL)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    ds = PairDataset(path)
    assert len(ds) == 4
    _assert_rows(ds, latents[:4], images[:4], labels[:4])
    ds.close()
    with PairWriter(path) as writer:  # Resuming overwrites the unmarked rows.
        writer.append(latents[4:], images[4:], labels[4:])
    _assert_rows(PairDataset(path), latents, images, labels)


def test_unconditional_labels(tmp_path):
    latents, images, _, seeds = _pairs()
    labels = np.full(N, -1)
    _write_ours(tmp_path / "ours.h5", latents, images, labels, seeds, label_dim=0)
    write_port_layout(tmp_path / "port.h5", latents, images, np.zeros(N, dtype=np.int64), seeds)
    assert {int(PairDataset(tmp_path / "ours.h5")[i][2]) for i in range(N)} == {-1}
    port = PairDataset(tmp_path / "port.h5", label_dim=0)
    assert {int(port[i][2]) for i in range(N)} == {-1}


def test_bad_files_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(PairFileError, match="cannot open pair file .*corrupt.h5 as HDF5"):
        PairDataset(corrupt)
    with pytest.raises(PairFileError, match="missing.h5 does not exist"):
        PairDataset(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(PairFileError, match="other.h5 has neither our layout"):
        PairDataset(tmp_path / "other.h5")
    with pytest.raises(PairFileError, match="other.h5 was not written by make-pairs"):
        PairWriter(tmp_path / "other.h5")
    filtered = tmp_path / "filtered.h5"
    create_pair_file(filtered, channels=C, resolution=R, label_dim=0, seeds=[0], attrs={})
    with h5py.File(filtered, "r+") as f:  # A tool that repacked our file with compression.
        del f["latents"]
        f.create_dataset("latents", data=np.zeros((1, C, R, R), np.float32), compression="gzip")
        f.attrs.modify("num_complete", 1)
    with pytest.raises(PairFileError, match="filtered.h5: /latents is unchunked or filtered"):
        PairDataset(filtered)[0]
    newer = tmp_path / "newer.h5"
    create_pair_file(newer, channels=C, resolution=R, label_dim=0, seeds=[0], attrs={})
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(PairFileError, match="newer.h5 has format version 2"):
        PairDataset(newer)


def test_check_compatible(tmp_path):
    latents, images, labels, seeds = _pairs()
    _write_ours(tmp_path / "ours.h5", latents, images, labels, seeds)
    write_port_layout(tmp_path / "port.h5", latents, images, labels, seeds)
    teacher = SimpleNamespace(img_resolution=R, img_channels=C, label_dim=LABEL_DIM)
    ours, port = PairDataset(tmp_path / "ours.h5"), PairDataset(tmp_path / "port.h5")
    ours.check_compatible(teacher)
    port.check_compatible(teacher)  # Inferred label_dim (max class_idx + 1 <= 10) fits a 10-class teacher.
    for key, value, message in [
        ("img_resolution", 32, "ours.h5 has resolution 8 but the teacher has 32"),
        ("img_channels", 1, "ours.h5 has channels 3 but the teacher has 1"),
        ("label_dim", 0, "ours.h5 has label_dim 10 but the teacher has label_dim 0"),
        ("label_dim", 1000, "ours.h5 has label_dim 10 but the teacher has label_dim 1000"),
    ]:
        with pytest.raises(PairFileError, match=message):
            ours.check_compatible(SimpleNamespace(**{**vars(teacher), key: value}))
    with pytest.raises(PairFileError, match="port.h5 has label_dim"):
        port.check_compatible(SimpleNamespace(**{**vars(teacher), "label_dim": 0}))
