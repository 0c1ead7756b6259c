"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one.

Files are created with mode 0o666 and the kernel applies the umask (and a folder's default ACL) as for any new file,
so a shared run folder stays readable to the group the umask allows; `tempfile.mkstemp` would force 0o600. A write
that runs out of space or quota raises `DiskFullError` naming the file, and the file it would have replaced is left
as it was.
"""

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import torch

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC) or quota (EDQUOT); the file it was replacing is untouched."""

    def __init__(self, path, code):
        super().__init__(code, f"{path}: {_FULL[code]} while writing; the previous file, if any, is untouched")
        self.filename = str(path)

    def __str__(self):
        return self.strerror


@contextmanager
def atomic_path(path, fsync=True):
    """Yield a temporary path beside `path`; on success move it onto `path` with `os.replace`, else delete it.

    fsync=False skips flushing the data to disk first: a crash may then lose the file, never leave half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _FULL:  # also re-raised by an enclosing atomic_path, so the message names the final file
            raise DiskFullError(path, e.errno) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_name_length(path):
    """Raise ValueError if a component of `path` is longer than its filesystem takes (NAME_MAX, 255 bytes on most),
    so that a write can be refused before the work instead of failing after it."""
    path = Path(path)
    folder = next((p for p in path.parents if os.path.isdir(p)), Path("."))  # isdir: False, not OSError, if too long
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the common limit
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"the name {part[:40]}... is {len(os.fsencode(part))} bytes; its filesystem takes {limit}")


def _create_temp(path):
    """Create an empty, uniquely named file beside `path` with mode 0o666 less the umask; return its Path.

    The name keeps at most the first 40 characters of `path`'s name, so that it is never longer than `path`'s by more
    than a few characters and a name the filesystem takes (up to 255 bytes) never fails at the temporary file, after
    the work.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name[:40]}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


# A write-only file object that remembers the OSError its writes raised: torch.save turns one into a RuntimeError
# ("unexpected pos ...") that has lost its errno, so a full disk would otherwise not be recognised.
class _RecordingWriter:
    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def atomic_torch_save(obj, path):
    """`torch.save` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def atomic_save_image(image, path):
    """Write a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def atomic_write_text(text, path):
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
