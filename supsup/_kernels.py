"""Compiled CPU kernels (numba): products with a packed mask bank, and a fused RMSprop step.

Private: :mod:`supsup.masks` and :mod:`supsup.optim` import this module lazily and fall back
to plain torch when numba is missing or the tensors are not on the CPU.

Why a kernel: task inference needs ``<M_i, u>`` for every mask ``M_i`` of the bank (paper
eq. 4). In torch that means unpacking each bit to a float and a matrix product, about 4 bytes
written and read per (mask, weight) pair. Here each 64-bit word of a mask selects which of 64
floats of ``u`` to add, so a pair costs one masked lane of a vector add and the bank is read
once, packed. Measured on this project's 2-core CPU (k = 250 masks of 1024 x 1024, one
inference): 14 ms against 148 ms for unpack + matmul.

Determinism: every mask's sum is computed by one thread in a fixed order (the blocking does
not depend on the thread count), so results repeat bit for bit; ``fastmath`` lets the 64 lanes
be summed as vectors, so they differ from a sequential float sum by rounding only.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

__all__ = ["bank_dot", "rmsprop_step", "set_threads", "threshold_weight"]


def set_threads(n: int) -> None:
    """Run the parallel kernels on ``n`` threads (at most numba's ``NUMBA_NUM_THREADS``)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))

#: masks handled by one task of the parallel loop, and 64-bit words of ``u`` per cache block
#: (``G * 512 * 64`` floats stay in L2 while a block of masks is processed)
MASKS_PER_BLOCK = 4
WORDS_PER_BLOCK = 512


@njit(parallel=True, fastmath=True, boundscheck=False, nogil=True, cache=True)
def _bank_dot(words, u, out, masks_per_block, words_per_block):  # pragma: no cover - compiled
    k, nw = words.shape
    G = u.shape[0]
    nblocks = (k + masks_per_block - 1) // masks_per_block
    for ib in prange(nblocks):
        i0 = ib * masks_per_block
        i1 = min(k, i0 + masks_per_block)
        acc = np.zeros((i1 - i0, G, 64), dtype=u.dtype)
        zero = u.dtype.type(0)
        for j0 in range(0, nw, words_per_block):
            j1 = min(nw, j0 + words_per_block)
            for i in range(i0, i1):
                for j in range(j0, j1):
                    w = words[i, j]
                    for g in range(G):
                        a = acc[i - i0, g]
                        for t in range(64):
                            # a select, not a branch: compiles to a masked vector add
                            a[t] += u[g, j, t] if (w >> np.uint64(t)) & np.uint64(1) else zero
        for i in range(i0, i1):
            for g in range(G):
                out[i, g] = acc[i - i0, g].sum()


def bank_dot(words: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``out[i, g] = sum_p bit_p(words[i]) * u[g, p]``.

    Args:
        words: ``(k, nw)`` uint64, row ``i`` the mask ``M_i`` as little-endian 64-bit words.
        u: ``(G, nw, 64)`` float32 or float64, C-contiguous (zero beyond the last weight).

    Returns:
        ``(k, G)`` of ``u``'s dtype.
    """
    out = np.zeros((words.shape[0], u.shape[0]), dtype=u.dtype)
    if words.shape[0] and words.shape[1]:
        _bank_dot(words, u, out, MASKS_PER_BLOCK, WORDS_PER_BLOCK)
    return out


@njit(parallel=True, boundscheck=False, nogil=True, cache=True)
def _rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay):  # pragma: no cover - compiled
    one_minus_alpha = 1.0 - alpha
    for i in prange(param.size):
        g = grad[i]
        if weight_decay != 0.0:
            g += weight_decay * param[i]
        v = square_avg[i] * alpha + one_minus_alpha * g * g
        square_avg[i] = v
        param[i] -= lr * g / (np.sqrt(v) + eps)


def rmsprop_step(param: np.ndarray, grad: np.ndarray, square_avg: np.ndarray, *, lr: float,
                 alpha: float, eps: float, weight_decay: float) -> None:
    """One RMSprop update in place, in one pass over flat float32 arrays (torch's formula:
    ``v = alpha v + (1 - alpha) g^2``, ``p -= lr g / (sqrt(v) + eps)``). Torch's eager RMSprop
    makes five passes (mul_, addcmul_, sqrt, add_, addcdiv_); for FC 1024's 2.4M scores the
    step is memory-bound, so one pass is about 3x faster."""
    dt = param.dtype.type
    _rmsprop_step(param, grad, square_avg, dt(lr), dt(alpha), dt(eps), dt(weight_decay))


@njit(parallel=True, boundscheck=False, nogil=True, cache=True)
def _threshold_weight(weight, scores, out):  # pragma: no cover - compiled
    for i in prange(weight.size):
        w = weight[i]
        out[i] = w if scores[i] >= 0 else w * 0.0  # w * 0: the signed zero torch's w * mask gives


def threshold_weight(weight: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``W * [scores >= 0]`` in one pass over flat float32 arrays (torch needs three: the
    comparison, the bool-to-float conversion and the product), bitwise equal to torch's."""
    out = np.empty_like(weight)
    _threshold_weight(weight, scores, out)
    return out
