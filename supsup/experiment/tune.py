"""``supsup tune``: hyperparameters chosen the continual-learning way, with Optuna.

Every trial is a native run of the config with the trial's values, evaluated on **validation
data carved from each task's training images** (``benchmark.validation`` images per task,
drawn by a generator seeded by (seed, task); those images are not trained on, the test set is
never read). After each task the trial reports the mean accuracy over the tasks learned so far
(task inferred in GN/NN, given in GG) and may be pruned there (median or successive-halving
pruner over trials that reached that task); its value is that mean after the last task. TPE
samples by default, seeded by the config's seed.

The study lives in an Optuna RDB storage: by default the SQLite file ``OUT/study.db``; any
Optuna RDB URL (PostgreSQL, MySQL) lets processes on several machines share one study. Each
trial runs in ``OUT/trials/NNNN``. A killed tune resumes: its unfinished trial is failed and its
values are tried again, going on from the run's last checkpoint. ``OUT/best.yaml`` is the best
trial's config for ``supsup run`` (the validation hold-out removed), ``OUT/study.json`` every
trial's state, values and parameters.

A space file maps the config's own dotted keys to ranges::

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}
    train.iterations: {low: 300, high: 3000, step: 300}
    train.schedule: {choices: [constant, cosine]}
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import CHECKPOINT_NAME
from ..config import (
    ConfigError,
    RunConfig,
    Scenario,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from ..fileio import atomic_write_text
from .backends import check_config, run_experiment
from .runlock import RunLockedError, run_lock

__all__ = ["PRUNERS", "SearchParam", "load_space", "tune", "with_values"]

log = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
_SPEC_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search: a float or int range (``log``: sampled on a log scale;
    ``step``: a grid) or a list of ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and (self.step is None or isinstance(self.step, int))

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def load_space(path: str | os.PathLike, base: RunConfig) -> list[SearchParam]:
    """The search space of a YAML file, checked against ``base``: every key must be one of the
    config's, every value it can take valid there. Mistakes are a one-line :class:`ConfigError`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError("", f"{path}: a search space maps config keys to ranges, e.g. "
                              "'train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}'")
    params = []
    for key, spec in data.items():
        where = f"space {key}"
        if not isinstance(spec, dict):
            raise ConfigError(where, "needs {low: .., high: ..} (log, step optional) or {choices: [..]}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ConfigError(where, f"unknown field {sorted(unknown)[0]!r}; use low, high, log, step or choices")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(where, "choices must be a non-empty list, alone")
            param = SearchParam(key, choices=tuple(spec["choices"]))
            values = param.choices
        else:
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise ConfigError(where, "needs numbers low and high")
            if not low < high:
                raise ConfigError(where, f"low ({low}) must be below high ({high})")
            if spec.get("log") and low <= 0:
                raise ConfigError(where, f"a log scale needs low > 0, got {low}")
            if spec.get("log") and spec.get("step") is not None:
                raise ConfigError(where, "log and step cannot be combined")
            param = SearchParam(key, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"))
            values = (low, high)
        for value in values:  # the key exists and the config accepts the value
            try:
                with_values(base, {key: value})
            except ConfigError as err:
                raise ConfigError(where, str(err)) from None
        params.append(param)
    return params


def with_values(base: RunConfig, values: dict[str, Any], extra: Sequence[str] = ()) -> RunConfig:
    """``base`` with dotted keys set to ``values`` (then the ``key=value`` overrides ``extra``)."""
    sets = [f"{k}={json.dumps(v)}" for k, v in values.items()] + list(extra)
    return config_from_dict(apply_overrides(config_to_dict(base), sets))


def objective_value(row: dict[str, Any], scenario: Scenario) -> float | None:
    """The mean accuracy a task row reports over the tasks learned so far (None if the run did
    not evaluate them then)."""
    key = "mean_acc_given_task" if scenario is Scenario.GG else "mean_acc_inferred"
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def trial_config(base: RunConfig, values: dict[str, Any], validation: int) -> RunConfig:
    """``base`` with a trial's values, evaluating on ``validation`` held-out training images per
    task after every task, without progress bars."""
    return with_values(base, values, [f"benchmark.validation={validation}", "progress=false",
                                      f"eval.at_tasks={json.dumps(list(range(1, base.benchmark.num_tasks + 1)))}"])


def _make_pruner(optuna, name: str, warmup_tasks: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_tasks - 1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup_tasks)
    return optuna.pruners.NopPruner()


def _fail_dead_trials(optuna, study, out: Path) -> None:
    """Trials left RUNNING by a process that died (its run directory's lock is free) are failed
    and their values queued again, to resume from their checkpoint (same machine; another
    machine's dead trials are failed by the storage's heartbeat)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        if not run_dir or not Path(run_dir).exists():
            continue
        try:
            with run_lock(run_dir, "supsup tune (checking a trial)"):
                pass
        except RunLockedError:
            continue  # alive: another process runs it
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"resume_dir": run_dir}, skip_if_exists=False)
        log.info("trial %d was interrupted: failed, its values queued again", trial.number)


def _open_storage(RDBStorage, url: str, extra: dict[str, Any]):
    """The RDB storage; when several processes create a new database at once, one of them
    loses the race to write its schema version, and simply tries again (the schema is there)."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            return RDBStorage(url, heartbeat_interval=60, grace_period=180, **extra)
        except SQLAlchemyError:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def tune(base: RunConfig, space: Sequence[SearchParam], out_dir: str | os.PathLike, *, trials: int,
         storage: str | None = None, study_name: str | None = None, validation: int = 2000,
         pruner: str = "median", warmup_tasks: int = 1) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` finished ones (complete or pruned; several
    processes sharing a study may each finish one more). Returns the summary written to
    ``OUT/study.json``."""
    import optuna
    from optuna.storages import RDBStorage

    if base.backend != "native":
        raise ConfigError("backend", "supsup tune runs trials on backend native")
    if base.method != "supsup":
        raise ConfigError("method", "supsup tune tunes SupSup runs (method supsup)")
    if pruner not in PRUNERS:
        raise ConfigError("", f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    check_config(trial_config(base, {}, validation))
    out = Path(out_dir)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # a trial whose process stopped beating for 3 minutes (another machine's, say) is failed and
    # retried; the callback's keyword was renamed in Optuna 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters:
            extra = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            extra = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
        if url.startswith("sqlite"):  # processes sharing the file wait for each other's writes
            extra["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        rdb = _open_storage(RDBStorage, url, extra)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name or "supsup", storage=rdb, load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=base.seed),
                                pruner=_make_pruner(optuna, pruner, warmup_tasks))
    _fail_dead_trials(optuna, study, out)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in space}
        resume_dir = trial.user_attrs.get("resume_dir")
        run_dir = Path(resume_dir) if resume_dir else out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("pid", os.getpid())  # which process ran it (several may share a study)
        cfg = trial_config(base, values, validation)

        def report(row: dict[str, Any]) -> None:
            value = objective_value(row, cfg.scenario)
            if value is None:
                return
            step = int(row["tasks_learned"])
            trial.report(value, step)
            if step < cfg.benchmark.num_tasks and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {step} tasks at {value:.4f}")

        resume = bool(resume_dir) and (run_dir / CHECKPOINT_NAME).exists()
        results = run_experiment(cfg, run_dir, resume=resume, on_task=report)
        value = results.summary.mean_acc_given_task if cfg.scenario is Scenario.GG else \
            results.summary.inferred.acc_inferred
        return float(value)

    def count() -> int:
        return len(study.get_trials(deepcopy=False, states=finished))

    while count() < trials:
        study.optimize(objective, n_trials=1, catch=(), callbacks=[
            optuna.study.MaxTrialsCallback(trials, states=finished)])
    return write_summary(study, base, out, validation)


def write_summary(study, base: RunConfig, out: Path, validation: int) -> dict[str, Any]:
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "reported": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                     "run_dir": t.user_attrs.get("run_dir")})
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    summary: dict[str, Any] = {"study": study.study_name, "validation_images_per_task": validation,
                               "trials": rows, "best": None}
    if complete:
        best = study.best_trial
        cfg = with_values(base, best.params)
        cfg = dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, validation=None))
        atomic_write_text(out / "best.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "config": str(out / "best.yaml")}
    atomic_write_text(out / "study.json", json.dumps(summary, indent=1) + "\n")
    return summary
