"""Resolve a local path or URL to a local file, downloading http(s) URLs once into a cache folder."""

import hashlib
import os
import posixpath
import re
import time
import urllib.parse
from pathlib import Path

from dmd.utils.io import atomic_path

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A URL could not be fetched, or its contents failed verification."""


class _RetryableError(Exception):
    """A failed attempt worth repeating: a dropped connection, a short body, a 5xx or 429 answer."""


def cache_dir(override=None):
    """Return the cache folder: `override`, else $DMD_CACHE_DIR, else ~/.cache/dmd."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("DMD_CACHE_DIR"):
        return Path(os.environ["DMD_CACHE_DIR"]).expanduser()
    return Path.home() / ".cache" / "dmd"


def sha256_file(path):
    """Return the sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(url, override=None):
    """Return where `url` lives in the cache: `<cache>/downloads/<sha256(url)[:16]>_<basename>`."""
    basename = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename)[:128].lstrip(".") or "download"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache_dir(override) / "downloads" / f"{key}_{basename}"


def open_url(
    url_or_path,  # Local path, file:// URL or http(s):// URL.
    *,
    cache_dir=None,  # Cache folder; None = $DMD_CACHE_DIR or ~/.cache/dmd.
    sha256=None,  # Expected hex digest; a mismatching download is an error and is not cached.
    num_attempts=5,  # Tries before giving up on dropped connections, short bodies and 5xx/429 answers.
    progress=True,  # Show a tqdm progress bar while downloading.
    retry_delay=1.0,  # Seconds before the second try, doubled before each further one.
    timeout=60.0,  # Seconds to wait for the server to connect or to send more bytes.
):
    """Return a local Path for a file path, a file:// URL or an http(s):// URL (downloaded once into the cache)."""
    text = os.fspath(url_or_path)
    if not _SCHEME.match(text) or text.startswith("file://"):
        path = _local_path(text)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if sha256 and sha256_file(path) != sha256.lower():
            raise DownloadError(f"{path}: sha256 does not match the expected {sha256}")
        return path
    if not text.startswith(("http://", "https://")):
        raise DownloadError(f"unsupported URL scheme (expected a path, file://, http:// or https://): {text}")

    target = cached_path(text, cache_dir)
    if target.is_file() and (not sha256 or sha256_file(target) == sha256.lower()):
        return target
    last_error = None
    for attempt in range(num_attempts):
        try:
            _download(text, target, sha256=sha256, progress=progress, timeout=timeout)
            return target
        except _RetryableError as e:
            last_error = e
        if attempt + 1 < num_attempts:
            time.sleep(retry_delay * 2**attempt)
    raise DownloadError(f"could not download {text} after {num_attempts} attempts: {last_error}")


def _local_path(text):
    """Map a plain path or a file:// URL to a Path."""
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    return Path(text).expanduser()


def _download(url, target, *, sha256, progress, timeout):
    """Stream `url` into a temp file beside `target`, check its length (and sha256), then move it into place."""
    import requests
    from tqdm import tqdm

    try:
        # identity encoding: the byte count we check against Content-Length is then the count on the wire.
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise _RetryableError(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise DownloadError(f"could not download {url}: HTTP {response.status_code}")
            expected = int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
            digest = hashlib.sha256()
            received = 0
            bar = tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, disable=not progress
            )
            with bar, atomic_path(target) as tmp, open(tmp, "wb") as f:
                for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                # urllib3 2 raises on a short body by itself; urllib3 1.x, which requests also accepts, does not.
                if expected is not None and received != expected:
                    raise _RetryableError(f"connection closed after {received} of {expected} bytes")
                if sha256 and digest.hexdigest() != sha256.lower():
                    raise DownloadError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    except requests.RequestException as e:
        raise _RetryableError(f"{type(e).__name__}: {e}") from e
