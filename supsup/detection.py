"""NN: detecting new tasks while training without task labels (paper Sec. 3.6).

:class:`NNDetector` is the one object that decides, batch by batch, which mask the stream
trains: it observes each training batch before the step and answers *keep training*, *new
task* (bank the active mask, start the next) or *switch to mask i* (an earlier task came back:
train its mask again), and applies the answer to the model. The native NN loop and the
Avalanche strategy both drive it, and rebuild their optimizer when the mask changed.

The check (every ``nn.check_every`` batches): a one-shot entropy gradient over
``n = max(k, nn.min_candidates)`` candidate masks at ``alpha = 1/n`` (the ``k`` learned ones,
padded with untrained masks of future task ids); a new task when ``n * max softmax(-grad)`` is
below ``nn.threshold``.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .candidates import Candidates
from .config import NNConfig, TrainConfig
from .inference import alpha_gradients
from .masks import SAMPLED_KINDS
from .model import SupermaskModel
from .objectives import entropy
from .training import CalibrationBuffer, fit_task_likelihood, make_optimizer, training_autocast

__all__ = ["Decision", "NNDetector", "NNState", "Verdict", "mask_to_task", "nn_detection_gradients",
           "shared_masks", "train_unlabeled"]

log = logging.getLogger(__name__)


@dataclass
class NNState:
    """What NN detection carries from one batch to the next (checkpointed)."""

    batches_seen: int = 0
    batches_on_mask: int = 0  # batches the active mask trained since it was allocated/selected
    allocations: list[int] = field(default_factory=list)  # batch index at which each mask started
    capacity_warned: bool = False
    #: counts[mask][true_task] = batches of that true task trained on that mask (reporting only)
    counts: dict[int, dict[int, int]] = field(default_factory=dict)
    #: calibrated rule: calibration[mask] = [mean, variance] of the entropy (mean over a
    #: batch's images) that the mask shows on its own task's training batches (moving averages)
    calibration: dict[int, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"batches_seen": self.batches_seen, "batches_on_mask": self.batches_on_mask,
                "allocations": list(self.allocations), "capacity_warned": self.capacity_warned,
                "counts": {str(m): {str(t): c for t, c in d.items()} for m, d in self.counts.items()},
                "calibration": {str(m): list(v) for m, v in self.calibration.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> NNState:
        return cls(batches_seen=int(d["batches_seen"]), batches_on_mask=int(d["batches_on_mask"]),
                   allocations=[int(a) for a in d["allocations"]], capacity_warned=bool(d["capacity_warned"]),
                   counts={int(m): {int(t): int(c) for t, c in v.items()} for m, v in d["counts"].items()},
                   calibration={int(m): [float(x) for x in v] for m, v in d.get("calibration", {}).items()})


class Decision(enum.Enum):
    KEEP = "keep training"
    NEW_TASK = "new task"
    SWITCH = "switch to mask"


@dataclass(frozen=True)
class Verdict:
    """What :meth:`NNDetector.observe` decided for a batch; ``mask`` is the mask trained next."""

    decision: Decision
    mask: int
    confidence: float | None = None  # max softmax(-grad) of the check, when one ran

    @property
    def mask_changed(self) -> bool:
        """True when the caller must train with a fresh optimizer (another mask's scores)."""
        return self.decision is not Decision.KEEP


def nn_detection_gradients(model: SupermaskModel, x: torch.Tensor, candidates: Candidates) -> tuple[torch.Tensor, float]:
    """The statistic of NN's check on batch ``x`` ``(n_img, ...)``: ``d H / d alpha`` ``(n,)``
    at ``alpha = 1/n`` over the ``n`` ``candidates`` (:meth:`SupermaskModel.candidates`), and
    ``max softmax(-grad)``."""
    n = len(candidates)
    alphas = torch.full((1, n), 1.0 / n, dtype=x.dtype, device=x.device)
    grads = alpha_gradients(model, x.unsqueeze(0), alphas, objective="entropy", num_classes=1,
                            candidates=candidates)[0]
    return grads, float(torch.softmax(-grads, dim=0).max())


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


class NNDetector:
    """Decides and applies, batch by batch, which mask an unlabeled stream trains.

    Call :meth:`observe` before each training step on batch ``x`` and :meth:`after_step`
    after it; when the verdict's ``mask_changed``, train with a fresh optimizer.
    """

    def __init__(self, model: SupermaskModel, cfg: NNConfig, state: NNState | None = None):
        self.model = model
        self.cfg = cfg
        self.state = state if state is not None else NNState()
        #: the active mask's last training batches: its likelihood statistics when it is banked
        self.calibration = CalibrationBuffer(model.likelihood.images) if model.likelihood is not None else None

    def finish(self) -> int:
        """Bank the active mask (and fit its likelihood statistics on its last batches)."""
        task_id = self.model.finish_task()
        fit_task_likelihood(self.model, task_id, self.calibration)
        if self.calibration is not None:
            self.calibration.clear()
        return task_id

    def start(self) -> Verdict | None:
        """Start mask 0 if no mask is active (the stream's very first batch); None otherwise."""
        if self.model.active_task is not None:
            return None
        self._allocate()
        return Verdict(Decision.NEW_TASK, self.model.active_task)

    def observe(self, x: torch.Tensor) -> Verdict:
        """Decide (every ``check_every`` batches) and apply: keep, new task or switch."""
        started = self.start()
        if started is not None:
            return started
        if self.state.batches_seen % self.cfg.check_every != 0:
            return Verdict(Decision.KEEP, self.model.active_task)
        return self._check(x)

    def after_step(self, true_task: int | None = None, logits: torch.Tensor | None = None,
                   x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        """Count the batch just trained (``true_task``: the benchmark's label, reporting only;
        ``logits``: its training forward, which the calibrated rule follows; ``x``: the batch,
        forwarded again as the check sees it when training forwards differ from that; ``x``
        and its labels ``y`` are kept for the mask's likelihood statistics)."""
        state = self.state
        if self.calibration is not None and x is not None and y is not None:
            self.calibration.add(x, y)
        if self.cfg.rule == "calibrated":
            if x is not None and self._training_forward_differs():
                # The check measures a mask in TASK mode (running statistics, the banked
                # deterministic mask); a training forward uses batch statistics or a sampled
                # mask, so its entropy would not be the same quantity.
                with torch.no_grad(), self.model.use_task(self.model.active_task):
                    logits = self.model(x)
            if logits is not None:
                self._calibrate(float(entropy(logits.detach().float().unsqueeze(0), 1)))
        if true_task is not None:
            counts = state.counts.setdefault(self.model.active_task, {})
            counts[true_task] = counts.get(true_task, 0) + 1
        state.batches_seen += 1
        state.batches_on_mask += 1

    def _training_forward_differs(self) -> bool:
        return (self.model.mask_kind in SAMPLED_KINDS
                or any(bn.norm != "batch" for bn in self.model.norm_layers))

    def _allocate(self) -> None:
        self.model.add_task()
        self.state.allocations.append(self.state.batches_seen)
        self.state.batches_on_mask = 0

    def _calibrate(self, h: float) -> None:
        """Moving mean and variance of the active mask's entropy on its training batches."""
        m = self.cfg.calibration_momentum
        # a new mask starts from its first batch; one trained again continues its own statistics
        mean, var = self.state.calibration.get(self.model.active_task, [h, 0.0])
        delta = h - mean
        mean += m * delta
        var = (1 - m) * (var + m * delta * delta)
        self.state.calibration[self.model.active_task] = [mean, var]

    def _z(self, mask: int, h: float) -> float:
        mean, var = self.state.calibration.get(mask, [h, 0.0])
        return (h - mean) / max(var ** 0.5, self.cfg.calibration_min_std)

    @torch.no_grad()
    def _calibrated_rule(self, x: torch.Tensor) -> tuple[bool, int, float]:
        """(new task?, best mask, statistic): the batch's entropy under a mask against what
        that mask shows on its own task, ``z = (H - mean) / std``; the active mask keeps the
        batch when ``z <= nn.z_threshold``, else the banked mask with the smallest ``z`` under
        the threshold takes it, else it is a new task. The banked masks are shortlisted by the
        entropy gradient (as the paper's check) when there are more than ``nn.shortlist``."""
        model, cfg = self.model, self.cfg
        active = model.active_task
        banked = [m for m in range(model.num_banked_tasks) if m != active]
        if len(banked) > cfg.shortlist:
            grads, _ = nn_detection_gradients(model, x)
            order = grads.argsort().tolist()
            banked = [m for m in order if m != active][: cfg.shortlist]
        z = {}
        for m in [active, *banked]:
            with model.use_task(m):
                z[m] = self._z(m, float(entropy(model(x).float().unsqueeze(0), 1)))
        if z[active] <= cfg.z_threshold:
            return False, active, z[active]
        best = min(banked, key=lambda m: z[m], default=None)
        if best is not None and z[best] <= cfg.z_threshold:
            return False, best, z[best]
        return True, active if best is None else best, min(z.values())

    def _check(self, x: torch.Tensor) -> Verdict:
        model, cfg, state = self.model, self.cfg, self.state
        k = model.num_learned_tasks
        active = model.active_task
        if cfg.rule == "calibrated":
            is_new, best, conf = self._calibrated_rule(x)
        else:  # the paper's: n * max softmax(-grad) below the threshold over n >= min_candidates masks
            n = max(k, cfg.min_candidates)
            grads, conf = nn_detection_gradients(model, x, model.candidates(include_active=True, pad_to=n))
            best = int(grads[:k].argmin())
            is_new = conf < cfg.threshold / n
        if is_new:  # no learned mask is sure of this batch: a new task
            if state.batches_on_mask < cfg.min_batches_per_task:
                log.info("NN guard: mask %d trained only %d batches; not allocating", active, state.batches_on_mask)
                return Verdict(Decision.KEEP, active, conf)
            if k < model.num_tasks:
                self.finish()
                self._allocate()
                log.info("NN: new task detected at batch %d (confidence %.4f); mask %d",
                         state.batches_seen, conf, model.active_task)
                return Verdict(Decision.NEW_TASK, model.active_task, conf)
            if not state.capacity_warned:
                warnings.warn(f"NN: the mask bank is full ({model.num_tasks} masks); "
                              "new tasks are trained on the best existing mask", RuntimeWarning, stacklevel=3)
                state.capacity_warned = True
        if best == active:
            return Verdict(Decision.KEEP, active, conf)
        # An earlier task came back: train its mask again. Logged, since a new task missed by
        # the check lands here too and then overwrites an old task's mask.
        log.info("NN: batch %d looks like mask %d's task (confidence %.4f); training mask %d again",
                 state.batches_seen, best, conf, best)
        self.finish()
        model.resume_task(best)
        state.batches_on_mask = 0
        return Verdict(Decision.SWITCH, best, conf)

    def mask_to_task(self) -> dict[int, int]:
        """Each mask -> the true task it trained on most (reporting only)."""
        return mask_to_task(self.state.counts)


def train_unlabeled(detector: NNDetector, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer | None, cfg: TrainConfig, *, true_task: int | None = None,
                    total: int | None = None, progress: bool = True) -> tuple[torch.optim.Optimizer | None, float]:
    """Train on a stretch of an unlabeled stream, the detector choosing the mask of every batch
    (a fresh optimizer whenever it changes). ``true_task`` is the benchmark's label of these
    batches, for reporting only. Returns the optimizer of the mask in training at the end and
    the mean loss of the last 50 steps."""
    model = detector.model
    bar = tqdm(batches, total=total, desc=f"NN (true task {true_task})", disable=not progress,
               leave=False, dynamic_ncols=True)
    recent: list[float] = []
    for x, y in bar:
        if detector.observe(x).mask_changed or optimizer is None:
            optimizer = make_optimizer(model.trainable_parameters(), cfg)
        model.train_mode()
        with training_autocast(cfg.precision, x.device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        detector.after_step(true_task, logits=logits, x=x, y=y)
        recent = [*recent[-49:], loss.item()]
        if detector.state.batches_seen % 20 == 0:
            bar.set_postfix(loss=f"{recent[-1]:.3f}", masks=model.num_learned_tasks)
    bar.close()
    return optimizer, sum(recent) / max(1, len(recent))
