"""`dmd make-dataset`: EDM's dataset format from folders, ZIPs and CIFAR-10's tarball, read back by the training and
FID readers pixel for pixel; labels as EDM's tool gives them; an unpickler that runs nothing; interrupted runs that
leave no DEST and continue; one line for every bad input."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from test_images import no_hang  # noqa: F401 (a fixture: fail instead of blocking on a FIFO)

from dmd.cli import main
from dmd.dataset_tool import center_crop, make_dataset
from dmd.fid import ImageFiles
from dmd.images import JOB_FILE, DatasetWriter, ImageDataset, ImageDatasetError


def _images(n, r=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, r, r, c), dtype=np.uint8)


def _encode(pixels):
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def _png(path, pixels, format="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path, format=format)


def _read_back(dest):
    """Pixels (N, H, W, C) uint8 and labels (N,) as `train --real-data` reads them; `fid ref --data` reads the same."""
    ds, fid = ImageDataset(dest), ImageFiles(dest)
    pixels = np.stack([ds.files.read_same_shape(i) for i in range(len(ds))])
    assert all(np.array_equal(fid.read(i), pixels[i]) for i in range(len(ds)))
    return pixels, ds.labels.numpy()


def _cifar_tarball(path, batches, payload=None):
    """A tarball with CIFAR-10's layout: cifar-10-batches-py/data_batch_1..5 (protocol-2 pickles of dicts with 'data'
    (n, 3072) uint8 rows of R, G and B planes and 'labels'), plus a test batch and batches.meta that are not read.
    `payload` replaces data_batch_3's pickle."""
    with tarfile.open(path, "w:gz") as tar:
        for i, (images, labels) in enumerate(batches, 1):
            rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
            batch = {"batch_label": f"training batch {i} of 5", "labels": list(map(int, labels)), "data": rows}
            batch["filenames"] = [f"img_{i}_{j}.png" for j in range(len(images))]
            data = payload if payload is not None and i == 3 else pickle.dumps(batch, protocol=2)
            for name in [f"data_batch_{i}"] + (["test_batch", "batches.meta"] if i == 5 else []):
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_tarball_round_trip(tmp_path):
    """Batches 1-5 in order, CHW rows turned HWC, labels kept: what EDM's cifar10-32x32.zip holds."""
    batches = [(_images(3, r=32, seed=i), np.arange(3) + i) for i in range(5)]
    tarball = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz", batches)
    result = CliRunner().invoke(main, ["make-dataset", str(tarball), str(tmp_path / "cifar.zip")])
    assert result.exit_code == 0, result.output
    assert result.output == f"{tmp_path / 'cifar.zip'}: 15 images, 32x32 RGB, 7 classes\n"
    pixels, labels = _read_back(tmp_path / "cifar.zip")
    np.testing.assert_array_equal(pixels, np.concatenate([images for images, _ in batches]))
    np.testing.assert_array_equal(labels, np.concatenate([labels for _, labels in batches]))
    with zipfile.ZipFile(tmp_path / "cifar.zip") as z:
        assert z.namelist()[:2] == ["00000/img00000000.png", "00000/img00000001.png"]
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_cifar_batch_runs_nothing(tmp_path):
    """A pickle that calls os.system when unpickled (as pickle.load would) is refused before the call."""
    marker = tmp_path / "ran"
    batches = [(_images(2, r=32, seed=i), [0, 1]) for i in range(5)]
    tarball = _cifar_tarball(tmp_path / "c.tar.gz", batches, payload=pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(ImageDatasetError, match=r"c.tar.gz: cifar-10-batches-py/data_batch_3: not a CIFAR-10 batch"):
        make_dataset(tarball, tmp_path / "out.zip")
    assert not marker.exists() and not (tmp_path / "out.zip").exists()
    (tmp_path / "other.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "other.tar", "w") as tar:
        tar.add(__file__, arcname="x.py")
    with pytest.raises(ImageDatasetError, match=r"other.tar: no cifar-10-batches-py/data_batch_1; not CIFAR-10's"):
        make_dataset(tmp_path / "other.tar", tmp_path / "out.zip")


def test_class_subfolders_flat_folders_and_edm_datasets(tmp_path):
    """Classes are the top-level subfolders in sorted order, as EDM's tool numbers them; a flat folder is
    unlabelled; an EDM dataset keeps its dataset.json labels (its 00000/ folders are no classes); JPEGs and
    grayscale images among RGB ones are decoded and converted."""
    images = _images(5)
    _png(tmp_path / "src" / "dog" / "b.png", images[0])
    _png(tmp_path / "src" / "cat" / "z.png", images[1])
    _png(tmp_path / "src" / "cat" / "a.jpg", images[2], format="jpeg")
    _png(tmp_path / "src" / "eel" / "deep" / "c.png", images[3, :, :, :1])
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    make_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    pixels, labels = _read_back(tmp_path / "out.zip")
    jpeg = np.asarray(PIL.Image.open(tmp_path / "src" / "cat" / "a.jpg"))
    expected = np.stack([jpeg, images[1], images[0], images[3, :, :, :1].repeat(3, axis=2)])  # cat/a, cat/z, dog, eel
    np.testing.assert_array_equal(pixels, expected)
    assert labels.tolist() == [0, 0, 1, 2]

    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", images[i, :, :, :1])
    assert make_dataset(tmp_path / "flat", tmp_path / "flat-out")["classes"] == 0
    pixels, labels = _read_back(tmp_path / "flat-out")
    np.testing.assert_array_equal(pixels, images[:3, :, :, :1])  # all grayscale: stays grayscale
    assert labels.tolist() == [-1, -1, -1]

    names = ["00000/img00000999.png", "00001/img00001000.png"]  # EDM's folders of 1,000 images: no classes
    with zipfile.ZipFile(tmp_path / "edm.zip", "w") as z:
        for name, pixels in zip(names, images):
            z.writestr(name, _encode(pixels))
        z.writestr("dataset.json", json.dumps({"labels": [[names[0], 7], [names[1], 3]]}))
    make_dataset(tmp_path / "edm.zip", tmp_path / "edm-copy")
    assert _read_back(tmp_path / "edm-copy")[1].tolist() == [7, 3]

    _png(tmp_path / "src" / "top.png", images[4])
    with pytest.raises(ImageDatasetError, match=r"src has images both at its top \(top.png\) and in subfolders"):
        make_dataset(tmp_path / "src", tmp_path / "mixed.zip")


def test_resolution_center_crops_and_max_images_keeps_the_first(tmp_path):
    """Without --resolution, other sizes are refused before anything is written; with it, every image is
    center-cropped and resized with Lanczos as EDM's center-crop transform (compared with PIL doing it here)."""
    wide, tall = _images(1, r=12)[0][:6], _images(1, r=10, seed=1)[0]
    _png(tmp_path / "src" / "a.png", tall)
    _png(tmp_path / "src" / "b.png", wide)
    _png(tmp_path / "src" / "c.png", _images(1, r=8, seed=2)[0])
    with pytest.raises(ImageDatasetError, match=r"src/b.png is 12x6, not square; give --resolution"):
        make_dataset(tmp_path / "src", tmp_path / "out.zip")
    os.remove(tmp_path / "src" / "b.png")
    with pytest.raises(ImageDatasetError, match=r"src/c.png is 8x8 but the first image a.png is 10x10; give --resol"):
        make_dataset(tmp_path / "src", tmp_path / "out.zip")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # neither DEST nor DEST.partial
    _png(tmp_path / "src" / "b.png", wide)
    make_dataset(tmp_path / "src", tmp_path / "out.zip", resolution=4, max_images=2)
    pixels, _ = _read_back(tmp_path / "out.zip")
    crops = [PIL.Image.fromarray(tall), PIL.Image.fromarray(wide).crop((3, 0, 9, 6))]  # the centered squares
    expected = [np.asarray(crop.resize((4, 4), PIL.Image.LANCZOS)) for crop in crops]
    np.testing.assert_array_equal(pixels, np.stack(expected))
    assert center_crop(PIL.Image.fromarray(tall), 10).size == (10, 10)


_KILL_AT_IMAGE_1002 = """
import os, signal, sys
import dmd.images
from dmd.dataset_tool import make_dataset

encode, calls = dmd.images.encode_png, []

def encode_then_die(pixels):
    calls.append(1)
    if len(calls) == 1003:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(pixels)

dmd.images.encode_png = encode_then_die
make_dataset(sys.argv[1], sys.argv[2], progress=False)
"""


def _counting_encoder(monkeypatch, fail_at=None):
    """Count the images encoded from now on (raising OSError at the `fail_at`-th), a list of one entry each."""
    import dmd.images

    original, encoded = dmd.images.encode_png, []

    def counted(pixels):
        encoded.append(1)
        if len(encoded) == fail_at:
            raise OSError("simulated failure")
        return original(pixels)

    monkeypatch.setattr(dmd.images, "encode_png", counted)
    return encoded


@pytest.fixture(scope="module")
def cifar_1005(tmp_path_factory):
    batches = [(_images(201, r=32, seed=i), np.arange(201) % 10) for i in range(5)]
    return _cifar_tarball(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz", batches)


def test_kill_9_leaves_no_dest_and_the_rerun_continues(tmp_path, monkeypatch, cifar_1005):
    """kill -9 while writing image 1002 of 1005 leaves DEST.partial with the whole group 00000/ and no DEST; the same
    command then writes only images 1000-1004 and gives what an uninterrupted run gives, byte for byte."""
    dest, partial = tmp_path / "out.zip", tmp_path / "out.zip.partial"
    run = subprocess.run([sys.executable, "-c", _KILL_AT_IMAGE_1002, str(cifar_1005), str(dest)])
    assert run.returncode == -signal.SIGKILL and not dest.exists()
    assert sorted(os.listdir(partial)) == ["00000.zip", "00001.zip.tmp", "make-dataset.json"]
    encoded = _counting_encoder(monkeypatch)
    assert make_dataset(cifar_1005, dest, progress=False)["continued"] == 1000
    assert len(encoded) == 5 and not partial.exists()
    make_dataset(cifar_1005, tmp_path / "clean.zip", progress=False)
    assert dest.read_bytes() == (tmp_path / "clean.zip").read_bytes()


def test_a_failed_write_into_a_folder_continues(tmp_path, monkeypatch, cifar_1005):
    """The same for a folder DEST and a failure inside the process (a full disk, say)."""
    dest = tmp_path / "out"
    _counting_encoder(monkeypatch, fail_at=1003)
    with pytest.raises(OSError, match="simulated failure"):
        make_dataset(cifar_1005, dest, progress=False)
    assert not dest.exists() and sorted(os.listdir(tmp_path / "out.partial")) == ["00000", "00001.tmp", JOB_FILE]
    encoded = _counting_encoder(monkeypatch)
    assert make_dataset(cifar_1005, dest, progress=False)["continued"] == 1000 and len(encoded) == 5
    pixels, labels = _read_back(dest)
    assert len(pixels) == 1005 and labels.tolist() == [i % 201 % 10 for i in range(1005)]
    assert sorted(os.listdir(dest)) == ["00000", "00001", "dataset.json"]


def test_an_existing_dest_or_a_foreign_partial_folder_is_never_overwritten(tmp_path):
    for i, pixels in enumerate(_images(3)):
        _png(tmp_path / "src" / f"{i}.png", pixels)
    (tmp_path / "mine.zip").write_text("a file a person made")
    result = CliRunner().invoke(main, ["make-dataset", str(tmp_path / "src"), str(tmp_path / "mine.zip")])
    assert result.exit_code == 2 and "mine.zip exists" in result.output
    with pytest.raises(ImageDatasetError, match="mine.zip exists; remove it or choose another DEST"):
        make_dataset(tmp_path / "src", tmp_path / "mine.zip")
    assert (tmp_path / "mine.zip").read_text() == "a file a person made"
    (tmp_path / "out.zip.partial").mkdir()
    (tmp_path / "out.zip.partial" / "notes.txt").write_text("someone's")
    with pytest.raises(ImageDatasetError, match=r"out.zip.partial exists and was not made by dmd; remove it"):
        make_dataset(tmp_path / "src", tmp_path / "out.zip")
    (tmp_path / "out.zip.partial" / "notes.txt").unlink()  # an empty one is taken over (a writer killed at mkdir)
    assert make_dataset(tmp_path / "src", tmp_path / "out.zip")["images"] == 3
    DatasetWriter(tmp_path / "other.zip", 3, {"another": "job"})  # as a write of other data leaves it when killed
    with pytest.raises(ImageDatasetError, match=r"other.zip.partial holds an interrupted write from other data or"):
        make_dataset(tmp_path / "src", tmp_path / "other.zip")
    with pytest.raises(ImageDatasetError, match=r"src/inside.zip is inside .*src; a dataset cannot be written into"):
        make_dataset(tmp_path / "src", tmp_path / "src" / "inside.zip")
    with pytest.raises(ImageDatasetError, match="--resolution 5000 is outside 1 .. 4096"):
        make_dataset(tmp_path / "src", tmp_path / "big.zip", resolution=5000)


@pytest.mark.usefixtures("no_hang")
def test_bad_sources_are_one_line(tmp_path):
    """A FIFO as SRC (it would block forever), a file of no known kind, an image of a refused mode."""
    os.mkfifo(tmp_path / "fifo")
    result = CliRunner().invoke(main, ["make-dataset", str(tmp_path / "fifo"), str(tmp_path / "out.zip")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path}/fifo: a FIFO, not a folder, ZIP or tarball of images\n"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageDatasetError, match=r"notes.txt: not a folder or ZIP of images, nor CIFAR-10's"):
        make_dataset(tmp_path / "notes.txt", tmp_path / "out.zip")
    _png(tmp_path / "rgba" / "a.png", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ImageDatasetError, match=r"rgba/a.png: mode RGBA; make-dataset reads RGB, grayscale, palette"):
        make_dataset(tmp_path / "rgba", tmp_path / "out.zip")
    result = CliRunner().invoke(
        main, ["make-dataset", str(tmp_path / "rgba"), str(tmp_path / "o"), "--resolution", "4x5"]
    )
    assert result.exit_code == 2 and "'4x5' is not a square size like 64 or 64x64" in result.output
