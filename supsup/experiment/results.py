"""A run's results as typed objects, serialised to ``results.json``.

:class:`RunResults` is what every backend fills and what ``results.json`` holds: per-task rows
(:class:`TaskRow`), means (:class:`Summary`), accuracy-vs-tasks points (:class:`CurvePoint`),
what NN detection did (:class:`NNReport`), timings and sizes. :meth:`RunResults.to_dict` gives
the JSON keys; :meth:`RunResults.from_dict` reads them back (also files written by earlier
versions, which lack the newer keys).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import RunConfig, Scenario
from ..metrics import summarise_matrix
from ..version import __version__

if TYPE_CHECKING:  # annotations only: results are data, they do not need the model at run time
    from ..model import SupermaskModel

__all__ = ["AccuracyMatrix", "BaselineReport", "CurvePoint", "HopSupSupReport", "InferredScores", "NNReport", "RunResults", "Summary", "TaskRow",
           "peak_rss_bytes", "safe_mean"]


def safe_mean(values) -> float | None:
    """Mean of the values that are not None or NaN (None if there are none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux

@dataclass
class InferredScores:
    """Task-inferred accuracy and task-inference accuracy (GN protocol) for one objective."""

    acc_inferred: float | None = None
    task_inference_acc: float | None = None


@dataclass
class TaskRow:
    """One task's accuracies. ``inferred`` holds the first objective's scores (keys
    ``acc_inferred``, ``task_inference_acc``); ``by_objective`` those of further objectives
    (keys ``acc_inferred_<objective>``, ``task_inference_acc_<objective>``)."""

    task_id: int
    acc_given_task: float | None = None
    inferred: InferredScores = field(default_factory=InferredScores)
    by_objective: dict[str, InferredScores] = field(default_factory=dict)
    acc_given_task_when_learned: float | None = None  # right after learning it (GG/GN)
    #: class-incremental streams: the task inferred from each test image alone
    acc_inferred_per_image: float | None = None
    #: batches of this task inferred as each task (GN/NN; the rows of ``task_confusion``)
    inferred_counts: dict[int, int] = field(default_factory=dict)
    #: GN/NN: fraction of batches whose own task was among the candidates the decision compared
    shortlist_recall: float | None = None
    #: GN/NN: batches per rank of their own task in the inference's ranking (0: inferred right)
    true_rank_counts: dict[int, int] = field(default_factory=dict)

    @property
    def mean_true_rank(self) -> float | None:
        n = sum(self.true_rank_counts.values())
        return sum(r * c for r, c in self.true_rank_counts.items()) / n if n else None

    @property
    def acc_inferred(self) -> float | None:
        return self.inferred.acc_inferred

    @property
    def task_inference_acc(self) -> float | None:
        return self.inferred.task_inference_acc

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task_id": self.task_id, "acc_given_task": self.acc_given_task,
                             "acc_inferred": self.inferred.acc_inferred,
                             "task_inference_acc": self.inferred.task_inference_acc}
        for obj, s in self.by_objective.items():
            d[f"acc_inferred_{obj}"] = s.acc_inferred
            d[f"task_inference_acc_{obj}"] = s.task_inference_acc
        if self.acc_given_task_when_learned is not None:
            d["acc_given_task_when_learned"] = self.acc_given_task_when_learned
        if self.acc_inferred_per_image is not None:
            d["acc_inferred_per_image"] = self.acc_inferred_per_image
        if self.inferred_counts:
            d["inferred_counts"] = {str(t): c for t, c in sorted(self.inferred_counts.items())}
        if self.shortlist_recall is not None:
            d["shortlist_recall"] = self.shortlist_recall
        if self.true_rank_counts:
            d["true_rank_counts"] = {str(r): c for r, c in sorted(self.true_rank_counts.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRow:
        by_obj = {k[len("acc_inferred_"):]: InferredScores(v, d.get("task_inference_acc_" + k[len("acc_inferred_"):]))
                  for k, v in d.items() if k.startswith("acc_inferred_") and k != "acc_inferred_per_image"}
        return cls(task_id=int(d["task_id"]), acc_given_task=d.get("acc_given_task"),
                   inferred=InferredScores(d.get("acc_inferred"), d.get("task_inference_acc")),
                   by_objective=by_obj, acc_given_task_when_learned=d.get("acc_given_task_when_learned"),
                   inferred_counts={int(t): int(c) for t, c in d.get("inferred_counts", {}).items()},
                   acc_inferred_per_image=d.get("acc_inferred_per_image"), shortlist_recall=d.get("shortlist_recall"),
                   true_rank_counts={int(r): int(c) for r, c in d.get("true_rank_counts", {}).items()})


@dataclass
class Summary:
    """Means over task rows: ``mean_acc_given_task``; with the task inferred,
    ``mean_acc_inferred`` and ``task_inference_acc`` (and ``..._<objective>`` per further
    objective)."""

    mean_acc_given_task: float | None = None
    inferred: InferredScores = field(default_factory=InferredScores)
    by_objective: dict[str, InferredScores] = field(default_factory=dict)
    mean_acc_inferred_per_image: float | None = None
    #: over every task-inferred batch: its own task among the compared candidates / its mean rank
    shortlist_recall: float | None = None
    mean_true_rank: float | None = None

    @classmethod
    def of(cls, rows: list[TaskRow], *, inferred: bool) -> Summary:
        """Means of ``rows`` (the inferred keys only when ``inferred``)."""
        ranked = [(r.mean_true_rank, sum(r.true_rank_counts.values())) for r in rows if r.true_rank_counts]
        batches = sum(n for _, n in ranked)
        out = cls(mean_acc_given_task=safe_mean(r.acc_given_task for r in rows),
                  mean_acc_inferred_per_image=safe_mean(r.acc_inferred_per_image for r in rows),
                  shortlist_recall=safe_mean(r.shortlist_recall for r in rows),
                  mean_true_rank=sum(m * n for m, n in ranked) / batches if batches else None)
        if inferred:
            out.inferred = InferredScores(safe_mean(r.acc_inferred for r in rows),
                                          safe_mean(r.task_inference_acc for r in rows))
            objectives = list(dict.fromkeys(o for r in rows for o in r.by_objective))
            out.by_objective = {
                o: InferredScores(safe_mean(r.by_objective[o].acc_inferred for r in rows if o in r.by_objective),
                                  safe_mean(r.by_objective[o].task_inference_acc for r in rows if o in r.by_objective))
                for o in objectives}
        return out

    def to_dict(self, *, with_inferred: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"mean_acc_given_task": self.mean_acc_given_task}
        if with_inferred:
            d["mean_acc_inferred"] = self.inferred.acc_inferred
            d["task_inference_acc"] = self.inferred.task_inference_acc
        for obj, s in self.by_objective.items():
            d[f"mean_acc_inferred_{obj}"] = s.acc_inferred
            d[f"task_inference_acc_{obj}"] = s.task_inference_acc
        if self.mean_acc_inferred_per_image is not None:
            d["mean_acc_inferred_per_image"] = self.mean_acc_inferred_per_image
        if self.shortlist_recall is not None:
            d["shortlist_recall"] = self.shortlist_recall
        if self.mean_true_rank is not None:
            d["mean_true_rank"] = self.mean_true_rank
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        by_obj = {k[len("mean_acc_inferred_"):]: InferredScores(v, d.get("task_inference_acc_" + k[len("mean_acc_inferred_"):]))
                  for k, v in d.items() if k.startswith("mean_acc_inferred_") and k != "mean_acc_inferred_per_image"}
        return cls(mean_acc_given_task=d.get("mean_acc_given_task"),
                   inferred=InferredScores(d.get("mean_acc_inferred"), d.get("task_inference_acc")),
                   by_objective=by_obj, mean_acc_inferred_per_image=d.get("mean_acc_inferred_per_image"),
                   shortlist_recall=d.get("shortlist_recall"), mean_true_rank=d.get("mean_true_rank"))


@dataclass
class CurvePoint:
    """Accuracy after ``num_tasks_learned`` tasks over ``tasks_evaluated`` (all learned tasks,
    or a sample of them)."""

    num_tasks_learned: int
    tasks_evaluated: list[int]
    summary: Summary
    seconds: float
    rows: list[TaskRow]
    num_detected_tasks: int | None = None  # NN: masks detected by then
    inferred: bool = True  # whether the point has task-inferred keys (GN/NN)

    def to_dict(self, *, with_rows: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"num_tasks_learned": self.num_tasks_learned, "tasks_evaluated": self.tasks_evaluated}
        d.update(self.summary.to_dict(with_inferred=self.inferred))
        d["seconds"] = self.seconds
        if with_rows:
            d["rows"] = [r.to_dict() for r in self.rows]
        if self.num_detected_tasks is not None:
            d["num_detected_tasks"] = self.num_detected_tasks
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurvePoint:
        return cls(num_tasks_learned=int(d["num_tasks_learned"]), tasks_evaluated=[int(t) for t in d["tasks_evaluated"]],
                   summary=Summary.from_dict(d), seconds=float(d.get("seconds", 0.0)),
                   rows=[TaskRow.from_dict(r) for r in d.get("rows", [])],
                   num_detected_tasks=d.get("num_detected_tasks"), inferred="mean_acc_inferred" in d)


@dataclass
class AccuracyMatrix:
    """``R[r][j]``: accuracy on task ``j`` after learning ``num_tasks_learned[r]`` tasks, with
    the task given (``given``) and inferred (``inferred``), as the scenario allows; None where
    not evaluated. ``before``: accuracy before any training (methods that answer unlearned
    tasks), for forward transfer. See :mod:`supsup.metrics`."""

    num_tasks_learned: list[int]
    given: list[list[float | None]] | None = None
    inferred: list[list[float | None]] | None = None
    before: dict[str, list[float | None]] | None = None

    @classmethod
    def from_points(cls, points: list[CurvePoint], num_tasks: int, *, given: bool, inferred: bool) -> AccuracyMatrix:
        """Rows from accuracy-vs-tasks points (each point's evaluated tasks)."""
        def rows(get):
            out = []
            for p in points:
                row: list[float | None] = [None] * num_tasks
                for r in p.rows:
                    if r.task_id < num_tasks:
                        row[r.task_id] = get(r)
                out.append(row)
            return out

        return cls(num_tasks_learned=[p.num_tasks_learned for p in points],
                   given=rows(lambda r: r.acc_given_task) if given else None,
                   inferred=rows(lambda r: r.acc_inferred) if inferred else None)

    def metrics(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {"given": x, "inferred": y}}`` for ACC, BWT, forgetting and FWT."""
        out: dict[str, dict[str, float | None]] = {}
        for kind, rows in (("given", self.given), ("inferred", self.inferred)):
            if rows is None:
                continue
            before = (self.before or {}).get(kind)
            for name, value in summarise_matrix(rows, self.num_tasks_learned, before).items():
                out.setdefault(name, {})[kind] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"num_tasks_learned": self.num_tasks_learned}
        for kind in ("given", "inferred"):
            if getattr(self, kind) is not None:
                d[kind] = getattr(self, kind)
        if self.before is not None:
            d["before"] = self.before
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AccuracyMatrix | None:
        if not d:
            return None
        return cls(num_tasks_learned=[int(n) for n in d["num_tasks_learned"]], given=d.get("given"),
                   inferred=d.get("inferred"), before=d.get("before"))


@dataclass
class NNReport:
    """What NN detection did: masks allocated (at which batch), which true tasks each trained
    on (``counts[mask][task]`` batches), the task each mask stands for, and masks shared by
    several true tasks (missed task switches)."""

    num_detected_tasks: int
    allocations: list[int]
    mask_to_task: dict[int, int]
    counts: dict[int, dict[int, int]]
    shared_masks: dict[int, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"num_detected_tasks": self.num_detected_tasks, "nn_allocations": list(self.allocations),
                "mask_to_task": {str(m): t for m, t in sorted(self.mask_to_task.items())},
                "nn_counts": {str(m): {str(t): c for t, c in sorted(d.items())} for m, d in sorted(self.counts.items())},
                "nn_shared_masks": {str(m): tasks for m, tasks in sorted(self.shared_masks.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NNReport | None:
        if "mask_to_task" not in d:
            return None
        return cls(num_detected_tasks=int(d["num_detected_tasks"]), allocations=[int(a) for a in d["nn_allocations"]],
                   mask_to_task={int(m): int(t) for m, t in d["mask_to_task"].items()},
                   counts={int(m): {int(t): int(c) for t, c in v.items()} for m, v in d.get("nn_counts", {}).items()},
                   shared_masks={int(m): [int(t) for t in v] for m, v in d.get("nn_shared_masks", {}).items()})


@dataclass
class BaselineReport:
    """What an Avalanche baseline run reports besides its accuracies."""

    hparams: dict[str, Any]
    accuracy_uses_task_id: bool
    head: str
    num_parameters: int
    optimizer_steps_per_task: int

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_hparams": self.hparams, "accuracy_uses_task_id": self.accuracy_uses_task_id,
                "head": self.head, "num_parameters": self.num_parameters,
                "optimizer_steps_per_task": self.optimizer_steps_per_task}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineReport | None:
        if "baseline_hparams" not in d:
            return None
        return cls(d["baseline_hparams"], bool(d["accuracy_uses_task_id"]), d["head"], int(d["num_parameters"]),
                   int(d["optimizer_steps_per_task"]))


@dataclass
class HopSupSupReport:
    """What a HopSupSup run reports besides its accuracies: its Hopfield stores, and how the
    masks were recovered (``tasks``: per task, its recovery steps, seconds and Hamming distances)."""

    rule: str
    hidden: list[int]
    store_bytes: int
    store_bytes_per_task: float
    explicit_mask_bytes_per_task: int
    mean_recovery_steps: float
    mean_recovery_seconds: float
    tasks: list[dict[str, Any]]
    train_loss_last: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> HopSupSupReport | None:
        return None if d is None else cls(**d)


_HEAD_KEYS = ("scenario", "benchmark", "num_tasks", "backend", "method", "backbone")
#: optional top-level keys of results.json that are typed fields of RunResults, written as they are
_OPTIONAL_KEYS = ("train_step_seconds", "precision", "precision_step_ms", "communication_seconds", "communication_bytes_per_task",
                  "data_cache_seconds")


@dataclass
class RunResults:
    """Everything a run reports (``results.json``). ``extra`` holds the keys of a results.json
    that this version does not know (written by a newer one), kept and written back as they are;
    nothing in this version writes to it."""

    scenario: Scenario
    benchmark: str
    num_tasks: int
    backend: str
    method: str
    backbone: str
    tasks: list[TaskRow] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    bank_bytes: int | None = None
    num_masked_weights: int | None = None
    bank_sha256: str | None = None
    curve: list[CurvePoint] = field(default_factory=list)
    tasks_inferred: int | None = None
    peak_rss_bytes: int | None = None
    nn: NNReport | None = None
    accuracy_matrix: AccuracyMatrix | None = None
    #: task_confusion[true task][inferred task] = test batches (GN/NN, the first objective)
    task_confusion: dict[int, dict[int, int]] | None = None
    supsup_version: str = __version__
    #: of ``train_seconds``, the seconds inside the optimizer steps (native GG/GN, one process):
    #: the rest is what the run adds around them (data, logging, progress, checkpoints, fits)
    train_step_seconds: float | None = None
    #: ``train.precision: auto``'s choice, and the timed training steps it was made on (native)
    precision: str | None = None
    precision_step_ms: dict[str, float] | None = None
    #: torchrun: seconds spent gathering the round's masks, and the bytes one task sends
    communication_seconds: float | None = None
    communication_bytes_per_task: int | None = None
    #: Avalanche: seconds spent turning experiences into cached tensors
    data_cache_seconds: float | None = None
    baseline: BaselineReport | None = None
    hopsupsup: HopSupSupReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, cfg: RunConfig) -> RunResults:
        """Empty results for a run of ``cfg``."""
        return cls(scenario=cfg.scenario, benchmark=cfg.benchmark.name, num_tasks=cfg.benchmark.num_tasks,
                   backend=cfg.backend, method=cfg.method, backbone=cfg.model.backbone)

    def summarise(self) -> None:
        """Fill :attr:`summary` from the task rows."""
        self.summary = Summary.of(self.tasks, inferred=not self.scenario.task_given_at_test)

    def record_confusion(self, rows: Sequence[TaskRow], tasks_inferred: int) -> None:
        """GN/NN: how many tasks had theirs inferred, and :attr:`task_confusion` from the rows'
        counts of inferred tasks."""
        self.tasks_inferred = tasks_inferred
        self.task_confusion = {r.task_id: dict(r.inferred_counts) for r in rows if r.inferred_counts}

    def record_bank(self, model: SupermaskModel, *, with_memory: bool = True) -> None:
        """The end of a run: the bank's bytes (masks and what tasks bank beside them), masked
        weights and digest, and (``with_memory``) this process's peak memory."""
        self.bank_bytes = model.bank_bytes
        self.num_masked_weights = model.num_masked_weights
        self.bank_sha256 = model.bank_sha256()
        if with_memory:
            self.peak_rss_bytes = peak_rss_bytes()

    @property
    def num_detected_tasks(self) -> int | None:
        return None if self.nn is None else self.nn.num_detected_tasks

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scenario": self.scenario.value, "benchmark": self.benchmark, "num_tasks": self.num_tasks,
                             "backend": self.backend, "method": self.method, "backbone": self.backbone,
                             "tasks": [r.to_dict() for r in self.tasks]}
        summary = self.summary.to_dict()
        d.update({k: summary[k] for k in ("mean_acc_given_task", "mean_acc_inferred", "task_inference_acc")})
        d.update({"num_detected_tasks": self.num_detected_tasks, "train_seconds": self.train_seconds,
                  "eval_seconds": self.eval_seconds, "bank_bytes": self.bank_bytes,
                  "num_masked_weights": self.num_masked_weights, "supsup_version": self.supsup_version})
        if self.bank_sha256 is not None:
            d["bank_sha256"] = self.bank_sha256
        if self.curve:
            d["curve"] = [p.to_dict() for p in self.curve]
        d.update({k: v for k, v in summary.items() if k not in d})  # further objectives' means
        if not self.scenario.task_given_at_test:
            # the class-incremental reading: each test image's task inferred from it alone
            # (mean over tasks; None where the run did not measure it)
            d["acc_inferred_per_image"] = self.summary.mean_acc_inferred_per_image
        if self.tasks_inferred is not None:
            d["tasks_inferred"] = self.tasks_inferred
        if self.peak_rss_bytes is not None:
            d["peak_rss_bytes"] = self.peak_rss_bytes
        if self.nn is not None:
            d.update({k: v for k, v in self.nn.to_dict().items() if k != "num_detected_tasks"})
        if self.accuracy_matrix is not None:
            d["accuracy_matrix"] = self.accuracy_matrix.to_dict()
            d.update(self.accuracy_matrix.metrics())
        if self.task_confusion is not None:
            d["task_confusion"] = {str(t): {str(i): c for i, c in sorted(row.items())}
                                   for t, row in sorted(self.task_confusion.items())}
        d.update({k: getattr(self, k) for k in _OPTIONAL_KEYS if getattr(self, k) is not None})
        if self.baseline is not None:
            d.update(self.baseline.to_dict())
        if self.hopsupsup is not None:
            d["hopsupsup"] = self.hopsupsup.to_dict()
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResults:
        known = set(_HEAD_KEYS) | {"tasks", "mean_acc_given_task", "mean_acc_inferred", "task_inference_acc",
                                   "num_detected_tasks", "train_seconds", "eval_seconds", "bank_bytes",
                                   "num_masked_weights", "supsup_version", "bank_sha256", "curve",
                                   "tasks_inferred", "peak_rss_bytes", "nn_allocations", "mask_to_task",
                                   "nn_counts", "nn_shared_masks", "accuracy_matrix", "task_confusion",
                                   "average_accuracy", "bwt", "forgetting", "fwt", "acc_inferred_per_image",
                                   "shortlist_recall", "mean_true_rank", "hopsupsup", *_OPTIONAL_KEYS}
        baseline = BaselineReport.from_dict(d)
        if baseline is not None:
            known |= set(baseline.to_dict())
        known |= {k for k in d if k.startswith(("mean_acc_inferred_", "task_inference_acc_"))}
        return cls(scenario=Scenario(d["scenario"]), benchmark=d["benchmark"], num_tasks=int(d["num_tasks"]),
                   backend=d.get("backend", "native"), method=d.get("method", "supsup"), backbone=d.get("backbone", ""),
                   tasks=[TaskRow.from_dict(r) for r in d.get("tasks", [])], summary=Summary.from_dict(d),
                   train_seconds=float(d.get("train_seconds", 0.0)), eval_seconds=float(d.get("eval_seconds", 0.0)),
                   bank_bytes=d.get("bank_bytes"), num_masked_weights=d.get("num_masked_weights"),
                   bank_sha256=d.get("bank_sha256"), curve=[CurvePoint.from_dict(p) for p in d.get("curve", [])],
                   tasks_inferred=d.get("tasks_inferred"), peak_rss_bytes=d.get("peak_rss_bytes"),
                   nn=NNReport.from_dict(d), accuracy_matrix=AccuracyMatrix.from_dict(d.get("accuracy_matrix")),
                   task_confusion={int(t): {int(i): int(c) for i, c in row.items()}
                                   for t, row in d["task_confusion"].items()} if d.get("task_confusion") else None,
                   supsup_version=d.get("supsup_version", "unknown"),
                   **{k: d[k] for k in _OPTIONAL_KEYS if k in d}, baseline=baseline,
                   hopsupsup=HopSupSupReport.from_dict(d.get("hopsupsup")),
                   extra={k: v for k, v in d.items() if k not in known})
