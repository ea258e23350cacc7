"""``method: hopsupsup`` on the native backend: neuron masks learned task by task, kept only in
Hopfield stores, recovered from each task's unlabelled test data (:mod:`supsup.hopsupsup`).

Protocol (the official ``hopsupsup.py`` on SplitMNIST): each task is trained for
``hopfield.epochs`` passes in batches of ``train.batch_size``, its masks go into the stores. To
evaluate task ``t`` (GN: no task id at test), its test set is shuffled (seeded by ``(seed, t)``)
and cut into batches of ``hopfield.batch_size``; one recovery step per batch gives the mask, and
the same batches are then classified with it among all the stream's classes.

Scores in ``results.json``: ``acc_inferred`` is the accuracy with the recovered mask;
``task_inference_acc`` is 1 when the recovered mask is nearest (Hamming) to the task's own mask
among the learned ones; ``acc_given_task`` is the accuracy with the mask as it was learned. The
runner keeps the learned masks (1 bit per neuron) for these two diagnostics only: recovery never
sees them. ``extra.hopsupsup`` has, per task, the recovery steps and seconds and the Hamming
distance to every learned mask. ``bank_bytes`` is the size of the Hopfield stores, which does not
grow with the tasks.

A checkpoint after each task (``hopsupsup_checkpoint.pt``) lets ``--resume`` go on after the
last finished task.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch
import yaml

from .._faults import maybe_crash
from ..backbones import WEIGHT_INITS
from ..checkpoint import (
    CHECKPOINT_MAGIC,
    CHECKPOINT_NAME,
    CheckpointError,
    read_checksummed,
    write_checksummed,
)
from ..config import ConfigError, RunConfig, Scenario, config_to_dict
from ..fileio import atomic_write_text
from ..hopsupsup import (
    NeuronMaskNet,
    Recovery,
    binary_masks,
    evaluate_neuron_masks,
    evaluation_batches,
    hamming,
    mask_bytes,
    recover_masks,
    scores_for,
    train_neuron_masks,
)
from .build import build_stream
from .evaluate import matrix_points
from .report import write_report
from .results import (
    AccuracyMatrix,
    CurvePoint,
    HopSupSupReport,
    InferredScores,
    RunResults,
    Summary,
    TaskRow,
    peak_rss_bytes,
)

__all__ = ["HOPSUPSUP_CHECKPOINT", "build_net", "check_hopsupsup", "evaluate_tasks", "finish_results",
           "is_hopsupsup_run", "run_hopsupsup_native", "score_recovery"]

log = logging.getLogger(__name__)

HOPSUPSUP_CHECKPOINT = "hopsupsup_checkpoint.pt"


def is_hopsupsup_run(out: Path) -> bool:
    """Whether ``out`` holds a HopSupSup run (its checkpoint, and no SupSup bank)."""
    return (out / HOPSUPSUP_CHECKPOINT).exists() and not (out / CHECKPOINT_NAME).exists()


def check_hopsupsup(cfg: RunConfig, *, backend: str) -> None:
    """What ``method: hopsupsup`` cannot run, as a :class:`ConfigError` before any work."""
    if cfg.scenario is not Scenario.GN:
        raise ConfigError("scenario", "hopsupsup learns with task ids and recovers the mask without one: use GN")
    if cfg.train.optimizer != "sgd":
        raise ConfigError("train.optimizer", f"hopsupsup trains its neuron scores with sgd (the official recipe), "
                                             f"got {cfg.train.optimizer!r}")
    if cfg.train.schedule != "constant":
        raise ConfigError("train.schedule", "hopsupsup trains with a constant learning rate")
    if cfg.train.precision == "bf16":
        raise ConfigError("train.precision", "hopsupsup runs in fp32")
    for key in ("checkpoint_every", "layer_lr"):
        if getattr(cfg.train, key) is not None:
            raise ConfigError(f"train.{key}", "is not supported by method hopsupsup")
    for key in ("sample_tasks", "extra_objectives"):
        if getattr(cfg.eval, key):
            raise ConfigError(f"eval.{key}", "is not supported by method hopsupsup")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("method", "hopsupsup runs in one process: run it without torchrun")
    if backend == "avalanche" and cfg.eval.at_tasks:
        raise ConfigError("eval.at_tasks", "is not supported by backend avalanche; use backend native")


def build_net(cfg: RunConfig, input_shape, num_classes: int, device) -> NeuronMaskNet:
    return NeuronMaskNet(math.prod(input_shape), cfg.hopfield.hidden, num_classes, seed=cfg.seed,
                         rule=cfg.hopfield.rule, weight_init=WEIGHT_INITS.get(cfg.model.weight_init), device=device)


def score_recovery(model: NeuronMaskNet, batches, rec: Recovery, learned: list[list[torch.Tensor]], t: int,
                   num_learned: int) -> tuple[TaskRow, dict]:
    """Task ``t``'s row and recovery details: accuracy over its labelled ``batches`` with the
    recovered masks and with ``learned[t]`` (the masks as learned, a diagnostic), and the
    Hamming distance of the recovered masks to each of the first ``num_learned`` learned ones."""
    correct, total = evaluate_neuron_masks(model, batches, rec.scores)
    given, _ = evaluate_neuron_masks(model, batches, scores_for(learned[t]))
    distances = [hamming(rec.masks(), learned[j]) for j in range(num_learned)]
    nearest = min(range(num_learned), key=lambda j: (distances[j], j))
    row = TaskRow(t, acc_given_task=given / total, inferred=InferredScores(correct / total, 1.0 if nearest == t else 0.0))
    row.inferred_counts = {nearest: 1}
    detail = {"task_id": t, "recovery_steps": rec.steps, "recovery_seconds": rec.seconds, "test_images": total,
              "nearest_learned_mask": nearest, "hamming_to_learned": distances,
              "final_entropy": rec.entropies[-1], "final_energy": rec.energies[-1]}
    return row, detail


def evaluate_tasks(cfg: RunConfig, model: NeuronMaskNet, test_batches, learned: list[list[torch.Tensor]],
                   num_learned: int) -> tuple[list[TaskRow], list[dict]]:
    """Recover and score each of the first ``num_learned`` tasks; ``test_batches(t)`` gives the
    labelled batches ``[(x, y), ...]`` of task ``t``."""
    rows, details = [], []
    for t in range(num_learned):
        batches = test_batches(t)
        rec = recover_masks(model, [x for x, _ in batches], **cfg.hopfield.recovery_options())
        row, detail = score_recovery(model, batches, rec, learned, t, num_learned)
        rows.append(row)
        details.append(detail)
    return rows, details


def stream_test_batches(cfg: RunConfig, stream):
    """Task ``t``'s test set, shuffled by ``(seed, t)``, in batches of ``hopfield.batch_size``
    (at most ``eval.max_batches``)."""
    def batches(t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = evaluation_batches(stream.num_samples(t, "test"), cfg.hopfield.batch_size, cfg.seed, t)
        if cfg.eval.max_batches is not None:
            pos = pos[: cfg.eval.max_batches]
        return [stream.batch(t, "test", p) for p in pos]

    return batches


def finish_results(cfg: RunConfig, results: RunResults, model: NeuronMaskNet, rows: list[TaskRow],
                   details: list[dict], points: list[CurvePoint], losses: list[float]) -> None:
    """Rows, summary, accuracy matrix, confusion, memory and the HopSupSup details."""
    results.backbone = "mlp-" + "-".join(map(str, cfg.hopfield.hidden)) + "-swish-neuronmask"
    results.tasks = rows
    results.summarise()
    T = cfg.benchmark.num_tasks
    if not points or points[-1].num_tasks_learned != T:
        points = [*points, CurvePoint(T, list(range(T)), results.summary, 0.0, rows)]
    results.curve = [p for p in points if p.num_tasks_learned in matrix_points(cfg)]
    results.accuracy_matrix = AccuracyMatrix.from_points(points, T, given=True, inferred=True)
    results.record_confusion(rows, T)
    state = b"".join(b.detach().cpu().contiguous().numpy().tobytes() for b in model.stores.buffers())
    results.bank_bytes = model.store_bytes
    results.num_masked_weights = sum(cfg.hopfield.hidden)  # masked neurons
    results.bank_sha256 = hashlib.sha256(state).hexdigest()
    results.peak_rss_bytes = peak_rss_bytes()
    results.hopsupsup = HopSupSupReport(
        rule=cfg.hopfield.rule, hidden=list(cfg.hopfield.hidden), store_bytes=model.store_bytes,
        store_bytes_per_task=model.store_bytes / T, explicit_mask_bytes_per_task=mask_bytes(cfg.hopfield.hidden),
        mean_recovery_steps=sum(d["recovery_steps"] for d in details) / len(details),
        mean_recovery_seconds=sum(d["recovery_seconds"] for d in details) / len(details),
        tasks=details, train_loss_last=losses)


def _save(out: Path, cfg: RunConfig, model: NeuronMaskNet, learned, next_task: int, results: RunResults,
          points: list[CurvePoint], losses: list[float]) -> None:
    tensors = {"model": model.state_dict(), "learned": [[m.bool().cpu() for m in ms] for ms in learned]}
    meta = {"method": "hopsupsup", "config": config_to_dict(cfg), "next_task": next_task,
            "train_seconds": results.train_seconds, "eval_seconds": results.eval_seconds,
            "points": [p.to_dict() for p in points], "losses": losses}
    write_checksummed(out / HOPSUPSUP_CHECKPOINT, tensors, meta, magic=CHECKPOINT_MAGIC)


def run_hopsupsup_native(cfg: RunConfig, out: Path, resume: bool, device: torch.device) -> RunResults:
    """Train, checkpoint, recover and evaluate; writes ``results.json``. The caller holds the
    run directory's lock."""
    path = out / HOPSUPSUP_CHECKPOINT
    if not resume and path.exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    stream = build_stream(cfg, device, progress=cfg.progress)
    num_classes = cfg.benchmark.num_classes
    model = build_net(cfg, stream.input_shape, num_classes, device)
    results = RunResults.new(cfg)
    learned: list[list[torch.Tensor]] = []
    points: list[CurvePoint] = []
    losses: list[float] = []
    start = 0
    if resume:
        tensors, meta = read_checksummed(path, magic=CHECKPOINT_MAGIC)
        if meta.get("method") != "hopsupsup":
            raise CheckpointError(f"{path} is not a hopsupsup checkpoint")
        if meta["config"] != config_to_dict(cfg):
            raise CheckpointError(f"{path} was written by another config than this one; resume with the run's own "
                                  f"config ({out / 'config.yaml'})")
        try:
            model.load_state_dict(tensors["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not fit this model: {str(err).splitlines()[0]}") from None
        learned = [[m.float().to(device) for m in ms] for ms in tensors["learned"]]
        start, losses = int(meta["next_task"]), list(meta["losses"])
        results.train_seconds, results.eval_seconds = meta["train_seconds"], meta["eval_seconds"]
        points = [CurvePoint.from_dict(p) for p in meta["points"]]
        log.info("resuming %s after task %d", out, start - 1)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    test_batches = stream_test_batches(cfg, stream)
    for t in range(start, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        steps = cfg.hopfield.steps_per_task(stream.num_samples(t, "train"), cfg.train)
        scores, task_losses = train_neuron_masks(model, stream.train_batches(t, steps, cfg.train.batch_size),
                                                 lr=cfg.train.lr, momentum=cfg.train.momentum,
                                                 weight_decay=cfg.train.weight_decay)
        model.store_task(scores)
        learned.append(binary_masks(scores))
        losses.append(task_losses[-1])
        results.train_seconds += time.perf_counter() - t0
        log.info("task %d learned (%d steps, last loss %.4f)", t, steps, task_losses[-1])
        if t + 1 in matrix_points(cfg) and t + 1 < cfg.benchmark.num_tasks:
            t0 = time.perf_counter()
            rows, _ = evaluate_tasks(cfg, model, test_batches, learned, t + 1)
            seconds = time.perf_counter() - t0
            points.append(CurvePoint(t + 1, list(range(t + 1)), Summary.of(rows, inferred=True), seconds, rows))
            results.eval_seconds += seconds
        _save(out, cfg, model, learned, t + 1, results, points, losses)
        maybe_crash("hopsupsup_task")  # fault injection for the tests (inactive unless asked)
    t0 = time.perf_counter()
    rows, details = evaluate_tasks(cfg, model, test_batches, learned, cfg.benchmark.num_tasks)
    results.eval_seconds += time.perf_counter() - t0
    finish_results(cfg, results, model, rows, details, points, losses)
    write_report(out, results)
    return results
