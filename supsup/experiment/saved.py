"""``supsup eval``: evaluate a saved run's bank again, without training; ``supsup export``: its
model as safetensors files."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import ConfigError, Scenario, apply_overrides, config_from_dict
from ..model import SupermaskModel
from .build import build_model, build_stream, resolve_device
from .evaluate import EvaluationCache, curve_point, final_evaluation, sampled_tasks
from .hopsupsup_run import is_hopsupsup_run
from .results import RunResults
from .runstate import restore_active_task, restore_checkpoint

__all__ = ["evaluate_saved", "export_run", "saved_model"]

log = logging.getLogger(__name__)


def evaluate_saved(out_dir: str | os.PathLike, *, overrides: list[str] = (), scenario: str | None = None,
                   curve: bool = False) -> RunResults:
    """Evaluate a saved bank without training (GG, or GN with inference).

    With ``curve`` (GG/GN), the accuracy-vs-tasks points ``eval.at_tasks`` are recomputed
    from the bank: the point after ``n`` tasks evaluates tasks ``0..n-1`` with the first ``n``
    masks as the only candidates, which is exactly the state after ``n`` tasks since a
    learned mask never changes. So a finished run's curve can be measured again with other
    inference settings, without training."""
    out = Path(out_dir)
    if is_hopsupsup_run(out):
        raise CheckpointError(f"{out} holds a hopsupsup run, which has no bank to evaluate again: its masks are "
                              "recovered from the test data during the run (results.json)")
    _, meta = load_checkpoint(out)
    data = meta["config"]
    if scenario is not None:
        data = dict(data, scenario=scenario)
    cfg = config_from_dict(apply_overrides(data, list(overrides)))
    # Evaluation-only keys may change; everything that defines the model must not.
    base = config_from_dict(meta["config"])
    for section in ("model", "mask"):
        if getattr(cfg, section) != getattr(base, section):
            raise CheckpointError(f"{section}.* cannot change when evaluating a saved bank")
    if cfg.seed != base.seed or cfg.benchmark != base.benchmark:
        raise CheckpointError("seed and benchmark.* cannot change when evaluating a saved bank")
    if cfg.scenario is Scenario.NN and base.scenario is not Scenario.NN:
        raise CheckpointError("scenario NN needs a bank trained in NN")
    device = resolve_device(cfg.device)
    stream = build_stream(cfg, device, progress=cfg.progress)
    model = build_model(cfg, device)
    restored = dataclasses.replace(cfg, scenario=base.scenario, eval=base.eval, inference=base.inference)
    state = restore_checkpoint(out, restored, model)
    results, training = state.results, state.training
    if restore_active_task(out, model, state.loop, training):  # NN ends by banking the mask it trains
        _bank_active_task(model, training)
    if model.active_task is None and model.num_banked_tasks < cfg.benchmark.num_tasks and cfg.scenario is not Scenario.NN:
        log.warning("the bank holds %d of %d tasks; evaluating those", model.num_banked_tasks, cfg.benchmark.num_tasks)
    missing = [t for t in range(model.num_banked_tasks) if model.task_likelihood(t) is None]
    if cfg.inference.method == "likelihood" and cfg.scenario is not Scenario.GG and missing:
        raise CheckpointError(f"{len(missing)} of the {model.num_banked_tasks} banked tasks in {out} have no "
                              f"likelihood statistics (the run used inference.method={base.inference.method}): "
                              f"run `supsup calibrate {out}` first")
    results.scenario = cfg.scenario
    learned = model.num_banked_tasks
    results.tasks = [r for r in results.tasks if r.task_id < learned]
    if cfg.scenario is not Scenario.NN:
        at = [n for n in (cfg.eval.at_tasks or []) if n <= learned] or None
        cfg = dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, num_tasks=learned),
                                  eval=dataclasses.replace(cfg.eval, at_tasks=at))
    t0 = time.perf_counter()
    reuse = False  # the saved curve may come from other settings
    cache = EvaluationCache(cfg, model, stream) if cfg.scenario is not Scenario.NN else None
    if cache is not None:
        for n in sorted(set(cfg.eval.at_tasks or [])) if curve else []:
            cache.prepare(sampled_tasks(n, cfg.eval.sample_tasks))
        cache.prepare(sampled_tasks(learned, cfg.eval.sample_tasks))
    if curve:
        if cfg.scenario is Scenario.NN:
            raise CheckpointError("--curve needs GG or GN: NN retrains masks, so a later bank does not hold "
                                  "the state after n tasks")
        if not cfg.eval.at_tasks:
            raise ConfigError("eval.at_tasks", "--curve needs the task counts to evaluate, e.g. --set 'eval.at_tasks=[10,50]'")
        results.curve = [curve_point(cfg, model, stream, n, bank_prefix=True, cache=cache)
                         for n in sorted(set(cfg.eval.at_tasks))]
        reuse = True
    final_evaluation(cfg, model, stream, results, reuse_curve=reuse, cache=cache)
    results.eval_seconds = time.perf_counter() - t0
    results.record_bank(model, with_memory=False)  # the training run's peak memory stays
    return results


def _bank_active_task(model: SupermaskModel, training) -> None:
    """Bank the mask in training, fitting its likelihood statistics on the last batches the
    checkpoint kept for this."""
    task = model.finish_task()
    if model.likelihood is not None and training.calibration:
        model.fit_likelihood(task, training.calibration["x"].to(model.device), training.calibration["y"].to(model.device))


def saved_model(out_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> SupermaskModel:
    """The model of the run checkpointed in ``out_dir`` with every banked task (an NN run's mask
    in training banked, as its evaluation does); a task checkpointed halfway is not included."""
    out = Path(out_dir)
    if is_hopsupsup_run(out):
        raise CheckpointError(f"{out} holds a hopsupsup run, which keeps no mask bank to export")
    _, meta = load_checkpoint(out)
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg, torch.device(device))
    state = restore_checkpoint(out, cfg, model)
    if restore_active_task(out, model, state.loop, state.training) and cfg.scenario is Scenario.NN:
        _bank_active_task(model, state.training)
    elif model.active_task is not None:
        model.abandon_task()
    return model


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, SupermaskModel]:
    """``supsup export``: the run's model as ``OUT_DIR/supermasks.safetensors`` +
    ``OUT_DIR/supsup_config.json`` (:meth:`~supsup.model.SupermaskModel.save_pretrained`)."""
    model = saved_model(run_dir)
    if model.num_banked_tasks == 0:
        raise CheckpointError(f"{run_dir} holds no finished task yet: nothing to export")
    return model.save_pretrained(out_dir), model
