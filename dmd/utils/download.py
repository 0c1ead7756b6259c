"""Resolve a local path or URL to a local file, downloading http(s) URLs once into a cache folder.

A download enters the cache only once it is proven complete: its byte count matches the server's Content-Length, a
chunked body ended with its closing chunk (urllib3 raises when the connection drops before it), or it matches the
caller's `sha256` / `size`. A short body, a cut chunked body and a mismatch against a size the server announced are
retried. A body that ends when the server closes the connection, with neither Content-Length nor chunked framing,
looks the same whole or cut off; without `sha256` or `size` to check it against, it is written to
`downloads/unverified/` instead, returned for this one call with a warning, and fetched again by the next call, so
a cut copy is never reused. Every file is moved into place atomically, so an interrupted download leaves nothing.
"""

import hashlib
import os
import posixpath
import re
import sys
import time
import urllib.parse
import warnings
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


def unverified_path(target):
    """Where a download that cannot be proven complete goes instead of `target`: never looked up, only overwritten."""
    return target.parent / "unverified" / target.name


def open_url(
    url_or_path,  # Local path, file:// URL or http(s):// URL.
    *,
    cache_dir=None,  # Cache folder; None = $DMD_CACHE_DIR or ~/.cache/dmd.
    sha256=None,  # Expected hex digest; a mismatching download is an error and is not cached.
    size=None,  # Expected size in bytes; a download of another size is an error and is not cached.
    num_attempts=5,  # Tries before giving up on dropped connections, short bodies and 5xx/429 answers.
    progress=None,  # tqdm bar while downloading: True, False, or None = when stderr is a terminal (not in logs).
    retry_delay=1.0,  # Seconds before the second try, doubled before each further one.
    timeout=60.0,  # Seconds to wait for the server to connect or to send more bytes.
):
    """Return a local Path for a file path, a file:// URL or an http(s):// URL (downloaded once into the cache)."""
    text = os.fspath(url_or_path)
    if not _SCHEME.match(text) or text.startswith("file://"):
        path = _local_path(text)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if size is not None and path.stat().st_size != size:
            raise DownloadError(f"{path}: {path.stat().st_size} bytes, not the expected {size}")
        if sha256 and sha256_file(path) != sha256.lower():
            raise DownloadError(f"{path}: sha256 does not match the expected {sha256}")
        return path
    if not text.startswith(("http://", "https://")):
        raise DownloadError(f"unsupported URL scheme (expected a path, file://, http:// or https://): {text}")

    target = cached_path(text, cache_dir)
    if target.is_file() and (size is None or target.stat().st_size == size):
        if not sha256 or sha256_file(target) == sha256.lower():
            return target
    last_error = None
    for attempt in range(num_attempts):
        try:
            return _download(text, target, sha256=sha256, size=size, progress=progress, timeout=timeout)
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


def _download(url, target, *, sha256, size, progress, timeout):
    """Stream `url` into a temp file, prove it complete, move it into place; return where it went (module docstring)."""
    import requests
    from tqdm import tqdm

    progress = sys.stderr.isatty() if progress is None else progress

    try:
        # identity encoding: the byte count we check against Content-Length is then the count on the wire.
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise _RetryableError(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise DownloadError(f"could not download {url}: HTTP {response.status_code}")
            # A chunked body ends with a zero-length chunk, and urllib3 raises when the connection closes before it;
            # Content-Length is then ignored, as RFC 9112 says.
            chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
            expected = None if chunked else _content_length(url, response.headers)
            if expected is not None and size is not None and expected != size:
                raise DownloadError(f"{url}: the server announces {expected} bytes, not the expected {size}")
            length_proven = chunked or expected is not None or size is not None
            dest = target if length_proven or sha256 else unverified_path(target)
            digest = hashlib.sha256()
            received = 0
            total = expected if expected is not None else size
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, disable=not progress
            )
            with bar, atomic_path(dest) as tmp, open(tmp, "wb") as f:
                for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                # urllib3 2 raises on a short body by itself; urllib3 1.x, which requests also accepts, does not.
                if expected is not None and received != expected:
                    raise _RetryableError(f"connection closed after {received} of {expected} bytes")
                if size is not None and received != size:
                    raise _RetryableError(f"connection closed after {received} bytes, not the expected {size}")
                if sha256 and digest.hexdigest() != sha256.lower():
                    mismatch = f"sha256 {digest.hexdigest()} does not match the expected {sha256}"
                    if length_proven:  # the whole file arrived: it is another file
                        raise DownloadError(f"{url}: {mismatch}")
                    raise _RetryableError(f"{mismatch}; the body may have been cut (the server sent no length)")
    except requests.RequestException as e:
        raise _RetryableError(f"{type(e).__name__}: {e}") from e
    if dest == target:
        unverified_path(target).unlink(missing_ok=True)  # a proven copy supersedes an earlier unproven one
    else:
        warnings.warn(
            f"{url}: the server sent neither Content-Length nor a chunked body, so this download cannot be proven "
            f"complete; it is used this once and fetched again next time (give sha256= or size= to cache it)",
            stacklevel=3,
        )
    return dest


def _content_length(url, headers):
    """The Content-Length header as an int, or None without one."""
    if "Content-Length" not in headers:
        return None
    try:
        return int(headers["Content-Length"])
    except ValueError:
        raise DownloadError(f"{url}: bad Content-Length header {headers['Content-Length']!r}") from None
