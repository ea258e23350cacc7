"""One writer per run directory.

A run, a resumed run, ``supsup calibrate`` and ``supsup report`` write into a run directory;
two of them at once would interleave checkpoints and results (a ``torchrun`` launcher killed
with SIGKILL leaves its workers running, and a ``--resume`` of the same directory would race
them). Each writer holds an OS-level lock on ``DIR/.supsup-lock`` (``flock`` on POSIX,
``msvcrt.locking`` on Windows) while it works. The OS releases it when the process ends, by
any signal, so a killed run never leaves a stale lock behind. A second writer stops at once with
a :class:`RunLockedError` naming the process that holds the directory, before writing anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint import CheckpointError

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]

#: the lock file inside a run directory (left in place: its presence means nothing, the lock does)
LOCK_NAME = ".supsup-lock"


class RunLockedError(CheckpointError):
    """Another process is writing the run directory."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``out``'s writer lock while the block runs (``out`` must exist); ``what`` (e.g.
    ``"supsup run"``) is recorded for the message another writer gets.

    Raises:
        RunLockedError: another process holds it.
    """
    path = Path(out) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() if hasattr(os, "pread") else ""
            raise RunLockedError(f"{out} is being written by another process ({holder or 'unknown'}); one writer "
                                 "per run directory: wait for it to end, or stop it")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {what}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
