"""A run directory's checkpoint: written after every finished task, checked strictly when a
run resumes (same config, same backbone), and the finished run's ``results.json``.

Output directory layout::

    DIR/config.yaml       the resolved config
    DIR/checkpoint.pt     packed bank + state after the last finished task (supsup.checkpoint)
    DIR/progress.json     what is done so far, and the accuracy-vs-tasks points (long runs)
    DIR/results.json      per-task and mean accuracies, timings, bank size
    DIR/accuracy.png      accuracy per task
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bank import bank_entries
from ..checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from ..config import RunConfig, config_to_dict
from ..fileio import atomic_write_text
from ..model import SupermaskModel
from ..training import TaskProgress
from ..version import __version__
from .results import RunResults, peak_rss_bytes

__all__ = ["RESUME_FREE", "LoopState", "Restored", "TrainingState", "config_mismatch", "finished_results",
           "model_identity", "peak_rss_bytes", "restore_active_task", "restore_checkpoint", "resume_inside_task",
           "write_checkpoint"]

log = logging.getLogger(__name__)

#: Config keys that may differ between a checkpoint and a resumed run: they change how results
#: are computed (where, how many inferences share a pass over the bank), not what is computed.
RESUME_FREE = {"progress", "device", "inference.group_size", "inference.memory_mb", "train.checkpoint_every"}


def config_mismatch(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ (resume-free keys excepted), with both values. A key
    the saved config lacks (written before the key existed) matches its default value."""
    if defaults is None and not prefix:
        defaults = config_to_dict(RunConfig())
    defaults = defaults or {}
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_mismatch(a, b, f"{dotted}.", defaults.get(key) if isinstance(defaults.get(key), dict) else {})
        elif key not in saved and key in defaults and b == defaults[key]:
            continue
        elif a != b:
            out.append(f"{dotted} (checkpoint: {a!r}, now: {b!r})")
    return out


def model_identity(cfg: RunConfig, model: SupermaskModel) -> dict[str, Any]:
    """What a checkpoint's bank belongs to: the backbone, its init and seed, the frozen weights'
    digest (a checkpoint of another model is refused with the differing key named)."""
    return {"backbone": cfg.model.backbone, "weight_init": cfg.model.weight_init, "seed": cfg.seed,
            "num_outputs": cfg.model.num_outputs, "num_tasks": model.num_tasks,
            "mask_kind": cfg.mask.kind, "num_masked_weights": model.num_masked_weights,
            "layer_shapes": [list(layer.weight.shape) for layer in model.masked_layers],
            "frozen_weights_sha256": model.frozen_weights_digest()}


@dataclass
class LoopState:
    """Where a run stands (a checkpoint's ``loop``).

    Attributes:
        next_task: the first true task not yet trained.
        active_task: NN: the mask still in training when the checkpoint was taken (None: none).
        nn: NN: the detector's state (:meth:`~supsup.detection.NNState.to_dict`).
    """

    next_task: int = 0
    active_task: int | None = None
    nn: dict[str, Any] | None = None
    #: several processes stopped inside a round of tasks: how many (each rank's task in training
    #: is saved; a resume with another number of processes starts the round again)
    world: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"next_task": self.next_task}
        if self.nn is not None or self.active_task is not None:
            out["active_task"] = self.active_task
        if self.nn is not None:
            out["nn"] = self.nn
        if self.world is not None:
            out["world"] = self.world
        return out

    @classmethod
    def from_dict(cls, d: Any) -> LoopState:
        """From a checkpoint's ``loop`` (keys written by earlier versions, ``num_learned``, are
        ignored: the bank's row count is the learned-task count)."""
        if not isinstance(d, dict) or not isinstance(d.get("next_task"), int) or d["next_task"] < 0:
            raise ValueError(f"loop state {d!r} has no valid next_task")
        active = d.get("active_task")
        if active is not None and (not isinstance(active, int) or active < 0):
            raise ValueError(f"loop state has an invalid active_task {active!r}")
        world = d.get("world")
        if world is not None and (not isinstance(world, int) or world < 2):
            raise ValueError(f"loop state has an invalid world {world!r}")
        return cls(next_task=d["next_task"], active_task=active, nn=d.get("nn"), world=world)


@dataclass
class TrainingState:
    """The mask in training at a checkpoint (NN between true tasks; GG/GN inside a task with
    ``train.checkpoint_every``): what its training needs to go on bitwise as if never stopped.
    The checkpoint's key format for it (``scores.<i>``, ``optimizer``, ``sampler``,
    ``calibration.<k>``, ``scheduler``, ``running.<j>``, ``progress.step``,
    ``progress.recent``) lives here only.

    Attributes:
        scores: its scores, one tensor per masked layer.
        optimizer: the optimizer's ``state_dict``.
        sampler: a sampled mask kind's generator state (None: a deterministic kind).
        calibration: its recent training images for the likelihood statistics (None: not kept).
        scheduler: inside a task: the learning-rate schedule's ``state_dict`` (None: constant).
        running: inside a task: each BatchNorm layer's running mean and variance ``(2, C)``.
        step: inside a task: the optimizer steps done (None: an NN checkpoint).
        recent: inside a task: the losses of its last steps.
    """

    scores: list[torch.Tensor]
    optimizer: dict[str, Any]
    sampler: torch.Tensor | None = None
    calibration: dict[str, torch.Tensor] | None = field(default=None)
    scheduler: dict[str, Any] | None = None
    running: list[torch.Tensor] = field(default_factory=list)
    step: int | None = None
    recent: list[float] = field(default_factory=list)

    @classmethod
    def capture(cls, model: SupermaskModel, progress: TaskProgress) -> TrainingState:
        """The task in training of ``model`` after ``progress.step`` steps (inside a task)."""
        sampler = model.sampler()
        return cls(scores=[layer.scores for layer in model.masked_layers], optimizer=progress.optimizer,
                   sampler=None if sampler is None else sampler.get_state(),
                   calibration=progress.calibration or None, scheduler=progress.scheduler,
                   running=[torch.stack([bn.running_mean, bn.running_var]) for bn in model.norm_layers],
                   step=progress.step, recent=progress.recent)

    def to_tensors(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"scores.{i:03d}": s.detach().cpu().clone() for i, s in enumerate(self.scores)}
        out["optimizer"] = self.optimizer
        if self.sampler is not None:
            out["sampler"] = self.sampler
        if self.calibration is not None:
            out.update({f"calibration.{k}": v for k, v in self.calibration.items()})
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler
        out.update({f"running.{j:03d}": r.detach().cpu().clone() for j, r in enumerate(self.running)})
        if self.step is not None:
            out["progress.step"] = torch.tensor(self.step, dtype=torch.int64)
            out["progress.recent"] = torch.tensor(self.recent, dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], prefix: str = "") -> TrainingState | None:
        """From a checkpoint's tensors (those whose keys start with ``prefix``); None when it holds
        no mask in training."""
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        keys = sorted(k for k in tensors if k.startswith("scores."))
        if not keys:
            return None
        if "optimizer" not in tensors:
            raise CheckpointError("the checkpoint holds a mask in training but not its optimizer state")
        calibration = {k[len("calibration."):]: v for k, v in tensors.items() if k.startswith("calibration.")}
        step = tensors.get("progress.step")
        return cls(scores=[tensors[k] for k in keys], optimizer=tensors["optimizer"], sampler=tensors.get("sampler"),
                   calibration=calibration or None, scheduler=tensors.get("scheduler"),
                   running=[tensors[k] for k in sorted(k for k in tensors if k.startswith("running."))],
                   step=None if step is None else int(step),
                   recent=[float(v) for v in tensors.get("progress.recent", torch.zeros(0)).tolist()])


@dataclass
class Restored:
    """What a checkpoint gives a resumed run besides the bank (loaded into the model)."""

    results: RunResults
    loop: LoopState
    training: TrainingState | None
    #: several processes stopped inside a round: each rank's task in training, in rank order
    ranks: list[TrainingState] = field(default_factory=list)


def _rank_prefix(rank: int) -> str:
    return f"rank{rank}."


def write_checkpoint(out: Path, cfg: RunConfig, model: SupermaskModel, results: RunResults, loop: LoopState,
                     training: TrainingState | None = None, ranks: Sequence[dict[str, Any]] = ()) -> None:
    """``DIR/checkpoint.pt`` (the bank, ``loop`` state, results so far, the mask in training;
    ``ranks``: every rank's :meth:`TrainingState.to_tensors` inside a round) and
    ``progress.json``."""
    tensors: dict[str, Any] = dict(model.bank_state())
    if training is not None:
        tensors.update(training.to_tensors())
    for r, state in enumerate(ranks):
        tensors.update({_rank_prefix(r) + k: v for k, v in state.items()})
    meta = {"supsup_version": __version__, "config": config_to_dict(cfg), "model": model_identity(cfg, model),
            "results": results.to_dict(), "loop": loop.to_dict()}
    save_checkpoint(out, tensors, meta)
    # A small, human-readable view of a long run while it goes: what is done and the
    # accuracy-vs-tasks points so far (benchmarks/reproduce.py plots from it).
    progress = {"tasks_done": loop.next_task, "num_tasks": cfg.benchmark.num_tasks,
                "num_learned_masks": model.num_learned_tasks, "train_seconds": results.train_seconds,
                "eval_seconds": results.eval_seconds, "peak_rss_bytes": peak_rss_bytes(),
                "curve": [p.to_dict(with_rows=False) for p in results.curve]}
    atomic_write_text(out / "progress.json", json.dumps(progress, indent=2) + "\n")


def restore_checkpoint(out: Path, cfg: RunConfig, model: SupermaskModel, *,
                       checkpoint: tuple[dict, dict] | None = None) -> Restored:
    """Load ``DIR/checkpoint.pt`` (or ``checkpoint``, its ``(tensors, meta)`` already read, e.g.
    by another process) into ``model`` (its bank) after checking that it was made with ``cfg``
    and this backbone; returns the results so far, the loop state and the mask in training."""
    tensors, meta = load_checkpoint(out) if checkpoint is None else checkpoint
    problems = config_mismatch(meta.get("config", {}), config_to_dict(cfg))
    if problems:
        raise CheckpointError(f"checkpoint in {out} was made with a different config: " + "; ".join(problems))
    saved_id, now_id = meta.get("model", {}), model_identity(cfg, model)
    for key in now_id:
        if saved_id.get(key) != now_id[key]:
            raise CheckpointError(f"checkpoint in {out} does not match this model: {key} is {saved_id.get(key)!r} "
                                  f"in the checkpoint, {now_id[key]!r} here")
    bank = bank_entries(tensors)
    try:
        # The learned-task count is the bank's row count: a mask still in training (NN) has
        # no row and is re-created by the NN loop. Checkpoints up to 0.1.0 saved a count that
        # included it, which gave it an id one past its row; that saved count is not used.
        model.load_bank_state(bank)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint in {out} has an unusable mask bank: {err}") from None
    try:
        results = RunResults.from_dict(meta["results"])
        loop = LoopState.from_dict(meta.get("loop"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint in {out} has unreadable results: {err}") from None
    ranks = []
    if loop.world is not None:
        ranks = [TrainingState.from_tensors(tensors, _rank_prefix(r)) for r in range(loop.world)]
        if any(s is None or s.step is None for s in ranks):
            raise CheckpointError(f"checkpoint in {out} stopped inside a round of {loop.world} processes but lacks "
                                  "the state of some of them")
    return Restored(results, loop, TrainingState.from_tensors(tensors), ranks)


def resume_inside_task(out: Path, model: SupermaskModel, task_id: int, training: TrainingState) -> TaskProgress:
    """Make task ``task_id``, stopped inside its training, the model's task in training again,
    exactly as it was (scores, BatchNorm running statistics, Bernoulli sampler); returns what
    its training goes on from."""
    model.add_task(task_id)
    if len(training.scores) != len(model.masked_layers) or len(training.running) != len(model.norm_layers):
        raise CheckpointError(f"checkpoint in {out}: the task in training has {len(training.scores)} score tensors "
                              f"and {len(training.running)} BatchNorm states for {len(model.masked_layers)} masked "
                              f"and {len(model.norm_layers)} BatchNorm layers")
    with torch.no_grad():
        for layer, scores in zip(model.masked_layers, training.scores):
            layer.scores.copy_(scores.to(layer.weight.device))
        for bn, running in zip(model.norm_layers, training.running):  # add_task started them afresh
            bn.running_mean.copy_(running[0])
            bn.running_var.copy_(running[1])
    if training.sampler is not None:
        model.sampler().set_state(training.sampler)
    return TaskProgress(step=training.step, recent=training.recent, optimizer=training.optimizer,
                        scheduler=training.scheduler, calibration=training.calibration or {})


def restore_active_task(out: Path, model: SupermaskModel, loop: LoopState, training: TrainingState | None) -> bool:
    """An NN checkpoint taken mid-stream holds the mask in training (its scores; the BatchNorm
    statistics are in the bank state): make it the active task again. False when there is none."""
    active = loop.active_task
    if active is None:
        return False
    if training is None:
        raise CheckpointError(f"checkpoint in {out}: mask {active} is in training but its scores are missing")
    # the bank state put back the running statistics of the mask in training; starting (or
    # resuming) it resets them, so they are kept aside and restored after
    running = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in model.norm_layers]
    if active < model.num_banked_tasks:
        model.resume_task(active)
    elif model.add_task() != active:
        raise CheckpointError(f"checkpoint in {out}: the mask in training, {active}, does not follow the "
                              f"{model.num_banked_tasks} banked masks")
    with torch.no_grad():
        for bn, (mean, var) in zip(model.norm_layers, running):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    if len(training.scores) != len(model.masked_layers):
        raise CheckpointError(f"checkpoint in {out}: {len(training.scores)} score tensors for "
                              f"{len(model.masked_layers)} masked layers")
    for layer, scores in zip(model.masked_layers, training.scores):
        with torch.no_grad():
            layer.scores.copy_(scores.to(layer.weight.device))
    return True


def finished_results(out: Path, cfg: RunConfig, loop: LoopState) -> RunResults | None:
    """results.json of a run whose checkpoint has every task done, or None. A run that ends
    writes it last, after its final evaluation; if it is missing, older than the checkpoint or
    unreadable (the run was stopped during that evaluation), the evaluation is done again."""
    path = out / "results.json"
    if loop.next_task < cfg.benchmark.num_tasks or not path.exists():
        return None
    if path.stat().st_mtime < (out / CHECKPOINT_NAME).stat().st_mtime:
        return None  # older than the last checkpoint: left by an earlier run in this directory
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("num_tasks") != cfg.benchmark.num_tasks:
            raise ValueError("it does not describe this run")
        return RunResults.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is unusable (%s): evaluating the finished run again", path, err)
        return None
