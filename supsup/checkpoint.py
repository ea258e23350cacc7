"""Atomic, checksummed, pickle-free checkpoints.

One file, ``DIR/checkpoint.pt``::

    b"SUPSUPCK1\\n" + sha256(payload) (32 bytes) + payload

``payload`` is ``torch.save`` of a dict holding only tensors, numbers, strings, lists and
dicts (so it loads with ``torch.load(weights_only=True)``, which never unpickles arbitrary
objects): the packed mask bank, the active scores and optimizer state when a task is mid-way
(NN), and ``meta`` (a JSON string: library version, config, backbone identity, results so
far, loop state). It is written to a temporary file, fsynced, then renamed over the old one
(and the directory fsynced): killing the process at any moment leaves the previous or the
new checkpoint, both valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._faults import maybe_crash

__all__ = ["CheckpointError", "CHECKPOINT_NAME", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_MAGIC = b"SUPSUPCK1\n"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, _crash_point: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            if _crash_point:
                maybe_crash(_crash_point)
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (str -> tensor or nested plain data) and ``meta`` (JSON-able)."""
    buf = io.BytesIO()
    torch.save({"tensors": tensors, "meta": json.dumps(meta, sort_keys=True)}, buf)
    payload = buf.getvalue()
    path = Path(directory) / CHECKPOINT_NAME
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload, _crash_point="checkpoint_write")
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(tensors, meta)``.

    Raises:
        CheckpointError: missing file, wrong magic, checksum mismatch (truncated or corrupted),
            or content that is not plain tensors and data.
    """
    path = Path(directory) / CHECKPOINT_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    head = len(_MAGIC) + 32
    if len(raw) < head or not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a supsup checkpoint (bad header; truncated or foreign file)")
    digest, payload = raw[len(_MAGIC):head], raw[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 checksum does not match (truncated or modified); not using it")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        meta = json.loads(obj["meta"])
        tensors = obj["tensors"]
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(f"{path} has a valid checksum but unreadable content: {err}") from None
    if not isinstance(meta, dict) or not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: unexpected checkpoint structure")
    return tensors, meta
