"""The native backend: fast tensor streams, a checkpoint after every task, exact resume.

GG/GN: each task is trained with its id (:func:`supsup.training.train_task`), its GG accuracy
measured, the optional accuracy-vs-tasks point taken, the checkpoint written. NN: the stream
is trained without ids, :class:`~supsup.detection.NNDetector` choosing the mask of every
batch; the checkpoint also holds the mask in training and its optimizer state. Then the final
evaluation (:mod:`.evaluate`), ``results.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import yaml

from .._faults import maybe_crash
from ..checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from ..config import ConfigError, RunConfig, Scenario, TrainConfig, config_to_dict
from ..detection import NNDetector, NNState, mask_to_task, shared_masks, train_unlabeled
from ..evaluation import evaluate_given_task
from ..fileio import atomic_write_text
from ..model import SupermaskModel
from ..training import (
    TaskProgress,
    check_learning_rate,
    choose_precision,
    learn_task,
    make_optimizer,
)
from .backends import BACKENDS
from .build import build_model, build_stream, resolve_device
from .distributed import Distributed
from .evaluate import (
    EvaluationCache,
    GivenCounts,
    accuracy_matrix,
    curve_point,
    deferred_evaluation,
    final_evaluation,
    matrix_points,
    sampled_tasks,
)
from .hopsupsup_run import check_hopsupsup, run_hopsupsup_native
from .loggers import RunLogger
from .parallel import evaluate_parallel, run_labeled_parallel
from .report import write_report
from .results import NNReport, RunResults, TaskRow
from .runlock import RunLockedError, run_lock
from .runstate import (
    LoopState,
    TrainingState,
    finished_results,
    restore_active_task,
    restore_checkpoint,
    resume_inside_task,
    write_checkpoint,
)

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


def _log_row(task: int, loss: float, acc: float | None, point, train_s: float, eval_s: float) -> dict:
    row = {"task": task, "tasks_learned": task + 1, "loss": loss, "acc_given_task": acc,
           "train_seconds": train_s, "eval_seconds": eval_s}
    if point is not None:
        row.update({"mean_acc_given_task": point.summary.mean_acc_given_task,
                    "mean_acc_inferred": point.summary.inferred.acc_inferred,
                    "task_inference_acc": point.summary.inferred.task_inference_acc})
    return row


def _run_labeled(cfg: RunConfig, train: TrainConfig, out: Path, model: SupermaskModel, stream, results: RunResults,
                 loop: LoopState, training: TrainingState | None,
                 logger: RunLogger, learned: dict[int, GivenCounts], cache: EvaluationCache) -> None:
    """GG/GN: learn each task with its id, checkpoint after each (and every
    ``train.checkpoint_every`` steps inside one); ``learned`` collects each task's GG counts
    right after it was learned, which the points and the final evaluation (sharing ``cache``)
    reuse."""
    every = cfg.train.checkpoint_every
    for task_id in range(loop.next_task, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        resume = None
        if training is not None and training.step is not None and loop.active_task == task_id:
            resume, training = resume_inside_task(out, model, task_id, training), None

        def save(progress: TaskProgress, task_id: int = task_id) -> None:
            write_checkpoint(out, cfg, model, results, LoopState(task_id, active_task=task_id),
                             TrainingState.capture(model, progress))
            maybe_crash("inside_task_checkpoint")  # fault injection for the tests (inactive unless asked)

        report = learn_task(model, stream.train_batches(task_id, train.iterations, train.batch_size),
                            train, max_steps=train.iterations, progress=cfg.progress, resume=resume,
                            checkpoint_every=every, on_checkpoint=save if every else None,
                            on_step=logger.log_step if logger.tracks_steps else None)
        if report.task_id != task_id:
            raise CheckpointError(f"expected to learn task {task_id}, the model learned {report.task_id}")
        if cfg.benchmark.labels == "global":  # class-incremental: the task answers among its own classes
            model.set_task_classes(task_id, stream.task_classes(task_id))
        train_s = time.perf_counter() - t0
        results.train_seconds += train_s
        t0 = time.perf_counter()
        acc, per_batch = evaluate_given_task(model, stream.test_batches(task_id, cfg.eval.batch_size,
                                                                        cfg.eval.max_batches), task_id)
        learned[task_id] = GivenCounts(acc, per_batch, model.task_sha256(task_id))
        results.tasks.append(TaskRow(task_id, acc_given_task=acc))
        point = None
        if task_id + 1 in matrix_points(cfg):
            cache.prepare(sampled_tasks(task_id + 1, cfg.eval.sample_tasks))
            point = curve_point(cfg, model, stream, task_id + 1, cache=cache)
            results.curve.append(point)
        eval_s = time.perf_counter() - t0
        results.eval_seconds += eval_s
        logger.log_task(_log_row(task_id, report.loss, acc, point, train_s, eval_s))
        write_checkpoint(out, cfg, model, results, LoopState(task_id + 1))
        log.info("task %d: acc_given_task %.4f", task_id, acc)


def _run_unlabeled(cfg: RunConfig, train: TrainConfig, out: Path, model: SupermaskModel, stream, results: RunResults,
                   loop: LoopState,
                   training: TrainingState | None, logger: RunLogger) -> None:
    """NN: train the stream without task ids; the detector picks the mask of every batch."""
    check_learning_rate(cfg.mask.kind, cfg.train.lr)
    detector = NNDetector(model, cfg.nn, None if loop.nn is None else NNState.from_dict(loop.nn))
    optimizer = None
    if restore_active_task(out, model, loop, training):  # a mid-stream checkpoint: scores and optimizer state
        optimizer = make_optimizer(model.trainable_parameters(), train)
        optimizer.load_state_dict(training.optimizer)
        if training.sampler is not None:  # a sampled mask kind: where its mask samples had got to
            model.sampler().set_state(training.sampler)
        if detector.calibration is not None:  # the mask's last batches, for its likelihood statistics
            detector.calibration.load_state(training.calibration or {}, model.device)
    for true_task in range(loop.next_task, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        optimizer, loss = train_unlabeled(detector, stream.train_batches(true_task, train.iterations, train.batch_size),
                                          optimizer, train, true_task=true_task, total=train.iterations,
                                          progress=cfg.progress)
        train_s = time.perf_counter() - t0
        results.train_seconds += train_s
        point = None
        if true_task + 1 in matrix_points(cfg):
            # Evaluate the masks detected so far (the one in training included), each mapped
            # to the true task it mostly saw.
            point = curve_point(cfg, model, stream, true_task + 1, detector.mask_to_task())
            point.num_detected_tasks = model.num_learned_tasks
            results.curve.append(point)
            results.eval_seconds += point.seconds
        acc = None if point is None else next((r.acc_given_task for r in point.rows if r.task_id == true_task), None)
        logger.log_task(_log_row(true_task, loss, acc, point, train_s, 0.0 if point is None else point.seconds))
        sampler = model.sampler()
        training = TrainingState(scores=[layer.scores for layer in model.masked_layers],
                                 optimizer=optimizer.state_dict(),
                                 sampler=None if sampler is None else sampler.get_state(),
                                 calibration=None if detector.calibration is None else detector.calibration.state())
        write_checkpoint(out, cfg, model, results,
                         LoopState(true_task + 1, model.active_task, detector.state.to_dict()), training)
    if model.active_task is not None:
        detector.finish()
    results.nn = nn_report(model, detector.state, cfg.nn.check_every)


def _training_config(cfg: RunConfig, results: RunResults, stream, device, dist: Distributed) -> TrainConfig:
    """``cfg.train`` with ``precision: auto`` resolved: bf16 only if a few timed steps of a
    throwaway copy of the model are faster in it here (rank 0 decides for every rank). The
    choice and the timings are recorded in the results (``extra.precision``); a resumed run keeps
    its recorded choice, so that it goes on as it started. An explicit ``bf16`` is timed the same
    way once and warns when it is the slower."""
    asked = cfg.train.precision
    if asked == "fp32" or (asked == "bf16" and "precision_step_ms" in results.extra):
        return cfg.train
    chosen = results.extra.get("precision") if asked == "auto" else None
    if chosen is None:
        timings = None
        if dist.is_main:
            probe = build_model(cfg, device)
            probe.add_task()
            x, y = next(iter(stream.train_batches(0, 1, cfg.train.batch_size)))
            chosen, timings = choose_precision(probe, x.to(device), y.to(device))
            log.info("precision %s: %s (training step fp32 %.1f ms, bf16 %.1f ms)", asked, chosen, timings["fp32"],
                     timings["bf16"])
            if asked == "bf16" and timings["bf16"] > timings["fp32"]:
                warnings.warn(f"train.precision=bf16 is slower than fp32 on this machine (a training step "
                              f"{timings['bf16']:.1f} ms against {timings['fp32']:.1f} ms): train.precision=auto "
                              "picks the faster", UserWarning, stacklevel=2)
        chosen, timings = dist.broadcast((chosen, timings))
        results.extra.update({"precision": chosen if asked == "auto" else asked, "precision_step_ms": timings})
    return dataclasses.replace(cfg.train, precision=results.extra["precision"])


class NativeBackend:
    """``backend: native``: SupSup, or HopSupSup (:mod:`.hopsupsup_run`)."""

    @staticmethod
    def check(cfg: RunConfig) -> None:
        if cfg.method == "hopsupsup":
            check_hopsupsup(cfg, backend="native")
            return
        if cfg.method != "supsup":
            raise ConfigError("method", f"baseline {cfg.method!r} runs on Avalanche: set backend: avalanche")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.train.checkpoint_every is not None and cfg.scenario is Scenario.NN:
            raise ConfigError("train.checkpoint_every", "checkpoints inside a task are taken in GG/GN (NN "
                                                        "checkpoints after each true task's batches)")
        if world > 1:  # several processes (torchrun) train tasks in parallel: tasks must be independent
            if cfg.scenario is Scenario.NN:
                raise ConfigError("scenario", f"NN decides task by task which mask trains, so it cannot be split over "
                                              f"{world} processes: run it as one process (without torchrun)")
            if cfg.model.score_init == "transfer":
                raise ConfigError("model.score_init", "transfer starts a task from the earlier tasks' masks, so "
                                                      "tasks cannot be trained in parallel: run one process")
            if cfg.model.norm == "shared":
                raise ConfigError("model.norm", "shared BatchNorm statistics run through every task in turn, so "
                                                "tasks cannot be trained in parallel: run one process")

    @staticmethod
    def run(cfg: RunConfig, out_dir: str | os.PathLike, resume: bool, on_task=None) -> RunResults:
        device = resolve_device(cfg.device)
        if cfg.method == "hopsupsup":
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            with run_lock(out, "supsup run --resume" if resume else "supsup run"):
                return run_hopsupsup_native(cfg, out, resume, device)
        dist = Distributed.from_env(device)
        try:
            with contextlib.ExitStack() as held:  # the run directory's writer lock (rank 0)
                return _run(cfg, Path(out_dir), resume, device, dist, held, on_task)
        finally:
            dist.close()


def _run(cfg: RunConfig, out: Path, resume: bool, device, dist: Distributed, held: contextlib.ExitStack,
         on_task=None) -> RunResults:
    problem = None
    if dist.is_main:  # rank 0 alone writes the directory, so it alone holds the lock
        out.mkdir(parents=True, exist_ok=True)
        try:
            held.enter_context(run_lock(out, "supsup run --resume" if resume else "supsup run"))
        except RunLockedError as err:
            problem = str(err)
        if problem is None and not resume and (out / CHECKPOINT_NAME).exists():
            problem = f"{out} already holds a run; pass --resume {out} to continue it or choose another --out"
    problem = dist.broadcast(problem)  # every rank stops, or none
    if problem:
        raise CheckpointError(problem)
    model = build_model(cfg, device)
    results = RunResults.new(cfg)
    loop, training, ranks = LoopState(), None, []
    if resume:
        # rank 0 reads the checkpoint and the finished run's results; every rank gets them (the
        # other machines need no copy of the run directory)
        checkpoint = finished = None
        if dist.is_main:
            checkpoint = load_checkpoint(out)
        checkpoint = dist.broadcast(checkpoint)
        restored = restore_checkpoint(out, cfg, model, checkpoint=checkpoint)
        results, loop, training, ranks = restored.results, restored.loop, restored.training, restored.ranks
        if dist.is_main:
            finished = finished_results(out, cfg, loop)
        finished = dist.broadcast(None if finished is None else finished.to_dict())
        if finished is not None:
            log.info("%s already finished: its results.json is returned as it is", out)
            return RunResults.from_dict(finished)
        log.info("resuming %s after task %d", out, loop.next_task - 1)
    stream = build_stream(cfg, device, progress=cfg.progress and dist.is_main)  # a finished run needs no data
    if dist.is_main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    train = _training_config(cfg, results, stream, device, dist)
    logger = RunLogger(cfg, out, resume_from_task=loop.next_task, enabled=dist.is_main, on_task=on_task)
    learned: dict[int, GivenCounts] = {}
    cache = EvaluationCache(cfg, model, stream, learned)
    try:
        if cfg.scenario is Scenario.NN:
            _run_unlabeled(cfg, train, out, model, stream, results, loop, training, logger)
        elif dist.enabled:
            run_labeled_parallel(cfg, train, out, model, stream, results, loop, logger, dist, ranks)
        else:
            _run_labeled(cfg, train, out, model, stream, results, loop, training, logger, learned, cache)
        _finish(cfg, out, model, stream, results, dist, cache)
        if dist.is_main:
            logger.log_results(results)
    finally:
        logger.close()
    return results


def _finish(cfg: RunConfig, out: Path, model: SupermaskModel, stream, results: RunResults, dist: Distributed,
            cache: EvaluationCache) -> None:
    """The final evaluation, the accuracy matrix, the bank's size and digest, results.json."""
    if dist.enabled:
        evaluate_parallel(cfg, model, stream, results, dist)
    else:
        t0 = time.perf_counter()
        if cfg.scenario is not Scenario.NN:  # points still missing (deferred, or resumed from several processes)
            deferred_evaluation(cfg, model, stream, results, cache)
        else:
            final_evaluation(cfg, model, stream, results)
        results.eval_seconds += time.perf_counter() - t0
    results.accuracy_matrix = accuracy_matrix(cfg, results)
    results.record_bank(model)
    if dist.is_main:
        write_report(out, results)


BACKENDS.register("native")(NativeBackend())
