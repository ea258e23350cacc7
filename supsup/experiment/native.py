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
from .evaluate import GivenCounts, deferred_evaluation, final_evaluation
from .hopsupsup_run import check_hopsupsup, run_hopsupsup_native
from .loggers import RunLogger
from .parallel import evaluate_parallel, run_labeled_parallel
from .results import NNReport, RunResults
from .run import Run
from .runlock import RunLockedError, run_lock
from .runstate import (
    LoopState,
    TrainingState,
    finished_results,
    restore_active_task,
    restore_checkpoint,
    resume_inside_task,
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


def _run_labeled(run: Run, loop: LoopState, training: TrainingState | None) -> None:
    """GG/GN: learn each task with its id, checkpoint after each (and every
    ``train.checkpoint_every`` steps inside one); each task's GG counts right after it was
    learned go to ``run.learned``, which the points and the final evaluation reuse."""
    cfg, model, every = run.cfg, run.model, run.cfg.train.checkpoint_every
    for task_id in range(loop.next_task, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        resume = None
        if training is not None and training.step is not None and loop.active_task == task_id:
            resume, training = resume_inside_task(run.out, model, task_id, training), None

        def save(progress: TaskProgress, task_id: int = task_id) -> None:
            run.checkpoint(LoopState(task_id, active_task=task_id), TrainingState.capture(model, progress))
            maybe_crash("inside_task_checkpoint")  # fault injection for the tests (inactive unless asked)

        report = learn_task(model, run.train_batches(task_id), run.train, max_steps=run.train.iterations,
                            progress=cfg.progress, resume=resume, checkpoint_every=every,
                            on_checkpoint=save if every else None,
                            on_step=run.logger.log_step if run.logger.tracks_steps else None)
        if report.task_id != task_id:
            raise CheckpointError(f"expected to learn task {task_id}, the model learned {report.task_id}")
        if cfg.benchmark.labels == "global":  # class-incremental: the task answers among its own classes
            model.set_task_classes(task_id, run.stream.task_classes(task_id))
        train_s = time.perf_counter() - t0
        run.results.train_seconds += train_s
        run.results.train_step_seconds = (run.results.train_step_seconds or 0.0) + report.step_seconds
        t0 = time.perf_counter()
        acc, per_batch = evaluate_given_task(model, run.test_batches(task_id), task_id)
        run.learned[task_id] = GivenCounts(acc, per_batch, model.task_sha256(task_id))
        point = run.point_after(task_id + 1)
        eval_s = time.perf_counter() - t0
        run.results.eval_seconds += eval_s
        run.record_task(task_id, report.loss, acc, point, train_s, eval_s)
        run.checkpoint(LoopState(task_id + 1))
        log.info("task %d: acc_given_task %.4f", task_id, acc)


def _run_unlabeled(run: Run, loop: LoopState, training: TrainingState | None) -> None:
    """NN: train the stream without task ids; the detector picks the mask of every batch."""
    cfg, model = run.cfg, run.model
    check_learning_rate(cfg.mask.kind, cfg.train.lr)
    detector = NNDetector(model, cfg.nn, None if loop.nn is None else NNState.from_dict(loop.nn))
    optimizer = None
    if restore_active_task(run.out, model, loop, training):  # a mid-stream checkpoint: scores and optimizer state
        optimizer = make_optimizer(model.trainable_parameters(), run.train)
        optimizer.load_state_dict(training.optimizer)
        if training.sampler is not None:  # a sampled mask kind: where its mask samples had got to
            model.sampler().set_state(training.sampler)
        if detector.calibration is not None:  # the mask's last batches, for its likelihood statistics
            detector.calibration.load_state(training.calibration or {}, model.device)
    for true_task in range(loop.next_task, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        optimizer, loss = train_unlabeled(detector, run.train_batches(true_task), optimizer, run.train,
                                          true_task=true_task, total=run.train.iterations, progress=cfg.progress)
        train_s = time.perf_counter() - t0
        run.results.train_seconds += train_s
        # the masks detected so far (the one in training included), each mapped to the true
        # task it mostly saw
        point = run.point_after(true_task + 1, detector.mask_to_task())
        eval_s = 0.0
        acc = None
        if point is not None:
            point.num_detected_tasks = model.num_learned_tasks
            eval_s = point.seconds
            run.results.eval_seconds += eval_s
            acc = next((r.acc_given_task for r in point.rows if r.task_id == true_task), None)
        run.record_task(true_task, loss, acc, point, train_s, eval_s, row=False)
        sampler = model.sampler()
        training = TrainingState(scores=[layer.scores for layer in model.masked_layers],
                                 optimizer=optimizer.state_dict(),
                                 sampler=None if sampler is None else sampler.get_state(),
                                 calibration=None if detector.calibration is None else detector.calibration.state())
        run.checkpoint(LoopState(true_task + 1, model.active_task, detector.state.to_dict()), training)
    if model.active_task is not None:
        detector.finish()
    run.results.nn = nn_report(model, detector.state, cfg.nn.check_every)


def _training_config(cfg: RunConfig, results: RunResults, stream, device, dist: Distributed) -> TrainConfig:
    """``cfg.train`` with ``precision: auto`` resolved: bf16 only if a few timed steps of a
    throwaway copy of the model are faster in it here (rank 0 decides for every rank). The
    choice and the timings are recorded in the results (``precision``); a resumed run keeps
    its recorded choice, so that it goes on as it started. An explicit ``bf16`` is timed the same
    way once and warns when it is the slower."""
    asked = cfg.train.precision
    if asked == "fp32" or (asked == "bf16" and results.precision_step_ms is not None):
        return cfg.train
    chosen = results.precision if asked == "auto" else None
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
        results.precision, results.precision_step_ms = chosen if asked == "auto" else asked, timings
    return dataclasses.replace(cfg.train, precision=results.precision)


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
    run = Run(cfg, train, out, model, stream, results, logger, dist)
    try:
        if cfg.scenario is Scenario.NN:
            _run_unlabeled(run, loop, training)
        elif dist.enabled:
            run_labeled_parallel(run, loop, ranks)
        else:
            _run_labeled(run, loop, training)
        t0 = time.perf_counter()
        if dist.enabled:
            evaluate_parallel(run)
        elif cfg.scenario is not Scenario.NN:  # points still missing (deferred, or resumed from several processes)
            deferred_evaluation(cfg, model, stream, results, run.cache)
        else:
            final_evaluation(cfg, model, stream, results)
        return run.finish(time.perf_counter() - t0)
    finally:
        logger.close()


BACKENDS.register("native")(NativeBackend())
