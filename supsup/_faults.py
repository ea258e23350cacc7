"""Fault injection for the crash-safety tests (inactive unless ``SUPSUP_CRASH_AT`` is set).

``SUPSUP_CRASH_AT=checkpoint_write:N`` kills the process with SIGKILL in the middle of the
N-th atomic file write (after half of the temporary file is written, before the rename), so
tests can check that an interrupted write never damages the previous checkpoint;
``SUPSUP_CRASH_AT=parallel_round:N`` at the N-th round of task-parallel training;
``SUPSUP_CRASH_AT=inside_task_checkpoint:N`` right after the N-th checkpoint taken inside a task
(``train.checkpoint_every``); ``SUPSUP_CRASH_AT=hopsupsup_task:N`` right after HopSupSup's N-th
task checkpoint. With several
processes, ``SUPSUP_CRASH_RANK=R`` limits it to rank ``R``.
"""

from __future__ import annotations

import os
import signal

_calls: dict[str, int] = {}  # per-process call counters; only read when the variable is set


def maybe_crash(point: str) -> None:
    spec = os.environ.get("SUPSUP_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    rank = os.environ.get("SUPSUP_CRASH_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _calls[point] = _calls.get(point, 0) + 1
    if _calls[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
