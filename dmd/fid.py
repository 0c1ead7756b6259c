"""FID as EDM computes it (Inception-v3 pool features of uint8 images, float64 statistics, scipy's sqrtm), and
EDM2's FD_DINOv2 beside it: the same Frechet distance of DINOv2 ViT-L/14 features (dmd/dinov2.py).

Each metric has a detector called as `detector(uint8 images (N, 3, H, W), return_features=True) -> (N, D)`: for
'fid' NVIDIA's TorchScript port of TF's `inception-2015-12-05` (D = 2048), or any TorchScript module with that call
signature (`--detector`); for 'fd_dinov2' DINOv2 (D = 1024; `--dinov2`). Images come from a PNG folder or ZIP (EDM's
dataset layout), or straight from a generator, quantised with `to_uint8` exactly as the PNGs would be; one pass feeds
every detector. Under torchrun each rank reads or generates its share and the feature sums are added over ranks, so
every rank gets the same statistics.

Reference statistics: EDM's npz ('mu', 'sigma'; FID only) or EDM2's pickle ({'fid': {'mu', 'sigma'}, 'fd_dinov2':
{'mu', 'sigma'}, 'num_images': N}). `make_ref` writes the pickle for a destination named .pkl, else the npz.
"""

import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dmd.images import ImageFolder
from dmd.utils import distributed
from dmd.utils.common import to_uint8

DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CIFAR10_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"  # EDM's CIFAR-10 statistics
METRICS = {"fid": "FID", "fd_dinov2": "FD_DINOv2"}  # EDM2's names (its pickles' keys) -> the names printed
DETECTOR_FLAGS = {"fid": "--detector", "fd_dinov2": "--dinov2"}  # the option choosing each metric's detector


class FIDError(ValueError):
    """Bad FID input: too few images, an unreadable reference or image, a detector that does not load."""


def load_detector(source=None, *, cache_dir=None, device="cpu", flag="--detector"):
    """Load a TorchScript feature detector (path or URL; None: the Inception-v3 of the EDM protocol); a failed
    download says how to work offline: a local copy given as `flag` PATH."""
    from dmd.utils.download import DownloadError, open_url

    source = DETECTOR_URL if source is None else source
    try:
        path = open_url(source, cache_dir=cache_dir)
        return torch.jit.load(str(path), map_location=device).eval()
    except DownloadError as e:
        name = Path(str(source)).name
        raise FIDError(
            f"detector: {e}; without internet, copy {name} from a machine that has it and give {flag} PATH"
        ) from e
    except FileNotFoundError as e:
        raise FIDError(f"detector: {e}") from e
    except RuntimeError as e:
        raise FIDError(f"detector {source}: not a TorchScript module ({' '.join(str(e).split())[:200]})") from e


def load_detectors(metrics, *, detector=None, dinov2=None, cache_dir=None, device="cpu"):
    """{metric: detector} for `metrics` ('fid': `detector` as load_detector takes it; 'fd_dinov2': `dinov2` as
    dmd.dinov2.load_dinov2 takes it), each loaded on rank 0 first, so that a download fills the cache once."""
    detectors = {}
    for metric in metrics:
        if metric == "fid":
            load = partial(load_detector, detector, cache_dir=cache_dir, device=device)
        else:
            from dmd.dinov2 import load_dinov2

            load = partial(load_dinov2, dinov2, cache_dir=cache_dir, device=device)
        detectors[metric] = distributed.main_first(load)
    return detectors


def check_metrics(metrics):
    """`metrics` as a tuple of known, distinct names; FIDError naming --metrics otherwise."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise FIDError(f"--metrics {','.join(metrics)}: give distinct names among {', '.join(METRICS)}")
    return metrics


MAX_FEATURES = 8192  # reference statistics of more features are refused before loading (Inception's: 2048)


def _read_npz_stats(path):
    """Return {'mu', 'sigma'} (those present in the npz at `path`) and the names of all its arrays.

    Every header is checked first (floats, at most two axes of at most MAX_FEATURES) and only then are the two arrays
    read, so a small file cannot ask for gigabytes; other arrays are never read.
    """
    fmt = np.lib.format
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        keys = [key for key in ("mu", "sigma") if f"{key}.npy" in names]
        for key in keys:
            with z.open(f"{key}.npy") as f:
                version = fmt.read_magic(f)
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read_header(f)
            if dtype.kind != "f" or len(shape) > 2 or any(n > MAX_FEATURES for n in shape):
                raise ValueError(f"'{key}' is declared {dtype} {shape}; expected floats of at most {MAX_FEATURES}")
        stats = {}
        for key in keys:
            with z.open(f"{key}.npy") as f:
                stats[key] = fmt.read_array(f, allow_pickle=False)
    return stats, sorted(name.removesuffix(".npy") for name in names)


# Reference statistics in EDM2's layout (calculate_metrics.py, dataset-refs/img64.pkl and img512.pkl): a pickled dict
# {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}, ...} of numpy float arrays, read without running it.
REF_ARRAYS_WHAT = "an EDM2 reference pickle"


def _read_pickle_stats(path, metric):
    """Return {'mu', 'sigma'} (those present) of entry `metric` of an EDM2 reference pickle and the names of that
    entry's keys; ValueError for a pickle of another layout."""
    from dmd.edm.persistence import ArrayLimits, PickledArray, read_array_pickle

    data = read_array_pickle(path, ArrayLimits("f", "float", MAX_FEATURES, MAX_FEATURES**2), REF_ARRAYS_WHAT)
    if not isinstance(data, dict):
        raise ValueError(f"the pickle holds a {type(data).__name__}, not EDM2's dict {{'fid': {{'mu', 'sigma'}}, ...}}")
    entry = data.get(metric)
    if entry is None:
        raise ValueError(
            f"no '{metric}' entry in the pickle (found: {', '.join(sorted(str(k)[:40] for k in data)[:10])})"
        )
    if not isinstance(entry, dict):
        raise ValueError(f"'{metric}' holds a {type(entry).__name__}, not a dict of 'mu' and 'sigma'")
    stats = {}
    for key in ("mu", "sigma"):
        if key in entry and not isinstance(entry[key], PickledArray):
            raise ValueError(f"'{metric}' has a '{key}' that is a {type(entry[key]).__name__}, not a numpy array")
        if key in entry:
            stats[key] = entry[key].array
    return stats, sorted(str(k)[:40] for k in entry)[:10]


def load_ref(ref, *, metric="fid", cache_dir=None, flag="--ref"):
    """Read reference statistics mu (D,) and sigma (D, D) as float64 arrays from a path or URL: EDM's npz (keys 'mu',
    'sigma') or EDM2's pickle (entry `metric`: 'fid' or 'fd_dinov2'; an npz holds 'fid' only). Errors are FIDError
    lines that start with `flag` and the reference."""
    from dmd.edm.persistence import NetworkLoadError
    from dmd.utils.download import DownloadError, open_url

    where, pickled = f"{flag} {ref}", False
    try:
        path = open_url(ref, cache_dir=cache_dir)
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # PROTO, which starts every pickle of protocol 2 or later (an npz: PK)
        if pickled:
            stats, names = _read_pickle_stats(path, metric)
        elif metric != "fid":
            raise FIDError(f"{where}: an npz holds FID statistics only, not '{metric}' (EDM2's pickles hold both)")
        else:
            stats, names = _read_npz_stats(path)
    except FIDError:
        raise
    except (DownloadError, FileNotFoundError) as e:
        raise FIDError(f"{flag}: {e}") from e
    except NetworkLoadError as e:  # names the local path; the user gave `ref`
        raise FIDError(f"{where}: {str(e).removeprefix(f'{path}: ')}") from e
    except ValueError as e:
        raise FIDError(f"{where}: {e}" if pickled else f"{where}: not a readable npz file ({e})") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise FIDError(f"{where}: not a readable npz file ({e})") from e
    missing = [key for key in ("mu", "sigma") if key not in stats]
    if missing:
        raise FIDError(f"{where}: missing key(s) {missing}; found {names}")
    mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    if mu.ndim != 1 or mu.shape[0] == 0 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


def save_ref(mu, sigma, dest):
    """Write reference statistics as EDM does (npz with 'mu' and 'sigma'), atomically."""
    from dmd.utils.io import atomic_path

    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def check_ref_dest(dest, metrics):
    """Refuse, before any work, a destination whose format cannot hold `metrics`: EDM's npz holds FID only."""
    if Path(dest).suffix.lower() != ".pkl" and metrics != ("fid",):
        raise FIDError(f"--dest {dest}: {', '.join(metrics)} statistics are written as EDM2's pickle; name it .pkl")


def save_refs(stats, dest, num_images):
    """Write {metric: (mu, sigma)} atomically: EDM2's pickle (plain dicts of float64 numpy arrays, which load_ref
    reads back without running code) for a destination named .pkl, else EDM's npz of 'fid'."""
    import pickle

    from dmd.utils.io import atomic_path

    check_ref_dest(dest, tuple(stats))
    if Path(dest).suffix.lower() == ".pkl":
        data = {"num_images": num_images, **{m: {"mu": mu, "sigma": sigma} for m, (mu, sigma) in stats.items()}}
        with atomic_path(dest) as tmp, open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)  # as EDM2's files (Python 3.8-3.13's default)
    else:
        save_ref(*stats["fid"], dest)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64, real part of scipy's sqrtm."""
    import scipy.linalg

    if np.shape(mu1) != np.shape(mu2) or np.shape(sigma1) != np.shape(sigma2):
        raise FIDError(
            f"statistics of shapes mu {np.shape(mu1)}, sigma {np.shape(sigma1)} cannot be compared with a reference's "
            f"mu {np.shape(mu2)}, sigma {np.shape(sigma2)}: the reference was made with another detector"
        )
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))  # EDM's disp=False result; the flag is deprecated
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


# Running float64 sums of features f (N, D): count, sum f and sum f f^T give mu and the unbiased covariance.
class FeatureStats:
    def __init__(self):
        self.num = 0
        self.sum = None  # (D,) float64
        self.sum_outer = None  # (D, D) float64

    def append(self, features):
        """Add a batch of features (N, D)."""
        f = features.to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.sum_outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.num += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def reduce(self, device):
        """Add the sums of every rank (a no-op for one process); a rank that saw no image adds zeros."""
        if not distributed.is_initialized():
            return
        import torch.distributed as dist

        dim = distributed.broadcast_object(None if self.sum is None else self.sum.shape[0])  # rank 0 has batch 0
        if dim is None:
            return
        if self.sum is None:
            self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
            self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        num = torch.tensor([float(self.num)], dtype=torch.float64, device=self.sum.device)
        for t in (num, self.sum, self.sum_outer):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.num = int(num.item())

    def mu_sigma(self):
        """Return mu = sum f / N and Sigma = (sum f f^T - N mu mu^T) / (N - 1) as float64 numpy arrays."""
        if self.num < 2 or self.sum is None:
            raise FIDError(f"statistics need at least 2 images, got {self.num}")
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# The detector, refusing features of another size than the reference's at its first batch, not after the whole pass.
class _SizeCheckedDetector:
    def __init__(self, detector, dim, ref_name, flag="--detector"):
        self.detector = detector
        self.dim = dim  # D of the reference's mu (D,)
        self.ref_name = ref_name  # for the message: "--ref PATH"
        self.flag = flag  # the option choosing this detector, for the message

    def __call__(self, x, return_features=True):
        features = self.detector(x, return_features=return_features)  # (N, D')
        if features.shape[1] != self.dim:
            raise FIDError(
                f"{self.ref_name} holds statistics of {self.dim}-dimensional features, but the detector gives "
                f"{features.shape[1]}; make the reference with the same detector (`dmd fid ref {self.flag} ...`)"
            )
        return features


def detect(detector, pixels, device):
    """Features (N, D) of uint8 images (N, H, W, C) numpy; one-channel images are repeated to three."""
    pixels = np.require(pixels, requirements=["C", "W"])  # torch wants a writable array
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.inference_mode():
        return detector(x, return_features=True)


# A PNG folder (searched recursively) or ZIP, read as EDM's ImageFolderDataset reads it: files sorted by name. The
# reader of the real images for training (dmd.images), raising FIDError.
class ImageFiles(ImageFolder):
    error = FIDError


def open_images(path, num=None):
    """The images of a folder or ZIP as ImageFiles, their first image read and at least `num` of them: bad data is
    refused before a detector is downloaded or a feature computed."""
    files = ImageFiles(path)
    files.shape  # noqa: B018 (reads and checks the first image)
    if num is not None and len(files) < num:
        raise FIDError(f"{path}: {len(files)} images, fewer than --num-images {num}")
    return files


def _stats(batches, pixels_of, detector, device, progress):
    """Statistics of the uint8 images (N, H, W, C) that pixels_of(batch) gives for each of this rank's batches, summed
    over ranks: one (mu, sigma), or {metric: (mu, sigma)} for `detector` a dict {metric: detector}, each image read
    or generated once for all of them."""
    from tqdm import tqdm

    detectors = detector if isinstance(detector, dict) else {"fid": detector}
    stats = {metric: FeatureStats() for metric in detectors}
    desc = ",".join(detectors)
    for batch in tqdm(batches, unit="batch", desc=desc, disable=not (progress and distributed.is_main())):
        pixels = pixels_of(batch)
        for metric, det in detectors.items():
            stats[metric].append(detect(det, pixels, device))
    for s in stats.values():
        s.reduce(device)
    result = {metric: s.mu_sigma() for metric, s in stats.items()}
    return result if isinstance(detector, dict) else result["fid"]


def image_stats(path, detector, *, num=None, seed=0, batch_size=256, device="cpu", progress=True):
    """mu, sigma of the images in a folder or ZIP (or ImageFiles): all of them, or a random subset of `num` as EDM's
    fid.py draws it; {metric: (mu, sigma)} for `detector` a dict {metric: detector}."""
    files = path if isinstance(path, ImageFiles) else open_images(path, num)
    indices = np.arange(len(files))
    if num is not None:
        if len(files) > num:  # EDM's ImageFolderDataset(max_size=num, random_seed=seed): shuffle, keep num, sort
            np.random.RandomState(seed).shuffle(indices)
            indices = np.sort(indices[:num])
    rank, world = distributed.get_rank(), distributed.get_world_size()
    batches = [indices[lo : lo + batch_size] for lo in range(0, len(indices), batch_size)][rank::world]

    def pixels_of(batch):  # the error names both files if sizes differ
        return np.stack([files.read_same_shape(i) for i in batch])

    return _stats(batches, pixels_of, detector, device, progress)


def generator_stats(generator_fn, seeds, label_dim, detector, *, batch_size=256, device="cpu", progress=False):
    """mu, sigma of generator_fn(seeds, class_ids) images in [-1, 1], with seed s labelled s % label_dim;
    {metric: (mu, sigma)} for `detector` a dict {metric: detector}."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise FIDError(f"FID needs at least 2 seeds, got {len(seeds)}")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    batches = [seeds[lo : lo + batch_size] for lo in range(0, len(seeds), batch_size)][rank::world]

    def pixels_of(batch):
        class_ids = torch.as_tensor(batch) % label_dim if label_dim > 0 else None
        return to_uint8(generator_fn(batch, class_ids))

    return _stats(batches, pixels_of, detector, device, progress)


def generator_fid(
    generator_fn,  # generator_fn(seeds: list[int], class_ids: LongTensor (N,) or None) -> (N, C, R, R) in [-1, 1].
    ref,  # Reference statistics (load_ref: EDM's npz or EDM2's pkl, path or URL), or a (mu, sigma) pair.
    *,
    seeds,  # Seeds of the images (e.g. range(10000)); seed s is labelled s % label_dim.
    label_dim,  # Classes of the generator; 0 = unconditional.
    detector=None,  # A loaded TorchScript detector, a path/URL, or None for the protocol's Inception-v3.
    batch_size=256,  # Images per generator call and detector call, per process.
    device="cpu",  # Where the detector runs.
    cache_dir=None,  # Download cache for URL references and detectors.
    progress=False,  # tqdm bar on rank 0.
):
    """FID of a generator's samples against reference statistics (every rank returns the same number)."""
    if isinstance(ref, (str, Path)):
        (mu_ref, sigma_ref), ref_name = load_ref(ref, cache_dir=cache_dir), f"--ref {ref}"
    else:
        (mu_ref, sigma_ref), ref_name = ref, "the reference"
    if detector is None or isinstance(detector, (str, Path)):
        detector = load_detector(detector, cache_dir=cache_dir, device=device)
    if not isinstance(detector, _SizeCheckedDetector):  # calc_metrics' own check names the file
        detector = _SizeCheckedDetector(detector, mu_ref.shape[0], ref_name)
    mu, sigma = generator_stats(
        generator_fn, seeds, label_dim, detector, batch_size=batch_size, device=device, progress=progress
    )
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def calc_metrics(
    ref,  # Reference statistics: EDM's npz (FID only) or EDM2's pkl (an entry per metric), path or URL.
    *,
    metrics=("fid",),  # Any of 'fid' (Inception-v3) and 'fd_dinov2' (DINOv2 ViT-L/14), scored in one pass.
    images=None,  # A PNG folder or ZIP to score ...
    network=None,  # ... or a network: a DMDGenerator, or anything it loads (path, run folder, URL, hf://user/repo).
    num=50000,  # Images per score.
    seeds=None,  # Seeds for `network` (a list, each once); None: 0 .. repeats * num - 1.
    repeats=1,  # `network`: disjoint seed ranges of `num` seeds each, scored separately.
    num_steps=None,  # `network`: None = its own sigmas; N = edm_sampler in N steps (an EDM teacher).
    sampler_kwargs=None,  # edm_sampler's other settings with num_steps (sigma_min, sigma_max, rho, S_churn, ...).
    detector=None,  # 'fid': TorchScript detector path or URL; None: the protocol's Inception-v3.
    dinov2=None,  # 'fd_dinov2': a folder saved with save_pretrained or a Hub name; None: facebook/dinov2-large.
    batch_size=256,  # Images per call, per process.
    device="auto",  # 'auto', 'cpu', 'cuda', 'cuda:1'; under torchrun CUDA ranks use their local device.
    cache_dir=None,  # Download cache.
    progress=True,  # tqdm bar on rank 0.
    vae=None,  # `network` on VAE latents: its VAE (folder or Hub name); None: the name its file records.
    ema=None,  # `network`: a training state's or run folder's EMA by --ema name; 'none': G itself; None: the first.
):
    """Score images or a generator against reference statistics `ref` as EDM (FID) and EDM2 (FD_DINOv2) do; return
    one dict {metric: value} per repeat (a list).

    The Python face of `dmd fid calc`. A generator's images are scored straight from its samples, seed s labelled
    s % label_dim (EDM's class-balanced protocol), without writing PNGs; a folder or ZIP of PNGs is scored whole or,
    when it holds more than `num`, on EDM's random subset. Each image is generated or read once and fed to every
    metric's detector. Under torchrun every rank returns the same numbers. Bad input raises FIDError (or
    GeneratorLoadError for a network that does not load).

    Example:
        from dmd import calc_metrics
        ref = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl"
        scores = calc_metrics(ref, images="out", metrics=("fid", "fd_dinov2"))[0]  # {'fid': ..., 'fd_dinov2': ...}
    """
    from dmd.generate import DMDGenerator, load_guide, load_on_ranks, refuse_repeated_seeds

    metrics = check_metrics(metrics)
    if (images is None) == (network is None):
        raise FIDError("give exactly one of --images and --network")
    if images is not None and repeats != 1:
        raise FIDError("--repeats needs --network (each repeat scores its own seed range)")
    if images is not None and seeds is not None:
        raise FIDError("--seeds needs --network")
    if network is not None:
        seeds = list(range(repeats * num)) if seeds is None else list(seeds)
        if len(seeds) < repeats * num:
            raise FIDError(
                f"--seeds gives {len(seeds)} seeds; --num-images {num} x --repeats {repeats} needs {repeats * num}"
            )
        try:
            refuse_repeated_seeds(seeds[: repeats * num])  # a repeated seed would count one image twice
        except ValueError as e:
            raise FIDError(str(e)) from None
    files = None if images is None else open_images(images, num)
    device = distributed.setup_device(device)
    refs = {m: distributed.main_first(partial(load_ref, ref, metric=m, cache_dir=cache_dir)) for m in metrics}
    detectors = load_detectors(metrics, detector=detector, dinov2=dinov2, cache_dir=cache_dir, device=device)
    detectors = {
        m: _SizeCheckedDetector(detectors[m], refs[m][0].shape[0], f"--ref {ref}", DETECTOR_FLAGS[m]) for m in metrics
    }

    def scores(stats):
        return {m: frechet_distance(*stats[m], *refs[m]) for m in metrics}

    kwargs = dict(batch_size=batch_size, device=device, progress=progress)
    if images is not None:
        return [scores(image_stats(files, detectors, num=num, **kwargs))]
    if isinstance(network, DMDGenerator):
        generator = network
    else:
        generator = load_on_ranks(network, device=device, cache_dir=cache_dir, vae=vae, ema=ema)
    try:
        sampler_kwargs = load_guide(generator, sampler_kwargs, device=device, cache_dir=cache_dir)
    except ValueError as e:
        raise FIDError(str(e)) from None

    def generator_fn(batch, class_ids):
        return generator.generate_batch(seeds=batch, class_ids=class_ids, num_steps=num_steps, **(sampler_kwargs or {}))

    ranges = [seeds[r * num : (r + 1) * num] for r in range(repeats)]
    return [scores(generator_stats(generator_fn, s, generator.label_dim, detectors, **kwargs)) for s in ranges]


def calc_fid(ref, **kwargs):
    """Score images or a generator against reference statistics `ref` as EDM does; return one FID per repeat (a list).

    calc_metrics with metrics=('fid',), which takes the same arguments: `images` (PNG folder or ZIP) or `network`,
    `num`, `seeds`, `repeats`, `num_steps`, `sampler_kwargs`, `detector`, `batch_size`, `device`, `cache_dir`,
    `progress`.

    Example:
        from dmd import DMDGenerator, calc_fid
        G = DMDGenerator("runs/dmd-cifar10/network-snapshot-best.pt")
        ref = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"
        fid = calc_fid(ref, network=G, num=50000)[0]  # EDM's CIFAR-10 protocol: 50k images, classes s % 10
    """
    return [scores["fid"] for scores in calc_metrics(ref, metrics=("fid",), **kwargs)]


def make_ref(
    data,  # Image folder or ZIP; every image counts.
    dest,  # File to write: EDM2's pickle if named .pkl, else EDM's npz (FID only).
    *,
    metrics=("fid",),  # Any of 'fid' and 'fd_dinov2', computed in one pass.
    detector=None,  # 'fid': TorchScript detector path or URL; None: the protocol's Inception-v3.
    dinov2=None,  # 'fd_dinov2': a folder saved with save_pretrained or a Hub name; None: facebook/dinov2-large.
    batch_size=256,  # Images per detector call, per process.
    device="auto",  # As calc_metrics takes it.
    cache_dir=None,  # Download cache.
    progress=True,  # tqdm bar on rank 0.
):
    """Compute reference statistics of every image in a folder or ZIP and write them to `dest`; return
    {metric: (mu, sigma)}."""
    metrics = check_metrics(metrics)
    check_ref_dest(dest, metrics)
    files = open_images(data)
    device = distributed.setup_device(device)
    detectors = load_detectors(metrics, detector=detector, dinov2=dinov2, cache_dir=cache_dir, device=device)
    stats = image_stats(files, detectors, batch_size=batch_size, device=device, progress=progress)
    if distributed.is_main():
        save_refs(stats, dest, len(files))
    distributed.barrier()
    return stats
