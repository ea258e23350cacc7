"""``supsup calibrate``: give a saved bank the likelihood statistics a run banks while training.

A GG/GN run with ``inference.method: likelihood`` fits each task's statistics on the task's last
``inference.likelihood_images`` training images when the task finishes. A bank trained without
them (another method, or an earlier version) can get exactly the same statistics afterwards:
each task's training batches are replayed in the run's own seeded order (data only, no
training) and the last images fitted, as :func:`supsup.training.learn_task` does. NN runs are
not supported: which batches trained which mask is the detector's decision, not a replayable
order.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from ..config import ConfigError, Scenario, apply_overrides, config_from_dict
from ..likelihood import LikelihoodSpec
from ..training import CalibrationBuffer
from .build import build_model, build_stream, resolve_device
from .runlock import run_lock
from .runstate import restore_checkpoint

__all__ = ["calibrate_saved"]

log = logging.getLogger(__name__)

#: the only keys ``supsup calibrate --set`` may change
CALIBRATION_KEYS = ("inference.likelihood_images", "inference.likelihood_rank", "device", "progress")


def calibrate_saved(out_dir: str | os.PathLike, *, overrides: list[str] = (), refit: bool = False) -> dict:
    """Fit the likelihood statistics of every banked task of the run in ``out_dir`` that has none
    (every task with ``refit``) and rewrite its checkpoint (atomically). Returns a summary:
    tasks fitted, their bytes, seconds."""
    out = Path(out_dir)
    if not (out / CHECKPOINT_NAME).is_file():  # refused before anything is written there
        raise CheckpointError(f"no checkpoint at {out / CHECKPOINT_NAME}")
    with run_lock(out, "supsup calibrate"):  # it rewrites the checkpoint: no other writer meanwhile
        return _calibrate(out, overrides, refit)


def _calibrate(out: Path, overrides, refit: bool) -> dict:
    tensors, meta = load_checkpoint(out)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in CALIBRATION_KEYS:
            raise ConfigError(key, f"supsup calibrate can only set {', '.join(CALIBRATION_KEYS)}")
    saved = config_from_dict(meta["config"])
    cfg = config_from_dict(apply_overrides(meta["config"], list(overrides)))
    if saved.scenario is Scenario.NN:
        raise CheckpointError(f"{out} is an NN run: its masks bank their likelihood statistics while they train "
                              "(inference.method: likelihood); an NN bank cannot be calibrated afterwards")
    device = resolve_device(cfg.device)
    model = build_model(saved, device)
    restore_checkpoint(out, saved, model)
    model.likelihood = LikelihoodSpec(images=cfg.inference.likelihood_images, max_rank=cfg.inference.likelihood_rank)
    stream = build_stream(cfg, device, progress=cfg.progress)
    t0 = time.perf_counter()
    fitted = []
    for task in range(model.num_banked_tasks):
        if model.task_likelihood(task) is not None and not refit:
            continue
        buffer = CalibrationBuffer(model.likelihood.images)
        for x, y in stream.train_batches(task, cfg.train.iterations, cfg.train.batch_size):
            buffer.add(x, y)
        model.fit_likelihood(task, *buffer.tensors())
        fitted.append(task)
        log.info("task %d: likelihood statistics fitted", task)
    bank = model.bank_state()
    others = {k: v for k, v in tensors.items() if not k.startswith("likelihood.")}
    others.update(bank)
    save_checkpoint(out, others, meta)
    per_task = [model.task_likelihood(t).nbytes() for t in range(model.num_banked_tasks)]
    return {"tasks_fitted": len(fitted), "tasks": model.num_banked_tasks, "seconds": time.perf_counter() - t0,
            "likelihood_bytes_per_task_max": max(per_task, default=0), "mask_bytes_per_task": model.mask_nbytes}
