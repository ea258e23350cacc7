"""Checksummed, pickle-free files: run checkpoints and saved models.

A file is ``MAGIC + sha256(payload) (32 bytes) + payload``. ``payload`` is ``torch.save`` of
a dict holding only tensors, numbers, strings, lists and dicts (so it loads with
``torch.load(weights_only=True)``, which never unpickles arbitrary objects): ``tensors`` (the
packed mask bank and, for a checkpoint taken mid-task, the active scores and optimizer state)
and ``meta`` (a JSON string). Files are written atomically (:mod:`supsup.fileio`): killing the
process at any moment leaves the previous file or the new one, both valid.

Two kinds, told apart by their magic so that one is never read as the other:

* ``DIR/checkpoint.pt`` of a run (:func:`save_checkpoint` / :func:`load_checkpoint`): meta
  holds the library version, config, backbone identity, results so far and loop state;
* a model file (:meth:`supsup.model.SupermaskModel.save`): meta holds the backbone identity.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_bytes

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_MAGIC",
    "MODEL_MAGIC",
    "CheckpointError",
    "load_checkpoint",
    "read_checksummed",
    "save_checkpoint",
    "write_checksummed",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_MAGIC = b"SUPSUPCK1\n"
MODEL_MAGIC = b"SUPSUPMD1\n"
_KINDS = {CHECKPOINT_MAGIC: "a supsup checkpoint", MODEL_MAGIC: "a supsup model file"}


class CheckpointError(RuntimeError):
    """A checkpoint or model file that is missing, corrupt, or does not match."""


def write_checksummed(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any], *,
                      magic: bytes, crash_point: str | None = None) -> Path:
    """Write ``tensors`` (str -> tensor or nested plain data) and ``meta`` (JSON-able) to
    ``path`` atomically, behind ``magic`` and the payload's SHA-256."""
    buf = io.BytesIO()
    torch.save({"tensors": tensors, "meta": json.dumps(meta, sort_keys=True)}, buf)
    payload = buf.getvalue()
    path = Path(path)
    atomic_write_bytes(path, magic + hashlib.sha256(payload).digest() + payload, crash_point=crash_point)
    return path


def read_checksummed(path: str | os.PathLike, *, magic: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a file written by :func:`write_checksummed`; returns ``(tensors, meta)``.

    Raises:
        CheckpointError: missing file, wrong magic (foreign file, or the other kind), checksum
            mismatch (truncated or corrupted), or content that is not plain tensors and data.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no {'checkpoint' if magic == CHECKPOINT_MAGIC else 'model file'} at {path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    head = len(magic) + 32
    if len(raw) < head or not raw.startswith(magic):
        other = next((what for m, what in _KINDS.items() if m != magic and raw.startswith(m)), None)
        if other is not None:
            raise CheckpointError(f"{path} is {other}, not {_KINDS[magic]}")
        raise CheckpointError(f"{path} is not {_KINDS[magic]} (bad header; truncated or foreign file)")
    digest, payload = raw[len(magic):head], raw[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 checksum does not match (truncated or modified); "
                              "not using it")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        meta = json.loads(obj["meta"])
        tensors = obj["tensors"]
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(f"{path} has a valid checksum but unreadable content: {err}") from None
    if not isinstance(meta, dict) or not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: unexpected file structure")
    return tensors, meta


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a run's ``DIR/checkpoint.pt``."""
    return write_checksummed(Path(directory) / CHECKPOINT_NAME, tensors, meta, magic=CHECKPOINT_MAGIC,
                             crash_point="checkpoint_write")


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a run's ``DIR/checkpoint.pt``; returns ``(tensors, meta)``."""
    return read_checksummed(Path(directory) / CHECKPOINT_NAME, magic=CHECKPOINT_MAGIC)
