"""A Hopfield network that stores binary masks as attractors (HopSupSup, paper Sec. 3.5).

A mask ``m`` in {0, 1}^d is stored as the pattern ``x = 2m - 1`` in {-1, +1}^d by adding a
rank-two update to one ``d x d`` matrix ``W``; the masks themselves are not kept. A stored
pattern is (close to) a local minimum of the energy ``E(s) = -1/2 s^T W s``, so a state can
be pulled towards the nearest stored mask by lowering E (:func:`energy`, or the classical
sign dynamics of :func:`recall`).

Rules (``d`` the pattern length, ``I`` the identity, ``x`` the new pattern):

- ``hebbian``: ``W <- W + (x x^T - I) / d``, the paper's text (Eq. 5). Capacity about
  ``0.138 d`` patterns for recall with few errors, ``d / (2 ln d)`` for exact recall.
- ``storkey``: ``W <- W + (x x^T - I - x h^T - h x^T) / d`` with the local field ``h = W x``
  (before the update), as the official code does (its ``FastHopMaskBN.cache_masks``); the
  update subtracts what ``W`` already predicts from ``x``, so correlated patterns interfere
  less. Capacity about ``d / sqrt(2 ln d)`` (Storkey 1997). The textbook rule leaves the
  terms ``k = i, j`` out of ``h_ij``; the reference code, and so this one, does not.

All functions work on float tensors of any device; no state is global.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HOPFIELD_RULES", "HopfieldStore", "capacity_estimates", "energy", "hebbian_update", "recall",
           "storkey_update"]

HOPFIELD_RULES = ("storkey", "hebbian")


def hebbian_update(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W + (x x^T - I) / d``: ``W`` ``(d, d)``, ``x`` ``(d,)`` in {-1, +1}; returns a new matrix."""
    d = x.numel()
    return W + (torch.outer(x, x) - torch.eye(d, dtype=W.dtype, device=W.device)) / d


def storkey_update(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W + (x x^T - I - x h^T - h x^T) / d`` with ``h = W x``: ``W`` ``(d, d)``, ``x`` ``(d,)``."""
    d = x.numel()
    h = W @ x
    pre = torch.outer(x, h)
    return W + (torch.outer(x, x) - torch.eye(d, dtype=W.dtype, device=W.device) - pre - pre.T) / d


_UPDATES = {"hebbian": hebbian_update, "storkey": storkey_update}


def energy(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hopfield energy ``E(s) = -1/2 s^T W s`` of a state ``s`` ``(d,)`` (or ``(n, d)``, one
    energy per row); differentiable in ``s``."""
    return -0.5 * ((s @ W) * s).sum(-1)


def recall(W: torch.Tensor, s: torch.Tensor, *, max_steps: int = 100) -> tuple[torch.Tensor, int]:
    """Synchronous sign dynamics ``s <- sign(W s)`` (a zero field keeps the old sign) from ``s``
    ``(d,)`` or ``(n, d)`` in {-1, +1} until nothing changes or ``max_steps``; returns the final
    state and the steps taken. The classical way to read a Hopfield memory, used for the
    capacity measurements (HopSupSup itself recovers a mask by gradient descent on E)."""
    for step in range(1, max_steps + 1):
        field = s @ W  # W is symmetric: row i of W s is s @ W[:, i]
        new = torch.where(field == 0, s, field.sign())
        if torch.equal(new, s):
            return s, step - 1
        s = new
    return s, max_steps


def capacity_estimates(d: int) -> dict[str, float]:
    """The classical capacity estimates for ``d`` neurons: Hebbian with few errors ``0.138 d``
    (Amit, Gutfreund, Sompolinsky 1985), Hebbian exact ``d / (2 ln d)`` (McEliece et al. 1987),
    Storkey ``d / sqrt(2 ln d)`` (Storkey 1997)."""
    return {"hebbian_0.138d": 0.138 * d, "hebbian_exact": d / (2 * math.log(d)),
            "storkey": d / math.sqrt(2 * math.log(d))}


class HopfieldStore(nn.Module):
    """One layer's reservoir: the ``d x d`` matrix ``W`` plus the running sum of the stored
    patterns (recovery starts from their mean) and their count. Its size does not depend on
    how many masks it holds: ``(d^2 + d) * 4 + 8`` bytes in float32.

    Buffers (saved with the module): ``W`` ``(d, d)``, ``pattern_sum`` ``(d,)``, ``count`` ``()``.
    """

    def __init__(self, d: int, rule: str = "storkey", *, device: torch.device | str | None = None):
        super().__init__()
        if rule not in _UPDATES:
            raise ValueError(f"unknown Hopfield rule {rule!r}; choose one of {', '.join(HOPFIELD_RULES)}")
        if d < 1:
            raise ValueError(f"a Hopfield store needs at least 1 neuron, got {d}")
        self.d, self.rule = d, rule
        self.register_buffer("W", torch.zeros(d, d, device=device))
        self.register_buffer("pattern_sum", torch.zeros(d, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def num_patterns(self) -> int:
        return int(self.count)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def store(self, mask: torch.Tensor) -> None:
        """Add the binary ``mask`` ``(d,)`` (values 0/1, or a bool tensor) as ``x = 2 mask - 1``."""
        if mask.shape != (self.d,):
            raise ValueError(f"a mask for this store has shape ({self.d},), got {tuple(mask.shape)}")
        x = 2 * mask.to(self.W.dtype) - 1
        if not bool(((x == 1) | (x == -1)).all()):
            raise ValueError("a stored mask must be binary (0/1)")
        self.W.copy_(_UPDATES[self.rule](self.W, x))
        self.pattern_sum.add_(x)
        self.count.add_(1)

    def mean_pattern(self) -> torch.Tensor:
        """The mean of the stored patterns ``(d,)``, in [-1, 1] (where recovery starts)."""
        if self.num_patterns == 0:
            raise ValueError("the Hopfield store holds no pattern yet")
        return self.pattern_sum / self.count

    def energy(self, s: torch.Tensor) -> torch.Tensor:
        return energy(self.W, s)

    def extra_repr(self) -> str:
        return f"d={self.d}, rule={self.rule}"
