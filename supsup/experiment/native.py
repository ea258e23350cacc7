"""The native backend: fast tensor streams, a checkpoint after every task, exact resume.

GG/GN: each task is trained with its id (:func:`supsup.training.train_task`), its GG accuracy
measured, the optional accuracy-vs-tasks point taken, the checkpoint written. NN: the stream
is trained without ids, :class:`~supsup.detection.NNDetector` choosing the mask of every
batch; the checkpoint also holds the mask in training and its optimizer state. Then the final
evaluation (:mod:`.evaluate`), ``results.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..bank import bank_sha256
from ..checkpoint import CHECKPOINT_NAME, CheckpointError
from ..config import ConfigError, RunConfig, Scenario, config_to_dict
from ..detection import NNDetector, NNState, mask_to_task, shared_masks, train_unlabeled
from ..evaluation import evaluate_given_task
from ..fileio import atomic_write_text
from ..model import SupermaskModel
from ..training import make_optimizer, train_task
from .backends import BACKENDS
from .build import build_model, build_stream, resolve_device
from .evaluate import curve_point, final_evaluation
from .report import write_report
from .results import NNReport, RunResults, TaskRow
from .runstate import finished_results, peak_rss_bytes, restore_checkpoint, write_checkpoint

__all__ = ["NativeBackend", "nn_report"]

log = logging.getLogger(__name__)


def nn_report(model: SupermaskModel, state: NNState, check_every: int) -> NNReport:
    """What NN detection did; warns when a mask trained ``check_every`` batches or more on
    each of several true tasks (a missed task switch, see :func:`~supsup.detection.shared_masks`)."""
    shared = shared_masks(state.counts, check_every)
    if shared:
        shown = "; ".join(f"mask {m} trained on true tasks {', '.join(map(str, t))}" for m, t in list(shared.items())[:5])
        log.warning("NN detection missed task switches: %d of %d masks trained on several true tasks (%s%s); "
                    "the earlier of those tasks are partly overwritten. The entropy check needs every learned mask "
                    "to be uncertain on a new task; see nn.threshold", len(shared), model.num_learned_tasks, shown,
                    "; ..." if len(shared) > 5 else "")
    return NNReport(num_detected_tasks=model.num_learned_tasks, allocations=list(state.allocations),
                    mask_to_task=mask_to_task(state.counts),
                    counts={m: dict(d) for m, d in state.counts.items()}, shared_masks=shared)


def _run_labeled(cfg: RunConfig, out: Path, model: SupermaskModel, stream, results: RunResults, loop: dict) -> None:
    """GG/GN: learn each task with its id, checkpoint after each."""
    for task_id in range(loop["next_task"], cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        learned = train_task(model, stream.train_batches(task_id, cfg.train.iterations, cfg.train.batch_size), cfg.train,
                             max_steps=cfg.train.iterations, progress=cfg.progress)
        if learned != task_id:
            raise CheckpointError(f"expected to learn task {task_id}, the model learned {learned}")
        results.train_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        acc, _ = evaluate_given_task(model, stream.test_batches(task_id, cfg.eval.batch_size, cfg.eval.max_batches),
                                     task_id)
        results.eval_seconds += time.perf_counter() - t0
        results.tasks.append(TaskRow(task_id, acc_given_task=acc))
        if cfg.eval.at_tasks and task_id + 1 in cfg.eval.at_tasks:
            point = curve_point(cfg, model, stream, task_id + 1)
            results.curve.append(point)
            results.eval_seconds += point.seconds
        write_checkpoint(out, cfg, model, results, {"next_task": task_id + 1, "num_learned": model.num_learned_tasks})
        log.info("task %d: acc_given_task %.4f", task_id, acc)


def _run_unlabeled(cfg: RunConfig, out: Path, model: SupermaskModel, stream, results: RunResults, loop: dict,
                   tensors: dict[str, Any]) -> None:
    """NN: train the stream without task ids; the detector picks the mask of every batch."""
    detector = NNDetector(model, cfg.nn, NNState.from_dict(loop["nn"]) if "nn" in loop else None)
    optimizer = None
    if loop.get("active_task") is not None:
        # Mid-stream checkpoint: the active mask's scores and optimizer state.
        if loop["active_task"] < model.num_banked_tasks:
            model.resume_task(loop["active_task"])
        elif model.add_task() != loop["active_task"]:
            raise CheckpointError(f"checkpoint in {out}: the mask in training, {loop['active_task']}, does not "
                                  f"follow the {model.num_banked_tasks} banked masks")
        for layer, key in zip(model.masked_layers, sorted(k for k in tensors if k.startswith("scores."))):
            with torch.no_grad():
                layer.scores.copy_(tensors[key].to(layer.weight.device))
        optimizer = make_optimizer(model.trainable_parameters(), cfg.train)
        optimizer.load_state_dict(tensors["optimizer"])
    for true_task in range(loop["next_task"], cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        optimizer = train_unlabeled(detector, stream.train_batches(true_task, cfg.train.iterations, cfg.train.batch_size),
                                    optimizer, cfg.train, true_task=true_task, total=cfg.train.iterations,
                                    progress=cfg.progress)
        results.train_seconds += time.perf_counter() - t0
        if cfg.eval.at_tasks and true_task + 1 in cfg.eval.at_tasks:
            # Evaluate the masks detected so far (the one in training included), each mapped
            # to the true task it mostly saw.
            point = curve_point(cfg, model, stream, true_task + 1, detector.mask_to_task())
            point.num_detected_tasks = model.num_learned_tasks
            results.curve.append(point)
            results.eval_seconds += point.seconds
        loop = {"next_task": true_task + 1, "num_learned": model.num_learned_tasks,
                "active_task": model.active_task, "nn": detector.state.to_dict()}
        extra = {f"scores.{i:03d}": layer.scores.detach().cpu().clone() for i, layer in enumerate(model.masked_layers)}
        extra["optimizer"] = optimizer.state_dict()
        write_checkpoint(out, cfg, model, results, loop, extra)
    if model.active_task is not None:
        model.finish_task()
    results.nn = nn_report(model, detector.state, cfg.nn.check_every)


class NativeBackend:
    """``backend: native`` (SupSup only)."""

    @staticmethod
    def check(cfg: RunConfig) -> None:
        if cfg.method != "supsup":
            raise ConfigError("method", f"baseline {cfg.method!r} runs on Avalanche: set backend: avalanche")

    @staticmethod
    def run(cfg: RunConfig, out_dir: str | os.PathLike, resume: bool) -> RunResults:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
        device = resolve_device(cfg.device)
        model = build_model(cfg, device)
        results = RunResults.new(cfg)
        loop: dict[str, Any] = {"next_task": 0, "num_learned": 0}
        tensors: dict[str, Any] = {}
        if resume:
            tensors, results, loop = restore_checkpoint(out, cfg, model)
            finished = finished_results(out, cfg, loop)
            if finished is not None:
                log.info("%s already finished: its results.json is returned as it is", out)
                return finished
            log.info("resuming %s after task %d", out, loop["next_task"] - 1)
        stream = build_stream(cfg, device, progress=cfg.progress)  # after the check: a finished run needs no data
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if cfg.scenario is Scenario.NN:
            _run_unlabeled(cfg, out, model, stream, results, loop, tensors)
        else:
            _run_labeled(cfg, out, model, stream, results, loop)
        t0 = time.perf_counter()
        final_evaluation(cfg, model, stream, results)
        results.eval_seconds += time.perf_counter() - t0
        results.bank_bytes = model.bank_bytes
        results.num_masked_weights = model.num_masked_weights
        results.bank_sha256 = bank_sha256(model.masked_layers)
        results.peak_rss_bytes = peak_rss_bytes()
        write_report(out, results)
        return results


BACKENDS.register("native")(NativeBackend())
