"""`data_fingerprint`, what a resumed run compares to know it reads the same data: content, not just names and sizes,
for image folders and ZIPs, and unchanged by what a copy changes (times); pair files keep `file_fingerprint`."""

import shutil
import zipfile

import numpy as np
import PIL.Image

from dmd.checkpoint import data_fingerprint, file_fingerprint
from dmd.images import write_image_dataset


def _images(n, seed, r=32):
    return np.random.default_rng(seed).integers(0, 256, (n, r, r, 3), dtype=np.uint8)


def test_a_folder_of_other_pixels_with_the_same_names_and_sizes_is_another_dataset(tmp_path):
    """Names and sizes were all a folder's fingerprint: uncompressed PNGs of one shape have one size, so other
    pictures under the same names passed for the same data."""
    write_image_dataset(tmp_path / "a", _images(8, seed=0), labels=[0] * 8)
    write_image_dataset(tmp_path / "b", _images(8, seed=1), labels=[0] * 8)
    sizes = [sorted(p.stat().st_size for p in (tmp_path / x).rglob("*.png")) for x in "ab"]
    assert sizes[0] == sizes[1]
    assert data_fingerprint(tmp_path / "a") != data_fingerprint(tmp_path / "b")


def test_one_pixel_of_a_large_png_or_one_label_changes_a_folder_fingerprint(tmp_path):
    """A PNG larger than the bytes read at its end still changes its fingerprint with any pixel (its tail holds the
    Adler-32 of all its pixel rows and the CRC-32 of its last IDAT chunk); dataset.json is hashed whole."""
    images = _images(3, seed=0, r=128)  # 49 KB PNGs, more than the 4 KiB read from each
    write_image_dataset(tmp_path / "a", images, labels=[0, 1, 2])
    before = data_fingerprint(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy", copy_function=shutil.copyfile)  # new times, same content
    assert data_fingerprint(tmp_path / "copy") == before
    first = tmp_path / "a" / "00000" / "img00000000.png"
    pixels = images[0].copy()
    pixels[0, 0, 0] ^= 1  # the first pixel, the farthest from the file's end
    PIL.Image.fromarray(pixels).save(first, format="png", compress_level=0)
    assert first.stat().st_size == (tmp_path / "copy" / "00000" / "img00000000.png").stat().st_size
    assert data_fingerprint(tmp_path / "a") != before
    labels = tmp_path / "copy" / "dataset.json"
    labels.write_text(labels.read_text().replace('png", 0]', 'png", 5]'))  # same size, another class
    assert data_fingerprint(tmp_path / "copy") != before


def _zip(path, entries, method=zipfile.ZIP_STORED, date_time=(1980, 1, 1, 0, 0, 0)):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name, date_time), data, compress_type=method)


def test_a_zip_fingerprint_covers_every_entry_from_its_central_directory(tmp_path):
    """A ZIP's fingerprint hashed its size and first and last MiB: with 20,000 entries (a 1.3 MB central directory) an
    entry changed in the middle passed, its data and its directory record both outside the bytes hashed. The CRC-32
    of every entry, read from the central directory, now covers all of them; times and compression do not count."""
    entries = {f"{i // 1000:05d}/img{i:08d}.png": i.to_bytes(4, "little") * 64 for i in range(20000)}
    _zip(tmp_path / "a.zip", entries)
    entries["00004/img00004000.png"] = bytes(256)  # its data at 1.2 MB, its record 1.3 MB before the end
    _zip(tmp_path / "b.zip", entries)
    assert (tmp_path / "a.zip").stat().st_size == (tmp_path / "b.zip").stat().st_size > 6 << 20
    assert data_fingerprint(tmp_path / "a.zip") != data_fingerprint(tmp_path / "b.zip")
    _zip(tmp_path / "c.zip", entries, zipfile.ZIP_DEFLATED, date_time=(2024, 5, 1, 12, 0, 0))
    assert data_fingerprint(tmp_path / "c.zip") == data_fingerprint(tmp_path / "b.zip")


def test_other_files_keep_the_file_fingerprint(tmp_path):
    """A pair file's fingerprint is unchanged (runs that recorded one still resume)."""
    path = tmp_path / "pairs.h5"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    assert data_fingerprint(path) == file_fingerprint(path)
