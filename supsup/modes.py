"""What a model, its masked layers and its BatchNorm layers compute: one enum for all three."""

from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(enum.Enum):
    """The forward pass a :class:`~supsup.model.SupermaskModel` (and each of its layers) runs.

    A layer's ``set_mode`` also takes the value as a string (``"task"``)."""

    IDLE = "idle"  # no task selected: forward raises
    TRAIN = "train"  # active scores, straight-through gradients
    TASK = "task"  # one mask (from the bank or the active scores)
    SUPERPOSE = "superpose"  # weighted sum of several masks


def as_mode(mode: Mode | str) -> Mode:
    """``mode`` as a :class:`Mode`; ``ValueError`` naming the known ones otherwise."""
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(m.value for m in Mode)}") from None
