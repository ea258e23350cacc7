"""Running one task and reading its predictions: :meth:`use_task`, :meth:`predict`, the
classes a task answers among (class-incremental streams) and what one image's forward pass
holds in memory, for
:class:`~supsup.model.SupermaskModel` (a mixin over its public methods)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .modes import Mode

__all__ = ["Prediction"]


class Prediction:
    """``use_task``, ``predict``, ``class_logits``, per-task class sets and activation bytes."""

    @contextlib.contextmanager
    def use_task(self, task_id: int) -> Iterator:
        """``with model.use_task(t): ...`` runs task ``t``'s mask inside the block, then puts
        the model back in the mode it was in (training the active task, or idle)."""
        self.set_task(task_id)
        try:
            yield self
        finally:
            self.restore_mode()

    def set_task_classes(self, task_id: int, classes: Sequence[int]) -> None:
        """Task ``task_id`` answers among ``classes`` only (class-incremental streams, where
        labels are global: a task's mask predicts one of its own classes)."""
        classes = sorted({int(c) for c in classes})
        if not classes or classes[0] < 0 or classes[-1] >= self.num_classes:
            raise ValueError(f"task classes must be in 0..{self.num_classes - 1}, got {classes}")
        self.task_classes[task_id] = classes

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of the real classes in the current mode; a task with its
        own classes (:meth:`set_task_classes`) gets ``-inf`` for the others."""
        logits = self(x)[:, : self.num_classes]
        classes = self.task_classes.get(self.current_task) if self.mode is Mode.TASK else None
        if classes is None:
            return logits
        allowed = torch.zeros(self.num_classes, dtype=torch.bool, device=logits.device)
        allowed[classes] = True
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class predictions ``(B,)`` int64 for inputs ``(B, ...)`` in the current mode, among
        the ``num_classes`` real classes (superfluous neurons are never a class) and, for a task
        with its own classes, among those."""
        return self.class_logits(x).argmax(dim=1)
