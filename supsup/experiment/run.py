"""A native run in progress: one object that the steps of its loop share.

:class:`Run` holds what every step reads and writes (config, run directory, model, stream,
results, logger, processes, the evaluation cache) and the steps that are the same for one
process and for several (:mod:`.parallel`): record a learned task, checkpoint, finish. The
loops (:mod:`.native`, :mod:`.parallel`) decide which task to learn and when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, TrainConfig
from ..data.streams import TaskStream
from ..model import SupermaskModel
from .distributed import Distributed
from .evaluate import (
    EvaluationCache,
    GivenCounts,
    accuracy_matrix,
    curve_point,
    matrix_points,
    sampled_tasks,
)
from .loggers import RunLogger
from .report import write_report
from .results import CurvePoint, RunResults, TaskRow
from .runstate import LoopState, TrainingState, write_checkpoint

__all__ = ["Run"]


@dataclass
class Run:
    """One native SupSup run in progress.

    Attributes:
        train: ``cfg.train`` as this run trains (``precision: auto`` resolved).
        learned: each task's GG counts right after it was learned (the accuracy points and the
            final evaluation reuse them through ``cache``).
    """

    cfg: RunConfig
    train: TrainConfig
    out: Path
    model: SupermaskModel
    stream: TaskStream
    results: RunResults
    logger: RunLogger
    dist: Distributed
    learned: dict[int, GivenCounts] = field(default_factory=dict)
    cache: EvaluationCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = EvaluationCache(self.cfg, self.model, self.stream, self.learned)

    def train_batches(self, task_id: int):
        """Task ``task_id``'s training batches: ``train.iterations`` of ``train.batch_size``."""
        return self.stream.train_batches(task_id, self.train.iterations, self.train.batch_size)

    def test_batches(self, task_id: int):
        """Task ``task_id``'s test batches (``eval.batch_size``, at most ``eval.max_batches``)."""
        return self.stream.test_batches(task_id, self.cfg.eval.batch_size, self.cfg.eval.max_batches)

    def checkpoint(self, loop: LoopState, training: TrainingState | None = None, ranks=()) -> None:
        """``DIR/checkpoint.pt`` at ``loop`` (rank 0 writes; the others have nothing to do)."""
        if self.dist.is_main:
            write_checkpoint(self.out, self.cfg, self.model, self.results, loop, training, ranks=ranks)

    def point_after(self, num_learned: int, mask_to_task: dict[int, int] | None = None) -> CurvePoint | None:
        """The accuracy-vs-tasks point after ``num_learned`` tasks, if the config asks for one
        there (recorded in the results); GG/GN reuse the cache, NN maps its masks to tasks."""
        if num_learned not in matrix_points(self.cfg):
            return None
        if mask_to_task is None:
            self.cache.prepare(sampled_tasks(num_learned, self.cfg.eval.sample_tasks))
        point = curve_point(self.cfg, self.model, self.stream, num_learned, mask_to_task,
                            cache=None if mask_to_task is not None else self.cache)
        self.results.curve.append(point)
        return point

    def record_task(self, task_id: int, loss: float | None, acc: float | None, point: CurvePoint | None,
                    train_s: float, eval_s: float, *, row: bool = True) -> None:
        """A learned task: its row (GG accuracy right after learning it), time and log line."""
        if row:
            self.results.tasks.append(TaskRow(task_id, acc_given_task=acc))
        entry = {"task": task_id, "tasks_learned": task_id + 1, "loss": loss, "acc_given_task": acc,
                 "train_seconds": train_s, "eval_seconds": eval_s}
        if point is not None:
            entry.update({"mean_acc_given_task": point.summary.mean_acc_given_task,
                          "mean_acc_inferred": point.summary.inferred.acc_inferred,
                          "task_inference_acc": point.summary.inferred.task_inference_acc})
        self.logger.log_task(entry)

    def finish(self, evaluation_seconds: float) -> RunResults:
        """After the final evaluation (``evaluation_seconds``): the accuracy matrix, the bank's
        size and digest, ``results.json`` and the report (rank 0), the trackers' last entries."""
        results = self.results
        results.eval_seconds += evaluation_seconds
        results.accuracy_matrix = accuracy_matrix(self.cfg, results)
        results.record_bank(self.model)
        if self.dist.is_main:
            write_report(self.out, results)
            self.logger.log_results(results)
        return results
