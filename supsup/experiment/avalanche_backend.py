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

from ..bank import bank_sha256
from ..checkpoint import CHECKPOINT_NAME, CheckpointError
from ..config import ConfigError, RunConfig, Scenario, config_to_dict
from ..evaluation import score_task
from ..fileio import atomic_write_text
from .backends import BACKENDS
from .build import build_model, resolve_device
from .native import nn_report
from .report import write_report
from .results import InferredScores, RunResults, TaskRow
from .runstate import peak_rss_bytes

__all__ = ["AvalancheBackend"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_evaluator(cfg: RunConfig, out: Path, *metrics):
    """An ``EvaluationPlugin`` with per-experience accuracy (plus ``metrics``), logging to
    ``out/avalanche_log.txt`` (and the terminal when ``cfg.progress``)."""
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.logging import InteractiveLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    with open(out / "avalanche_log.txt", "w") as text:
        loggers = [TextLogger(text)] + ([InteractiveLogger()] if cfg.progress else [])
        yield EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(experience=True),
                               *metrics, loggers=loggers)


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
    with run_evaluator(cfg, out, TaskInferenceAccuracy()) as evaluator:
        strategy = SupSupStrategy(model=model, scenario=cfg.scenario, train_config=cfg.train, eval_config=cfg.eval,
                                  inference_config=cfg.inference, nn_config=cfg.nn, task_id_source="task_label",
                                  seed=cfg.seed, device=device, evaluator=evaluator)
        for exp in bench.train:
            t0 = time.perf_counter()
            strategy.train(exp)
            results.train_seconds += time.perf_counter() - t0
            log.info("experience %d trained (%d steps)", exp.current_experience, strategy.steps_in_experience)
        if model.active_task is not None:  # NN: the last mask is still being trained
            model.finish_task()
        t0 = time.perf_counter()
        strategy.eval_task = "given"
        given = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
        if cfg.scenario is not Scenario.GG:
            strategy.eval_task = "inferred"
            strategy.eval(bench.test)
        results.eval_seconds += time.perf_counter() - t0

    mapped = set(strategy.task_to_mask())
    for exp in bench.test:
        task_id = strategy.task_id_of(exp)
        row = TaskRow(task_id)
        if cfg.scenario is not Scenario.NN or task_id in mapped:
            row.acc_given_task = given.get(exp.current_experience)
        if cfg.scenario is not Scenario.GG:
            scores = score_task(task_id, strategy.outcomes[exp.current_experience])
            row.inferred = InferredScores(scores.acc_inferred, scores.task_inference_acc)
        results.tasks.append(row)
    results.summarise()
    if cfg.scenario is Scenario.NN:
        results.nn = nn_report(model, strategy.nn_state, cfg.nn.check_every)
    results.bank_bytes = model.bank_bytes
    results.num_masked_weights = model.num_masked_weights
    results.bank_sha256 = bank_sha256(model.masked_layers)
    results.peak_rss_bytes = peak_rss_bytes()
    if cfg.scenario is not Scenario.GG:
        results.tasks_inferred = len(bench.test)
    results.extra["data_cache_seconds"] = strategy.data_cache.seconds
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
    with run_evaluator(cfg, out) as evaluator:
        strategy = make_baseline_strategy(method, model=model, num_tasks=num_tasks, iterations=cfg.train.iterations,
                                          train_mb_size=cfg.train.batch_size, eval_mb_size=cfg.eval.batch_size,
                                          eval_max_batches=cfg.eval.max_batches, hparams=hparams, device=device,
                                          evaluator=evaluator, seed=cfg.seed)
        for exp in bench.train:
            t0 = time.perf_counter()
            strategy.train(exp)
            results.train_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
        results.eval_seconds += time.perf_counter() - t0

    uses_task_id = head != "single"
    for exp in bench.test:
        row = TaskRow(exp.current_experience)
        if uses_task_id:
            row.acc_given_task = acc.get(exp.current_experience)
        else:
            row.inferred = InferredScores(acc_inferred=acc.get(exp.current_experience))
        results.tasks.append(row)
    results.summarise()
    cache = next(p for p in strategy.plugins if isinstance(p, TensorCachePlugin))
    results.extra.update({"baseline_hparams": hparams, "accuracy_uses_task_id": uses_task_id, "head": head,
                          "num_parameters": sum(p.numel() for p in model.parameters()),
                          "optimizer_steps_per_task": cfg.train.iterations,
                          "data_cache_seconds": cache.cache.seconds})
    write_report(out, results)
    return results


class AvalancheBackend:
    """``backend: avalanche``: SupSup (``method: supsup``) or an Avalanche baseline."""

    @staticmethod
    def check(cfg: RunConfig) -> None:
        if cfg.benchmark.name == "permuted_mnist" and cfg.benchmark.permutation_source != "avalanche":
            raise ConfigError("benchmark.permutation_source",
                              "backend avalanche uses Avalanche's PermutedMNIST permutations: set "
                              "benchmark.permutation_source=avalanche (the native backend then draws the same ones)")
        for key in ("at_tasks", "sample_tasks", "extra_objectives"):  # native-only evaluation options
            if getattr(cfg.eval, key):
                raise ConfigError(f"eval.{key}", "is not supported by backend avalanche; use backend native")
        if cfg.method == "supsup":
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
        return (run_supsup if cfg.method == "supsup" else run_baseline)(cfg, out_dir, resume=resume)


BACKENDS.register("avalanche")(AvalancheBackend())

