"""The pair file layer: our HDF5 layout, its crash-safe writer, the port's layout, conversion and clear errors."""

import os
import re
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
    grow_pair_file,
    read_pair_attrs,
    read_seeds,
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


def test_grow_keeps_complete_rows_and_plans_the_new_seeds(tmp_path):
    latents, images, labels, seeds = _pairs(n=14)
    path = tmp_path / "pairs.h5"
    create_pair_file(
        path, channels=C, resolution=R, label_dim=LABEL_DIM, seeds=seeds[:10], attrs={"teacher_sha256": "ab"}
    )
    with PairWriter(path) as writer:
        writer.append(latents[:4], images[:4], labels[:4])
    for wrong, message in [
        (seeds[:10], "its 10 seeds are not the first of this run's 10"),  # nothing to grow
        (seeds[:8], "its 10 seeds are not the first of this run's 8"),
        (np.r_[seeds[1:10], seeds[10:14]], "its 10 seeds are not the first of this run's 13"),
    ]:
        with pytest.raises(PairFileError, match=f"pair file .*pairs.h5 was made for a different seed list .*{message}"):
            grow_pair_file(path, wrong)
    assert grow_pair_file(path, seeds, batch_size=3) == 4
    attrs = read_pair_attrs(path)
    assert (attrs["num_complete"], attrs["num_requested"], attrs["teacher_sha256"]) == (4, 14, "ab")
    np.testing.assert_array_equal(read_seeds(path), seeds)
    _assert_rows(PairDataset(path), latents[:4], images[:4], labels[:4])
    with PairWriter(path) as writer:  # the planned rows take the rest
        writer.append(latents[4:], images[4:], labels[4:])
    _assert_rows(PairDataset(path), latents, images, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.h5"]


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


def _edit(path, **attrs):
    """Overwrite attributes of a pair file (a tool or a hand that disagrees with the data)."""
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value


@pytest.mark.parametrize(
    "attrs, message",
    [
        (
            dict(resolution=16),
            r"/latents is float32 \(10, 3, 8, 8\) but the attributes .* say float32 \(10, 3, 16, 16\)",
        ),
        (dict(channels=1), r"/latents is float32 \(10, 3, 8, 8\) but the attributes .* say float32 \(10, 1, 8, 8\)"),
        (dict(num_requested=12), r"/latents is float32 \(10, 3, 8, 8\) but the attributes .* \(12, 3, 8, 8\)"),
        (dict(num_complete=11), "attribute num_complete=11 exceeds num_requested=10"),
        (dict(num_complete=-1), "attribute num_complete=-1 is below 0"),
        (dict(label_dim="ten"), "attribute label_dim is 'ten', not an integer"),
        (dict(resolution=8.0), "attribute resolution is 8.0, not an integer"),
        (dict(resolution=None), "attribute resolution is missing"),
        (dict(label_dim=5), r"row \d+ has label [5-9], not a class in \[0, 5\)"),  # labels 0..9 were drawn
        (dict(label_dim=0), r"row 0 has label \d, not -1 \(the file is unconditional\)"),
    ],
)
def test_attributes_that_disagree_with_the_data_are_refused(tmp_path, attrs, message):
    path = tmp_path / "edited.h5"
    _write_ours(path, *_pairs())
    _edit(path, **attrs)
    with pytest.raises(PairFileError, match=f"pair file .*edited.h5: {message}"):
        PairDataset(path)


def test_datasets_that_disagree_with_the_attributes_are_refused(tmp_path):
    path = tmp_path / "edited.h5"
    _write_ours(path, *_pairs())
    with h5py.File(path, "r+") as f:
        del f["seeds"]
    with pytest.raises(PairFileError, match="edited.h5: dataset /seeds is missing"):
        PairDataset(path)
    with h5py.File(path, "r+") as f:
        f["seeds"] = np.zeros(N, dtype=np.float64)
    with pytest.raises(PairFileError, match=r"edited.h5: /seeds is float64 \(10,\) but the attributes .* int64"):
        PairWriter(path)


@pytest.mark.parametrize("label, label_dim", [(-4, LABEL_DIM), (LABEL_DIM, LABEL_DIM), (3, 0)])
def test_out_of_range_label_is_refused_naming_the_row(tmp_path, label, label_dim):
    """Today label -4 of a 10-class file trains as class 6 (one_hot indexes from the end): refuse it at open."""
    latents, images, labels, seeds = _pairs()
    labels = labels if label_dim else np.full(N, -1)
    path = tmp_path / "labels.h5"
    _write_ours(path, latents, images, labels, seeds, label_dim=label_dim)
    with h5py.File(path, "r+") as f:
        f["labels"][7] = label
    want = "-1 \\(the file is unconditional\\)" if label_dim == 0 else f"a class in \\[0, {label_dim}\\)"
    with pytest.raises(PairFileError, match=f"pair file .*labels.h5: row 7 has label {label}, not {want}"):
        PairDataset(path)
    # Rows past num_complete are not data yet: a resumable file with garbage there opens.
    _edit(path, num_complete=7)
    assert len(PairDataset(path)) == 7


def test_writer_refuses_bad_rows_and_keeps_the_file(tmp_path):
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "pairs.h5"
    create_pair_file(path, channels=C, resolution=R, label_dim=LABEL_DIM, seeds=seeds, attrs={})
    bad_images = images[:4].copy()
    bad_images[2, 1, 3, 3] = np.nan
    bad_labels = labels[:4].copy()
    bad_labels[1] = -4
    with PairWriter(path) as writer:
        writer.append(latents[:2], images[:2], labels[:2])
        with pytest.raises(PairFileError, match="pairs.h5: row 4 has a NaN or inf in its image"):
            writer.append(latents[:4], bad_images, labels[:4])
        with pytest.raises(PairFileError, match=r"pairs.h5: row 3 has label -4, not a class in \[0, 10\)"):
            writer.append(latents[:4], images[:4], bad_labels)
        with pytest.raises(PairFileError, match=r"pairs.h5: latents to append have shape \(4, 3, 4, 4\)"):
            writer.append(latents[:4, :, :4, :4], images[:4], labels[:4])
        writer.append(latents[2:], images[2:], labels[2:])
    _assert_rows(PairDataset(path), latents, images, labels)


@pytest.mark.parametrize("column", ["latents", "images"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_row_is_refused_when_read(tmp_path, column, value):
    latents, images, labels, seeds = _pairs()
    path = tmp_path / "nan.h5"
    _write_ours(path, latents, images, labels, seeds)
    with h5py.File(path, "r+") as f:
        f[column][5, 2, 1, 0] = value
    ds = PairDataset(path)  # Finiteness is checked per row read: a scan at open would read every image.
    _assert_rows(ds, latents[:5], images[:5], labels[:5])
    message = f"pair file .*nan.h5: row 5 has a NaN or inf in its {column[:-1]}"
    with pytest.raises(PairFileError, match=message):
        ds[5]
    with pytest.raises(PairFileError, match=message):
        ds.read_rows(2, N)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(PairFileError, match=message):  # A worker's error reaches the main process as PairFileError.
        list(loader)


def _port_file(path):
    latents, images, labels, seeds = _pairs()
    write_port_layout(path, latents, images, labels, seeds)
    return path


def _break_port(path, index, how):
    with h5py.File(path, "r+") as f:
        ds = f[f"data/{index}"]
        if how == "delete":
            del f[f"data/{index}"]
        elif how == "shape":
            attrs = dict(ds.attrs)
            del f[f"data/{index}"]
            f[f"data/{index}"] = np.zeros((2, C, 4, 4))
            f[f"data/{index}"].attrs.update(attrs)
        elif how == "nan":
            ds[0, 0, 0, 0] = np.nan
        else:  # An attribute: (name, value), value None deletes it.
            name, value = how
            if value is None:
                del ds.attrs[name]
            else:
                ds.attrs[name] = value


@pytest.mark.parametrize(
    "index, how, label_dim, message",
    [
        (3, "delete", LABEL_DIM, r"/data/3 is missing \(the port's 9 pairs are /data/0 ... /data/8\)"),
        (4, "shape", LABEL_DIM, r"/data/4 is float64 \(2, 3, 4, 4\), not floats \(2, 3, 8, 8\) like /data/0"),
        (6, "nan", LABEL_DIM, "row 6 has a NaN or inf in its image"),
        (2, ("class_idx", 2.5), None, "/data/2: attribute class_idx is 2.5, not an integer"),
        (2, ("class_idx", 2.5), LABEL_DIM, "/data/2: attribute class_idx is 2.5, not an integer"),
        (1, ("class_idx", None), LABEL_DIM, "/data/1: attribute class_idx is missing"),
        (5, ("class_idx", -4), None, r"/data/5: class_idx -4 is not a class >= 0"),
        (5, ("class_idx", 12), LABEL_DIM, r"/data/5: class_idx 12 is not a class in \[0, 10\)"),
        (8, ("seed", None), LABEL_DIM, "/data/8: attribute seed is missing"),
        (8, ("seed", "x"), LABEL_DIM, "/data/8: attribute seed is 'x', not an integer"),
    ],
)
def test_malformed_port_file_names_the_pair(tmp_path, index, how, label_dim, message):
    """Each flaw of a port-layout file is one PairFileError naming the file and the pair, from PairDataset (when the
    pair is opened or read) and from `convert-pairs` (one 'Error:' line, no output file)."""
    path = _port_file(tmp_path / "port.h5")
    _break_port(path, index, how)
    with pytest.raises(PairFileError, match=f"pair file .*port.h5: {message}"):
        ds = PairDataset(path, label_dim=label_dim)
        ds.read_rows(0, len(ds))
    args = ["convert-pairs", str(path), str(tmp_path / "new.h5")]
    result = CliRunner().invoke(main, [*args] + ([] if label_dim is None else ["--label-dim", str(label_dim)]))
    last = result.output.strip().splitlines()[-1]  # After the progress bar, when the flaw is met while converting.
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.count("Error") == 1
    assert re.fullmatch(f"Error: pair file .*port.h5: {message}", last)
    assert not (tmp_path / "new.h5").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["port.h5"]


def test_a_fifo_pair_file_is_named_as_such(tmp_path):
    """A FIFO given as --data-path was reported as a file that does not exist."""
    os.mkfifo(tmp_path / "pairs.h5")
    with pytest.raises(PairFileError, match=re.escape(f"pair file {tmp_path}/pairs.h5 is a FIFO, not a regular file")):
        PairDataset(tmp_path / "pairs.h5")


def test_a_folder_given_as_pair_file_is_named_as_such(tmp_path):
    with pytest.raises(PairFileError, match=re.escape(f"pair file {tmp_path} is a folder; give the .h5 file")):
        PairDataset(tmp_path)  # it said "does not exist"
