"""Training and evaluation loops: GG training, GG/GN evaluation, NN task detection.

Plain functions over a :class:`~supsup.model.SupermaskModel` and a task stream; the runner
(:mod:`supsup.runner`) and the Avalanche strategy both call them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import EvalConfig, InferenceConfig, NNConfig, TrainConfig
from .inference import alpha_gradients, infer_tasks
from .model import SupermaskModel
from .optim import FusedRMSprop

__all__ = [
    "make_optimizer",
    "training_autocast",
    "train_loss",
    "train_steps",
    "train_task",
    "evaluate_given_task",
    "evaluate_inferred",
    "NNState",
    "nn_detect",
    "nn_detection_gradients",
    "nn_check",
    "train_nn_segment",
    "mask_to_task",
]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The per-task optimizer over the active scores (paper: RMSprop, lr 1e-4, no decay)."""
    params = list(params)
    if cfg.optimizer == "rmsprop":
        # torch's RMSprop, with a one-pass compiled step on the CPU (memory-bound otherwise)
        return FusedRMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def training_autocast(precision: str, device: torch.device | str):
    """The autocast context of a training forward pass: bf16 runs the matmuls of the masked
    layers in bfloat16 with fp32 accumulation (about 1.6x faster for FC 1024 on a CPU with
    AVX512-BF16); the scores, their gradients and the optimizer stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; known: fp32, bf16")


def train_loss(model: SupermaskModel, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Cross-entropy of the model's current (training) forward, computed in fp32."""
    with training_autocast(precision, x.device):
        logits = model(x)
    return F.cross_entropy(logits.float(), y)


def train_steps(model: SupermaskModel, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                *, total: int | None = None, desc: str = "", progress: bool = True,
                precision: str = "fp32") -> float:
    """Cross-entropy steps on the active task; returns the mean loss of the last 50 steps."""
    model.train_mode()
    recent: list[float] = []
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        loss = train_loss(model, x, y, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        recent = recent[-50:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()
    return sum(recent) / max(1, len(recent))


def train_task(model: SupermaskModel, stream, task_id: int, cfg: TrainConfig, *, progress: bool = True) -> float:
    """GG training of one task: add its mask, ``cfg.iterations`` steps, freeze it into the bank.

    Returns the final training loss.
    """
    new_id = model.add_task()
    if new_id != task_id:
        raise RuntimeError(f"expected to learn task {task_id}, the model is at task {new_id}")
    opt = make_optimizer(model.trainable_parameters(), cfg)
    loss = train_steps(model, opt, stream.train_batches(task_id, cfg.iterations, cfg.batch_size),
                       total=cfg.iterations, desc=f"task {task_id}", progress=progress, precision=cfg.precision)
    model.finish_task()
    return loss


@torch.no_grad()
def _batch_correct(model: SupermaskModel, batches: Iterable[Batch], num_classes: int) -> list[tuple[int, int]]:
    out = []
    for x, y in batches:
        pred = model(x)[:, :num_classes].argmax(dim=1)  # superfluous neurons are never a class
        out.append((int((pred == y).sum()), y.numel()))
    return out


def evaluate_given_task(model: SupermaskModel, stream, task_id: int, cfg: EvalConfig, *,
                        num_classes: int, mask_id: int | None = None) -> tuple[float, list[tuple[int, int]]]:
    """GG accuracy of ``task_id``'s test set with mask ``mask_id`` (default: the task's own).

    Returns ``(accuracy, [(correct, size) per test batch])``.
    """
    model.set_task(task_id if mask_id is None else mask_id)
    try:
        per_batch = _batch_correct(model, stream.test_batches(task_id, cfg.batch_size, cfg.max_batches), num_classes)
    finally:
        model.restore_mode()
    correct = sum(c for c, _ in per_batch)
    total = sum(n for _, n in per_batch)
    return correct / max(1, total), per_batch


def evaluate_inferred(model: SupermaskModel, stream, task_id: int, eval_cfg: EvalConfig, inf_cfg: InferenceConfig,
                      *, num_classes: int, per_batch_given: list[tuple[int, int]] | None = None,
                      task_map: Callable[[int], int] | None = None,
                      packed: list[torch.Tensor] | None = None,
                      extra: list[torch.Tensor] | None = None) -> dict[str, float]:
    """GN accuracy of one task (the paper's protocol).

    Each test batch comes from one task; its task is inferred from its first
    ``inf_cfg.num_images`` images, the whole batch is classified with the inferred mask, and a
    batch whose task is wrong counts as wrong. ``task_map`` maps a mask id to the true task it
    stands for (NN: detected masks are not numbered like the stream's tasks).

    Returns ``{"acc_inferred", "task_inference_acc", "acc_given_task"}``.
    """
    batches = list(stream.test_batches(task_id, eval_cfg.batch_size, eval_cfg.max_batches))
    if task_map is not None:  # NN: mask ids are not task ids; GG scores are not defined here
        per_batch_given = [(0, y.numel()) for _, y in batches]
    elif per_batch_given is None:
        _, per_batch_given = evaluate_given_task(model, stream, task_id, eval_cfg, num_classes=num_classes)
    # Batches share an inference pass in groups of ``group_size``; a group only holds batches
    # that give the same number of images, so that every batch uses its own first
    # ``num_images`` (a short last batch uses all it has, on its own).
    predicted: list[int] = [0] * len(batches)
    by_size: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(batches):
        by_size.setdefault(min(inf_cfg.num_images, x.shape[0]), []).append(i)
    for n, members in by_size.items():
        for start in range(0, len(members), inf_cfg.group_size):
            chunk = members[start: start + inf_cfg.group_size]
            xs = torch.stack([batches[i][0][:n] for i in chunk])
            tasks, _ = infer_tasks(model, xs, method=inf_cfg.method, objective=inf_cfg.objective,
                                   num_classes=num_classes, log_base=inf_cfg.log_base, packed=packed, extra=extra)
            for i, t in zip(chunk, tasks.tolist()):
                predicted[i] = int(t)
    hits = 0
    correct = 0
    total = 0
    mapper = task_map or (lambda t: t)
    for p, (x, y), (c_given, n) in zip(predicted, batches, per_batch_given):
        total += n
        if mapper(p) != task_id:
            continue  # wrong task: the whole batch counts as wrong
        hits += 1
        if task_map is None:
            correct += c_given  # the inferred mask is the task's own: scores exactly as in GG
        else:
            model.set_task(p)
            try:
                correct += _batch_correct(model, [(x, y)], num_classes)[0][0]
            finally:
                model.restore_mode()
    return {
        "acc_inferred": correct / max(1, total),
        "task_inference_acc": hits / max(1, len(batches)),
        "acc_given_task": None if task_map is not None else sum(c for c, _ in per_batch_given) / max(1, total),
    }


# ----------------------------------------------------------------------------------- NN

@dataclass
class NNState:
    """What NN training carries from one stream segment to the next (checkpointed)."""

    batches_seen: int = 0
    batches_on_mask: int = 0  # batches the active mask trained since it was allocated/selected
    allocations: list[int] = field(default_factory=list)  # batch index at which each mask started
    capacity_warned: bool = False
    #: counts[mask][true_task] = batches of that true task trained on that mask
    counts: dict[int, dict[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"batches_seen": self.batches_seen, "batches_on_mask": self.batches_on_mask,
                "allocations": list(self.allocations), "capacity_warned": self.capacity_warned,
                "counts": {str(m): {str(t): c for t, c in d.items()} for m, d in self.counts.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> NNState:
        return cls(batches_seen=int(d["batches_seen"]), batches_on_mask=int(d["batches_on_mask"]),
                   allocations=[int(a) for a in d["allocations"]], capacity_warned=bool(d["capacity_warned"]),
                   counts={int(m): {int(t): int(c) for t, c in v.items()} for m, v in d["counts"].items()})


def nn_detection_gradients(model: SupermaskModel, x: torch.Tensor, *, packed: list[torch.Tensor] | None = None,
                           extra: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """The statistic of NN's check on batch ``x`` ``(n_img, ...)``: ``d H / d alpha`` ``(n,)``
    at ``alpha = 1/n`` over the ``n`` candidates (``packed``, default the bank, then ``extra``;
    see :func:`~supsup.inference.alpha_gradients`), and ``max softmax(-grad)``."""
    n = (packed[0].shape[0] if packed is not None else model.num_banked_tasks) + (extra[0].shape[0] if extra else 0)
    alphas = torch.full((1, n), 1.0 / n, dtype=x.dtype, device=x.device)
    grads = alpha_gradients(model, x.unsqueeze(0), alphas, objective="entropy", num_classes=1,
                            packed=packed, extra=extra)[0]
    model.restore_mode()
    return grads, float(torch.softmax(-grads, dim=0).max())


def nn_detect(model: SupermaskModel, x: torch.Tensor, cfg: NNConfig) -> tuple[int, bool, float]:
    """One NN check (paper Sec. 3.6): one-shot entropy gradient over
    ``n = max(k, min_candidates)`` masks at ``alpha = 1/n`` (``k`` learned masks, padded with
    untrained ones). Returns ``(best mask, is_new_task, max softmax(-grad))``; a new task is
    signalled when ``max softmax(-grad) < threshold / n``."""
    k = model.num_learned_tasks
    n = max(k, cfg.min_candidates)
    grads, confidence = nn_detection_gradients(model, x, extra=model.candidate_extras(include_active=True, pad_to=n))
    best = int(grads[:k].argmin())
    return best, confidence < cfg.threshold / n, confidence


def train_nn_segment(model: SupermaskModel, optimizer_factory: Callable[[], torch.optim.Optimizer],
                     optimizer: torch.optim.Optimizer | None, batches: Iterable[Batch], true_task: int,
                     state: NNState, cfg: NNConfig, *, total: int | None = None,
                     progress: bool = True, precision: str = "fp32") -> torch.optim.Optimizer:
    """Train on a stretch of the unlabeled stream, detecting new tasks every ``check_every``
    batches. ``true_task`` is used only for reporting (which mask saw which task).

    Returns the optimizer of the mask being trained at the end.
    """
    bar = tqdm(batches, total=total, desc=f"NN (true task {true_task})", disable=not progress,
               leave=False, dynamic_ncols=True)
    for x, y in bar:
        if model.active_task is None:  # the very first batch starts mask 0
            model.add_task()
            optimizer = optimizer_factory()
            state.allocations.append(state.batches_seen)
            state.batches_on_mask = 0
        elif state.batches_seen % cfg.check_every == 0:
            optimizer = nn_check(model, optimizer_factory, optimizer, x, state, cfg)
        model.train_mode()
        loss = train_loss(model, x, y, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mask = model.active_task
        state.counts.setdefault(mask, {})
        state.counts[mask][true_task] = state.counts[mask].get(true_task, 0) + 1
        state.batches_seen += 1
        state.batches_on_mask += 1
        if state.batches_seen % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", masks=model.num_learned_tasks)
    bar.close()
    return optimizer


def nn_check(model: SupermaskModel, optimizer_factory: Callable[[], torch.optim.Optimizer],
             optimizer: torch.optim.Optimizer, x: torch.Tensor, state: NNState, cfg: NNConfig) -> torch.optim.Optimizer:
    """One NN decision on batch ``x`` (paper Sec. 3.6): a new task (finish the active mask and
    start the next one, unless the active mask trained fewer than ``min_batches_per_task``
    batches or the bank is full), a task seen before (train its mask again), or the same
    task. Returns the optimizer to train with from now on (a fresh one when the mask changed).
    Shared by :func:`train_nn_segment` and the Avalanche strategy."""
    best, is_new, conf = nn_detect(model, x, cfg)
    active = model.active_task
    if is_new:
        if state.batches_on_mask < cfg.min_batches_per_task:
            log.info("NN guard: mask %d trained only %d batches; not allocating", active, state.batches_on_mask)
            return optimizer
        if model.num_learned_tasks >= model.num_tasks:
            if not state.capacity_warned:
                warnings.warn(f"NN: the mask bank is full ({model.num_tasks} masks); "
                              "new tasks are trained on the best existing mask", RuntimeWarning, stacklevel=2)
                state.capacity_warned = True
            is_new = False
        else:
            model.finish_task()
            model.add_task()
            state.allocations.append(state.batches_seen)
            state.batches_on_mask = 0
            log.info("NN: new task detected at batch %d (confidence %.4f); mask %d",
                     state.batches_seen, conf, model.active_task)
            return optimizer_factory()
    if best != active:
        # An earlier task came back: train its mask again. Logged, since a new task missed by
        # the check lands here too and then overwrites an old task's mask.
        log.info("NN: batch %d looks like mask %d's task (confidence %.4f); training mask %d again",
                 state.batches_seen, best, conf, best)
        model.finish_task()
        model.resume_task(best)
        state.batches_on_mask = 0
        return optimizer_factory()
    return optimizer


def mask_to_task(counts: dict[int, dict[int, int]]) -> dict[int, int]:
    """Each detected mask -> the true task it saw most batches of."""
    return {m: max(d.items(), key=lambda kv: (kv[1], -kv[0]))[0] for m, d in counts.items() if d}


def shared_masks(counts: dict[int, dict[int, int]], min_batches: int) -> dict[int, list[int]]:
    """Masks that trained on more than one true task -> those tasks, sorted. A task counts when
    it gave the mask at least ``min_batches`` batches: pass ``nn.check_every``, since a switch
    between two checks leaves up to ``check_every - 1`` batches of the new task on the old mask
    even when the next check catches it.

    NN never sees task labels, but a benchmark knows the true task of every batch: a shared
    mask means detection missed a task switch (or the bank was full), so tasks were trained
    over each other and the earlier ones are partly forgotten."""
    shared = {m: sorted(t for t, c in d.items() if c >= min_batches) for m, d in counts.items()}
    return {m: tasks for m, tasks in sorted(shared.items()) if len(tasks) > 1}


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def safe_mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None
