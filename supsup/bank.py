"""The mask bank as plain data: every masked layer's packed rows, keyed ``bank.<i>``.

A finished task's mask is stored at 1 bit per weight, in each layer's ``bank`` buffer
(:class:`~supsup.layers.SupermaskLayer`); these functions turn the rows of all layers into a
flat ``{"bank.<i>": (k, packed_nbytes(P_i)) uint8}`` mapping (what checkpoints and model files
hold) and back, strictly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from . import masks as M
from .layers import SupermaskLayer

__all__ = ["bank_sha256", "bank_state", "check_bank_state"]


def bank_state(layers: Sequence[SupermaskLayer]) -> dict[str, torch.Tensor]:
    """Packed bank rows per layer (exactly the banked masks), on the CPU."""
    return {f"bank.{i}": layer.bank_rows.detach().cpu().clone() for i, layer in enumerate(layers)}


def bank_sha256(layers: Sequence[SupermaskLayer], num_tasks: int | None = None) -> str:
    """SHA-256 of the packed bank, task by task (task 0's rows of every layer, then task 1's,
    ...): equal digests mean bitwise-equal masks. ``num_tasks`` hashes the first tasks only."""
    h = hashlib.sha256()
    k = layers[0].num_masks if num_tasks is None else num_tasks
    rows = [layer.bank_rows[:k].detach().cpu() for layer in layers]
    for t in range(k):
        for r in rows:
            h.update(r[t].numpy().tobytes())
    return h.hexdigest()


def check_bank_state(layers: Sequence[SupermaskLayer], state: dict[str, torch.Tensor],
                     capacity: int) -> list[torch.Tensor]:
    """Validate a bank mapping against ``layers``; returns each layer's rows, padded to whole
    64-bit words where a bank saved by 0.1.0 packed them to whole bytes.

    Raises:
        ValueError: missing or extra layers, different mask counts, more masks than
            ``capacity``, wrong dtype or row width.
    """
    expected = {f"bank.{i}" for i in range(len(layers))}
    if set(state) != expected:
        raise ValueError(f"bank state has keys {sorted(state)}, expected {sorted(expected)}")
    counts = {state[f"bank.{i}"].shape[0] for i in range(len(layers))}
    if len(counts) != 1:
        raise ValueError(f"bank layers hold different numbers of masks: {sorted(counts)}")
    (k,) = counts
    if k > capacity:
        raise ValueError(f"bank holds {k} masks, more than the model's capacity {capacity}")
    out = []
    for i, layer in enumerate(layers):
        t = state[f"bank.{i}"]
        want = (k, M.packed_nbytes(layer.num_weights))
        legacy = (layer.num_weights + 7) // 8
        if t.dtype == torch.uint8 and t.dim() == 2 and t.shape[0] == k and t.shape[1] == legacy != want[1]:
            # Banks saved by 0.1.0 packed rows to whole bytes; rows are now whole 64-bit
            # words. The padding bits are zero, so the masks are unchanged.
            t = torch.nn.functional.pad(t, (0, want[1] - legacy))
        if t.dtype != torch.uint8 or tuple(t.shape) != want:
            raise ValueError(f"bank.{i}: expected uint8 {want}, got {t.dtype} {tuple(t.shape)}")
        out.append(t)
    return out
