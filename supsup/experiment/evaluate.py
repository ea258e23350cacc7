"""Evaluating a native run: one task's row, an accuracy-vs-tasks point, the final evaluation.

The protocols themselves are :mod:`supsup.evaluation`'s; this module decides which tasks,
masks, objectives and candidates a run config asks for.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..config import RunConfig, Scenario
from ..evaluation import evaluate_given_task, evaluate_inferred, evaluate_per_image
from ..inference import candidate_extras
from ..model import SupermaskModel
from .results import AccuracyMatrix, CurvePoint, InferredScores, RunResults, Summary, TaskRow

__all__ = ["MATRIX_EVERY_TASK_MAX", "accuracy_matrix", "curve_point", "evaluate_task", "final_evaluation",
           "matrix_points", "objectives", "sampled_tasks"]

#: streams up to this many tasks get an accuracy-matrix row after every task (longer ones at
#: ``eval.at_tasks`` only)
MATRIX_EVERY_TASK_MAX = 20

log = logging.getLogger(__name__)


def objectives(cfg: RunConfig) -> list[str]:
    """``inference.objective`` then ``eval.extra_objectives`` (each once)."""
    return [cfg.inference.objective] + [o for o in cfg.eval.extra_objectives if o != cfg.inference.objective]


def matrix_points(cfg: RunConfig) -> set[int]:
    """After how many tasks a run evaluates every learned task (an accuracy-vs-tasks point, a
    row of the accuracy matrix): ``eval.at_tasks``, or after every task of a short stream."""
    if cfg.eval.at_tasks:
        return set(cfg.eval.at_tasks)
    if cfg.benchmark.num_tasks <= MATRIX_EVERY_TASK_MAX:
        return set(range(1, cfg.benchmark.num_tasks + 1))
    return set()


def accuracy_matrix(cfg: RunConfig, results: RunResults) -> AccuracyMatrix:
    """The accuracy matrix of a finished native run: its accuracy-vs-tasks points and the final
    evaluation as the last row (masks of GG/GN runs never change, so a point after ``n`` tasks
    is the bank's first ``n`` masks; NN points were taken while training)."""
    points = list(results.curve)
    T = cfg.benchmark.num_tasks
    if not points or points[-1].num_tasks_learned != T:
        points.append(CurvePoint(num_tasks_learned=T, tasks_evaluated=[r.task_id for r in results.tasks],
                                 summary=results.summary, seconds=0.0, rows=results.tasks))
    return AccuracyMatrix.from_points(points, T, given=True, inferred=not cfg.scenario.task_given_at_test)


def sampled_tasks(num_learned: int, sample: int | None) -> list[int]:
    """The tasks an evaluation covers: all ``num_learned``, or ``sample`` of them evenly
    spaced (first and last included, for ``sample`` >= 2) when ``sample`` is smaller."""
    if sample is None or sample >= num_learned:
        return list(range(num_learned))
    if sample == 1:
        return [0]
    return sorted({round(i * (num_learned - 1) / (sample - 1)) for i in range(sample)})


def evaluate_task(cfg: RunConfig, model: SupermaskModel, stream, task_id: int,
                  mask_to_task: dict[int, int] | None, *, inferred: bool = True,
                  packed: list[torch.Tensor] | None = None) -> TaskRow:
    """One task's row: GG accuracy, and in GN/NN (if ``inferred``) the task-inferred accuracy
    per objective, over the candidate masks ``packed`` (default: the bank and the mask in
    training). ``mask_to_task`` (NN) maps detected masks to the true tasks they stand for."""
    row = TaskRow(task_id)
    batches = list(stream.test_batches(task_id, cfg.eval.batch_size, cfg.eval.max_batches))
    per_batch = None
    task_map = None
    if mask_to_task is not None:  # NN: masks are numbered in detection order
        task_to_mask: dict[int, int] = {}
        for m, t in sorted(mask_to_task.items()):
            task_to_mask.setdefault(t, m)
        mask = task_to_mask.get(task_id)
        if mask is not None:
            row.acc_given_task, _ = evaluate_given_task(model, batches, mask)
        def task_map(mask: int) -> int:
            return mask_to_task.get(mask, -1)
    else:
        row.acc_given_task, per_batch = evaluate_given_task(model, batches, task_id)
    if cfg.scenario is Scenario.GG or not inferred:
        return row
    extra = candidate_extras(model, include_active=True) if model.active_task is not None else None
    for i, objective in enumerate(objectives(cfg)):
        inf = dataclasses.replace(cfg.inference, objective=objective)
        res = evaluate_inferred(model, batches, task_id, inf, per_batch_given=per_batch, task_map=task_map,
                                packed=packed, extra=extra)
        scores = InferredScores(res.acc_inferred, res.task_inference_acc)
        if i == 0:
            row.inferred = scores
            row.inferred_counts = res.inferred_counts
            if cfg.benchmark.labels == "global":  # class-incremental: also the task of each image alone
                row.acc_inferred_per_image = evaluate_per_image(model, batches, inf, packed=packed, extra=extra)
        else:
            row.by_objective[objective] = scores
    return row


def curve_point(cfg: RunConfig, model: SupermaskModel, stream, num_learned: int,
                mask_to_task: dict[int, int] | None = None, *, bank_prefix: bool = False) -> CurvePoint:
    """Accuracy over the tasks learned so far (a sample of them if ``eval.sample_tasks``).
    With ``bank_prefix`` the candidates are the bank's first ``num_learned`` masks: the state
    after ``num_learned`` tasks, recomputed from a later bank (GG/GN masks never change once
    learned)."""
    t0 = time.perf_counter()
    tasks = sampled_tasks(num_learned, cfg.eval.sample_tasks)
    packed = [layer.bank_rows[:num_learned] for layer in model.masked_layers] if bank_prefix else None
    rows = [evaluate_task(cfg, model, stream, t, mask_to_task, packed=packed) for t in tasks]
    inferred = not cfg.scenario.task_given_at_test
    point = CurvePoint(num_tasks_learned=num_learned, tasks_evaluated=tasks, summary=Summary.of(rows, inferred=inferred),
                       seconds=time.perf_counter() - t0, rows=rows, inferred=inferred)
    log.info("curve point after %d tasks: %s", num_learned, point.to_dict(with_rows=False))
    return point


def final_evaluation(cfg: RunConfig, model: SupermaskModel, stream, results: RunResults, *,
                     reuse_curve: bool = True) -> None:
    """GG accuracy of every task with the final bank; GN/NN task-inferred accuracy of every
    task, or of ``eval.sample_tasks`` of them. A GG/GN curve point taken after the last task
    already holds those rows (same bank, same tasks, same settings): with ``reuse_curve`` they
    are reused, not recomputed."""
    mask_to_task = results.nn.mask_to_task if cfg.scenario is Scenario.NN and results.nn is not None else None
    num_tasks = cfg.benchmark.num_tasks
    old = {r.task_id: r for r in results.tasks}
    inferred_tasks = set() if cfg.scenario is Scenario.GG else set(sampled_tasks(num_tasks, cfg.eval.sample_tasks))
    reuse: dict[int, TaskRow] = {}
    last = results.curve[-1] if results.curve else None
    # NN: not reused, since the last point was taken with a mask still in training (a
    # retrained old mask is only banked, and can change, at the end).
    if (reuse_curve and cfg.scenario is not Scenario.NN and last is not None and last.num_tasks_learned == num_tasks
            and set(last.tasks_evaluated) == inferred_tasks):
        reuse = {r.task_id: r for r in last.rows}
    rows = []
    for task_id in range(num_tasks):
        row = evaluate_task(cfg, model, stream, task_id, mask_to_task,
                            inferred=task_id in inferred_tasks and task_id not in reuse)
        if task_id in reuse:
            old_row = reuse[task_id]
            row.inferred, row.by_objective = old_row.inferred, dict(old_row.by_objective)
            row.inferred_counts = dict(old_row.inferred_counts)
            row.acc_inferred_per_image = old_row.acc_inferred_per_image
        if task_id in old and old[task_id].acc_given_task is not None and cfg.scenario is not Scenario.NN:
            # Accuracy right after learning the task, to show that later tasks changed nothing.
            row.acc_given_task_when_learned = old[task_id].acc_given_task
        rows.append(row)
    results.tasks = rows
    if cfg.scenario is not Scenario.GG:
        results.tasks_inferred = len(inferred_tasks)
        results.task_confusion = {r.task_id: dict(r.inferred_counts) for r in rows if r.inferred_counts}
    results.summarise()
