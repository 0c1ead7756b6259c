import hashlib
import http.server
import os
import stat
import threading

import pytest

from dmd.utils.download import DownloadError, cache_dir, cached_path, open_url

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, several download chunks


class _Server:
    """A local HTTP server on an ephemeral port serving PAYLOAD; the first `drops` requests die mid-body.

    framing: "length" sends Content-Length; "chunked" sends chunks of 100 kB and the closing zero-length chunk (a
    dropped request stops inside a chunk); "eof" sends neither and ends the body by closing the connection.
    """

    def __init__(self, drops=0, statuses=(), framing="length"):
        self.requests = 0
        self.drops = drops
        self.statuses = statuses  # error codes answered to the first requests
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked transfer encoding needs it

            def do_GET(self):
                owner.requests += 1
                if self.path.startswith("/missing"):
                    self.send_error(404)
                    return
                if owner.requests <= len(owner.statuses):
                    self.send_error(owner.statuses[owner.requests - 1])
                    return
                self.send_response(200)
                if framing == "length":
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                elif framing == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                body = PAYLOAD[: len(PAYLOAD) // 3] if owner.requests <= owner.drops else PAYLOAD
                if framing != "chunked":
                    self.wfile.write(body)  # a cut body ends at the socket's close, before any promised length
                    return
                for lo in range(0, len(body), 100_000):
                    chunk = PAYLOAD[lo : lo + 100_000]
                    self.wfile.write(b"%x\r\n" % len(chunk) + body[lo : lo + len(chunk)])
                    if lo + len(chunk) > len(body):
                        return  # cut inside this chunk
                    self.wfile.write(b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _fetch(url, cache, **kwargs):
    return open_url(url, cache_dir=cache, progress=False, retry_delay=0.01, **kwargs)


def test_download_then_cache_hit(tmp_path):
    with _Server() as server:
        url = f"{server.url}/nets/edm%20cifar.pkl?x=1"
        path = _fetch(url, tmp_path, sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert path.read_bytes() == PAYLOAD
        assert path.parent == tmp_path / "downloads"
        assert path.name == hashlib.sha256(url.encode()).hexdigest()[:16] + "_edm_cifar.pkl"
        assert _fetch(url, tmp_path) == path
        assert server.requests == 1  # the second call never reached the server
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [path.name]


def test_progress_bar_download(tmp_path, capsys):
    with _Server() as server:
        path = open_url(f"{server.url}/a.pkl", cache_dir=tmp_path, retry_delay=0.01, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert "1.00M" in capsys.readouterr().err
    with _Server() as server:  # stderr is no terminal here: by default no bar, as in a job's log
        open_url(f"{server.url}/b.pkl", cache_dir=tmp_path, retry_delay=0.01)
    assert capsys.readouterr().err == ""


def test_dropped_connection_is_retried(tmp_path):
    with _Server(drops=2) as server:
        path = _fetch(f"{server.url}/a.pkl", tmp_path, num_attempts=3)
        assert server.requests == 3
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_always_dropping_leaves_nothing(tmp_path):
    with _Server(drops=100) as server:
        url = f"{server.url}/a.pkl"
        with pytest.raises(DownloadError, match=f"could not download {url} after 3 attempts"):
            _fetch(url, tmp_path, num_attempts=3)
        assert server.requests == 3
    assert list((tmp_path / "downloads").iterdir()) == []  # neither a cache entry nor a temp file


def test_server_errors_are_retried(tmp_path):
    with _Server(statuses=[503, 429]) as server:
        path = _fetch(f"{server.url}/a.pkl", tmp_path)
        assert server.requests == 3
    assert path.read_bytes() == PAYLOAD


def test_stale_cache_entry_is_replaced_when_sha256_is_given(tmp_path):
    with _Server() as server:
        url = f"{server.url}/a.pkl"
        stale = cached_path(url, tmp_path)
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"half a file")
        assert _fetch(url, tmp_path).read_bytes() == b"half a file"  # without a checksum the cache is trusted
        assert _fetch(url, tmp_path, sha256=hashlib.sha256(PAYLOAD).hexdigest()).read_bytes() == PAYLOAD
        assert server.requests == 1


def test_http_error_is_not_retried(tmp_path):
    with _Server() as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            _fetch(f"{server.url}/missing.pkl", tmp_path)
        assert server.requests == 1


def test_sha256_mismatch_caches_nothing(tmp_path):
    with _Server() as server:
        url = f"{server.url}/a.pkl"
        with pytest.raises(DownloadError, match=f"{url}: sha256 .* does not match the expected 00ff"):
            _fetch(url, tmp_path, sha256="00ff")
        assert not cached_path(url, tmp_path).exists()
        assert list((tmp_path / "downloads").iterdir()) == []


def test_local_paths(tmp_path):
    file = tmp_path / "net.pkl"
    file.write_bytes(b"abc")
    assert open_url(str(file)) == file
    assert open_url(f"file://{file}") == file
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.pkl"):
        open_url(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        open_url(f"file://{tmp_path}/nope.pkl")
    with pytest.raises(DownloadError, match="sha256 does not match"):
        open_url(file, sha256="00")
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        open_url("ftp://example.org/a.pkl")


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "flag") == tmp_path / "flag"
    with _Server() as server:
        path = open_url(f"{server.url}/a.pkl", progress=False)
    assert path.parent == tmp_path / "env" / "downloads"
    monkeypatch.delenv("DMD_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dmd"


def test_cut_body_without_length_is_never_reused(tmp_path):
    # Neither Content-Length nor chunked framing: a cut body ends like a whole one, so no copy is trusted later.
    with _Server(drops=1, framing="eof") as server:
        url = f"{server.url}/a.pkl"
        with pytest.warns(UserWarning, match=f"{url}: .* cannot be proven complete"):
            first = _fetch(url, tmp_path)
        assert first.read_bytes() == PAYLOAD[: len(PAYLOAD) // 3]  # what this call got; nothing can tell it was cut
        assert first.parent == tmp_path / "downloads" / "unverified"
        assert not cached_path(url, tmp_path).exists()
        with pytest.warns(UserWarning, match="fetched again next time"):
            assert _fetch(url, tmp_path).read_bytes() == PAYLOAD
        assert server.requests == 2  # the cut copy was not reused

        # With the size known the body is checked, enters the cache, and the unproven copy goes.
        path = _fetch(url, tmp_path, size=len(PAYLOAD))
        assert path == cached_path(url, tmp_path) and path.read_bytes() == PAYLOAD
        assert not first.exists()
        assert _fetch(url, tmp_path, size=len(PAYLOAD)) == path and _fetch(url, tmp_path) == path
        assert server.requests == 3


def test_cut_body_without_length_is_retried_against_size_or_sha256(tmp_path):
    with _Server(drops=1, framing="eof") as server:
        path = _fetch(f"{server.url}/a.pkl", tmp_path, size=len(PAYLOAD))
        assert server.requests == 2 and path.read_bytes() == PAYLOAD
    with _Server(drops=100, framing="eof") as server:
        url = f"{server.url}/b.pkl"
        with pytest.raises(DownloadError, match=f"{url} after 3 attempts: sha256 .* the body may have been cut"):
            _fetch(url, tmp_path, sha256=hashlib.sha256(PAYLOAD).hexdigest(), num_attempts=3)
        with pytest.raises(DownloadError, match=f"after 3 attempts: .*{len(PAYLOAD) // 3} bytes, not the expected"):
            _fetch(url, tmp_path, size=len(PAYLOAD), num_attempts=3)
        assert server.requests == 6
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [path.name]  # nothing of b.pkl


def test_chunked_body_is_cached_only_when_it_ends_properly(tmp_path, recwarn):
    with _Server(framing="chunked") as server:
        url = f"{server.url}/a.pkl"
        path = _fetch(url, tmp_path)
        assert path == cached_path(url, tmp_path) and path.read_bytes() == PAYLOAD
        assert _fetch(url, tmp_path) == path and server.requests == 1
    assert not recwarn.list  # a closing chunk proves the end: no warning
    with _Server(drops=2, framing="chunked") as server:
        assert _fetch(f"{server.url}/b.pkl", tmp_path, num_attempts=3).read_bytes() == PAYLOAD
        assert server.requests == 3
    with _Server(drops=100, framing="chunked") as server:
        url = f"{server.url}/c.pkl"
        with pytest.raises(DownloadError, match=f"{url} after 2 attempts: ChunkedEncodingError"):
            _fetch(url, tmp_path, num_attempts=2)
        assert not cached_path(url, tmp_path).exists()
    assert len(list((tmp_path / "downloads").iterdir())) == 2  # a.pkl, b.pkl; no temp file


def test_size_is_checked(tmp_path):
    with _Server() as server:
        url = f"{server.url}/a.pkl"
        with pytest.raises(
            DownloadError, match=f"{url}: the server announces {len(PAYLOAD)} bytes, not the expected 5"
        ):
            _fetch(url, tmp_path, size=5)
        assert server.requests == 1  # the server's own length disagrees: retrying cannot help
        path = _fetch(url, tmp_path, size=len(PAYLOAD))
        assert path.read_bytes() == PAYLOAD
        with pytest.raises(DownloadError, match="not the expected"):
            _fetch(url, tmp_path, size=len(PAYLOAD) + 1)  # the cached copy has another size: not returned
        assert server.requests == 3
    assert path.read_bytes() == PAYLOAD  # the refused download left the cache entry as it was
    with pytest.raises(DownloadError, match=f"{path}: {len(PAYLOAD)} bytes, not the expected 7"):
        open_url(path, size=7)
    assert open_url(path, size=len(PAYLOAD)) == path


def test_cached_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with _Server() as server:
            path = _fetch(f"{server.url}/a.pkl", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # group-readable, as a lab's shared cache needs
