"""Task-by-task logs of a native run, for the tools people already use.

* ``csv``: ``DIR/metrics.csv``, one row per finished task: the loss of its last 50 steps, its
  accuracy with the task given, and, when the run evaluates every learned task then (an
  accuracy-matrix row), their mean accuracy with the task given and inferred and the
  task-inference accuracy; seconds of training and evaluation of the task;
* ``tensorboard``: the same numbers as scalars in ``DIR/tensorboard/`` (step = tasks learned),
  with torch's ``SummaryWriter`` (needs the optional ``tensorboard`` package).

A resumed run keeps the rows of the tasks its checkpoint holds and drops later ones (written
before the run was stopped, and about to be written again).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..fileio import atomic_write_text

__all__ = ["METRIC_FIELDS", "RunLogger"]

METRIC_FIELDS = ("task", "tasks_learned", "loss", "acc_given_task", "mean_acc_given_task", "mean_acc_inferred",
                 "task_inference_acc", "train_seconds", "eval_seconds")


class RunLogger:
    """Logs one row per finished task to the configured backends (``log.backends``)."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume_from_task: int = 0, enabled: bool = True):
        self.out = out
        self.backends = list(cfg.log.backends) if enabled else []  # several processes: rank 0 logs
        self.csv_path = out / "metrics.csv"
        if "csv" in self.backends:
            rows: list[dict[str, Any]] = []
            if resume_from_task and self.csv_path.exists():
                with open(self.csv_path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("task", "").isdigit() and int(r["task"]) < resume_from_task]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(self.csv_path, buf.getvalue())  # rows after the checkpoint's last task dropped
        self._writer = None
        if "tensorboard" in self.backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.backends", "tensorboard needs the tensorboard package: "
                                                  "pip install tensorboard (or drop it from log.backends)") from None
            self._writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_from_task or None)

    def log_task(self, row: dict[str, Any]) -> None:
        """One finished task: keys of :data:`METRIC_FIELDS` (missing ones left empty)."""
        if "csv" in self.backends:
            with open(self.csv_path, "a", newline="") as f:  # appended: a task is one line
                csv.DictWriter(f, fieldnames=METRIC_FIELDS, lineterminator="\n").writerow(
                    {k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
        if self._writer is not None:
            step = int(row["tasks_learned"])
            for k in METRIC_FIELDS[2:]:
                if row.get(k) is not None:
                    self._writer.add_scalar(f"supsup/{k}", float(row[k]), step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
