"""Evaluation protocols, written once for every backend: the task given (GG) and the task
inferred from the test batch (GN, NN).

**The GN protocol** (the paper's, as the official code scores it with unshared labels): every
test batch comes from one task; the task is inferred from the batch's first
``inference.num_images`` images alone (never its label), and the whole batch is classified
with the inferred mask. A batch whose task is inferred wrongly counts as all wrong, even if the
wrong mask happens to classify some of its images right: with unshared labels a wrong task
means wrong classes. So

* ``acc_inferred`` = (images correctly classified in batches whose task was inferred right) /
  (all images);
* ``task_inference_acc`` = (batches whose task was inferred right) / (batches);
* ``acc_given_task`` = accuracy with the task's own mask (GG).

In NN, masks are numbered in detection order: ``task_map`` maps each mask to the true task it
stands for (the one it trained on most), for scoring only.

:func:`score_task` applies the protocol to per-batch :class:`BatchOutcome` records; the native
runner (:func:`evaluate_inferred`) and the Avalanche strategy both produce those records, so
the same masks give the same numbers through both by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .candidates import Candidates
from .config import InferenceConfig
from .inference import TaskRanking, likelihood_candidates, likelihood_scores, rank_among
from .model import SupermaskModel

__all__ = ["BatchInference", "BatchOutcome", "TaskScores", "classify", "evaluate_given_task", "evaluate_inferred",
           "evaluate_from_table", "evaluate_per_image", "infer_batch_masks", "infer_batches", "activation_bytes_per_image",
           "likelihood_table", "score_task"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BatchOutcome:
    """One test batch under the GN protocol.

    Attributes:
        size: images in the batch.
        inferred_task: the task its inferred mask stands for (-1: a mask that stands for no
            task, e.g. an NN mask that never trained).
        correct: images classified right with the inferred mask (used only when
            ``inferred_task`` is the batch's task).
    """

    size: int
    inferred_task: int
    correct: int
    #: where the batch's own task stood in the inference's ranking (0: chosen), when known
    true_rank: int | None = None
    #: whether the candidates the final decision compared held the batch's own task
    in_shortlist: bool | None = None


@dataclass(frozen=True)
class TaskScores:
    """One task's scores under the GN protocol (see the module docstring), and where its
    batches went: ``inferred_counts[t]`` batches were inferred as task ``t`` (a row of the
    task-inference confusion matrix)."""

    acc_inferred: float
    task_inference_acc: float
    inferred_counts: dict[int, int] = field(default_factory=dict)
    #: fraction of batches whose own task was among the candidates the decision compared
    shortlist_recall: float | None = None
    #: true_rank_counts[r] batches had their own task at rank r (0: inferred right)
    true_rank_counts: dict[int, int] = field(default_factory=dict)


def score_task(task_id: int, outcomes: Sequence[BatchOutcome]) -> TaskScores:
    """The GN protocol over one task's test batches: a batch counts only when its task was
    inferred right (then by its predictions); a wrongly inferred batch counts as all wrong."""
    total = sum(o.size for o in outcomes)
    right = [o for o in outcomes if o.inferred_task == task_id]
    counts: dict[int, int] = {}
    ranks: dict[int, int] = {}
    for o in outcomes:
        counts[o.inferred_task] = counts.get(o.inferred_task, 0) + 1
        if o.true_rank is not None:
            ranks[o.true_rank] = ranks.get(o.true_rank, 0) + 1
    listed = [o.in_shortlist for o in outcomes if o.in_shortlist is not None]
    return TaskScores(acc_inferred=sum(o.correct for o in right) / max(1, total),
                      task_inference_acc=len(right) / max(1, len(outcomes)), inferred_counts=dict(sorted(counts.items())),
                      shortlist_recall=sum(listed) / len(listed) if listed else None,
                      true_rank_counts=dict(sorted(ranks.items())))


@torch.no_grad()
def classify(model: SupermaskModel, x: torch.Tensor, y: torch.Tensor, mask_id: int) -> int:
    """Images of batch ``(x, y)`` that mask ``mask_id`` classifies right (among the model's
    ``num_classes`` real classes)."""
    with model.use_task(mask_id):
        return int((model.predict(x) == y).sum())


def evaluate_given_task(model: SupermaskModel, batches: Iterable[Batch], mask_id: int
                        ) -> tuple[float, list[tuple[int, int]]]:
    """GG: accuracy of ``batches`` with mask ``mask_id`` (the task's own).

    Returns ``(accuracy, [(correct, size) per batch])``.
    """
    # One set_task for all batches: the mask is unpacked and W * M formed once, not per batch.
    with torch.no_grad(), model.use_task(mask_id):
        per_batch = [(int((model.predict(x) == y).sum()), y.numel()) for x, y in batches]
    correct = sum(c for c, _ in per_batch)
    total = sum(n for _, n in per_batch)
    return correct / max(1, total), per_batch


@dataclass(frozen=True)
class BatchInference:
    """The inference of one test batch: the mask chosen, and, when the batch's own mask was
    named, where it stood (``true_rank``, 0: chosen) and whether the decision compared it."""

    mask: int
    true_rank: int | None = None
    in_shortlist: bool | None = None


def infer_batches(model: SupermaskModel, images: Sequence[torch.Tensor], cfg: InferenceConfig,
                  candidates: Candidates, *, true_masks: Sequence[int | None] | None = None) -> list[BatchInference]:
    """The mask inferred for each test batch ``images[i]`` ``(B_i, ...)`` from its first
    ``cfg.num_images`` images (paper protocol), among ``candidates``
    (:meth:`SupermaskModel.candidates`); with ``true_masks`` (each batch's own mask), where that
    mask was ranked.

    Batches share an inference pass in groups of ``cfg.group_size`` (speed only); a group only
    holds batches that give the same number of images, so every batch uses its own first
    ``num_images`` (a short last batch uses all it has, on its own).
    """
    out: list[BatchInference | None] = [None] * len(images)
    by_size: dict[int, list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault(min(cfg.num_images, x.shape[0]), []).append(i)
    # One batch never shares a pass: no need to know its size (the Avalanche strategy infers
    # batch by batch).
    per_image = activation_bytes_per_image(model, images[0][:1]) if len(images) > 1 else 0
    fit = max(1, (cfg.memory_mb << 20) // max(1, 3 * per_image))  # x3: saved activations, their gradients
    for n, members in by_size.items():
        group = max(1, min(cfg.group_size, fit // n))
        for start in range(0, len(members), group):
            chunk = members[start: start + group]
            xs = torch.stack([images[i][:n] for i in chunk])
            ranking = _rank(model, xs, cfg, candidates)
            for row, i in enumerate(chunk):
                out[i] = _batch_inference(ranking.order[row], ranking.shortlist,
                                          None if true_masks is None else true_masks[i])
    return out


def _rank(model: SupermaskModel, xs: torch.Tensor, cfg: InferenceConfig, candidates: Candidates) -> TaskRanking:
    """:func:`~supsup.inference.rank_among` of groups ``xs`` ``(G, n, ...)`` with the settings of ``cfg``."""
    return rank_among(model, xs, candidates, method=cfg.method, objective=cfg.objective, num_classes=model.num_classes,
                      log_base=cfg.log_base, refine=cfg.refine, refine_candidates=cfg.refine_candidates,
                      refine_temperature=cfg.refine_temperature)


def _batch_inference(order: torch.Tensor, shortlist: int, true_mask: int | None) -> BatchInference:
    """A batch's inference from its ranking ``order`` ``(k,)`` (best first)."""
    mask = int(order[0])
    if true_mask is None:
        return BatchInference(mask)
    where = (order == true_mask).nonzero()
    if where.numel() == 0:  # not a candidate at all (e.g. a task not learned yet)
        return BatchInference(mask, None, False)
    rank = int(where[0, 0])
    return BatchInference(mask, rank, rank < shortlist)


def infer_batch_masks(model: SupermaskModel, images: Sequence[torch.Tensor], cfg: InferenceConfig,
                      candidates: Candidates) -> list[int]:
    """The mask inferred for each test batch (:func:`infer_batches`)."""
    return [b.mask for b in infer_batches(model, images, cfg, candidates)]


def likelihood_table(model: SupermaskModel, images: Sequence[torch.Tensor], cfg: InferenceConfig, *,
                     candidates: Sequence[int] | None = None) -> torch.Tensor:
    """``(len(images), k)``: each test batch's likelihood score (:mod:`supsup.likelihood`) under
    every banked mask (or the banked tasks ``candidates``), from its first ``cfg.num_images``
    images; one pass over the masks for all batches. A mask's score ignores the other
    candidates, so the columns of any prefix of the bank give the inference over that prefix
    (:func:`evaluate_from_table`)."""
    tasks = likelihood_candidates(model, model.candidates())
    if candidates is not None:
        tasks = [tasks[t] for t in candidates]
    n = [min(cfg.num_images, x.shape[0]) for x in images]
    x = torch.cat([img[:m] for img, m in zip(images, n)])
    scores = likelihood_scores(model, x, tasks)
    group = torch.repeat_interleave(torch.arange(len(images), device=scores.device),
                                    torch.tensor(n, device=scores.device))
    return torch.zeros(len(images), len(tasks), device=scores.device).index_add_(0, group, scores)


def activation_bytes_per_image(model: SupermaskModel, x: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module for one input ``x`` ``(1, ...)``: what one image
    adds to an inference pass, so that :func:`infer_batches` can bound a group (128 batches of
    128 images through a ResNet-18 would hold tens of GB). One forward pass of one image with
    the first banked task, without gradients; 0 while no task is banked or a task is in
    training (no task to run it with)."""
    if model.num_banked_tasks == 0 or model.active_task is not None:
        return 0
    total = 0

    def count(_module, _inputs, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad(), model.use_task(0):
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return total


def evaluate_inferred(model: SupermaskModel, batches: Sequence[Batch], task_id: int, cfg: InferenceConfig,
                      candidates: Candidates, *, per_batch_given: list[tuple[int, int]] | None = None,
                      task_map: Callable[[int], int] | None = None, true_mask: int | None = None, table: torch.Tensor | None = None) -> TaskScores:
    """GN accuracy of task ``task_id`` over its test ``batches`` (the protocol of the module
    docstring).

    Args:
        per_batch_given: ``(correct, size)`` per batch with the task's own mask, when known
            (GG/GN: a batch inferred right is then scored without another forward pass).
        task_map: mask id -> the task it stands for (NN); default: mask ``i`` is task ``i``.
        candidates: the masks inference chooses among (:meth:`SupermaskModel.candidates`).
        true_mask: the task's own mask (default: ``task_id`` without a ``task_map``), whose
            rank among the candidates is recorded.
        table: ``(len(batches), k)`` scores of every batch under each candidate, lowest best,
            when the method's scores are known already (:func:`likelihood_table`): no inference
            is run.
    """
    if true_mask is None and task_map is None:
        true_mask = task_id
    if table is not None:
        k = table.shape[1]
        inferred = [_batch_inference(o, k, true_mask) for o in table.argsort(dim=1, stable=True)]
    else:
        inferred = infer_batches(model, [x for x, _ in batches], cfg, candidates, true_masks=[true_mask] * len(batches))
    outcomes = []
    for i, ((x, y), inf) in enumerate(zip(batches, inferred)):
        mask = inf.mask
        stands_for = mask if task_map is None else task_map(mask)
        if stands_for != task_id:
            correct = 0  # not used by the protocol: the batch counts as wrong
        elif task_map is None and per_batch_given is not None:
            correct = per_batch_given[i][0]  # the task's own mask: exactly its GG count
        else:
            correct = classify(model, x, y, mask)
        outcomes.append(BatchOutcome(size=y.numel(), inferred_task=stands_for, correct=correct,
                                     true_rank=inf.true_rank, in_shortlist=inf.in_shortlist))
    return score_task(task_id, outcomes)


def evaluate_from_table(task_id: int, table: torch.Tensor, per_batch_given: Sequence[tuple[int, int]]) -> TaskScores:
    """The GN protocol for task ``task_id`` when every test batch's score under every candidate is
    known (``table`` ``(batches, k)``, lowest best; candidate ``i`` is task ``i``) and so is each
    batch's GG count with the task's own mask (``per_batch_given``, ``(correct, size)``): a batch
    inferred right scores its GG count, the others nothing; no forward pass."""
    k = table.shape[1]
    outcomes = []
    for order, (correct, size) in zip(table.argsort(dim=1, stable=True), per_batch_given):
        inf = _batch_inference(order, k, task_id)
        outcomes.append(BatchOutcome(size=size, inferred_task=inf.mask, correct=correct if inf.mask == task_id else 0,
                                     true_rank=inf.true_rank, in_shortlist=inf.in_shortlist))
    return score_task(task_id, outcomes)


@torch.no_grad()
def evaluate_per_image(model: SupermaskModel, batches: Sequence[Batch], cfg: InferenceConfig,
                       candidates: Candidates) -> float:
    """Accuracy when the task of every test image is inferred from that image alone and the
    image classified with the inferred mask (among that task's classes): the class-incremental
    reading, where a test image need not come with others of its task."""
    correct = total = 0
    for x, y in batches:
        tasks = _rank(model, x.unsqueeze(1), cfg, candidates).tasks  # each image its own group
        for mask in tasks.unique().tolist():
            rows = tasks == mask
            with model.use_task(int(mask)):
                correct += int((model.predict(x[rows]) == y[rows]).sum())
        total += y.numel()
    return correct / max(1, total)
