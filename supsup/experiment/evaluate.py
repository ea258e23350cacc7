"""Evaluating a native run: one task's row, an accuracy-vs-tasks point, the final evaluation.

The protocols themselves are :mod:`supsup.evaluation`'s; this module decides which tasks,
masks, objectives and candidates a run config asks for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..candidates import Candidates
from ..config import InferenceConfig, RunConfig, Scenario
from ..evaluation import (
    evaluate_from_table,
    evaluate_given_task,
    evaluate_inferred,
    evaluate_per_image,
    likelihood_table,
)
from ..model import SupermaskModel
from .results import AccuracyMatrix, CurvePoint, InferredScores, RunResults, Summary, TaskRow

__all__ = ["MASK_INDEPENDENT_METHODS", "MATRIX_EVERY_TASK_MAX", "EvaluationCache", "GivenCounts", "accuracy_matrix", "curve_point",
           "deferred_evaluation", "evaluate_task", "final_evaluation", "matrix_points", "objectives",
           "sampled_tasks"]

#: inference methods whose score of a mask ignores the other candidates: one pass over the bank
#: gives the inference over every prefix of it (every accuracy-matrix row)
MASK_INDEPENDENT_METHODS = ("likelihood",)

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


@dataclass(frozen=True)
class GivenCounts:
    """A task's GG evaluation: accuracy, ``(correct, size)`` per test batch, and the digest of
    the mask and statistics it was measured with (:meth:`SupermaskModel.task_sha256`)."""

    acc: float
    per_batch: list[tuple[int, int]]
    task_sha256: str


class EvaluationCache:
    """What the evaluations of a GG/GN run share while its bank grows (a banked mask never
    changes): each task's GG count per test batch (counts measured right after the task was
    learned, ``learned``, are reused while the task's digest is the same), and, for a
    :data:`MASK_INDEPENDENT_METHODS` inference, the score of every test batch of the tasks
    :meth:`prepare` named under every banked mask. A mask's score ignores the other masks, so
    the table only grows: a point after ``n`` tasks computes the scores of the masks banked
    since the last point and of the tasks new to it, and reads the first ``n`` columns; the whole
    run costs one pass of each mask over each task's inference images."""

    def __init__(self, cfg: RunConfig, model: SupermaskModel, stream, learned: dict[int, GivenCounts] | None = None):
        self.cfg, self.model, self.stream = cfg, model, stream
        self._given: dict[int, GivenCounts] = {}
        self._learned = learned if learned is not None else {}  # shared: the run adds tasks as it learns them
        self._images: dict[int, list[torch.Tensor]] = {}  # task -> each test batch's inference images
        self._tables: dict[int, torch.Tensor] = {}  # task -> (batches, masks scored so far)
        self._wanted: set[int] = set()

    def given(self, task_id: int, batches: Callable[[], list]) -> GivenCounts:
        """GG accuracy and per-batch counts of a task with its own mask (``batches``: its test
        batches, loaded only if they must be evaluated)."""
        digest = self.model.task_sha256(task_id)
        for known in (self._given.get(task_id), self._learned.get(task_id)):
            if known is not None and known.task_sha256 == digest:
                return known
        acc, per_batch = evaluate_given_task(self.model, batches(), task_id)
        self._given[task_id] = GivenCounts(acc, per_batch, digest)
        return self._given[task_id]

    def prepare(self, tasks) -> None:
        """Tasks whose test batches the next table computation should cover (all in one pass)."""
        self._wanted.update(tasks)

    def table(self, task_id: int, inf: InferenceConfig, k: int) -> torch.Tensor | None:
        """``(batches, k)``: the scores of the task's test batches under the first ``k`` banked
        masks, or None when the method's scores depend on the candidate set."""
        if inf.method not in MASK_INDEPENDENT_METHODS:
            return None
        for t in sorted(self._wanted | {task_id}):
            if t not in self._images:
                self._images[t] = [x[: inf.num_images] for x, _ in
                                   self.stream.test_batches(t, self.cfg.eval.batch_size, self.cfg.eval.max_batches)]
                self._tables[t] = torch.zeros(len(self._images[t]), 0)
        short = {t: self._tables[t].shape[1] for t in self._wanted | {task_id} if self._tables[t].shape[1] < k}
        for first in sorted(set(short.values())):  # the tasks that lack the same masks: one pass for them
            tasks = sorted(t for t, c in short.items() if c == first)
            images = [x for t in tasks for x in self._images[t]]
            scores = likelihood_table(self.model, images, inf, candidates=list(range(first, k))).cpu()
            for t, part in zip(tasks, scores.split([len(self._images[t]) for t in tasks])):
                self._tables[t] = torch.cat([self._tables[t], part], dim=1)
        return self._tables[task_id][:, :k]


def evaluate_task(cfg: RunConfig, model: SupermaskModel, stream, task_id: int,
                  mask_to_task: dict[int, int] | None, candidates: Candidates, *, inferred: bool = True,
                  cache: EvaluationCache | None = None) -> TaskRow:
    """One task's row: GG accuracy, and in GN/NN (if ``inferred``) the task-inferred accuracy
    per objective, among ``candidates`` (:meth:`SupermaskModel.candidates`). ``mask_to_task`` (NN) maps detected masks to the true tasks they stand for.
    ``cache``: what evaluations of the same bank share (GG counts, mask-independent scores);
    with both cached, the task's test set is not even loaded."""
    row = TaskRow(task_id)
    loaded: list = []

    def batches() -> list:
        if not loaded:
            loaded.append(list(stream.test_batches(task_id, cfg.eval.batch_size, cfg.eval.max_batches)))
        return loaded[0]

    per_batch = None
    task_map = None
    true_mask = task_id
    if mask_to_task is not None:  # NN: masks are numbered in detection order
        task_to_mask: dict[int, int] = {}
        for m, t in sorted(mask_to_task.items()):
            task_to_mask.setdefault(t, m)
        true_mask = task_to_mask.get(task_id)
        if true_mask is not None:
            row.acc_given_task, _ = evaluate_given_task(model, batches(), true_mask)
        def task_map(mask: int) -> int:
            return mask_to_task.get(mask, -1)
    elif cache is not None:
        given = cache.given(task_id, batches)
        row.acc_given_task, per_batch = given.acc, given.per_batch
    else:
        row.acc_given_task, per_batch = evaluate_given_task(model, batches(), task_id)
    if cfg.scenario is Scenario.GG or not inferred:
        return row
    only_banked = len(candidates) == candidates.banked  # a prefix of the bank: the state after that many tasks
    for i, objective in enumerate(objectives(cfg)):
        inf = dataclasses.replace(cfg.inference, objective=objective)
        table = (cache.table(task_id, inf, candidates.banked) if cache is not None and only_banked
                 and mask_to_task is None else None)
        if table is not None:
            res = evaluate_from_table(task_id, table, per_batch)
        else:
            res = evaluate_inferred(model, batches(), task_id, inf, candidates, per_batch_given=per_batch,
                                    task_map=task_map, true_mask=true_mask)
        scores = InferredScores(res.acc_inferred, res.task_inference_acc)
        if i == 0:
            row.inferred = scores
            row.inferred_counts = res.inferred_counts
            row.shortlist_recall = res.shortlist_recall
            row.true_rank_counts = res.true_rank_counts
            if cfg.benchmark.labels == "global":  # class-incremental: also the task of each image alone
                row.acc_inferred_per_image = evaluate_per_image(model, batches(), inf, candidates)
        else:
            row.by_objective[objective] = scores
    return row


def curve_point(cfg: RunConfig, model: SupermaskModel, stream, num_learned: int,
                mask_to_task: dict[int, int] | None = None, *, bank_prefix: bool = False,
                cache: EvaluationCache | None = None) -> CurvePoint:
    """Accuracy over the tasks learned so far (a sample of them if ``eval.sample_tasks``).
    With ``bank_prefix`` the candidates are the bank's first ``num_learned`` masks: the state
    after ``num_learned`` tasks, recomputed from a later bank (GG/GN masks never change once
    learned)."""
    t0 = time.perf_counter()
    tasks = sampled_tasks(num_learned, cfg.eval.sample_tasks)
    candidates = model.candidates(num_banked=num_learned) if bank_prefix else model.candidates(include_active=True)
    rows = [evaluate_task(cfg, model, stream, t, mask_to_task, candidates, cache=cache) for t in tasks]
    inferred = not cfg.scenario.task_given_at_test
    point = CurvePoint(num_tasks_learned=num_learned, tasks_evaluated=tasks, summary=Summary.of(rows, inferred=inferred),
                       seconds=time.perf_counter() - t0, rows=rows, inferred=inferred)
    log.info("curve point after %d tasks: %s", num_learned, point.to_dict(with_rows=False))
    return point


def deferred_evaluation(cfg: RunConfig, model: SupermaskModel, stream, results: RunResults,
                        cache: EvaluationCache | None = None) -> None:
    """The accuracy-vs-tasks points a GG/GN run still lacks (from bank prefixes: a run resumed
    from several processes) and the final evaluation, sharing ``cache`` (the run's own, or a
    new one)."""
    cache = cache if cache is not None else EvaluationCache(cfg, model, stream)
    done = {p.num_tasks_learned for p in results.curve}
    missing = sorted(n for n in matrix_points(cfg) - done if n < cfg.benchmark.num_tasks)
    for n in missing:
        cache.prepare(sampled_tasks(n, cfg.eval.sample_tasks))
    cache.prepare(sampled_tasks(cfg.benchmark.num_tasks, cfg.eval.sample_tasks))
    results.curve += [curve_point(cfg, model, stream, n, bank_prefix=True, cache=cache) for n in missing]
    results.curve.sort(key=lambda p: p.num_tasks_learned)
    final_evaluation(cfg, model, stream, results, cache=cache)


def final_evaluation(cfg: RunConfig, model: SupermaskModel, stream, results: RunResults, *,
                     reuse_curve: bool = True, cache: EvaluationCache | None = None) -> None:
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
    candidates = model.candidates(include_active=True)
    for task_id in range(num_tasks):
        row = evaluate_task(cfg, model, stream, task_id, mask_to_task, candidates,
                            inferred=task_id in inferred_tasks and task_id not in reuse, cache=cache)
        if task_id in reuse:
            old_row = reuse[task_id]
            row.inferred, row.by_objective = old_row.inferred, dict(old_row.by_objective)
            row.inferred_counts = dict(old_row.inferred_counts)
            row.acc_inferred_per_image = old_row.acc_inferred_per_image
            row.shortlist_recall, row.true_rank_counts = old_row.shortlist_recall, dict(old_row.true_rank_counts)
        if task_id in old and old[task_id].acc_given_task is not None and cfg.scenario is not Scenario.NN:
            # Accuracy right after learning the task, to show that later tasks changed nothing.
            row.acc_given_task_when_learned = old[task_id].acc_given_task
        rows.append(row)
    results.tasks = rows
    if cfg.scenario is not Scenario.GG:
        results.record_confusion(rows, len(inferred_tasks))
    results.summarise()
