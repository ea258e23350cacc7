"""What the benchmark drivers share (they are scripts, not a package: each puts this folder on
``sys.path`` before importing it)."""

from __future__ import annotations


def set_threads(n: int | None) -> None:
    """``n`` threads for torch and for numba's kernels (at most ``NUMBA_NUM_THREADS``); ``None``
    or 0 leaves both as they are."""
    if not n:
        return
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
