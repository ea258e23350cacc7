"""``backend: avalanche``: Avalanche's classic benchmark, SupSup through
:class:`~supsup.integrations.avalanche.SupSupStrategy` or a baseline
(:mod:`supsup.integrations.baselines`); the same ``results.json`` as the native backend.

Avalanche is imported when a run starts, not when this module is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import yaml

from ..checkpoint import CHECKPOINT_NAME, CheckpointError
from ..config import ConfigError, RunConfig, Scenario, config_to_dict
from ..evaluation import score_task
from ..fileio import atomic_write_text
from .backends import BACKENDS
from .build import build_model, resolve_device
from .evaluate import matrix_points
from .native import nn_report
from .report import write_report
from .results import (
    AccuracyMatrix,
    BaselineReport,
    CurvePoint,
    InferredScores,
    RunResults,
    Summary,
    TaskRow,
)

__all__ = ["AvalancheBackend"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_evaluator(cfg: RunConfig, out: Path, *metrics):
    """An ``EvaluationPlugin`` with per-experience accuracy and loss (plus ``metrics``), logging
    to ``out/avalanche_log.txt``, the terminal when ``cfg.progress``, and Avalanche's own CSV
    (``out/csv/``) and TensorBoard (``out/tensorboard/``) loggers as ``log.backends`` asks."""
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    with open(out / "avalanche_log.txt", "w") as text:
        loggers = [TextLogger(text)] + ([InteractiveLogger()] if cfg.progress else [])
        stays_open = []  # the W&B run: finish_trackers logs the results into it, then ends it
        if "csv" in cfg.log.backends:
            loggers.append(CSVLogger(str(out / "csv")))
        if "tensorboard" in cfg.log.backends:
            loggers.append(TensorboardLogger(tb_log_dir=str(out / "tensorboard")))
        if "wandb" in cfg.log.backends:  # Avalanche's own; finish_trackers ends its run
            try:
                from ..integrations.avalanche.wandb_logger import SupSupWandBLogger
            except ImportError:
                from .loggers import missing_tracker

                raise missing_tracker("wandb") from None
            stays_open.append(SupSupWandBLogger(project_name=os.environ.get("WANDB_PROJECT", "supsup"),
                                                run_name=out.name, dir=str(out), save_code=False,
                                                config=config_to_dict(cfg)))
        try:
            yield EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(experience=True),
                                   *metrics, loggers=loggers + stays_open)
        finally:
            for logger in loggers[1:]:
                if hasattr(logger, "close"):
                    logger.close()


def finish_trackers(cfg: RunConfig, out: Path, results: RunResults) -> None:
    """W&B (the run Avalanche's logger started) and MLflow get the config, the task rows, the
    accuracy matrix, the figures and the bank's digest, as a native run's
    (:class:`~.loggers.RunLogger`)."""
    if not {"wandb", "mlflow"} & set(cfg.log.backends):
        return
    from .loggers import RunLogger

    run = None
    if "wandb" in cfg.log.backends:
        import wandb

        run = wandb.run
    logger = RunLogger(cfg, out, only=("wandb", "mlflow"), wandb_run=run)
    try:
        for row in results.tasks:
            logger.log_task({"task": row.task_id, "tasks_learned": row.task_id + 1, "acc_given_task": row.acc_given_task,
                             "mean_acc_inferred": row.acc_inferred, "task_inference_acc": row.task_inference_acc})
        logger.log_results(results)
    finally:
        logger.close()


def start_run(cfg: RunConfig, out_dir, *, resume: bool) -> Path:
    """Checks shared by every Avalanche run; writes ``config.yaml``."""
    if resume:
        raise CheckpointError("backend avalanche does not checkpoint, so it cannot resume: rerun without "
                              "--resume, or use backend native")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{out} holds a native run's checkpoint; choose another --out")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return out


def run_supsup(cfg: RunConfig, out_dir, *, resume: bool = False) -> RunResults:
    """SupSup through the strategy. ``acc_given_task`` is Avalanche's ``Top1_Acc_Exp`` with the
    task given; ``acc_inferred`` and ``task_inference_acc`` follow the GN protocol of
    :mod:`supsup.evaluation` over the strategy's per-minibatch outcomes, exactly as the native
    backend scores them."""
    from ..integrations.avalanche import (
        SupSupStrategy,
        TaskInferenceAccuracy,
        classic_benchmark,
        per_experience,
    )

    out = start_run(cfg, out_dir, resume=resume)
    device = resolve_device(cfg.device)
    bench = classic_benchmark(cfg)
    model = build_model(cfg, device, input_shape=bench.input_shape, num_classes=bench.num_classes)
    results = RunResults.new(cfg)
    inferred = cfg.scenario is not Scenario.GG
    with run_evaluator(cfg, out, TaskInferenceAccuracy()) as evaluator:
        strategy = SupSupStrategy(model=model, scenario=cfg.scenario, train_config=cfg.train, eval_config=cfg.eval,
                                  inference_config=cfg.inference, nn_config=cfg.nn, task_id_source="task_label",
                                  seed=cfg.seed, device=device, evaluator=evaluator)

        def evaluate(num_learned: int) -> list[TaskRow]:
            """Every test experience, after ``num_learned`` training experiences: a row of the
            accuracy matrix (tasks without a mask: None)."""
            strategy.eval_task = "given"
            given = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
            if inferred:
                strategy.eval_task = "inferred"
                strategy.eval(bench.test)
            mapped = set(strategy.task_to_mask())
            rows = []
            for exp in bench.test:
                task_id = strategy.task_id_of(exp)
                row = TaskRow(task_id)
                seen = task_id < num_learned  # evaluated: the tasks of the experiences trained so far
                if seen and (cfg.scenario is not Scenario.NN or task_id in mapped):
                    row.acc_given_task = given.get(exp.current_experience)
                if inferred and seen:
                    scores = score_task(task_id, strategy.outcomes[exp.current_experience])
                    row.inferred = InferredScores(scores.acc_inferred, scores.task_inference_acc)
                    row.inferred_counts = scores.inferred_counts
                    row.shortlist_recall, row.true_rank_counts = scores.shortlist_recall, scores.true_rank_counts
                rows.append(row)
            return rows

        points = []
        for i, exp in enumerate(bench.train):
            t0 = time.perf_counter()
            strategy.train(exp)
            results.train_seconds += time.perf_counter() - t0
            log.info("experience %d trained (%d steps)", exp.current_experience, strategy.steps_in_experience)
            if i + 1 < len(bench.train) and i + 1 in matrix_points(cfg):
                t0 = time.perf_counter()
                rows = evaluate(i + 1)[: i + 1]
                seconds = time.perf_counter() - t0
                points.append(CurvePoint(i + 1, list(range(i + 1)), Summary.of(rows, inferred=inferred), seconds, rows,
                                         inferred=inferred))
                results.eval_seconds += seconds
        if model.active_task is not None:  # NN: the last mask is still being trained
            strategy.detector.finish()
        t0 = time.perf_counter()
        results.tasks = evaluate(len(bench.train))
        if cfg.benchmark.labels == "global":  # class-incremental: also the task of each image alone
            from ..evaluation import evaluate_per_image
            from ..integrations.avalanche import CachedBatches

            candidates = model.candidates()
            for row, exp in zip(results.tasks, bench.test):
                batches = list(CachedBatches.evaluation(strategy.data_cache.get(exp.dataset, "eval"),
                                                        batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches))
                row.acc_inferred_per_image = evaluate_per_image(model, [(b[0], b[1]) for b in batches], cfg.inference,
                                                             candidates)
        results.eval_seconds += time.perf_counter() - t0
    results.summarise()
    if len(bench.train) in matrix_points(cfg):
        points.append(CurvePoint(len(bench.train), list(range(len(bench.train))), results.summary, 0.0,
                                 results.tasks, inferred=inferred))
    results.curve = points  # the accuracy-vs-tasks points, as the native backend's
    last = [] if points and points[-1].num_tasks_learned == len(bench.train) else [
        CurvePoint(len(bench.train), list(range(len(bench.train))), results.summary, 0.0, results.tasks)]
    results.accuracy_matrix = AccuracyMatrix.from_points(points + last, len(bench.test), given=True, inferred=inferred)
    if inferred:
        results.record_confusion(results.tasks, len(bench.test))
    if cfg.scenario is Scenario.NN:
        results.nn = nn_report(model, strategy.nn_state, cfg.nn.check_every)
    results.record_bank(model)
    results.data_cache_seconds = strategy.data_cache.seconds
    write_report(out, results)
    return results


def run_baseline(cfg: RunConfig, out_dir, *, resume: bool = False) -> RunResults:
    """A baseline ``method``: same stream, backbone and step budget as SupSup; results.json in
    the native schema plus ``baseline_hparams``, ``accuracy_uses_task_id`` and ``head``.

    Model: the registered backbone as a dense, trained network with Kaiming-normal weights from
    (seed, "backbone"); scenario GN: one head shared by all tasks (no task id at test: the
    accuracy is reported as ``acc_inferred``), scenario GG: one head per task picked by the task
    id (``acc_given_task``); PackNet always selects its weights by task id (GG only)."""
    from avalanche.training.determinism.rng_manager import RNGManager

    from ..integrations.avalanche import classic_benchmark, per_experience
    from ..integrations.baselines import (
        DEFAULT_HPARAMS,
        TensorCachePlugin,
        dense_model,
        make_baseline_strategy,
    )

    method = cfg.method
    out = start_run(cfg, out_dir, resume=resume)
    device = resolve_device(cfg.device)
    # Avalanche draws from the global generators (loader shuffling, memories, new heads).
    RNGManager.set_random_seeds(cfg.seed)
    bench = classic_benchmark(cfg)
    head = "packnet" if method == "packnet" else ("multi" if cfg.scenario is Scenario.GG else "single")
    model = dense_model(cfg.model.backbone, input_shape=bench.input_shape, num_classes=bench.num_classes,
                        seed=cfg.seed, head=head)
    num_tasks = cfg.benchmark.num_tasks
    hparams = {"optimizer": dict(DEFAULT_HPARAMS["optimizer"]), method: dict(DEFAULT_HPARAMS[method])}
    results = RunResults.new(cfg)
    uses_task_id = head != "single"
    with run_evaluator(cfg, out) as evaluator:
        strategy = make_baseline_strategy(method, model=model, num_tasks=num_tasks, iterations=cfg.train.iterations,
                                          train_mb_size=cfg.train.batch_size, eval_mb_size=cfg.eval.batch_size,
                                          eval_max_batches=cfg.eval.max_batches, hparams=hparams, device=device,
                                          evaluator=evaluator, seed=cfg.seed)

        def accuracies() -> list[float | None]:
            t0 = time.perf_counter()
            acc = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
            results.eval_seconds += time.perf_counter() - t0
            return [acc.get(exp.current_experience) for exp in bench.test]

        # a multi-head model has no head for a task it has not met: no accuracy before training
        before = None if uses_task_id else accuracies()
        rows, learned = [], []
        for i, exp in enumerate(bench.train):
            t0 = time.perf_counter()
            strategy.train(exp)
            results.train_seconds += time.perf_counter() - t0
            if i + 1 == len(bench.train) or i + 1 in matrix_points(cfg):
                row = accuracies()
                rows.append([v if (not uses_task_id or j <= i) else None for j, v in enumerate(row)])
                learned.append(i + 1)
    final = rows[-1]
    for exp in bench.test:
        row = TaskRow(exp.current_experience)
        if uses_task_id:
            row.acc_given_task = final[exp.current_experience]
        else:
            row.inferred = InferredScores(acc_inferred=final[exp.current_experience])
        results.tasks.append(row)
    results.summarise()
    kind = "given" if uses_task_id else "inferred"
    results.accuracy_matrix = AccuracyMatrix(num_tasks_learned=learned, **{kind: rows},
                                             before=None if before is None else {kind: before})
    cache = next(p for p in strategy.plugins if isinstance(p, TensorCachePlugin))
    results.baseline = BaselineReport(hparams, uses_task_id, head, sum(p.numel() for p in model.parameters()),
                                      cfg.train.iterations)
    results.data_cache_seconds = cache.cache.seconds
    write_report(out, results)
    return results


def run_hopsupsup(cfg: RunConfig, out_dir, *, resume: bool = False) -> RunResults:
    """HopSupSup through :class:`~supsup.integrations.avalanche.HopSupSupStrategy`: the same
    protocol and ``results.json`` as the native run (:mod:`.hopsupsup_run`); ``acc_inferred`` is
    Avalanche's ``Top1_Acc_Exp`` with the mask the strategy recovered."""
    from ..integrations.avalanche import HopSupSupStrategy, classic_benchmark, per_experience
    from .hopsupsup_run import build_net, finish_results, score_recovery

    out = start_run(cfg, out_dir, resume=resume)
    device = resolve_device(cfg.device)
    bench = classic_benchmark(cfg)
    model = build_net(cfg, bench.input_shape, bench.num_classes, device)
    results = RunResults.new(cfg)
    with run_evaluator(cfg, out) as evaluator:
        strategy = HopSupSupStrategy(model=model, train_config=cfg.train, hopfield_config=cfg.hopfield, seed=cfg.seed,
                                     task_id_source="task_label", device=device, evaluator=evaluator,
                                     max_eval_batches=cfg.eval.max_batches)

        def evaluate(n: int) -> tuple[list[TaskRow], list[dict]]:
            """Recover and score the first ``n`` test experiences (the tasks learned so far)."""
            accs = per_experience(strategy.eval(bench.test[:n]), "Top1_Acc_Exp")
            learned = [strategy.learned[t] for t in range(n)]
            rows, details = [], []
            for exp in bench.test[:n]:
                batches = [(x, y) for x, y, _ in strategy.dataloader_for(exp)]
                row, detail = score_recovery(model, batches, strategy.recoveries[exp.current_experience], learned,
                                             strategy.task_id_of(exp), n)
                row.inferred.acc_inferred = accs[exp.current_experience]
                rows.append(row)
                details.append(detail)
            return rows, details

        points, losses = [], []
        for i, exp in enumerate(bench.train):
            t0 = time.perf_counter()
            strategy.train(exp)
            results.train_seconds += time.perf_counter() - t0
            losses.append(strategy.last_loss)
            if i + 1 < len(bench.train) and i + 1 in matrix_points(cfg):
                t0 = time.perf_counter()
                rows, _ = evaluate(i + 1)
                seconds = time.perf_counter() - t0
                points.append(CurvePoint(i + 1, list(range(i + 1)), Summary.of(rows, inferred=True), seconds, rows))
                results.eval_seconds += seconds
        t0 = time.perf_counter()
        rows, details = evaluate(len(bench.train))
        results.eval_seconds += time.perf_counter() - t0
    finish_results(cfg, results, model, rows, details, points, losses)
    results.data_cache_seconds = strategy.data_cache.seconds
    write_report(out, results)
    return results


class AvalancheBackend:
    """``backend: avalanche``: SupSup (``method: supsup``), HopSupSup (``method: hopsupsup``) or an
    Avalanche baseline."""

    @staticmethod
    def check(cfg: RunConfig) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("backend", "backend avalanche runs in one process (Avalanche's loop is sequential): "
                                         "run it without torchrun, or use backend native for several processes")
        if cfg.benchmark.name not in ("permuted_mnist", "rotated_mnist", "split_mnist"):
            raise ConfigError("benchmark.name", f"backend avalanche runs the MNIST benchmarks; for {cfg.benchmark.name} "
                                                "use backend native, or SupSupStrategy on your own Avalanche stream")
        if cfg.benchmark.name == "permuted_mnist" and cfg.benchmark.permutation_source != "avalanche":
            raise ConfigError("benchmark.permutation_source",
                              "backend avalanche uses Avalanche's PermutedMNIST permutations: set "
                              "benchmark.permutation_source=avalanche (the native backend then draws the same ones)")
        if cfg.train.layer_lr is not None:
            raise ConfigError("train.layer_lr", "is not supported by backend avalanche; use backend native")
        if cfg.benchmark.validation is not None:
            raise ConfigError("benchmark.validation", "is not supported by backend avalanche; use backend native")
        if cfg.train.checkpoint_every is not None:
            raise ConfigError("train.checkpoint_every", "backend avalanche does not checkpoint; use backend native")
        for key in ("at_tasks", "sample_tasks", "extra_objectives"):  # native-only evaluation options
            if getattr(cfg.eval, key):
                raise ConfigError(f"eval.{key}", "is not supported by backend avalanche; use backend native")
        if cfg.method == "supsup":
            return
        if cfg.method == "hopsupsup":
            from .hopsupsup_run import check_hopsupsup

            check_hopsupsup(cfg, backend="avalanche")
            return
        from ..config.sections import check_choice
        from ..integrations.baselines import BASELINES

        check_choice("method", cfg.method, ["supsup", *BASELINES.names()])
        if cfg.scenario is Scenario.NN:
            raise ConfigError("scenario", "NN is a SupSup scenario; baselines run GG or GN")
        if cfg.method == "packnet" and cfg.scenario is not Scenario.GG:
            raise ConfigError("scenario", "packnet selects its weights by task id at test: run it in scenario GG")

    @staticmethod
    def run(cfg: RunConfig, out_dir: str | os.PathLike, resume: bool) -> RunResults:
        from .runlock import run_lock

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with run_lock(out_dir, f"supsup run ({cfg.method}, backend avalanche)"):  # one writer per directory
            run = {"supsup": run_supsup, "hopsupsup": run_hopsupsup}.get(cfg.method, run_baseline)
            results = run(cfg, out_dir, resume=resume)
            finish_trackers(cfg, Path(out_dir), results)
            return results


BACKENDS.register("avalanche")(AvalancheBackend())

