"""Backends register themselves here; :func:`run_experiment` dispatches a config to one.

A backend is an object with ``check(cfg)`` (raise :class:`~supsup.config.ConfigError` for what
it cannot run, before any work) and ``run(cfg, out_dir, resume) -> RunResults``. The modules
that define them (:mod:`.native`, :mod:`.avalanche_backend`) import nothing heavy at module
level: Avalanche is imported only when its backend runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from ..config import RunConfig
from ..registry import Registry
from .results import RunResults

__all__ = ["BACKENDS", "Backend", "check_config", "run_experiment", "saved_config"]


class Backend(Protocol):
    def check(self, cfg: RunConfig) -> None: ...

    def run(self, cfg: RunConfig, out_dir: str | os.PathLike, resume: bool, **options) -> RunResults: ...


BACKENDS: Registry[Backend] = Registry("backend")


def check_config(cfg: RunConfig) -> None:
    """What only the experiment layer can check: the backend exists and can run ``cfg``."""
    if cfg.backend not in BACKENDS:
        from ..config.sections import check_choice

        check_choice("backend", cfg.backend, BACKENDS)
    BACKENDS.get(cfg.backend).check(cfg)


def run_experiment(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                   on_task: Callable[[dict[str, Any]], None] | None = None) -> RunResults:
    """Run ``cfg`` into ``out_dir`` with its backend; returns what ``results.json`` holds.
    ``on_task`` (native backend, SupSup) gets each finished task's row (its keys:
    :data:`~.loggers.METRIC_FIELDS`); an exception it raises stops the run (its last checkpoint
    stays)."""
    check_config(cfg)
    if on_task is None:
        return BACKENDS.get(cfg.backend).run(cfg, out_dir, resume)
    return BACKENDS.get(cfg.backend).run(cfg, out_dir, resume, on_task=on_task)



def saved_config(out_dir: str | os.PathLike) -> dict:
    """The config (as a dict) of the run checkpointed in ``out_dir``: a SupSup run's
    ``checkpoint.pt`` or a HopSupSup run's ``hopsupsup_checkpoint.pt``."""
    from pathlib import Path

    from ..checkpoint import CHECKPOINT_MAGIC, load_checkpoint, read_checksummed
    from .hopsupsup_run import HOPSUPSUP_CHECKPOINT, is_hopsupsup_run

    out = Path(out_dir)
    if is_hopsupsup_run(out):
        return read_checksummed(out / HOPSUPSUP_CHECKPOINT, magic=CHECKPOINT_MAGIC)[1]["config"]
    return load_checkpoint(out)[1]["config"]
