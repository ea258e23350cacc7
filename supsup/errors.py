"""Errors of the model's task bookkeeping (their own module so that every part of the model
can raise them)."""

from __future__ import annotations

__all__ = ["CapacityError", "ModeError"]


class ModeError(RuntimeError):
    """An operation that the model's current mode does not allow."""


class CapacityError(RuntimeError):
    """The bank already holds ``num_tasks`` masks."""
