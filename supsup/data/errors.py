"""The error every dataset raises when its files are missing or unusable."""

from __future__ import annotations

__all__ = ["DataUnavailableError"]


class DataUnavailableError(RuntimeError):
    """A dataset's files are missing or unreadable; the message says what is expected where
    and how to obtain it (``supsup run`` reports it as one line, exit code 2)."""
