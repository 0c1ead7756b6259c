"""EDM2's encoded datasets: the writer and reader round trip (and read np.save's entries as EDM2 writes them), final
latents against a hand computation, one error line per bad entry naming file and entry, the teacher check, and
DataLoader workers reading the ZIP through their own handles."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_edm2_encoders import SCALE, VAE

from dmd.batches import BatchStream
from dmd.edm.persistence import load_network
from dmd.edm2.encoders import final_latents
from dmd.edm2.vae import latent_info
from dmd.encoded import (
    EncodedDataset,
    EncodedDatasetError,
    holds_latents,
    latent_name,
    write_encoded_dataset,
)
from dmd.images import ImageDatasetError, write_image_dataset

EDM2 = Path(__file__).parent / "fixtures" / "edm2"
LATENT, PIXEL = EDM2 / "edm2_latent_cond.pkl", EDM2 / "edm2_img_cond.pkl"


def _raw(n=6, c=4, r=8, seed=0):
    """Raw latents (n, 2c, r, r): a mean, then a positive std."""
    g = np.random.default_rng(seed)
    mean, std = g.standard_normal((n, c, r, r)) * 3, g.uniform(0.01, 0.2, (n, c, r, r))
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def _zip_of(path, entries, labels=None):
    """A ZIP as EDM2's dataset_tool.py writes it: {name: bytes} stored, and dataset.json."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        z.writestr("dataset.json", '{"labels": %s}' % ("null" if labels is None else labels))
    return path


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _header(shape):
    """A .npy header of a float32 C-order array of `shape`, as np.save writes it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@pytest.mark.parametrize("dest", ["lat.zip", "lat"])
def test_write_then_read_round_trips(tmp_path, dest):
    raw, labels = _raw(), [3, 1, 4, 1, 5, 9]
    write_encoded_dataset(tmp_path / dest, raw, labels)
    data = EncodedDataset(tmp_path / dest)
    assert (len(data), data.channels, data.resolution, data.label_dim) == (6, 4, 8, 10)
    assert (
        data.files.names == [latent_name(i) for i in range(6)]
        and latent_name(1234) == "00001/img-mean-std-00001234.npy"
    )
    for i in range(6):
        x, label = data[i]
        assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(raw[i])) and int(label) == labels[i]
    if dest.endswith(".zip"):  # entries np.load reads back, uncompressed as EDM's tool stores them
        with zipfile.ZipFile(tmp_path / dest) as z:
            assert np.array_equal(np.load(io.BytesIO(z.read(latent_name(2)))), raw[2])
            assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}
    assert holds_latents(tmp_path / dest)
    with pytest.raises(ImageDatasetError, match="exists"):  # never overwritten
        write_encoded_dataset(tmp_path / dest, raw, labels)


def test_reads_np_save_entries_as_edm2_writes_them(tmp_path):
    raw = _raw(3)
    entries = {latent_name(i): _npy(raw[i]) for i in range(3)}
    path = _zip_of(tmp_path / "img512-sd.zip", entries)  # unlabelled
    data = EncodedDataset(path)
    assert data.label_dim == 0 and torch.equal(data.labels, torch.full((3,), -1))
    assert all(torch.equal(data[i][0], torch.from_numpy(raw[i])) for i in range(3))


def test_final_latents_are_mean_plus_std_eps_scaled_and_biased_per_channel():
    info = latent_info(load_network(LATENT))
    assert np.array_equal(np.float32(info.scale), SCALE) and np.array_equal(np.float32(info.bias), VAE["bias"])
    raw = torch.from_numpy(_raw(2, r=3))
    eps = torch.randn(2, 4, 3, 3)
    out = final_latents(raw, eps, info)
    expected = np.empty((2, 4, 3, 3), np.float32)
    for n in range(2):
        for ch in range(4):
            mean, std = raw[n, ch].numpy(), raw[n, 4 + ch].numpy()
            expected[n, ch] = (mean + std * eps[n, ch].numpy()) * SCALE[ch] + VAE["bias"][ch]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert latent_info(load_network(PIXEL)) is None


GOOD = _raw(1)[0]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_npy(GOOD.astype(np.float64)), "a float64 array in C order; EDM2's latents are float32"),
        (_npy(np.asfortranarray(GOOD)), "in Fortran order"),
        (_npy(GOOD[:, :4]), "shape (8, 4, 8) but the first entry 00000/img-mean-std-00000000.npy has (8, 8, 8)"),
        (_npy(GOOD)[:-100], "bytes of data; its header declares 2,048"),
        (_npy(np.where(np.arange(8)[:, None, None] == 5, np.nan, GOOD).astype(np.float32)), "holds an inf or a NaN"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable .npy array"),
        # A header declaring 64 GiB in a small entry: refused before any allocation.
        (_header((8, 1 << 16, 1 << 15)) + bytes(64), "shape (8, 65536, 32768) but the first entry"),
    ],
    ids=["float64", "fortran", "shape", "truncated", "nan", "png", "huge"],
)
def test_a_bad_entry_is_one_error_naming_file_and_entry(tmp_path, second, message):
    path = _zip_of(tmp_path / "bad.zip", {latent_name(0): _npy(GOOD), latent_name(1): second})
    data = EncodedDataset(path)
    assert torch.equal(data[0][0], torch.from_numpy(GOOD))
    with pytest.raises(EncodedDatasetError) as e:
        data[1]
    assert f"{path}/{latent_name(1)}: " in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_first_entry_or_zip_is_refused_on_opening(tmp_path):
    odd = _zip_of(tmp_path / "odd.zip", {latent_name(0): _npy(GOOD[:7])})
    with pytest.raises(EncodedDatasetError, match=r"odd.zip/00000/img-mean-std-00000000.npy: shape \(7, 8, 8\)"):
        EncodedDataset(odd)
    huge = _zip_of(tmp_path / "huge.zip", {latent_name(0): _header((8, 1 << 16, 1 << 15)) + bytes(64)})
    with pytest.raises(EncodedDatasetError, match="of at most 16,777,216 values"):  # before any allocation
        EncodedDataset(huge)
    wide = _zip_of(tmp_path / "wide.zip", {latent_name(0): _npy(np.zeros((8, 8, 16), np.float32))})
    with pytest.raises(EncodedDatasetError, match="latents are 8x16; EDM2's networks take square ones"):
        EncodedDataset(wide)
    with zipfile.ZipFile(tmp_path / "bz.zip", "w") as z:  # ImageFolder's ZIP checks serve latents too
        z.writestr(latent_name(0), _npy(GOOD), compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(EncodedDatasetError, match="bz.zip/00000/img-mean-std-00000000.npy: compression method 12"):
        EncodedDataset(tmp_path / "bz.zip")
    labels = _zip_of(tmp_path / "labels.zip", {latent_name(0): _npy(GOOD)}, labels='[["other.npy", 1]]')
    with pytest.raises(EncodedDatasetError, match="no label for 1 of 1 VAE latents"):
        EncodedDataset(labels)
    write_image_dataset(tmp_path / "img.zip", np.zeros((2, 8, 8, 3), np.uint8))
    assert not holds_latents(tmp_path / "img.zip")
    with pytest.raises(EncodedDatasetError, match=r"img.zip: no VAE latents \(.npy entries"):
        EncodedDataset(tmp_path / "img.zip")


def test_the_teacher_must_be_a_latent_network_of_the_same_shape(tmp_path):
    latent = load_network(LATENT)
    write_encoded_dataset(tmp_path / "ok.zip", _raw(2), [0, 9])
    EncodedDataset(tmp_path / "ok.zip").check_compatible(latent)
    with pytest.raises(EncodedDatasetError, match="are VAE latents .* but the teacher is a pixel-space network"):
        EncodedDataset(tmp_path / "ok.zip").check_compatible(load_network(PIXEL))
    cases = [
        ("c3.zip", _raw(2, c=3), [0, 1], "have channels 3 but the teacher has 4"),
        ("r4.zip", _raw(2, r=4), [0, 1], "have resolution 4 but the teacher has 8"),
        ("none.zip", _raw(2), None, "have no labels"),
        ("c12.zip", _raw(2), [0, 11], "class indices up to 11 but the teacher has label_dim 10"),
    ]
    for name, raw, labels, message in cases:
        write_encoded_dataset(tmp_path / name, raw, labels)
        with pytest.raises(EncodedDatasetError, match=message):
            EncodedDataset(tmp_path / name).check_compatible(latent)


def test_workers_read_the_zip_through_their_own_handles(tmp_path):
    raw = _raw(8)
    write_encoded_dataset(tmp_path / "lat.zip", raw, list(range(8)))
    data = EncodedDataset(tmp_path / "lat.zip")
    data[0]  # the parent's handle is open: workers must not share it
    batches = {}
    for workers in (0, 2):
        stream = BatchStream(data, 2, seed=1, workers=workers, errors=(ImageDatasetError,))
        batches[workers] = [stream.next(torch.device("cpu")) for _ in range(4)]
    for (x0, k0), (x2, k2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(k0, k2)
        assert torch.equal(x0, torch.from_numpy(raw[k0.numpy()]))  # label i is entry i


def test_make_dataset_encode_writes_the_vaes_raw_latents(tmp_path, tiny_vae):
    """`make-dataset --encode` writes what LatentCodec.encode_raw gives for each image (the VAE reads [0, 1])."""
    from click.testing import CliRunner

    from dmd.cli import main
    from dmd.edm2.encoders import EncoderInfo
    from dmd.edm2.vae import LatentCodec, load_vae

    images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    write_image_dataset(tmp_path / "img16.zip", images, labels=[4, 0, 7])
    args = ["make-dataset", str(tmp_path / "img16.zip"), str(tmp_path / "img16-sd.zip"), "--encode"]
    result = CliRunner().invoke(main, [*args, "--vae", str(tiny_vae), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0 and "3 latents of 16x16 images, 8x8x8 (mean, std), 3 classes" in result.output
    data = EncodedDataset(tmp_path / "img16-sd.zip")
    assert (len(data), data.channels, data.resolution) == (3, 4, 8) and data.labels.tolist() == [4, 0, 7]
    codec = LatentCodec(load_vae(tiny_vae), EncoderInfo("StabilityVAEEncoder", vae_name="tiny", batch_size=8))
    expected = codec.encode_raw(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(torch.stack([data[i][0] for i in range(3)]), expected)
    bad = CliRunner().invoke(main, [*args[:2], str(tmp_path / "x.zip"), "--encode", "--vae", str(tmp_path / "none")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "--vae" in bad.output, bad.output
