"""Task-by-task logs of a native run, for the tools people already use.

* ``csv``: ``DIR/metrics.csv``, one row per finished task: the loss of its last 50 steps, its
  accuracy with the task given, and, when the run evaluates every learned task then (an
  accuracy-matrix row), their mean accuracy with the task given and inferred and the
  task-inference accuracy; seconds of training and evaluation of the task;
* ``tensorboard``: the same numbers as scalars in ``DIR/tensorboard/`` (step = tasks learned),
  with torch's ``SummaryWriter`` (needs the optional ``tensorboard`` package);
* ``wandb`` (Weights & Biases, ``pip install supsup[track]``): the config, the loss of every
  training step (``train/loss``, step = optimizer steps so far), the task rows (``task/*``),
  and at the end the accuracy matrix (a table), the figures, the means and the bank's SHA-256
  (summary). Runs live in ``DIR/wandb/``; ``WANDB_MODE=offline`` needs no network;
  ``WANDB_PROJECT`` names the project (default ``supsup``);
* ``mlflow`` (``pip install supsup[track]``): the same, as params, metrics, a tag and
  artifacts, through an ``MlflowClient`` on ``$MLFLOW_TRACKING_URI`` or, by default, the local
  SQLite store ``DIR/mlflow.db`` with artifacts in ``DIR/mlartifacts`` (experiment ``supsup``).

A resumed run logs into the same W&B and MLflow runs (their ids are kept in ``DIR``).

A resumed run keeps the rows of the tasks its checkpoint holds and drops later ones (written
before the run was stopped, and about to be written again).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, RunConfig, config_to_dict
from ..fileio import atomic_write_text

if TYPE_CHECKING:  # annotations only
    from .results import RunResults

__all__ = ["METRIC_FIELDS", "RunLogger", "flat_config", "missing_tracker"]

METRIC_FIELDS = ("task", "tasks_learned", "loss", "acc_given_task", "mean_acc_given_task", "mean_acc_inferred",
                 "task_inference_acc", "train_seconds", "eval_seconds")


class RunLogger:
    """Logs one row per finished task to the configured backends (``log.backends``)."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume_from_task: int = 0, enabled: bool = True,
                 only: tuple[str, ...] | None = None, wandb_run: Any = None,
                 on_task: Callable[[dict[str, Any]], None] | None = None):
        """``only``: of ``log.backends``, just these; ``wandb_run``: a W&B run already started
        (Avalanche's ``WandBLogger``) to log into instead of starting one; ``on_task``: also
        gets every task row (e.g. a tuner's pruning, which may stop the run by raising)."""
        self.out = out
        self.on_task = on_task
        self.backends = list(cfg.log.backends) if enabled else []  # several processes: rank 0 logs
        if only is not None:
            self.backends = [b for b in self.backends if b in only]
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
        # optimizer steps before this process (GG/GN tasks have train.iterations each): W&B's
        # steps must only grow, also across a resume
        self._step = resume_from_task * cfg.train.iterations
        self._losses: list[tuple[int, float]] = []
        self._wandb = None
        if "wandb" in self.backends:
            self._wandb = wandb_run if wandb_run is not None else _start_wandb(cfg, out)
            self._step = max(self._step, int(getattr(self._wandb, "step", 0) or 0))  # W&B steps only grow
        self._mlflow = _MlflowRun(cfg, out) if "mlflow" in self.backends else None

    @property
    def tracks_steps(self) -> bool:
        """Whether :meth:`log_step` is wanted (a tracker that plots the training loss)."""
        return self._wandb is not None or self._mlflow is not None

    def log_step(self, loss: float) -> None:
        """One optimizer step's loss (sent with the task's row, not one call per step)."""
        self._step += 1
        if self.tracks_steps:
            self._losses.append((self._step, float(loss)))

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
        values = {f"task/{k}": float(row[k]) for k in METRIC_FIELDS[1:] if row.get(k) is not None}
        if not self._losses:  # no step logged since the last row (NN, Avalanche): a step of its own
            self._step += 1
        if self._wandb is not None:
            for step, loss in self._losses:
                self._wandb.log({"train/loss": loss}, step=step)
            self._wandb.log(values, step=max(self._step, 1))
        if self._mlflow is not None:
            self._mlflow.log_metrics([("train/loss", loss, step) for step, loss in self._losses]
                                     + [(k, v, int(row["tasks_learned"])) for k, v in values.items()])
        self._losses = []
        if self.on_task is not None:
            self.on_task(row)

    def log_results(self, results: RunResults) -> None:
        """The end of a run: means, the accuracy matrix, the bank's digest and the figures (from
        the run directory)."""
        out = self.out
        d = results.to_dict()
        means = {k: d[k] for k in ("mean_acc_given_task", "mean_acc_inferred", "task_inference_acc",
                                   "acc_inferred_per_image") if isinstance(d.get(k), (int, float))}
        figures = [out / name for name in ("accuracy.png", "confusion.png") if (out / name).exists()]
        matrix = d.get("accuracy_matrix")
        if self._wandb is not None:
            import wandb

            self._wandb.summary.update({**means, "bank_sha256": results.bank_sha256, "bank_bytes": results.bank_bytes})
            am = results.accuracy_matrix
            for kind, rows in (("given", am and am.given), ("inferred", am and am.inferred)):
                if rows:
                    columns = [f"task {j}" for j in range(len(rows[0]))]
                    self._wandb.log({f"accuracy_matrix/{kind}": wandb.Table(
                        columns=["after tasks", *columns], data=[[i + 1, *r] for i, r in enumerate(rows)])},
                        step=max(self._step, 1))
            self._wandb.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}, step=max(self._step, 1))
        if self._mlflow is not None:
            self._mlflow.log_metrics([(k, float(v), 0) for k, v in means.items()])
            if results.bank_sha256 is not None:
                self._mlflow.set_tag("bank_sha256", results.bank_sha256)
            if matrix:
                self._mlflow.log_text(json.dumps(matrix, indent=1), "accuracy_matrix.json")
            for p in [*figures, out / "results.json"]:
                if p.exists():
                    self._mlflow.log_artifact(p)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """The config as dotted keys (``train.lr``) with string values (MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("", config_to_dict(cfg))
    return out


def missing_tracker(name: str) -> ConfigError:
    """The error for a ``log.backends`` tracker whose package is not installed."""
    return ConfigError("log.backends", f"{name} needs the {name} package: pip install 'supsup[track]' "
                                       "(or drop it from log.backends)")


def _start_wandb(cfg: RunConfig, out: Path):
    try:
        import wandb
    except ImportError:
        raise missing_tracker("wandb") from None
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "supsup"), dir=str(out), name=out.name, id=run_id,
                      resume="allow", config=config_to_dict(cfg), reinit="create_new")


class _MlflowRun:
    """One MLflow run, through its own ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, cfg: RunConfig, out: Path):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_tracker("mlflow") from None
        # default: an SQLite database in the run directory (MLflow 3 refuses its old file store),
        # artifacts beside it; MLFLOW_TRACKING_URI (a server, PostgreSQL, ...) takes its own defaults
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (out.resolve() / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = out / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name("supsup")
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment("supsup", artifact_location=artifacts)
        self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        atomic_write_text(id_file, self.run_id + "\n")
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log_metrics(self, values: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in values]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)
