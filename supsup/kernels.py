"""Where the compiled CPU kernels (:mod:`supsup._kernels`, numba) run and where the plain
torch implementations do: the ``SUPSUP_KERNELS`` switch, the thread count the kernels use, and
the packed-bank dot product through the kernel. Everything has a torch twin, which runs on a
GPU and under ``SUPSUP_KERNELS=torch``."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

__all__ = ["KERNEL_MAX_COLUMNS", "KERNELS_ENV_VAR", "bit_kernels_available", "compiled_kernels", "kernel_dot",
           "kernel_ok", "kernel_threads"]


#: at most this many inferences go through the compiled kernel at once; more share one
#: unpack-and-matmul pass over the bank instead (faster from about 12 on, measured at k = 250)
KERNEL_MAX_COLUMNS = 8


#: environment variable: ``torch`` forces the plain torch implementations on the CPU too
#: (what runs on a GPU); unset or ``auto``: the compiled kernels where they apply
KERNELS_ENV_VAR = "SUPSUP_KERNELS"


@functools.lru_cache(maxsize=1)
def compiled_kernels():
    """:mod:`supsup._kernels`, or None when numba cannot be imported or ``SUPSUP_KERNELS=torch``."""
    choice = os.environ.get(KERNELS_ENV_VAR, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{KERNELS_ENV_VAR}={choice!r}: use 'torch' (torch implementations only) or 'auto'")
    if choice == "torch":
        return None
    try:
        from . import _kernels
    except ImportError:  # pragma: no cover - numba is a dependency; stay usable without it
        return None
    return _kernels


@contextlib.contextmanager
def kernel_threads() -> Iterator[None]:
    """Run a compiled kernel with torch's thread count, and leave torch's as it was.

    numba's OpenMP layer shares the OpenMP runtime with torch, and the first parallel launch
    resets that runtime's thread count to numba's default (every core), which would silently
    change torch's: a job given 1 thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads``)
    would run on all cores. So the kernel uses ``torch.get_num_threads()`` threads, and torch's
    count is put back if the launch changed it."""
    n = torch.get_num_threads()
    kernels = compiled_kernels()
    if kernels is not None:
        kernels.set_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def bit_kernels_available() -> bool:
    """True when the compiled CPU kernel for packed-bank products can be used."""
    return compiled_kernels() is not None


def kernel_ok(packed: torch.Tensor, u_dtype: torch.dtype, columns: int, use_kernel: bool | None,
               needs_grad: bool = False) -> bool:
    # The compiled kernel is not differentiable: a product that autograd must see takes the
    # torch path.
    if use_kernel is False or needs_grad or packed.device.type != "cpu" or u_dtype not in (torch.float32, torch.float64):
        return False
    if packed.shape[1] % 8 or not packed.is_contiguous():
        return False
    if use_kernel is None and columns > KERNEL_MAX_COLUMNS:
        return False
    return bit_kernels_available()


def kernel_dot(packed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(k, G)``: ``<M_i, u_g>`` with the compiled kernel; ``u`` is ``(G, P)``, ``P <= 8 * nbytes``."""
    k, nbytes = packed.shape
    G, P = u.shape
    nw = nbytes // 8
    buf = u.new_zeros(G, nw * 64)  # zero past the last weight: the padding bits are zero too
    buf[:, :P] = u
    words = packed.numpy().view("<u8")  # little-endian words: bit t of byte j is weight 8j + t
    with kernel_threads():
        out = compiled_kernels().bank_dot(words, buf.numpy().reshape(G, nw, 64))
    return torch.from_numpy(out)
