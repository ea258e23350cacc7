"""Atomic file writes: the one helper every file supsup writes goes through.

A write goes to a temporary file in the destination directory, is flushed and fsynced, then
renamed over the destination (and the directory fsynced): a process killed at any moment
leaves either the old file or the new one, never a torn one. The new file gets the mode any
other new file would get (``0o666`` minus the user's umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ._faults import maybe_crash

__all__ = ["ChecksumMismatch", "atomic_write", "atomic_write_bytes", "atomic_write_text", "current_umask"]


class ChecksumMismatch(ValueError):
    """The bytes written do not have the expected SHA-256 (nothing was put in place)."""


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry to disk where the platform allows it."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """Create ``path`` atomically from ``write(tmp_path)``, which fills a temporary file next to
    it (a library that writes files by name, e.g. matplotlib's ``savefig``, can write there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes | memoryview], *,
                       sha256: str | None = None, crash_point: str | None = None,
                       suffix: str = ".tmp") -> None:
    """Write ``data`` (bytes, or an iterable of chunks) to ``path`` atomically.

    Args:
        sha256: if given, the written bytes must have this digest, else :class:`ChecksumMismatch`
            is raised and nothing is put in place.
        crash_point: a fault-injection point (``SUPSUP_CRASH_AT``, tests only) hit after the
            first half of ``data`` is written.
    """
    chunks: Iterable[bytes | memoryview]
    if isinstance(data, (bytes, bytearray, memoryview)):
        half = len(data) // 2
        chunks = (data[:half], data[half:])
    else:
        chunks = data

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            for i, chunk in enumerate(chunks):
                if i == 1 and crash_point:
                    f.flush()
                    maybe_crash(crash_point)
                digest.update(chunk)
                f.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ChecksumMismatch(f"{Path(path).name}: SHA-256 mismatch (got {digest.hexdigest()}, expected {sha256})")

    atomic_write(path, write, suffix=suffix)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())
