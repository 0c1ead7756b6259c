"""FID: statistics and the Frechet distance against numpy/scipy, `fid ref`/`fid calc` on PNGs, ZIPs and networks."""

import io
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from conftest import Call, numpy1_spelling, pickled_array

from dmd.checkpoint import save_snapshot
from dmd.cli import main
from dmd.fid import (
    FeatureStats,
    FIDError,
    ImageFiles,
    calc_fid,
    detect,
    frechet_distance,
    generator_fid,
    load_ref,
    save_ref,
)
from dmd.generate import DMDGenerator

PKL = Path(__file__).parent / "fixtures" / "edm_ddpmpp_cond.pkl"


# A stand-in for the Inception detector with its call signature: fixed random projections of 4x4-pooled pixels.
class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 16, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, return_features: bool = True):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # (N, 3 * 4 * 4)
        return pooled @ self.proj / 255  # (N, 16)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyDetector()), str(path))
    return path


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, detector_path):
    """40 PNGs from `dmd generate` with the FID protocol's labels (seed s -> class s % 10)."""
    out = tmp_path_factory.mktemp("pngs")
    args = ["generate", "--network", str(PKL), "--outdir", str(out), "--seeds", "0-39", "--class-balanced"]
    result = CliRunner().invoke(main, [*args, "--batch", "40", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def numpy_fid(f1, f2):
    """FID straight from two feature sets with numpy and scipy, in float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))


def stats_of(features, chunk):
    stats = FeatureStats()
    for lo in range(0, len(features), chunk):
        stats.append(torch.from_numpy(features[lo : lo + chunk]))
    return stats.mu_sigma()


def fid_number(output):
    return float(re.search(r"FID: (\S+)", output).group(1))


def test_statistics_and_fid_match_numpy():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    f2 = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.3
    mu1, sigma1 = stats_of(f1, chunk=64)
    np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma1, np.cov(f1, rowvar=False), rtol=1e-10, atol=1e-12)
    mu2, sigma2 = stats_of(f2, chunk=200)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(numpy_fid(f1, f2), rel=1e-9)
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-8


def test_fid_of_diagonal_gaussians():
    # Closed form for diagonal covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 5.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_ref_then_calc_on_the_same_images_is_zero(pngs, detector_path, tmp_path):
    det = ["--detector", str(detector_path), "--device", "cpu", "--batch", "16"]
    result = CliRunner().invoke(main, ["fid", "ref", "--data", str(pngs), "--dest", str(tmp_path / "ref.npz"), *det])
    assert result.exit_code == 0, result.output
    mu, sigma = load_ref(tmp_path / "ref.npz")
    assert sorted(np.load(tmp_path / "ref.npz").files) == ["mu", "sigma"] and sigma.shape == (16, 16)

    # The statistics equal numpy's on the detector's features of the PNGs.
    files = ImageFiles(pngs)
    features = detect(torch.jit.load(str(detector_path)), np.stack([files.read(i) for i in range(40)]), "cpu")
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-8, atol=1e-12)

    args = ["fid", "calc", "--images", str(pngs), "--ref", str(tmp_path / "ref.npz"), "--num", "40", *det]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert abs(fid_number(result.output)) < 1e-6


def test_pngs_zip_and_network_give_the_same_fid(pngs, detector_path, tmp_path):
    rng = np.random.default_rng(1)
    save_ref(rng.normal(size=16) * 0.01, np.eye(16) * 1e-3, tmp_path / "ref.npz")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for png in sorted(pngs.glob("*.png")):
            z.write(png, f"00000/{png.name}")
    det = ["--ref", str(tmp_path / "ref.npz"), "--detector", str(detector_path), "--device", "cpu"]
    scores = []
    for source in (["--images", str(pngs)], ["--images", str(tmp_path / "images.zip")], ["--network", str(PKL)]):
        result = CliRunner().invoke(main, ["fid", "calc", *source, "--num", "40", "--batch", "16", *det])
        assert result.exit_code == 0, result.output
        scores.append(fid_number(result.output))
    assert scores[0] > 0.01
    assert scores[1] == pytest.approx(scores[0], abs=2e-6)  # printed with 6 decimals
    assert scores[2] == pytest.approx(scores[0], abs=2e-6)

    # In full precision: the PNG route and the library call the training loop makes.
    detector = torch.jit.load(str(detector_path))
    from_pngs = calc_fid(tmp_path / "ref.npz", images=pngs, num=40, detector=detector_path, device="cpu")
    generator = DMDGenerator(PKL, device="cpu")
    from_network = generator_fid(
        generator.generate_batch,
        tmp_path / "ref.npz",
        seeds=range(40),
        label_dim=generator.label_dim,
        detector=detector,
        batch_size=40,
    )
    assert from_network == pytest.approx(from_pngs[0], rel=1e-9)


def test_repeats_score_disjoint_seed_ranges(detector_path, tmp_path):
    save_ref(np.zeros(16), np.eye(16) * 1e-3, tmp_path / "ref.npz")
    det = ["--ref", str(tmp_path / "ref.npz"), "--detector", str(detector_path), "--device", "cpu", "--batch", "20"]
    result = CliRunner().invoke(main, ["fid", "calc", "--network", str(PKL), "--num", "20", "--repeats", "2", *det])
    assert result.exit_code == 0, result.output
    per_repeat = [float(v) for v in re.findall(r"repeat \d: FID (\S+)", result.output)]
    assert len(per_repeat) == 2 and per_repeat[0] != per_repeat[1]
    assert fid_number(result.output) == min(per_repeat)
    assert "FID over 2 seed ranges: min" in result.output and "+-" in result.output

    second = CliRunner().invoke(main, ["fid", "calc", "--network", str(PKL), "--num", "20", "--seeds", "20-39", *det])
    assert fid_number(second.output) == pytest.approx(per_repeat[1], abs=2e-6)


def test_grayscale_is_repeated_to_three_channels(detector_path, tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    PIL.Image.fromarray(gray, "L").save(tmp_path / "a.png")
    PIL.Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB").save(tmp_path / "b.png")
    files = ImageFiles(tmp_path)
    det = torch.jit.load(str(detector_path))
    assert files.read(0).shape == (8, 8, 1) and files.read(1).shape == (8, 8, 3)
    torch.testing.assert_close(detect(det, files.read(0)[None], "cpu"), detect(det, files.read(1)[None], "cpu"))


def test_subset_is_edm_random_subset(pngs, detector_path):
    # More images than --num: EDM's fid.py keeps the first num of a RandomState(0) shuffle, sorted.
    from dmd.fid import image_stats

    det = torch.jit.load(str(detector_path))
    mu, _ = image_stats(pngs, det, num=30, batch_size=16, progress=False)
    indices = np.arange(40)
    np.random.RandomState(0).shuffle(indices)
    files = ImageFiles(pngs)
    features = detect(det, np.stack([files.read(i) for i in sorted(indices[:30])]), "cpu")
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-10, atol=1e-12)


def test_errors(pngs, detector_path, tmp_path):
    np.savez(tmp_path / "bad_ref.npz", mu=np.zeros(16))
    save_ref(np.zeros(16), np.eye(16), tmp_path / "ref.npz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_script.pt").write_bytes(b"garbage")
    det = ["--detector", str(detector_path), "--device", "cpu"]
    ref = ["--ref", str(tmp_path / "ref.npz")]
    cases = [
        (["--images", str(pngs), *ref, "--num", "41"], "40 images, fewer than --num-images 41"),
        (["--images", str(pngs), "--ref", str(tmp_path / "bad_ref.npz"), "--num", "40"], "missing key(s) ['sigma']"),
        (["--images", str(pngs), "--ref", str(tmp_path / "nope.npz"), "--num", "40"], "nope.npz"),
        (["--images", str(pngs), "--network", str(PKL), *ref], "exactly one of --images and --network"),
        (["--images", str(pngs), *ref, "--repeats", "2"], "--repeats needs --network"),
        (["--network", str(PKL), *ref, "--num", "10", "--seeds", "0-4"], "--seeds gives 5 seeds"),
        (["--images", str(tmp_path / "empty"), *ref], "no images found"),
        (["--network", str(tmp_path / "bad_ref.npz"), *ref, "--num", "4"], "bad_ref.npz"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["fid", "calc", *args, *det])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    not_script = ["--detector", str(tmp_path / "not_script.pt")]
    result = CliRunner().invoke(main, ["fid", "calc", "--images", str(pngs), *ref, "--num", "40", *not_script])
    assert result.exit_code == 1 and "not a TorchScript module" in result.output, result.output
    with pytest.raises(FIDError, match="at least 2 images"):
        FeatureStats().mu_sigma()


def test_reference_of_another_feature_size_is_refused_at_the_first_batch(pngs, detector_path, tmp_path):
    ref = tmp_path / "ref64.npz"
    save_ref(np.zeros(64), np.eye(64), ref)  # 64-d statistics; the detector gives 16-d features
    message = f"--ref {ref} holds statistics of 64-dimensional features, but the detector gives 16"
    det = ["--ref", str(ref), "--detector", str(detector_path), "--device", "cpu", "--num", "40", "--batch", "8"]
    for source in (["--images", str(pngs)], ["--network", str(PKL)]):
        result = CliRunner().invoke(main, ["fid", "calc", *source, *det])
        assert result.exit_code == 1 and message in result.output, result.output

    # The library call refuses after one batch of 10, before generating the other 30 images.
    generator = DMDGenerator(PKL, device="cpu")
    calls = []

    def generator_fn(seeds, class_ids):
        calls.append(len(seeds))
        return generator.generate_batch(seeds, class_ids)

    mu, sigma = load_ref(ref)
    with pytest.raises(FIDError, match="the reference holds statistics of 64-dimensional features, but the .* 16"):
        generator_fid(generator_fn, (mu, sigma), seeds=range(40), label_dim=10, detector=TinyDetector(), batch_size=10)
    assert calls == [10]
    with pytest.raises(FIDError, match=r"mu \(16,\), sigma \(16, 16\) cannot be compared with .* mu \(64,\)"):
        frechet_distance(np.zeros(16), np.eye(16), mu, sigma)
    np.savez(tmp_path / "empty.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    with pytest.raises(FIDError, match=r"empty.npz: mu \(0,\) and sigma \(0, 0\) are not \(D,\) and \(D, D\)"):
        load_ref(tmp_path / "empty.npz")


def _npz_declaring(path, arrays):
    """An npz whose members are .npy headers declaring {name: (dtype, shape)} with no data behind them."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (dtype, shape) in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", header.getvalue())


def test_hostile_references_are_refused_from_their_headers(tmp_path):
    """A 300-byte npz declaring a 200000^2 sigma used to raise MemoryError (298 GiB) as a traceback; an object
    array, an .npy instead of an npz and a reference whose extra arrays are huge are one line or ignored."""
    _npz_declaring(tmp_path / "huge.npz", {"mu": ("<f8", (4,)), "sigma": ("<f8", (200000, 200000))})
    _npz_declaring(tmp_path / "objects.npz", {"mu": ("|O", (2,))})
    np.save(tmp_path / "plain.npy", np.zeros(4))
    cases = [
        ("huge.npz", r"'sigma' is declared float64 \(200000, 200000\); expected floats of at most 8192"),
        ("objects.npz", r"'mu' is declared object \(2,\)"),
        ("plain.npy", r"plain.npy: not a readable npz file \(File is not a zip file\)"),
    ]
    for name, message in cases:
        with pytest.raises(FIDError, match=message):
            load_ref(str(tmp_path / name))
    with zipfile.ZipFile(tmp_path / "extra.npz", "w") as z:  # arrays other than mu and sigma are never read
        for key, value in (("mu", np.arange(3.0)), ("sigma", np.eye(3))):
            with z.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
        z.writestr("features.npy", header.getvalue())
    mu, sigma = load_ref(str(tmp_path / "extra.npz"))
    assert mu.tolist() == [0.0, 1.0, 2.0] and sigma.tolist() == np.eye(3).tolist()


def _edm2_stats(seed=3, fid_dim=16, dino_dim=8):
    """Statistics in the layout of EDM2's calculate_metrics.py: float64 mu and sigma per metric, and num_images."""
    rng = np.random.default_rng(seed)
    stats = {"num_images": 50000}
    for metric, dim in (("fid", fid_dim), ("fd_dinov2", dino_dim)):
        features = rng.normal(size=(4 * dim, dim))
        stats[metric] = {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False)}
    return stats


def _pickled(obj):
    """obj as EDM2 pickles its references: pickle.dump's protocol 4 (Python 3.8-3.13's default; 3.14's is 5)."""
    return pickle.dumps(obj, protocol=4)


@pytest.mark.parametrize("numpy_version", [2, 1])
def test_edm2_reference_pickles_are_read(tmp_path, numpy_version):
    """EDM2's dataset-refs/img64.pkl layout, written by numpy 2 (`numpy._core`) or numpy 1 (`numpy.core`, as EDM2's
    released files are): the 'fid' entry by default, 'fd_dinov2' on request, the arrays exactly as pickled."""
    stats = _edm2_stats()
    data = _pickled(stats)
    path = tmp_path / "img64.pkl"
    path.write_bytes(data if numpy_version == 2 else numpy1_spelling(data))
    assert (b"numpy.core.multiarray" in path.read_bytes()) == (numpy_version == 1)
    for metric in ("fid", "fd_dinov2"):
        mu, sigma = load_ref(path, metric=metric) if metric != "fid" else load_ref(str(path))
        assert mu.dtype == sigma.dtype == np.float64
        assert np.array_equal(mu, stats[metric]["mu"]) and np.array_equal(sigma, stats[metric]["sigma"])


def test_fid_calc_reads_an_edm2_reference_as_its_npz(pngs, detector_path, tmp_path):
    """The same statistics as EDM's npz and as EDM2's pickle give the same FID through `fid calc --ref`."""
    mu, sigma = np.random.default_rng(4).normal(size=16) * 0.01, np.eye(16) * 1e-3
    save_ref(mu, sigma, tmp_path / "ref.npz")
    (tmp_path / "ref.pkl").write_bytes(_pickled({"fid": {"mu": mu, "sigma": sigma}}))
    det = ["--detector", str(detector_path), "--device", "cpu", "--num", "40", "--batch", "40"]
    scores = []
    for name in ("ref.npz", "ref.pkl"):
        result = CliRunner().invoke(main, ["fid", "calc", "--images", str(pngs), "--ref", str(tmp_path / name), *det])
        assert result.exit_code == 0, result.output
        scores.append(fid_number(result.output))
    assert scores[0] == scores[1] > 0.01
    with pytest.raises(FIDError, match=r"ref.npz: an npz holds FID statistics only, not 'fd_dinov2'"):
        load_ref(tmp_path / "ref.npz", metric="fd_dinov2")


def _hostile_references(sentinel):
    """{name: (pickle bytes, the phrase of the one-line error)}: each small, most using only the globals a reference
    pickle needs; none may run code, allocate what the file does not hold, or end in a traceback."""
    run = Call(os.system, f"touch {sentinel}")
    good = _edm2_stats()["fid"]
    cases = {
        "system": ({"fid": run}, f"refusing to load, the pickle names the global '{os.system.__module__}.system'"),
        "objects": ({"fid": {"mu": pickled_array((1,), "O", [run])}}, "sets the state of an object made by numpy"),
        "integers": ({"fid": dict(good, mu=pickled_array((16,), "i8", bytes(128)))}, "not a plain float array"),
        "declared_huge": (
            {"fid": dict(good, sigma=pickled_array((200000, 200000), "f8", bytes(8)))},
            r"declares 40000000000 elements of float64 and holds 8 bytes",
        ),
        "too_long": ({"fid": dict(good, mu=pickled_array((8193,), "f8", bytes(8 * 8193)))}, "at most 8192 per axis"),
        "list": ([good], r"the pickle holds a list, not EDM2's dict \{'fid': \{'mu', 'sigma'\}, \.\.\.\}"),
        "no_fid": ({"fd_dinov2": good}, r"no 'fid' entry in the pickle \(found: fd_dinov2\)"),
        "no_sigma": ({"fid": {"mu": good["mu"]}}, r"missing key\(s\) \['sigma'\]; found \['mu'\]"),
        "sigma_listed": ({"fid": dict(good, sigma=[[1.0]])}, r"'fid' has a 'sigma' that is a list, not a numpy array"),
        "sigma_of_another_size": ({"fid": dict(good, sigma=np.eye(3))}, r"mu \(16,\) and sigma \(3, 3\) are not"),
    }
    data = {name: (_pickled(obj), phrase) for name, (obj, phrase) in cases.items()}
    data["nested_deep"] = (b"\x80\x04" + b"]" * 2000 + b"a" * 1999 + b".", "nests objects deeper than 1000 levels")
    data["bytes_declared_huge"] = (
        b"\x80\x04}\x8c\x03fid\x8e" + struct.pack("<Q", 2**40) + b"s.",
        "truncated or corrupt",
    )
    data["truncated"] = (_pickled(_edm2_stats())[:300], "truncated or corrupt")
    return data


def test_hostile_edm2_references_are_refused_in_one_line(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    for name, (data, phrase) in _hostile_references(sentinel).items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(FIDError) as error:
            load_ref(path)
        message = str(error.value)
        assert re.match(rf"--ref {re.escape(str(path))}: .*{phrase}", message) and "\n" not in message, (name, message)
        assert len(message) < 300, (name, message)
    assert not sentinel.exists()
    with pytest.raises(FIDError, match=f"^--fid-ref {re.escape(str(path))}: "):  # train names its own flag
        load_ref(path, flag="--fid-ref")


def test_an_offline_detector_download_names_the_flag_that_avoids_it(pngs, tmp_path, monkeypatch):
    """A failed download of the Inception detector named only its URL; it now says how to work offline."""
    import dmd.utils.download
    from dmd.fid import DETECTOR_URL

    def offline(url, **kwargs):
        raise dmd.utils.download.DownloadError(f"could not download {url} after 5 attempts: ConnectionError")

    monkeypatch.setattr(dmd.utils.download, "open_url", offline)
    result = CliRunner().invoke(main, ["fid", "ref", "--data", str(pngs), "--dest", str(tmp_path / "ref.npz")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output == (
        f"Error: detector: could not download {DETECTOR_URL} after 5 attempts: ConnectionError; without internet, "
        "copy inception-2015-12-05.pt from a machine that has it and give --detector PATH\n"
    )


@pytest.mark.parametrize("command", ["ref", "calc"])
def test_detector_help_gives_the_call_signature(command):
    text = " ".join(CliRunner().invoke(main, ["fid", command, "--help"]).output.split())
    assert "called as detector(uint8 images (N, 3, H, W), return_features=True) -> (N, D) features" in text


def test_calc_fid_is_the_python_entry_point(detector_path, tmp_path):
    """`from dmd import calc_fid` scores a DMDGenerator in memory, as `fid calc --network` scores its file."""
    from dmd import DMDGenerator as Generator
    from dmd import calc_fid as public

    save_ref(np.random.default_rng(2).normal(size=16) * 0.01, np.eye(16) * 1e-3, tmp_path / "ref.npz")
    kwargs = dict(num=20, detector=detector_path, device="cpu", batch_size=8, progress=False)
    in_memory = public(tmp_path / "ref.npz", network=Generator(PKL, device="cpu"), **kwargs)
    from_file = calc_fid(tmp_path / "ref.npz", network=PKL, **kwargs)
    assert len(in_memory) == 1 and in_memory[0] > 0.01 and in_memory == from_file
    assert "Example:" in calc_fid.__doc__ and "from dmd import DMDGenerator, calc_fid" in calc_fid.__doc__


def test_fid_calc_refuses_repeated_seeds_and_names_a_run_folders_snapshot(detector_path, tmp_path):
    save_ref(np.zeros(16), np.eye(16) * 1e-3, tmp_path / "ref.npz")
    det = ["--ref", str(tmp_path / "ref.npz"), "--detector", str(detector_path), "--device", "cpu"]
    result = CliRunner().invoke(main, ["fid", "calc", "--network", str(PKL), "--num", "4", "--seeds", "0-2,2", *det])
    assert result.exit_code == 1
    assert result.output == "Error: --seeds gives seed 2 2 times; each seed is one image: list it once\n"

    run = tmp_path / "run"
    run.mkdir()
    save_snapshot(run / "network-snapshot-000004.pt", DMDGenerator(PKL, device="cpu").net, generator_sigmas=[80.0],
                  step=4, config={})  # fmt: skip
    result = CliRunner().invoke(main, ["fid", "calc", "--network", str(run), "--num", "4", *det])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{run}: a run folder; loading its newest snapshot, network-snapshot-000004.pt\n")


@pytest.mark.parametrize("command", ["ref", "calc"])
def test_bad_images_are_refused_before_the_detector_is_fetched(tmp_path, monkeypatch, command):
    """fid ref --data and fid calc --images open their images first: a bad folder is refused without a download."""
    import dmd.utils.download

    fetched = []
    monkeypatch.setattr(dmd.utils.download, "open_url", lambda url, **kwargs: fetched.append(url))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    args = {"ref": ["--data", str(bad), "--dest", str(tmp_path / "r.npz")], "calc": ["--images", str(bad)]}[command]
    extra = ["--ref", str(tmp_path / "r.npz")] if command == "calc" else []
    result = CliRunner().invoke(main, ["fid", command, *args, *extra])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {bad}/a.png: not a PNG image")
    assert fetched == []


def test_fid_and_fd_dinov2_in_one_pass(pngs, detector_path, dinov2_folder, tmp_path, monkeypatch):
    """`fid ref --metrics fid,fd_dinov2` writes EDM2's pickle of numpy's statistics of each detector's features;
    `fid calc` scores the same images ~0 on both and a generator's other seeds > 0, one line per metric per repeat,
    every generated image fed to both detectors (one generator call per batch, not one per metric)."""
    from dmd import calc_metrics
    from dmd.dinov2 import load_dinov2

    det = ["--detector", str(detector_path), "--dinov2", str(dinov2_folder), "--device", "cpu", "--batch", "16"]
    ref = tmp_path / "ref.pkl"
    result = CliRunner().invoke(
        main, ["fid", "ref", "--data", str(pngs), "--dest", str(ref), "--metrics", "fid,fd_dinov2", *det]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"{ref}: statistics of 16-d features (fid), 32-d features (fd_dinov2)\n"
    with open(ref, "rb") as f:
        data = pickle.load(f)  # EDM2's layout, as its calculate_metrics.py writes and reads it
    assert sorted(data) == ["fd_dinov2", "fid", "num_images"] and data["num_images"] == 40
    files = ImageFiles(pngs)
    pixels = np.stack([files.read(i) for i in range(40)])
    for metric, detector in (("fid", torch.jit.load(str(detector_path))), ("fd_dinov2", load_dinov2(dinov2_folder))):
        features = detect(detector, pixels, "cpu").double().numpy()
        mu, sigma = load_ref(ref, metric=metric)
        assert sorted(data[metric]) == ["mu", "sigma"] and np.array_equal(mu, data[metric]["mu"])
        np.testing.assert_allclose(mu, features.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-12)

    calc = ["fid", "calc", "--ref", str(ref), "--metrics", "fid,fd_dinov2", *det]
    result = CliRunner().invoke(main, [*calc, "--images", str(pngs), "--num", "40"])
    assert result.exit_code == 0, result.output
    same = dict(re.findall(r"^(FID|FD_DINOv2): (\S+)$", result.output, re.M))
    assert sorted(same) == ["FD_DINOv2", "FID"] and all(abs(float(v)) < 1e-4 for v in same.values()), result.output
    in_python = calc_metrics(ref, images=pngs, num=40, metrics=("fid", "fd_dinov2"), detector=detector_path,
                             dinov2=dinov2_folder, device="cpu", progress=False)  # fmt: skip
    assert len(in_python) == 1 and in_python[0]["fd_dinov2"] == pytest.approx(float(same["FD_DINOv2"]), abs=2e-6)

    calls = []
    generate_batch = DMDGenerator.generate_batch
    monkeypatch.setattr(DMDGenerator, "generate_batch", lambda self, seeds, **kw: calls.append(len(seeds))
                        or generate_batch(self, seeds, **kw))  # fmt: skip
    args = ["--network", str(PKL), "--seeds", "100-139", "--num", "20", "--repeats", "2"]
    result = CliRunner().invoke(main, [*calc, *args])
    assert result.exit_code == 0, result.output
    assert calls == [16, 4, 16, 4]
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "repeat 0", "repeat 0", "repeat 1", "repeat 1", "FID", "FID over 2 seed ranges", "FD_DINOv2",
        "FD_DINOv2 over 2 seed ranges",
    ]  # fmt: skip
    assert [line.split()[2] for line in lines[:4]] == ["FID", "FD_DINOv2", "FID", "FD_DINOv2"]
    assert all(float(line.split()[-1]) > 0.01 for line in lines[:4]), result.output


def test_metrics_errors_are_one_line(pngs, detector_path, dinov2_folder, tmp_path):
    """A metric the npz cannot hold, an unknown metric, and a reference whose fd_dinov2 entry is of another size."""
    det = ["--detector", str(detector_path), "--dinov2", str(dinov2_folder), "--device", "cpu"]
    ref = ["fid", "ref", "--data", str(pngs), *det]
    dest = tmp_path / "ref.npz"
    (tmp_path / "ref16.pkl").write_bytes(_pickled(_edm2_stats(fid_dim=16, dino_dim=16)))
    calc = ["fid", "calc", "--images", str(pngs), "--num", "40", "--ref", str(tmp_path / "ref16.pkl"), *det]
    cases = [
        ([*ref, "--dest", str(dest), "--metrics", "fid,fd_dinov2"],
         f"--dest {dest}: fid, fd_dinov2 statistics are written as EDM2's pickle; name it .pkl"),
        ([*ref, "--dest", str(dest), "--metrics", "fid,fid"],
         "--metrics fid,fid: give distinct names among fid, fd_dinov2"),
        ([*calc, "--metrics", "inception"], "--metrics inception: give distinct names among fid, fd_dinov2"),
        ([*calc, "--metrics", "fd_dinov2"],
         f"--ref {tmp_path / 'ref16.pkl'} holds statistics of 16-dimensional features, but the detector gives 32; "
         "make the reference with the same detector (`dmd fid ref --dinov2 ...`)"),
    ]  # fmt: skip
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output == f"Error: {message}\n", (args, result.output)
    assert not dest.exists()

    # A .pkl destination holds FID alone in EDM2's layout too.
    result = CliRunner().invoke(main, [*ref, "--dest", str(tmp_path / "fid.pkl")])
    assert result.exit_code == 0 and result.output == f"{tmp_path / 'fid.pkl'}: statistics of 16-d features\n"
    with open(tmp_path / "fid.pkl", "rb") as f:
        assert sorted(pickle.load(f)) == ["fid", "num_images"]
    assert load_ref(tmp_path / "fid.pkl")[0].shape == (16,)
