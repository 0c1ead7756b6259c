"""Real images in EDM's dataset format: reading folders and ZIPs as dataset_tool.py writes them, labels, x-flips,
the teacher check, DataLoader workers, and one clear error per bad input (in training and in FID)."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from dmd.fid import FIDError, ImageFiles, image_stats
from dmd.images import ImageDataset, ImageDatasetError, ImageFolder, write_image_dataset

N, R = 12, 8


def _images(n=N, r=R, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, r, r, c), dtype=np.uint8)


def _labels(n=N):
    return np.arange(n) % 5


@pytest.fixture(params=["zip", "folder"])
def dest(request, tmp_path):
    return tmp_path / ("data.zip" if request.param == "zip" else "data")


def _png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)


def test_round_trip(dest):
    images, labels = _images(), _labels()
    write_image_dataset(dest, images, labels)
    ds = ImageDataset(dest)
    assert (len(ds), ds.resolution, ds.channels, ds.label_dim) == (N, R, 3, 5)
    for i in range(N):
        image, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, R, R) and label.dtype == torch.int64
        expected = torch.from_numpy(images[i]).permute(2, 0, 1).to(torch.float32) / 127.5 - 1  # EDM's scaling
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
        assert int(label) == labels[i]
    assert ds[0][0].min() >= -1 and ds[0][0].max() <= 1


def test_writer_uses_dataset_tool_layout(tmp_path):
    write_image_dataset(tmp_path / "data.zip", _images(n=1001), labels=np.zeros(1001, dtype=int))
    with zipfile.ZipFile(tmp_path / "data.zip") as z:
        names = z.namelist()
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}
        meta = json.loads(z.read("dataset.json"))
    assert names[:2] == ["00000/img00000000.png", "00000/img00000001.png"]
    assert names[999:] == ["00000/img00000999.png", "00001/img00001000.png", "dataset.json"]
    assert meta["labels"][1000] == ["00001/img00001000.png", 0]


def test_reads_a_zip_made_by_hand_in_name_order(tmp_path):
    # Not our writer: other folder names, deflated members, labels listed out of order; names sort, labels follow.
    images = _images(n=3)
    with zipfile.ZipFile(tmp_path / "data.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, i in [("b/2.png", 2), ("a/0.png", 0), ("a/1.png", 1)]:
            with z.open(name, "w") as f:
                PIL.Image.fromarray(images[i]).save(f, format="png")
        z.writestr("dataset.json", json.dumps({"labels": [["b/2.png", 7], ["a/0.png", 3], ["a/1.png", 0]]}))
        z.writestr("README.txt", "not an image")
    ds = ImageDataset(tmp_path / "data.zip")
    assert ds.files.names == ["a/0.png", "a/1.png", "b/2.png"] and ds.label_dim == 8
    assert [int(ds[i][1]) for i in range(3)] == [3, 0, 7]
    torch.testing.assert_close(ds[2][0], torch.from_numpy(images[2]).permute(2, 0, 1) / 127.5 - 1, rtol=0, atol=0)


def test_xflip_doubles_the_dataset_with_mirrored_copies(dest):
    write_image_dataset(dest, _images(), _labels())
    plain, flipped = ImageDataset(dest), ImageDataset(dest, xflip=True)
    assert len(flipped) == 2 * N
    for i in range(N):
        torch.testing.assert_close(flipped[i][0], plain[i][0], rtol=0, atol=0)
        torch.testing.assert_close(flipped[N + i][0], plain[i][0].flip(2), rtol=0, atol=0)  # left-right
        assert int(flipped[N + i][1]) == int(plain[i][1])
    with pytest.raises(IndexError, match="out of range"):
        flipped[2 * N]


def test_grayscale_and_unlabelled(tmp_path):
    write_image_dataset(tmp_path / "gray", _images(c=1))
    ds = ImageDataset(tmp_path / "gray")
    assert (ds.channels, ds.label_dim, ds[0][0].shape, int(ds[0][1])) == (1, 0, (1, R, R), -1)
    _png(tmp_path / "plain" / "x.png", _images(n=1)[0])  # no dataset.json at all
    assert ImageDataset(tmp_path / "plain").label_dim == 0


def test_check_compatible_against_the_fixture_teacher(tmp_path, fixtures_dir):
    from dmd.edm import load_network

    teacher = load_network(fixtures_dir / "edm_ddpmpp_cond.pkl")  # 8x8, 3 channels, label_dim 10
    write_image_dataset(tmp_path / "ok.zip", _images(), _labels())
    ImageDataset(tmp_path / "ok.zip").check_compatible(teacher)  # classes 0-4 of 10: fine
    cases = [
        ("big.zip", _images(r=16), _labels(), "have resolution 16 but the teacher has 8"),
        ("gray.zip", _images(c=1), _labels(), "have channels 1 but the teacher has 3"),
        ("nolabels.zip", _images(), None, "have no labels (dataset.json) but the teacher has label_dim 10"),
        ("many.zip", _images(), np.arange(N), "have class indices up to 11 but the teacher has label_dim 10"),
    ]
    for name, images, labels, message in cases:
        write_image_dataset(tmp_path / name, images, labels)
        with pytest.raises(ImageDatasetError, match=f"real images .*{name} {re.escape(message)}"):
            ImageDataset(tmp_path / name).check_compatible(teacher)
    uncond = SimpleNamespace(img_resolution=R, img_channels=3, label_dim=0)
    ImageDataset(tmp_path / "ok.zip").check_compatible(uncond)  # an unconditional teacher ignores the labels


def test_zip_is_opened_lazily_per_process_and_workers_read_the_same(tmp_path):
    write_image_dataset(tmp_path / "data.zip", _images(n=32), _labels(32))
    ds = ImageDataset(tmp_path / "data.zip", xflip=True)
    ds[0]
    assert ds.files._zip is not None and ds.files._pid == os.getpid()
    assert pickle.loads(pickle.dumps(ds)).files._zip is None  # workers get no handle of ours
    loaders = [torch.utils.data.DataLoader(ds, batch_size=16, num_workers=w) for w in (0, 2)]
    batches = [[torch.cat([b[0].flatten(1), b[1][:, None]], 1) for b in loader] for loader in loaders]
    torch.testing.assert_close(torch.cat(batches[0]), torch.cat(batches[1]), rtol=0, atol=0)
    ds.close()
    assert ds.files._zip is None and int(ds[1][1]) == 1  # reopens


def test_mixed_sizes_and_modes_name_both_files(tmp_path):
    _png(tmp_path / "sizes" / "a.png", _images(n=1)[0])
    _png(tmp_path / "sizes" / "b.png", _images(n=1, r=16)[0])
    ds = ImageDataset(tmp_path / "sizes")
    ds[0]
    with pytest.raises(
        ImageDatasetError, match=r"sizes/b.png: a 16x16 RGB image, but the first image a.png is 8x8 RGB"
    ):
        ds[1]
    _png(tmp_path / "modes" / "a.png", _images(n=1)[0])
    _png(tmp_path / "modes" / "b.png", _images(n=1, c=1)[0, :, :, 0])
    with pytest.raises(ImageDatasetError, match=r"modes/b.png: a 8x8 grayscale image, but .* a.png is 8x8 RGB"):
        ImageDataset(tmp_path / "modes")[1]


def test_fid_reads_through_the_same_reader_and_names_mixed_files(tmp_path):
    assert issubclass(ImageFiles, ImageFolder) and ImageFiles.error is FIDError
    _png(tmp_path / "mixed" / "a.png", _images(n=1)[0])
    _png(tmp_path / "mixed" / "b.png", _images(n=1, r=16)[0])

    def detector(x, return_features=True):
        return x.float().mean((2, 3))

    # Batch size 1: each batch stacks fine; before, the 16x16 image would have been scored at its own size.
    with pytest.raises(FIDError, match=r"mixed/b.png: a 16x16 RGB image, but the first image a.png is 8x8 RGB"):
        image_stats(tmp_path / "mixed", detector, batch_size=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FIDError, match="no images found"):
        ImageFiles(tmp_path / "empty")


def _bad_json(tmp_path, name, text):
    folder = tmp_path / name
    _png(folder / "00000" / "img00000000.png", _images(n=1)[0])
    _png(folder / "00000" / "img00000001.png", _images(n=1)[0])
    (folder / "dataset.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "dataset.json: not readable JSON"),
        ('{"classes": []}', "dataset.json: no 'labels' entry"),
        ('{"labels": {"a": 1}}', "dataset.json: 'labels' is a dict, not a list of"),
        (
            '{"labels": [["00000/img00000000.png", [0.5, 0.5]]]}',
            r'entry \["00000/img00000000.png", \[0.5, 0.5\]\] is not',
        ),
        ('{"labels": [["00000/img00000000.png", -1]]}', r"is not a \[path, class index\] pair"),
        # A class beyond int64 raised OverflowError, nesting deeper than the parser recurses RecursionError.
        pytest.param(
            '{"labels": [["00000/img00000000.png", 1' + "0" * 30 + '], ["00000/img00000001.png", 0]]}',
            r'entry \["00000/img00000000.png", 10+\] is not a \[path, class index\] pair',
            id="class-beyond-int64",
        ),
        pytest.param(
            '{"labels": ' + "[" * 100000 + "]" * 100000 + "}",
            r"dataset.json: not readable JSON \(nested too deeply\)",
            id="deep-nesting",
        ),
        ('{"labels": [["00000/img00000000.png", 3]]}', r"no label for 1 of 2 images \(e.g. 00000/img00000001.png\)"),
    ],
)
def test_bad_labels_name_the_file(tmp_path, text, message):
    folder = _bad_json(tmp_path, "data", text)
    with pytest.raises(ImageDatasetError, match=message) as info:
        ImageDataset(folder)
    assert str(folder / "dataset.json") in str(info.value)


def test_bad_paths_and_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "wide" / "a.png", np.zeros((8, 16, 3), dtype=np.uint8))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    _png(tmp_path / "rgba" / "a.png", np.zeros((8, 8, 4), dtype=np.uint8))
    cases = [
        ("notes.txt", "notes.txt: not a folder or ZIP of images"),
        ("missing.zip", "missing.zip: not a folder or ZIP of images"),
        ("empty", "empty: no images found"),
        ("wide", "wide: images are 8x16; EDM's networks take square images"),
        ("broken", "broken/a.png: not a PNG image"),
        ("rgba", "rgba/a.png: mode RGBA; expected RGB or L"),
    ]
    for name, message in cases:
        with pytest.raises(ImageDatasetError, match=message):
            ImageDataset(tmp_path / name)
    with pytest.raises(ImageDatasetError, match=r"images must be \(N, H, W, 1 or 3\) uint8"):
        write_image_dataset(tmp_path / "x.zip", np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageDatasetError, match="3 labels for 2 images"):
        write_image_dataset(tmp_path / "x.zip", np.zeros((2, 8, 8, 3), dtype=np.uint8), labels=[0, 1, 2])


def _png_header_only(path, width, height):
    """A PNG of a few dozen bytes that declares width x height grayscale pixels (its pixel data missing)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_declared_sizes_are_checked_before_decoding(tmp_path):
    """A PNG of a few dozen bytes declaring 8000x8000 pixels is refused from its header (it used to be decoded), one
    declaring 20000x20000 is an error naming it (PIL's DecompressionBombError used to escape as a traceback), and an
    image of another size is named before it is decoded."""
    _png_header_only(tmp_path / "bomb" / "a.png", 8000, 8000)
    assert (tmp_path / "bomb" / "a.png").stat().st_size < 100
    with pytest.raises(ImageDatasetError, match=r"bomb/a.png: declares 8000x8000 pixels, more than the 16,777,216"):
        ImageDataset(tmp_path / "bomb")
    with pytest.raises(FIDError, match=r"bomb/a.png: declares 8000x8000 pixels"):
        ImageFiles(tmp_path / "bomb").read_same_shape(0)
    _png_header_only(tmp_path / "huge" / "a.png", 20000, 20000)
    with pytest.raises(ImageDatasetError, match=r"huge/a.png: not a readable image \(Image size \(400000000 pixels"):
        ImageDataset(tmp_path / "huge")
    _png(tmp_path / "late" / "a.png", _images(n=1)[0, :, :, :1].repeat(3, axis=2)[:, :, 0])
    _png_header_only(tmp_path / "late" / "b.png", 3000, 3000)  # no pixel data: decoding it would fail otherwise
    with pytest.raises(ImageDatasetError, match=r"late/b.png: a 3000x3000 grayscale image, but .* a.png is 8x8"):
        ImageDataset(tmp_path / "late")[1]


def test_a_label_file_inflating_to_256_mib_is_refused_after_a_bounded_read(tmp_path):
    """A ZIP entry of 0.25 MB that inflates to 256 MiB of JSON (it used to be read whole) is refused after ~1 MB."""
    dest = tmp_path / "bomb.zip"
    write_image_dataset(dest, _images(n=2), labels=[0, 1])
    with zipfile.ZipFile(dest) as z:
        members = {name: z.read(name) for name in z.namelist() if name != "dataset.json"}
    with zipfile.ZipFile(dest, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        info = zipfile.ZipInfo("dataset.json")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:  # streamed: never 256 MiB in memory here
            f.write(b'{"labels": null, "pad": "')
            block = b" " * (1 << 24)
            for _ in range(16):
                f.write(block)
            f.write(b'"}')
    assert dest.stat().st_size < 1 << 20
    with pytest.raises(ImageDatasetError, match=r"bomb.zip/dataset.json: more than 1,050,624 bytes for 2 images"):
        ImageDataset(dest)


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def test_an_eps_file_named_png_never_starts_ghostscript(tmp_path):
    """Pillow picks a decoder by content, so EPS bytes in a .png made it run Ghostscript (here a fake `gs` first on
    PATH that leaves a marker); every dataset read now opens PNGs only, make-dataset's sources a few raster formats,
    and the error names the file."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(_EPS)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("00000/img00000000.png", _EPS)
    script = textwrap.dedent(
        """
        import sys
        from dmd.dataset_tool import SourceImages
        from dmd.fid import ImageFiles
        from dmd.images import ImageDataset
        for path in sys.argv[1:]:
            # train --real-data, fid ref/calc, make-dataset SRC
            for read in (ImageDataset, lambda p: ImageFiles(p).read(0), lambda p: SourceImages(p).scan(1, None)):
                try:
                    read(path)
                except ValueError as e:
                    print(e)
        """
    )
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    paths = [str(tmp_path / "folder"), str(tmp_path / "data.zip")]
    result = subprocess.run([sys.executable, "-c", script, *paths], env=env, capture_output=True, text=True)
    assert not marker.exists(), "Ghostscript was started"
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(": not a PNG " in line for line in lines), lines
    assert lines[0].startswith(f"{tmp_path}/folder/a.png: ") and lines[3].startswith(f"{paths[1]}/00000/img00000000")
    assert lines[2] == f"{tmp_path}/folder/a.png: not a PNG or JPEG or BMP or WEBP image"  # make-dataset's formats


def test_names_that_count_as_images_are_read_as_png_only(tmp_path):
    """Every name with an extension PIL knows counts, as in EDM's ImageFolderDataset (nothing image-like is skipped
    silently), but only PNG is decoded: a JPEG was read before, and is now named with the way to convert it."""
    _png(tmp_path / "data" / "a.png", _images(n=1)[0])
    PIL.Image.fromarray(_images(n=1)[0]).save(tmp_path / "data" / "b.jpg", quality=95)
    (tmp_path / "data" / "notes.txt").write_text("not an image, not counted")
    files = ImageFolder(tmp_path / "data")
    assert files.names == ["a.png", "b.jpg"]
    with pytest.raises(ImageDatasetError, match=r"data/b.jpg: not a PNG image \(EDM's dataset format.*make-dataset"):
        files.read(1)


@pytest.fixture
def no_hang():
    """Fail a test that blocks (opening a FIFO waits for a writer forever) instead of hanging the suite."""

    def hung(signum, frame):  # pytest.fail, not an OSError, which the code under test may catch
        pytest.fail("blocked for 10 s (opening a FIFO?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifos_are_refused_not_opened(tmp_path, no_hang):
    """A FIFO given as data, or among a folder's images, blocked forever (or was skipped); now one line names it."""
    os.mkfifo(tmp_path / "data.zip")
    for open_files in (ImageDataset, ImageFiles):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/data.zip: a FIFO, not a folder or ZIP of images")):
            open_files(tmp_path / "data.zip")
    for name in ("b.png", "dataset.json"):
        folder = tmp_path / name.replace(".", "_")
        _png(folder / "a.png", _images(n=1)[0])
        os.mkfifo(folder / name)
        with pytest.raises(ImageDatasetError, match=re.escape(f"{folder}/{name}: a FIFO, not a regular file")):
            ImageDataset(folder)


def _zip_with(path, change):
    """A two-image ZIP in EDM's layout whose first entry's ZipInfo has been changed by `change` (as its central
    directory will record it)."""
    write_image_dataset(path, _images(n=2), labels=[0, 1])
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, data)
        change(z.infolist()[0])
    return path


def test_encrypted_and_unsupported_zip_entries_are_named(tmp_path):
    """Encrypted entries raised RuntimeError and unknown compression methods NotImplementedError, as tracebacks."""
    encrypted = _zip_with(tmp_path / "encrypted.zip", lambda info: setattr(info, "flag_bits", info.flag_bits | 1))
    zstd = _zip_with(tmp_path / "zstd.zip", lambda info: setattr(info, "compress_type", 93))
    with pytest.raises(ImageDatasetError, match=r"encrypted.zip/00000/img00000000.png: encrypted"):
        ImageDataset(encrypted)
    with pytest.raises(FIDError, match=r"zstd.zip/00000/img00000000.png: compression method 93; .* stored or deflate"):
        ImageFiles(zstd)
