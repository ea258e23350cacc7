"""BatchNorm for a shared frozen backbone: running statistics kept per task.

A backbone's BatchNorm layers are non-affine (no learned scale or shift: SupSup learns masks
only); a pretrained backbone's affine scale and shift are kept frozen, shared by every task, and
applied after the normalisation. Their running mean and variance describe one task's activations. Shared by all
tasks, they are the last task's after training, and every earlier task falls to about chance:
the official code's first release had exactly this bug (0.20 on 5-way SplitCIFAR-100 tasks);
its fix kept the statistics per task. :class:`TaskBatchNorm` wraps a frozen ``nn.BatchNorm1d``
/ ``nn.BatchNorm2d`` and keeps, per :data:`NORMS` mode:

* ``per_task``: the running statistics of the task in training, banked with its mask when it
  finishes (``2 * C`` floats per layer per task, counted in the bank's bytes); a task runs with
  its own statistics;
* ``batch``: no running statistics: every forward normalises with the batch's own;
* ``shared``: one set of running statistics for all tasks (the official bug, kept so that it
  can be shown).

Training (model mode ``TRAIN``) always normalises with the batch's statistics and, unless
``batch``, updates the running ones (momentum and eps of the wrapped layer). Running one task
(``TASK``) uses that task's statistics. The superposed network of task inference (``SUPERPOSE``)
uses, per inference, either the statistics of its own images (``batch``: independent of alpha)
or the alpha-weighted banked statistics (``weighted``: ``mean = sum_i alpha_i mean_i``, ``var =
sum_i alpha_i var_i``, differentiable in alpha); see the README for the measurements behind the
default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modes import Mode, as_mode

__all__ = ["NORMS", "SUPERPOSED_NORMS", "TaskBatchNorm", "group_batch_norm"]

NORMS = ("per_task", "batch", "shared")
SUPERPOSED_NORMS = ("batch", "weighted")
#: what a wrapped layer can be set to run (the model's Mode values, set on every layer)


def group_batch_norm(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Normalise ``x`` ``(G * n, C, ...)`` with each group's own statistics: group ``g`` is
    rows ``g * n .. (g + 1) * n - 1``, its mean and (biased) variance taken per channel over
    its ``n`` samples and all spatial positions."""
    n = x.shape[0] // groups
    v = x.reshape(groups, n, x.shape[1], -1)
    mean = v.mean(dim=(1, 3), keepdim=True)
    var = v.var(dim=(1, 3), unbiased=False, keepdim=True)
    return ((v - mean) / torch.sqrt(var + eps)).reshape(x.shape)


class TaskBatchNorm(nn.Module):
    """A frozen non-affine BatchNorm with per-task running statistics (see the module docstring).

    Buffers: ``running_mean`` / ``running_var`` ``(C,)``, the active task's (or the shared)
    statistics; ``bank`` ``(capacity, 2, C)``, row ``t`` the banked mean and variance of task
    ``t`` (``per_task`` only). The owning model sets the mode.
    """

    def __init__(self, base_layer: nn.modules.batchnorm._BatchNorm, *, norm: str = "per_task"):
        super().__init__()
        if not isinstance(base_layer, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"TaskBatchNorm wraps BatchNorm layers, got {type(base_layer).__name__}")
        if base_layer.momentum is None or not base_layer.track_running_stats:
            # Both would need another kind of statistics (a cumulative average, or none at all)
            # than the exponential running ones kept and banked per task here.
            raise TypeError(f"{type(base_layer).__name__}(momentum=None or track_running_stats=False) is not "
                            "supported: SupSup keeps exponential running statistics per task (model.norm: batch "
                            "normalises with batch statistics only)")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        self.num_features = base_layer.num_features
        self.eps = base_layer.eps
        self.momentum = base_layer.momentum
        self.norm = norm
        c = self.num_features
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("bank", torch.zeros(0, 2, c))
        # a pretrained layer's scale and shift: frozen, shared by every task (None: non-affine)
        affine = base_layer.affine
        self.register_buffer("frozen_weight", base_layer.weight.detach().clone() if affine else None)
        self.register_buffer("frozen_bias", base_layer.bias.detach().clone() if affine else None)
        self.num_stats = 0
        self._mode = Mode.IDLE
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) for "task"
        self._alphas: torch.Tensor | None = None
        self._candidates: torch.Tensor | None = None  # (k, 2, C) for weighted superposition
        self._groups = 1

    @property
    def keeps_stats(self) -> bool:
        """True when tasks have banked statistics (``per_task``)."""
        return self.norm == "per_task"

    # ------------------------------------------------------------------ task bookkeeping
    def reset_running(self) -> None:
        """Fresh statistics for a new task (``per_task``); the shared set carries on."""
        if self.norm == "per_task":
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def bank_stats(self, task_id: int, capacity: int) -> None:
        """Store the running statistics as task ``task_id``'s (a new row, or over its row)."""
        if not self.keeps_stats:
            return
        self._store(task_id, torch.stack([self.running_mean, self.running_var]), capacity)

    def append_stats(self, row: torch.Tensor, capacity: int) -> None:
        """Bank ``row`` ``(2, C)`` as the next task's statistics."""
        self._store(self.num_stats, row.to(self.bank.device, torch.float32), capacity)

    def _store(self, task_id: int, row: torch.Tensor, capacity: int) -> None:
        if task_id < self.num_stats:
            self.bank[task_id] = row
            return
        if task_id != self.num_stats:
            raise IndexError(f"statistics of task {task_id} cannot follow {self.num_stats} banked tasks")
        if self.num_stats == self.bank.shape[0]:
            new = self.bank.new_zeros(min(capacity, max(1, 2 * self.num_stats)), 2, self.num_features)
            new[: self.num_stats] = self.bank[: self.num_stats]
            self.bank = new
        self.bank[self.num_stats] = row
        self.num_stats += 1

    def load_stats(self, task_id: int) -> None:
        """Continue training task ``task_id`` from its banked statistics."""
        if self.keeps_stats:
            self.running_mean.copy_(self.bank[task_id, 0])
            self.running_var.copy_(self.bank[task_id, 1])

    def stats_rows(self) -> torch.Tensor:
        """``(num_stats, 2, C)``: the banked statistics."""
        return self.bank[: self.num_stats]

    def load_bank(self, rows: torch.Tensor) -> None:
        self.bank = rows.to(self.running_mean.device, torch.float32).clone()
        self.num_stats = rows.shape[0]

    def bank_nbytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()

    def task_stats(self, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics task ``task_id`` runs with (None: the running ones)."""
        if task_id is None or not self.keeps_stats:
            return self.running_mean, self.running_var
        return self.bank[task_id, 0], self.bank[task_id, 1]

    # ------------------------------------------------------------------------ modes
    def set_mode(self, mode: Mode | str, *, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                 alphas: torch.Tensor | None = None, candidates: torch.Tensor | None = None,
                 groups: int = 1) -> None:
        """``train``; ``task`` with ``stats``; ``superpose`` with per-group batch statistics
        (``groups``) or, given ``alphas`` ``(G, k)`` and ``candidates`` ``(k, 2, C)``, the
        alpha-weighted ones; ``idle``."""
        self._mode = as_mode(mode)
        self._stats = stats
        self._alphas = alphas
        self._candidates = candidates
        self._groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._normalise(x)
        if self.frozen_weight is None:
            return out
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return out * self.frozen_weight.view(shape) + self.frozen_bias.view(shape)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if mode is Mode.TRAIN:
            if self.norm == "batch":
                return F.batch_norm(x, None, None, training=True, eps=self.eps)
            return F.batch_norm(x, self.running_mean, self.running_var, training=True, momentum=self.momentum,
                                eps=self.eps)
        if self.norm == "batch" or (mode is Mode.SUPERPOSE and self._alphas is None):
            return group_batch_norm(x, self._groups if mode is Mode.SUPERPOSE else 1, self.eps)
        if mode is Mode.TASK:
            mean, var = self._stats
            return F.batch_norm(x, mean, var, training=False, eps=self.eps)
        if mode is Mode.SUPERPOSE:
            if not self.keeps_stats:  # shared statistics: the same for every candidate
                return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
            stats = torch.einsum("gk,ksc->gsc", self._alphas, self._candidates)  # (G, 2, C)
            groups = stats.shape[0]
            v = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)
            out = (v - stats[:, 0, None, :, None]) / torch.sqrt(stats[:, 1, None, :, None] + self.eps)
            return out.reshape(x.shape)
        raise RuntimeError("the layer has no task to run: call add_task, set_task or superpose on the model")

    def extra_repr(self) -> str:
        return f"{self.num_features}, norm={self.norm!r}, num_stats={self.num_stats}, mode={self._mode.value!r}"
