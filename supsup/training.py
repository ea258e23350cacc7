"""Training one task's supermask: the optimizer over the active scores, the loss, the loop.

Plain functions over a :class:`~supsup.model.SupermaskModel` and any iterable of ``(x, y)``
batches (a ``DataLoader``, or a task stream's batches); the experiment runner, the NN loop
and the Avalanche strategy all call them.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import PRECISIONS, TrainConfig
from .model import SupermaskModel
from .optim import OPTIMIZERS

__all__ = ["CalibrationBuffer", "StepTime", "TaskReport", "fit_active_task", "fit_task_likelihood", "learn_task", "make_optimizer", "make_scheduler", "training_autocast", "train_loss",
           "train_steps", "train_task"]

Batch = tuple[torch.Tensor, torch.Tensor]


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The per-task optimizer over the active scores (paper: RMSprop, lr 1e-4, no decay).

    With ``cfg.layer_lr`` the scores of masked layer ``l`` (``params`` in layer order, one
    tensor per layer: :meth:`SupermaskModel.trainable_parameters`) learn at
    ``cfg.lr * layer_lr[l]``, each layer its own parameter group (a schedule scales every
    group alike).
    """
    params = list(params)
    if cfg.layer_lr is not None:
        if any(not isinstance(p, torch.Tensor) for p in params):
            raise ValueError("train.layer_lr needs the scores one tensor per masked layer, not parameter groups "
                             "(the Avalanche backend builds its own: leave train.layer_lr unset there)")
        if len(params) != len(cfg.layer_lr):
            raise ValueError(f"train.layer_lr has {len(cfg.layer_lr)} multipliers for {len(params)} masked layers")
        params = [{"params": [p], "lr": cfg.lr * m} for p, m in zip(params, cfg.layer_lr)]
    return OPTIMIZERS.get(cfg.optimizer)(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)


def default_precision(device: torch.device | str) -> str:
    """What ``precision: auto`` means without a timing (the Python API, the Avalanche strategy):
    bf16 on a GPU that supports it, fp32 elsewhere (on a CPU without bf16 units bf16 is about 3x
    slower; the runner times both instead, :func:`choose_precision`)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def choose_precision(model: SupermaskModel, x: torch.Tensor, y: torch.Tensor, *, steps: int = 5,
                     margin: float = 0.9) -> tuple[str, dict[str, float]]:
    """``precision: auto`` in the runner: time ``steps`` training forward and backward passes of
    ``model``'s task in training on the batch ``(x, y)`` in fp32 and in bf16 (after one warm-up
    each, alternating), and take bf16 only if its median is below ``margin`` times fp32's. The
    model should be a throwaway copy: its scores get gradients and BatchNorm statistics move.
    Returns the choice and the medians in ms."""
    import statistics
    import time

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for i in range(steps + 1):
        for precision in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            sync()
            t0 = time.perf_counter()
            train_loss(model, x, y, precision).backward()
            sync()
            if i:  # the first pass of each warms up (allocations, kernel selection)
                times[precision].append(time.perf_counter() - t0)
    ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
    return ("bf16" if ms["bf16"] < margin * ms["fp32"] else "fp32"), ms


def training_autocast(precision: str, device: torch.device | str):
    """The autocast context of a training forward pass: bf16 runs the matmuls of the masked
    layers in bfloat16 with fp32 accumulation (about 1.4x faster for FC 1024 on a CPU with
    AVX512-BF16, about 3x slower on one without); the scores, their gradients and the optimizer
    stay fp32. ``auto``: :func:`default_precision`."""
    if precision == "auto":
        precision = default_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def train_loss(model: SupermaskModel, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Cross-entropy of the model's current (training) forward over all outputs (superfluous
    neurons included, as in the paper), computed in fp32."""
    with training_autocast(precision, x.device):
        logits = model(x)
    return F.cross_entropy(logits.float(), y)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int | None):
    """The learning-rate schedule over a task's ``steps`` (None for ``constant``)."""
    if cfg.schedule == "constant":
        return None
    if steps is None:
        raise ValueError("a cosine schedule needs the number of steps: pass max_steps, or batches with a length")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def train_steps(model: SupermaskModel, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                *, total: int | None = None, desc: str = "", progress: bool = True,
                precision: str = "fp32", scheduler=None, start: int = 0, recent: list[float] | None = None,
                on_step: Callable[[int, list[float]], None] | None = None, step_time: StepTime | None = None) -> float:
    """Cross-entropy steps on the active task (``scheduler`` stepped after each); returns the
    mean loss of the last 50 steps. A task resumed inside its training continues at step
    ``start`` with the losses it had (``recent``); ``on_step(steps done, recent losses)`` runs
    after every step (checkpoints); ``step_time`` sums the seconds inside the steps (forward,
    backward, update, up to the loss on the host), leaving out data, progress and callbacks."""
    model.train_mode()
    recent = list(recent or [])
    bar = tqdm(batches, total=total, initial=start, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, start=start):
        t0 = time.perf_counter()
        loss = train_loss(model, x, y, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        recent.append(loss.item())  # waits for the step on a GPU: the step's time ends here
        if step_time is not None:
            step_time.seconds += time.perf_counter() - t0
        recent = recent[-50:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if on_step is not None:
            on_step(step + 1, recent)
    bar.close()
    return sum(recent) / max(1, len(recent))


def _steps(batches: Iterable, device: torch.device, epochs: int, max_steps: int | None) -> Iterator[Batch]:
    """``epochs`` passes over ``batches`` (or ``max_steps`` batches, passing as often as needed;
    a one-shot iterator ends when it runs out), each moved to ``device``."""
    steps = 0
    passes = 0
    while max_steps is not None or passes < epochs:
        yielded = False
        for batch in batches:
            if max_steps is not None and steps >= max_steps:
                return
            x, y = batch[0], batch[1]  # (x, y), or Avalanche's (x, y, t)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            steps += 1
            yielded = True
        passes += 1
        if not yielded or isinstance(batches, Iterator):
            return


class CalibrationBuffer:
    """The last ``size`` training images of a task and their labels: what its likelihood
    statistics are fitted on when it finishes (:meth:`SupermaskModel.fit_likelihood`). Keeps
    references to the batches it is given (at most one batch more than ``size`` images)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a calibration buffer holds at least 1 image, got {size}")
        self.size = size
        self._batches: list[Batch] = []
        self._count = 0

    def __len__(self) -> int:
        return min(self._count, self.size)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._batches.append((x.detach(), y.detach()))
        self._count += x.shape[0]
        while self._count - self._batches[0][0].shape[0] >= self.size:
            self._count -= self._batches.pop(0)[0].shape[0]

    def clear(self) -> None:
        self._batches, self._count = [], 0

    def tensors(self) -> Batch:
        """``(x, y)``: the last ``len(self)`` images, oldest first."""
        if not self._batches:
            raise ValueError("the calibration buffer is empty")
        x = torch.cat([b[0] for b in self._batches])
        y = torch.cat([b[1] for b in self._batches])
        return x[-self.size:], y[-self.size:]

    def state(self) -> dict[str, torch.Tensor]:
        """Its images and labels as tensors (a checkpoint of a task still in training)."""
        if not self._batches:
            return {}
        x, y = self.tensors()
        return {"x": x.cpu(), "y": y.cpu()}

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.clear()
        if state:
            self.add(state["x"].to(device), state["y"].to(device))


def fit_task_likelihood(model: SupermaskModel, task_id: int, buffer: CalibrationBuffer | None) -> None:
    """Fit task ``task_id``'s likelihood statistics on ``buffer`` when the model keeps them."""
    if model.likelihood is not None and buffer is not None and len(buffer) >= 2:
        model.fit_likelihood(task_id, *buffer.tensors())


@dataclass
class TaskProgress:
    """A task stopped inside its training: what it needs to go on exactly as if never stopped
    (with its scores, BatchNorm running statistics, Bernoulli sampler: the model's state).

    Attributes:
        step: optimizer steps done.
        recent: the losses of its last (up to 50) steps.
        optimizer: the optimizer's ``state_dict``.
        scheduler: the learning-rate schedule's ``state_dict`` (None: constant).
        calibration: its recent training images for the likelihood statistics.
    """

    step: int
    recent: list[float]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    calibration: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskReport:
    """What learning a task did: its id, the mean loss of its last 50 steps, its steps, its
    last training images (when the model keeps likelihood statistics) and the seconds spent
    inside its optimizer steps (:class:`StepTime`)."""

    task_id: int
    loss: float
    steps: int
    calibration: CalibrationBuffer | None = None
    step_seconds: float = 0.0


@dataclass
class StepTime:
    """Seconds spent inside optimizer steps, summed (what a run adds around them is the rest)."""

    seconds: float = 0.0


#: The learning rates measured to let a mask kind learn, where the paper's 1e-4 does not: RMSprop
#: and Adam move a score by about lr per step, and Bernoulli scores start as coins (sigmoid(s) =
#: 0.5). One PermutedMNIST task, FC 1024: lr 1e-4 0.19, 1e-2 0.66, 0.1 0.89, 0.3 0.965, 1.0 0.93
#: (benchmarks/results/bernoulli_lr.md).
LEARNING_RATE_RANGES = {"bernoulli": (1e-2, 1.0, 0.3)}


def check_learning_rate(mask_kind: str, lr: float) -> str | None:
    """Warn (once per message) when ``mask_kind`` trains at a learning rate outside the range
    measured for it (:data:`LEARNING_RATE_RANGES`); returns the warning, or None."""
    measured = LEARNING_RATE_RANGES.get(mask_kind)
    if measured is None or measured[0] <= lr <= measured[1]:
        return None
    lo, hi, best = measured
    message = (f"mask.kind={mask_kind} at train.lr={lr:g} is outside the range measured to learn ({lo:g} to {hi:g}, "
               f"best {best:g}): its masks may stay near chance; set train.lr={best:g}")
    warnings.warn(message, UserWarning, stacklevel=3)
    return message


def train_task(model: SupermaskModel, batches: Iterable[Batch], config: TrainConfig | None = None, *,
               epochs: int = 1, max_steps: int | None = None, progress: bool = False) -> int:
    """Learn a new task from ``batches`` and bank its mask; returns the task id
    (:func:`learn_task` also returns its loss)."""
    return learn_task(model, batches, config, epochs=epochs, max_steps=max_steps, progress=progress).task_id


def learn_task(model: SupermaskModel, batches: Iterable[Batch], config: TrainConfig | None = None, *,
               epochs: int = 1, max_steps: int | None = None, progress: bool = False,
               resume: TaskProgress | None = None, checkpoint_every: int | None = None,
               on_checkpoint: Callable[[TaskProgress], None] | None = None,
               on_step: Callable[[float], None] | None = None) -> TaskReport:
    """Learn a new task from ``batches`` and bank its mask.

    Starts the next task (:meth:`SupermaskModel.add_task`), runs one optimizer step per batch
    over ``epochs`` passes (or exactly ``max_steps`` steps, passing over the batches as often as
    needed), and freezes the mask into the bank (:meth:`SupermaskModel.finish_task`).

    Args:
        batches: any iterable of ``(x, y)`` (e.g. a ``torch.utils.data.DataLoader``), ``x``
            ``(B, ...)`` inputs, ``y`` ``(B,)`` labels in ``[0, model.num_classes)``; moved to
            the model's device.
        config: optimizer, learning rate and precision (default :class:`TrainConfig`: the
            paper's RMSprop with lr 1e-4; its ``iterations`` is not used here).
        resume: the task in training stopped inside its training (the model's active task,
            its state restored): it goes on from there (:func:`fit_active_task`).
        checkpoint_every / on_checkpoint: every ``checkpoint_every`` steps (not after the
            last), ``on_checkpoint`` gets the task's :class:`TaskProgress`.
        on_step: gets every step's loss (e.g. for a tracker).
    """
    cfg = config if config is not None else TrainConfig()
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if resume is None:
        model.add_task()
    try:
        report = fit_active_task(model, batches, cfg, epochs=epochs, max_steps=max_steps, progress=progress,
                                 resume=resume, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                                 on_step=on_step)
    except BaseException:
        model.abandon_task()
        raise
    model.finish_task()
    fit_task_likelihood(model, report.task_id, report.calibration)
    return report


def fit_active_task(model: SupermaskModel, batches: Iterable[Batch], cfg: TrainConfig, *, epochs: int = 1,
                    max_steps: int | None = None, progress: bool = False, resume: TaskProgress | None = None,
                    checkpoint_every: int | None = None,
                    on_checkpoint: Callable[[TaskProgress], None] | None = None,
                    on_step: Callable[[float], None] | None = None) -> TaskReport:
    """Train the task in training (:meth:`SupermaskModel.add_task` started it) on ``batches``,
    with a fresh optimizer and ``cfg``'s schedule; it is not banked (:func:`learn_task` does).
    With ``resume`` it goes on from a :class:`TaskProgress`: the batches it had trained on are
    skipped (drawn, not trained), the optimizer, schedule, losses and calibration images are
    restored. Every ``checkpoint_every`` steps before the last, ``on_checkpoint`` gets the
    progress."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    check_learning_rate(model.mask_kind, cfg.lr)
    task_id = model.active_task
    counted = [0]
    buffer = CalibrationBuffer(model.likelihood.images) if model.likelihood is not None else None

    def counting(stream):
        for batch in stream:
            counted[0] += 1
            if buffer is not None:
                buffer.add(*batch)
            yield batch

    optimizer = make_optimizer(model.trainable_parameters(), cfg)
    steps = max_steps if max_steps is not None else (epochs * len(batches) if hasattr(batches, "__len__") else None)
    scheduler = make_scheduler(optimizer, cfg, steps)
    stream = _steps(batches, model.device, epochs, max_steps)
    start, recent = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        if buffer is not None:
            buffer.load_state(resume.calibration, model.device)
        start, recent = resume.step, resume.recent
        counted[0] = start
        stream = itertools.islice(stream, start, None)  # the same data order: the batches trained are drawn

    def after_step(done: int, losses: list[float]) -> None:
        if on_step is not None:
            on_step(losses[-1])
        if not checkpoint_every or on_checkpoint is None or done % checkpoint_every or (steps is not None and done >= steps):
            return
        on_checkpoint(TaskProgress(step=done, recent=list(losses), optimizer=optimizer.state_dict(),
                                   scheduler=None if scheduler is None else scheduler.state_dict(),
                                   calibration={} if buffer is None else buffer.state()))

    step_time = StepTime()
    loss = train_steps(model, optimizer, counting(stream), total=steps, desc=f"task {task_id}", progress=progress,
                       precision=cfg.precision, scheduler=scheduler, start=start, recent=recent,
                       on_step=after_step if on_step is not None or (checkpoint_every and on_checkpoint is not None)
                       else None, step_time=step_time)
    return TaskReport(task_id=task_id, loss=loss, steps=counted[0], calibration=buffer, step_seconds=step_time.seconds)
