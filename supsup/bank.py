"""The mask bank as plain data: every masked layer's packed rows, keyed ``bank.<i>``, and the
BatchNorm statistics banked with them.

A finished task's mask is stored at 1 bit per weight, in each layer's ``bank`` buffer
(:class:`~supsup.layers.SupermaskLayer`); these functions turn the rows of all layers into a
flat mapping (what checkpoints and model files hold) and back, strictly:

* ``bank.<i>``: ``(k, packed_nbytes(P_i))`` uint8, masked layer ``i``;
* ``norm.<j>``: ``(k, 2, C_j)`` float32, BatchNorm layer ``j``'s mean and variance per task
  (``per_task`` statistics);
* ``norm_running.<j>``: ``(2, C_j)`` float32, its running statistics (the shared ones, or the
  task in training's);
* ``task_classes`` (class-incremental streams): ``(k, c)`` int64, each task's classes, -1 padded;
* ``likelihood.*`` (tasks that banked likelihood statistics): see
  :func:`supsup.likelihood.pack_likelihoods`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from . import masks as M
from .layers import SupermaskLayer
from .likelihood import TaskLikelihood, pack_likelihoods, unpack_likelihoods
from .norm import TaskBatchNorm

__all__ = ["LIKELIHOOD_PREFIX", "TASK_CLASSES_KEY", "bank_entries", "bank_sha256", "bank_size", "bank_state",
           "check_bank_state", "likelihood_state", "mask_key", "norm_key", "norm_running_key", "task_classes_state",
           "task_rows", "task_sha256"]

# The key format: spelled out here and nowhere else.
LIKELIHOOD_PREFIX = "likelihood."
TASK_CLASSES_KEY = "task_classes"


def mask_key(i: int) -> str:
    """The key of masked layer ``i``'s packed rows."""
    return f"bank.{i}"


def norm_key(j: int) -> str:
    """The key of BatchNorm layer ``j``'s per-task statistics."""
    return f"norm.{j}"


def norm_running_key(j: int) -> str:
    """The key of BatchNorm layer ``j``'s running statistics."""
    return f"norm_running.{j}"


def bank_size(state: dict[str, torch.Tensor]) -> int:
    """How many tasks a bank mapping (or a file's tensors holding one) banks; 0 if none."""
    first = state.get(mask_key(0))
    return 0 if first is None else int(first.shape[0])


def task_rows(masks: Sequence[torch.Tensor], norms: Sequence[TaskBatchNorm] = ()) -> dict[str, torch.Tensor]:
    """One task's bank entries, on the CPU: ``masks`` (one bool tensor per masked layer) packed
    to ``(1, nbytes)`` rows, and the running statistics of the BatchNorm layers that keep
    per-task statistics as ``(1, 2, C)``."""
    state = {mask_key(i): M.pack_bits(m).unsqueeze(0).cpu() for i, m in enumerate(masks)}
    for j, bn in enumerate(norms):
        if bn.keeps_stats:
            state[norm_key(j)] = torch.stack([bn.running_mean, bn.running_var]).unsqueeze(0).cpu()
    return state


def task_classes_state(task_classes: dict[int, list[int]], num_tasks: int) -> dict[str, torch.Tensor]:
    """Each task's classes as ``{TASK_CLASSES_KEY: (k, c)}`` int64, -1 padded; ``{}`` if no task has any."""
    if not task_classes:
        return {}
    width = max(len(c) for c in task_classes.values())
    rows = torch.full((num_tasks, width), -1, dtype=torch.int64)
    for t, classes in task_classes.items():
        if t < num_tasks:
            rows[t, : len(classes)] = torch.tensor(classes, dtype=torch.int64)
    return {TASK_CLASSES_KEY: rows}


def bank_entries(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bank's entries among a file's tensors (a checkpoint also holds other state)."""
    prefixes = (mask_key(0)[:-1], norm_key(0)[:-1], norm_running_key(0)[:-1], TASK_CLASSES_KEY, LIKELIHOOD_PREFIX)
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def likelihood_state(tasks: Sequence[TaskLikelihood | None]) -> dict[str, torch.Tensor]:
    """The tasks' likelihood statistics as bank entries ``likelihood.*`` (none when no task has any)."""
    return {LIKELIHOOD_PREFIX + k: v for k, v in pack_likelihoods(tasks).items()}


def bank_state(layers: Sequence[SupermaskLayer], norms: Sequence[TaskBatchNorm] = ()) -> dict[str, torch.Tensor]:
    """Packed bank rows per layer (exactly the banked masks) and BatchNorm statistics, on the CPU."""
    out = {mask_key(i): layer.bank_rows.detach().cpu().clone() for i, layer in enumerate(layers)}
    for j, bn in enumerate(norms):
        if bn.keeps_stats:
            out[norm_key(j)] = bn.stats_rows().detach().cpu().clone()
        if bn.norm != "batch":
            out[norm_running_key(j)] = torch.stack([bn.running_mean, bn.running_var]).detach().cpu().clone()
    return out


def bank_sha256(layers: Sequence[SupermaskLayer], num_tasks: int | None = None,
                norms: Sequence[TaskBatchNorm] = (), likelihoods: Sequence[TaskLikelihood | None] = ()) -> str:
    """SHA-256 of the bank, task by task (task 0's mask rows of every layer, its BatchNorm
    statistics and its likelihood statistics if any, then task 1's, ...): equal digests mean
    bitwise-equal banks. ``num_tasks`` hashes the first tasks only."""
    h = hashlib.sha256()
    k = layers[0].num_masks if num_tasks is None else num_tasks
    rows = [layer.bank_rows[:k].detach().cpu() for layer in layers]
    stats = [bn.stats_rows()[:k].detach().cpu().contiguous() for bn in norms if bn.keeps_stats]
    for t in range(k):
        for r in [*rows, *stats]:
            h.update(r[t].numpy().tobytes())
        if t < len(likelihoods) and likelihoods[t] is not None:
            for g in likelihoods[t].layers:
                for v in (g.means, g.basis, g.eigvals, g.noise):
                    h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def task_sha256(layers: Sequence[SupermaskLayer], task_id: int, norms: Sequence[TaskBatchNorm] = ()) -> str:
    """SHA-256 of what one banked task classifies with: its mask rows and BatchNorm statistics
    (equal digests: bitwise the same outputs with the task given)."""
    h = hashlib.sha256()
    for layer in layers:
        h.update(layer.bank_rows[task_id].detach().cpu().numpy().tobytes())
    for bn in norms:
        if bn.keeps_stats:
            h.update(bn.stats_rows()[task_id].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_bank_state(layers: Sequence[SupermaskLayer], state: dict[str, torch.Tensor],
                     capacity: int, norms: Sequence[TaskBatchNorm] = (), feature_dims: Sequence[int] = (),
                     ) -> tuple[list[torch.Tensor], dict, list[TaskLikelihood | None]]:
    """Validate a bank mapping against ``layers`` and ``norms``; returns each masked layer's
    rows (padded to whole 64-bit words where a bank saved by 0.1.0 packed them to whole bytes),
    ``{key: tensor}`` of the BatchNorm entries and each task's likelihood statistics (None for a
    task without; ``feature_dims``: the model's feature layers' widths).

    Raises:
        ValueError: missing or extra layers, different mask counts, more masks than
            ``capacity``, wrong dtype or row width.
    """
    likelihood = {k[len(LIKELIHOOD_PREFIX):]: v for k, v in state.items() if k.startswith(LIKELIHOOD_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(LIKELIHOOD_PREFIX)}
    expected = {mask_key(i) for i in range(len(layers))}
    if TASK_CLASSES_KEY in state:  # optional: each task's classes (class-incremental streams)
        expected.add(TASK_CLASSES_KEY)
    for j, bn in enumerate(norms):
        if bn.keeps_stats:
            expected.add(norm_key(j))
        if bn.norm != "batch":
            expected.add(norm_running_key(j))
    if set(state) != expected:
        raise ValueError(f"bank state has keys {sorted(state)}, expected {sorted(expected)}")
    counts = {state[mask_key(i)].shape[0] for i in range(len(layers))}
    if len(counts) != 1:
        raise ValueError(f"bank layers hold different numbers of masks: {sorted(counts)}")
    (k,) = counts
    if k > capacity:
        raise ValueError(f"bank holds {k} masks, more than the model's capacity {capacity}")
    out = []
    for i, layer in enumerate(layers):
        t = state[mask_key(i)]
        want = (k, M.packed_nbytes(layer.num_weights))
        legacy = (layer.num_weights + 7) // 8
        if t.dtype == torch.uint8 and t.dim() == 2 and t.shape[0] == k and t.shape[1] == legacy != want[1]:
            # Banks saved by 0.1.0 packed rows to whole bytes; rows are now whole 64-bit
            # words. The padding bits are zero, so the masks are unchanged.
            t = torch.nn.functional.pad(t, (0, want[1] - legacy))
        if t.dtype != torch.uint8 or tuple(t.shape) != want:
            raise ValueError(f"{mask_key(i)}: expected uint8 {want}, got {t.dtype} {tuple(t.shape)}")
        out.append(t)
    norm_entries = {}
    for j, bn in enumerate(norms):
        for key, want in ((norm_key(j), (k, 2, bn.num_features)), (norm_running_key(j), (2, bn.num_features))):
            if key in expected:
                t = state[key]
                if t.dtype != torch.float32 or tuple(t.shape) != want:
                    raise ValueError(f"{key}: expected float32 {want}, got {t.dtype} {tuple(t.shape)}")
                norm_entries[key] = t
    if likelihood and not feature_dims:
        raise ValueError("bank state holds likelihood statistics, but no feature layers were given to check them")
    return out, norm_entries, unpack_likelihoods(likelihood, k, feature_dims)
