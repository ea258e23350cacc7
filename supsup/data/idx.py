"""The idx file format of MNIST: reading with validation, and headers/chunks for writing.

An idx file is a big-endian header -- two zero bytes, an element-type code (``0x08`` for
unsigned bytes), the number of dimensions, then one 32-bit size per dimension -- followed by
the elements in C order.  Only unsigned-byte files (all MNIST needs) are read or written here.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Sequence

import numpy as np

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "idx_chunks", "idx_header", "read_idx"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def idx_header(magic: int, dims: Sequence[int]) -> bytes:
    """The idx header for ``magic`` (see :data:`IDX_IMAGES_MAGIC`) and dimensions ``dims``."""
    return struct.pack(f">I{len(dims)}I", magic, *dims)


def idx_chunks(array: np.ndarray) -> list[bytes | memoryview]:
    """The content of the idx file holding ``array`` (uint8 images, 3-d, or labels, 1-d):
    its header and its elements, as chunks to write one after the other."""
    magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
    return [idx_header(magic, array.shape), memoryview(np.ascontiguousarray(array)).cast("B")]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST file format) into a numpy array.

    Args:
        path: An uncompressed idx file.

    Returns:
        A writable ``uint8`` array with the dimensions given in the header.

    Raises:
        ValueError: if the header is malformed, the element type is not unsigned
            byte, or the file size does not match the header.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data) or f.read(1):
            raise ValueError(f"{path}: file changed while being read")
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        magic = struct.unpack_from(">I", data, 0)[0]
        raise ValueError(
            f"{path}: bad idx magic number {magic} (0x{magic:08x}); expected an unsigned-byte idx "
            f"file such as {IDX_LABELS_MAGIC} (labels) or {IDX_IMAGES_MAGIC} (images)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes)")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    expected = header_size + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path}: size {len(data)} bytes does not match header dims {tuple(dims)} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
