"""One experiment end to end: build, train task after task, checkpoint, evaluate, report.

Output directory layout::

    DIR/config.yaml       the resolved config
    DIR/checkpoint.pt     packed bank + state after the last finished task (supsup.checkpoint)
    DIR/results.json      per-task and mean accuracies, timings, bank size
    DIR/accuracy.png      accuracy per task
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict
from .model import SupermaskModel
from .training import (
    NNState,
    evaluate_given_task,
    evaluate_inferred,
    make_optimizer,
    mask_to_task,
    safe_mean,
    shared_masks,
    train_nn_segment,
    train_task,
)

__all__ = ["run_experiment", "evaluate_saved", "build_model", "build_stream", "resolve_device", "format_table",
           "new_results", "task_row", "sampled_tasks", "peak_rss_bytes", "record_nn_detection"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def build_stream(cfg: RunConfig, device: torch.device, *, progress: bool = True):
    from .data.mnist import load_mnist
    from .data.streams import create_stream

    data = load_mnist(cfg.benchmark.data_root, progress=progress)
    kwargs: dict[str, Any] = {}
    if cfg.benchmark.name == "permuted_mnist":
        kwargs["permutation_source"] = cfg.benchmark.permutation_source
    elif cfg.benchmark.name == "rotated_mnist":
        kwargs["angles"] = cfg.benchmark.angles
    return create_stream(cfg.benchmark.name, data, num_tasks=cfg.benchmark.num_tasks, seed=cfg.seed,
                         device=device, **kwargs)


def build_model(cfg: RunConfig, device: torch.device, input_shape=(1, 28, 28)) -> SupermaskModel:
    return SupermaskModel.from_name(
        cfg.model.backbone, num_tasks=cfg.capacity, num_outputs=cfg.model.num_outputs,
        seed=cfg.seed, input_shape=input_shape, weight_init=cfg.model.weight_init,
        mask_kind=cfg.mask.kind, density=cfg.mask.density, device=device)


def _model_identity(cfg: RunConfig, model: SupermaskModel) -> dict[str, Any]:
    return {"backbone": cfg.model.backbone, "weight_init": cfg.model.weight_init, "seed": cfg.seed,
            "num_outputs": cfg.model.num_outputs, "num_tasks": model.num_tasks,
            "mask_kind": cfg.mask.kind, "num_masked_weights": model.num_masked_weights,
            "layer_shapes": [list(layer.weight.shape) for layer in model.masked_layers],
            "frozen_weights_sha256": model.frozen_weights_digest()}


def new_results(cfg: RunConfig) -> dict[str, Any]:
    """An empty results.json (the schema every backend and method fills)."""
    return {"scenario": cfg.scenario, "benchmark": cfg.benchmark.name, "num_tasks": cfg.benchmark.num_tasks,
            "backend": cfg.backend, "method": cfg.method, "backbone": cfg.model.backbone,
            "tasks": [], "mean_acc_given_task": None, "mean_acc_inferred": None, "task_inference_acc": None,
            "num_detected_tasks": None, "train_seconds": 0.0, "eval_seconds": 0.0,
            "bank_bytes": None, "num_masked_weights": None, "supsup_version": __version__}


def task_row(task_id: int) -> dict[str, Any]:
    """One task's entry of ``results["tasks"]``."""
    return {"task_id": task_id, "acc_given_task": None, "acc_inferred": None, "task_inference_acc": None}


# Config keys that may differ between a checkpoint and a resumed run: they change how results
# are computed (where, how many inferences share a pass over the bank), not what is computed.
_RESUME_FREE = {"progress", "device", "inference.group_size"}


def _config_mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in _RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_mismatch(a, b, f"{dotted}.")
        elif a != b:
            out.append(f"{dotted} (checkpoint: {a!r}, now: {b!r})")
    return out


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _checkpoint(out: Path, cfg: RunConfig, model: SupermaskModel, results: dict, loop: dict,
                extra_tensors: dict[str, Any] | None = None) -> None:
    tensors: dict[str, Any] = dict(model.bank_state())
    if extra_tensors:
        tensors.update(extra_tensors)
    meta = {"supsup_version": __version__, "config": config_to_dict(cfg), "model": _model_identity(cfg, model),
            "results": results, "loop": loop}
    save_checkpoint(out, tensors, meta)
    # A small, human-readable view of a long run while it goes: what is done and the
    # accuracy-vs-tasks points so far (benchmarks/reproduce.py plots from it).
    progress = {"tasks_done": loop["next_task"], "num_tasks": cfg.benchmark.num_tasks,
                "num_learned_masks": model.num_learned_tasks, "train_seconds": results["train_seconds"],
                "eval_seconds": results["eval_seconds"], "peak_rss_bytes": peak_rss_bytes(),
                "curve": [{k: v for k, v in p.items() if k != "rows"} for p in results.get("curve", [])]}
    atomic_write_text(out / "progress.json", json.dumps(progress, indent=2) + "\n")


def _restore(out: Path, cfg: RunConfig, model: SupermaskModel) -> tuple[dict, dict, dict]:
    tensors, meta = load_checkpoint(out)
    problems = _config_mismatch(meta.get("config", {}), config_to_dict(cfg))
    if problems:
        raise CheckpointError(f"checkpoint in {out} was made with a different config: " + "; ".join(problems))
    saved_id, now_id = meta.get("model", {}), _model_identity(cfg, model)
    for key in now_id:
        if saved_id.get(key) != now_id[key]:
            raise CheckpointError(f"checkpoint in {out} does not match this model: {key} is {saved_id.get(key)!r} "
                                  f"in the checkpoint, {now_id[key]!r} here")
    bank = {k: v for k, v in tensors.items() if k.startswith("bank.")}
    try:
        # The learned-task count is the bank's row count: a mask still in training (NN) has
        # no row and is re-created by _run_nn. Checkpoints up to 0.1.0 saved a count that
        # included it, which gave it an id one past its row; that saved count is not used.
        model.load_bank_state(bank)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint in {out} has an unusable mask bank: {err}") from None
    return tensors, meta["results"], meta["loop"]


def _finished_results(out: Path, cfg: RunConfig, loop: dict) -> dict[str, Any] | None:
    """results.json of a run whose checkpoint has every task done, or None. A run that ends
    writes it last, after its final evaluation; if it is missing, older than the checkpoint or
    unreadable (the run was stopped during that evaluation), the evaluation is done again."""
    path = out / "results.json"
    if loop["next_task"] < cfg.benchmark.num_tasks or not path.exists():
        return None
    if path.stat().st_mtime < (out / CHECKPOINT_NAME).stat().st_mtime:
        return None  # older than the last checkpoint: left by an earlier run in this directory
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): evaluating the finished run again", path, err)
        return None
    if not isinstance(results, dict) or results.get("num_tasks") != cfg.benchmark.num_tasks:
        log.warning("%s does not describe this run: evaluating the finished run again", path)
        return None
    return results


def run_experiment(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` into ``out_dir`` (see the module docstring); returns results.json's content."""
    if cfg.backend == "avalanche":
        from .integrations.avalanche import run_avalanche_experiment

        return run_avalanche_experiment(cfg, out_dir, resume=resume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    results = new_results(cfg)
    loop: dict[str, Any] = {"next_task": 0, "num_learned": 0}
    tensors: dict[str, Any] = {}
    if resume:
        tensors, results, loop = _restore(out, cfg, model)
        finished = _finished_results(out, cfg, loop)
        if finished is not None:
            log.info("%s already finished: its results.json is returned as it is", out)
            return finished
        log.info("resuming %s after task %d", out, loop["next_task"] - 1)
    stream = build_stream(cfg, device, progress=cfg.progress)  # after the check: a finished run needs no data
    num_classes = stream.num_classes
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    if cfg.scenario in ("GG", "GN"):
        for task_id in range(loop["next_task"], cfg.benchmark.num_tasks):
            t0 = time.perf_counter()
            train_task(model, stream, task_id, cfg.train, progress=cfg.progress)
            results["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            acc, _ = evaluate_given_task(model, stream, task_id, cfg.eval, num_classes=num_classes)
            results["eval_seconds"] += time.perf_counter() - t0
            row = task_row(task_id)
            row["acc_given_task"] = acc
            results["tasks"].append(row)
            if cfg.eval.at_tasks and task_id + 1 in cfg.eval.at_tasks:
                point = _curve_point(cfg, model, stream, task_id + 1)
                results.setdefault("curve", []).append(point)
                results["eval_seconds"] += point["seconds"]
            loop = {"next_task": task_id + 1, "num_learned": model.num_learned_tasks}
            _checkpoint(out, cfg, model, results, loop)
            log.info("task %d: acc_given_task %.4f", task_id, acc)
    else:
        _run_nn(cfg, out, model, stream, results, loop, tensors)

    t0 = time.perf_counter()
    _final_evaluation(cfg, model, stream, results)
    results["eval_seconds"] += time.perf_counter() - t0
    results["bank_bytes"] = model.bank_bytes
    results["num_masked_weights"] = model.num_masked_weights
    results["peak_rss_bytes"] = peak_rss_bytes()
    write_report(out, results)
    return results


def _run_nn(cfg, out, model, stream, results, loop, tensors) -> None:
    state = NNState.from_dict(loop["nn"]) if "nn" in loop else NNState()
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

    def factory():
        return make_optimizer(model.trainable_parameters(), cfg.train)

    for true_task in range(loop["next_task"], cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        optimizer = train_nn_segment(model, factory, optimizer,
                                     stream.train_batches(true_task, cfg.train.iterations, cfg.train.batch_size),
                                     true_task, state, cfg.nn, total=cfg.train.iterations, progress=cfg.progress,
                                     precision=cfg.train.precision)
        results["train_seconds"] += time.perf_counter() - t0
        if cfg.eval.at_tasks and true_task + 1 in cfg.eval.at_tasks:
            # Evaluate the masks detected so far (the one in training included), each mapped
            # to the true task it mostly saw.
            point = _curve_point(cfg, model, stream, true_task + 1, mask_to_task(state.counts))
            point["num_detected_tasks"] = model.num_learned_tasks
            results.setdefault("curve", []).append(point)
            results["eval_seconds"] += point["seconds"]
        loop = {"next_task": true_task + 1, "num_learned": model.num_learned_tasks,
                "active_task": model.active_task, "nn": state.to_dict()}
        extra = {f"scores.{i:03d}": layer.scores.detach().cpu().clone() for i, layer in enumerate(model.masked_layers)}
        extra["optimizer"] = optimizer.state_dict()
        _checkpoint(out, cfg, model, results, loop, extra)
    if model.active_task is not None:
        model.finish_task()
    record_nn_detection(results, model, state, cfg.nn.check_every)


def record_nn_detection(results: dict[str, Any], model: SupermaskModel, state: NNState, check_every: int) -> None:
    """What NN detection did, into ``results``: masks allocated, where, which true tasks each
    trained on; warns when a mask trained ``check_every`` batches or more on each of several
    true tasks (a missed task switch, see :func:`~supsup.training.shared_masks`)."""
    results["num_detected_tasks"] = model.num_learned_tasks
    results["nn_allocations"] = state.allocations
    results["mask_to_task"] = {str(m): t for m, t in sorted(mask_to_task(state.counts).items())}
    results["nn_counts"] = {str(m): {str(t): c for t, c in sorted(d.items())} for m, d in sorted(state.counts.items())}
    shared = shared_masks(state.counts, check_every)
    results["nn_shared_masks"] = {str(m): tasks for m, tasks in shared.items()}
    if shared:
        shown = "; ".join(f"mask {m} trained on true tasks {', '.join(map(str, t))}" for m, t in list(shared.items())[:5])
        log.warning("NN detection missed task switches: %d of %d masks trained on several true tasks (%s%s); "
                    "the earlier of those tasks are partly overwritten. The entropy check needs every learned mask "
                    "to be uncertain on a new task; see nn.threshold", len(shared), model.num_learned_tasks, shown,
                    "; ..." if len(shared) > 5 else "")


def _objectives(cfg: RunConfig) -> list[str]:
    return [cfg.inference.objective] + [o for o in cfg.eval.extra_objectives if o != cfg.inference.objective]


def _evaluate_task(cfg: RunConfig, model: SupermaskModel, stream, task_id: int,
                   m2t: dict[int, int] | None, *, inferred: bool = True,
                   packed: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """One task's row: GG accuracy, and in GN/NN (if ``inferred``) the task-inferred accuracy
    per objective (the first objective fills ``acc_inferred``; others
    ``acc_inferred_<objective>``), over the candidate masks ``packed`` (default: the bank and
    the mask in training)."""
    num_classes = stream.num_classes
    row = task_row(task_id)
    if m2t is not None:  # NN: masks are numbered in detection order
        t2m: dict[int, int] = {}
        for m, t in sorted(m2t.items()):
            t2m.setdefault(t, m)
        mask = t2m.get(task_id)
        if mask is not None:
            row["acc_given_task"], _ = evaluate_given_task(model, stream, task_id, cfg.eval,
                                                           num_classes=num_classes, mask_id=mask)
        per_batch, task_map = None, (lambda m: m2t.get(m, -1))
    else:
        row["acc_given_task"], per_batch = evaluate_given_task(model, stream, task_id, cfg.eval, num_classes=num_classes)
        task_map = None
    if cfg.scenario == "GG" or not inferred:
        return row
    for i, objective in enumerate(_objectives(cfg)):
        inf = dataclasses.replace(cfg.inference, objective=objective)
        extra = model.candidate_extras(include_active=True) if model.active_task is not None else None
        res = evaluate_inferred(model, stream, task_id, cfg.eval, inf, num_classes=num_classes,
                                per_batch_given=per_batch, task_map=task_map, packed=packed, extra=extra)
        suffix = "" if i == 0 else f"_{objective}"
        row[f"acc_inferred{suffix}"] = res["acc_inferred"]
        row[f"task_inference_acc{suffix}"] = res["task_inference_acc"]
    return row


def _summarise(cfg: RunConfig, rows: list[dict[str, Any]], target: dict[str, Any]) -> None:
    target["mean_acc_given_task"] = safe_mean([r["acc_given_task"] for r in rows])
    if cfg.scenario != "GG":
        for i, objective in enumerate(_objectives(cfg)):
            suffix = "" if i == 0 else f"_{objective}"
            target[f"mean_acc_inferred{suffix}"] = safe_mean([r.get(f"acc_inferred{suffix}") for r in rows])
            target[f"task_inference_acc{suffix}"] = safe_mean([r.get(f"task_inference_acc{suffix}") for r in rows])


def _m2t(cfg: RunConfig, results: dict) -> dict[int, int] | None:
    if cfg.scenario != "NN":
        return None
    return {int(m): t for m, t in results.get("mask_to_task", {}).items()}


def sampled_tasks(num_learned: int, sample: int | None) -> list[int]:
    """The tasks an evaluation covers: all ``num_learned``, or ``sample`` of them evenly
    spaced (first and last included, for ``sample`` >= 2) when ``sample`` is smaller."""
    if sample is None or sample >= num_learned:
        return list(range(num_learned))
    if sample == 1:
        return [0]
    return sorted({round(i * (num_learned - 1) / (sample - 1)) for i in range(sample)})


def _curve_point(cfg: RunConfig, model: SupermaskModel, stream, num_learned: int,
                 m2t: dict[int, int] | None = None, *, bank_prefix: bool = False) -> dict[str, Any]:
    """Accuracy over the tasks learned so far (a sample of them if ``eval.sample_tasks``);
    ``rows`` holds each evaluated task's row. With ``bank_prefix`` the candidates are the
    bank's first ``num_learned`` masks: the state after ``num_learned`` tasks, recomputed from
    a later bank (GG/GN masks never change once learned)."""
    t0 = time.perf_counter()
    tasks = sampled_tasks(num_learned, cfg.eval.sample_tasks)
    packed = [layer.bank_rows[:num_learned] for layer in model.masked_layers] if bank_prefix else None
    rows = [_evaluate_task(cfg, model, stream, t, m2t, packed=packed) for t in tasks]
    point: dict[str, Any] = {"num_tasks_learned": num_learned, "tasks_evaluated": tasks}
    _summarise(cfg, rows, point)
    point["seconds"] = time.perf_counter() - t0
    point["rows"] = rows
    log.info("curve point after %d tasks: %s", num_learned, {k: v for k, v in point.items() if k != "rows"})
    return point


_INFERRED_KEYS = ("acc_inferred", "task_inference_acc")


def _final_evaluation(cfg: RunConfig, model: SupermaskModel, stream, results: dict, *,
                      reuse_curve: bool = True) -> None:
    """GG accuracy of every task with the final bank; GN/NN task-inferred accuracy of every
    task, or of ``eval.sample_tasks`` of them. A GG/GN curve point taken after the last task
    already holds those rows (same bank, same tasks, same settings): with ``reuse_curve`` they
    are reused, not recomputed."""
    m2t = _m2t(cfg, results)
    num_tasks = cfg.benchmark.num_tasks
    old = {r["task_id"]: r for r in results["tasks"]}
    inferred_tasks = set(sampled_tasks(num_tasks, cfg.eval.sample_tasks)) if cfg.scenario != "GG" else set()
    reuse: dict[int, dict[str, Any]] = {}
    last = (results.get("curve") or [None])[-1]
    # NN: not reused, since the last point was taken with a mask still in training (a
    # retrained old mask is only banked, and can change, at the end).
    if (reuse_curve and cfg.scenario != "NN" and last is not None and last["num_tasks_learned"] == num_tasks
            and set(last["tasks_evaluated"]) == inferred_tasks):
        reuse = {r["task_id"]: r for r in last.get("rows", [])}
    rows = []
    for task_id in range(num_tasks):
        row = _evaluate_task(cfg, model, stream, task_id, m2t,
                             inferred=task_id in inferred_tasks and task_id not in reuse)
        if task_id in reuse:
            row.update({k: v for k, v in reuse[task_id].items() if k.startswith(_INFERRED_KEYS)})
        if task_id in old and old[task_id].get("acc_given_task") is not None and cfg.scenario != "NN":
            # Accuracy right after learning the task, to show that later tasks changed nothing.
            row["acc_given_task_when_learned"] = old[task_id]["acc_given_task"]
        rows.append(row)
    results["tasks"] = rows
    if cfg.scenario != "GG":
        results["tasks_inferred"] = len(inferred_tasks)
    _summarise(cfg, rows, results)


def format_table(results: dict[str, Any]) -> str:
    """A plain-text summary table of results.json."""
    def f(v):
        return "   -  " if v is None else f"{v:.4f}"

    lines = [f"{results['benchmark']} | scenario {results['scenario']} | {results.get('method', 'supsup')} "
             f"| {results['num_tasks']} tasks",
             "task  acc_given_task  acc_inferred  task_inference_acc"]
    rows = results["tasks"]
    shown = rows if len(rows) <= 40 else rows[:10] + [None] + rows[-10:]  # long runs: the ends
    for r in shown:
        if r is None:
            lines.append(f"  ... ({len(rows) - 20} more tasks in results.json)")
            continue
        lines.append(f"{r['task_id']:>4}  {f(r['acc_given_task']):>14}  {f(r['acc_inferred']):>12}  {f(r['task_inference_acc']):>18}")
    lines.append(f"mean  {f(results['mean_acc_given_task']):>14}  {f(results['mean_acc_inferred']):>12}  {f(results['task_inference_acc']):>18}")
    extra = []
    if results.get("tasks_inferred") is not None and results["tasks_inferred"] < len(rows):
        extra.append(f"task inferred on {results['tasks_inferred']} sampled tasks")
    if results.get("num_detected_tasks") is not None:
        extra.append(f"detected tasks: {results['num_detected_tasks']}")
    if results.get("bank_bytes") is not None:
        extra.append(f"bank: {results['bank_bytes'] / 1e6:.2f} MB for {results['num_masked_weights']:,} masked weights")
    extra.append(f"train {results['train_seconds']:.1f} s, eval {results['eval_seconds']:.1f} s")
    lines.append(" | ".join(extra))
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike) -> None:
    """accuracy.png: accuracy per task (task given, and task inferred when available)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = [r["task_id"] for r in results["tasks"]]
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 0.25 * len(tasks) + 3)), 3.6), dpi=120)
    few = len(tasks) <= 60  # markers only while they stay readable
    given = [r["acc_given_task"] for r in results["tasks"]]
    if any(v is not None for v in given):
        ax.plot(tasks, [float("nan") if v is None else v for v in given], "o-" if few else "-", label="task given (GG)")
    # sampled runs infer the task on some tasks only: plot those as points
    inferred = [(t, r["acc_inferred"]) for t, r in zip(tasks, results["tasks"]) if r["acc_inferred"] is not None]
    if inferred:
        ax.plot(*zip(*inferred), "s--" if few else ".", label="task inferred")
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results['benchmark']} ({results['scenario']}, {results.get('method', 'supsup')})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    plot_accuracy(results, out / "accuracy.png")


def evaluate_saved(out_dir: str | os.PathLike, *, overrides: list[str] = (), scenario: str | None = None,
                   curve: bool = False) -> dict[str, Any]:
    """``supsup eval``: evaluate a saved bank without training (GG, or GN with inference).

    With ``curve`` (GG/GN), the accuracy-vs-tasks points ``eval.at_tasks`` are recomputed
    from the bank: the point after ``n`` tasks evaluates tasks ``0..n-1`` with the first ``n``
    masks as the only candidates, which is exactly the state after ``n`` tasks since a
    learned mask never changes. So a finished run's curve can be measured again with other
    inference settings, without training."""
    out = Path(out_dir)
    _, meta = load_checkpoint(out)
    from .config import apply_overrides

    data = meta["config"]
    if scenario is not None:
        data = dict(data, scenario=scenario)
    data = apply_overrides(data, list(overrides))
    cfg = config_from_dict(data)
    # Evaluation-only keys may change; everything that defines the model must not.
    base = config_from_dict(meta["config"])
    for section in ("model", "mask"):
        if getattr(cfg, section) != getattr(base, section):
            raise CheckpointError(f"{section}.* cannot change when evaluating a saved bank")
    if cfg.seed != base.seed or cfg.benchmark != base.benchmark:
        raise CheckpointError("seed and benchmark.* cannot change when evaluating a saved bank")
    if cfg.scenario == "NN" and base.scenario != "NN":
        raise CheckpointError("scenario NN needs a bank trained in NN")
    device = resolve_device(cfg.device)
    stream = build_stream(cfg, device, progress=cfg.progress)
    model = build_model(cfg, device)
    restored = dataclasses.replace(cfg, scenario=base.scenario, eval=base.eval, inference=base.inference)
    _, results, loop = _restore(out, restored, model)
    if model.active_task is None and model.num_banked_tasks < cfg.benchmark.num_tasks and cfg.scenario != "NN":
        log.warning("the bank holds %d of %d tasks; evaluating those", model.num_banked_tasks, cfg.benchmark.num_tasks)
    results = dict(results)
    results["scenario"] = cfg.scenario
    learned = model.num_banked_tasks
    results["tasks"] = [r for r in results["tasks"] if r["task_id"] < learned]
    if cfg.scenario != "NN":
        at = [n for n in (cfg.eval.at_tasks or []) if n <= learned] or None
        cfg = dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, num_tasks=learned),
                                  eval=dataclasses.replace(cfg.eval, at_tasks=at))
    t0 = time.perf_counter()
    reuse = False  # the saved curve may come from other settings
    if curve:
        if cfg.scenario == "NN":
            raise CheckpointError("--curve needs GG or GN: NN retrains masks, so a later bank does not hold "
                                  "the state after n tasks")
        if not cfg.eval.at_tasks:
            raise ConfigError("eval.at_tasks", "--curve needs the task counts to evaluate, e.g. --set 'eval.at_tasks=[10,50]'")
        results["curve"] = [_curve_point(cfg, model, stream, n, bank_prefix=True) for n in sorted(set(cfg.eval.at_tasks))]
        reuse = True
    _final_evaluation(cfg, model, stream, results, reuse_curve=reuse)
    results["eval_seconds"] = time.perf_counter() - t0
    results["bank_bytes"] = model.bank_bytes
    results["num_masked_weights"] = model.num_masked_weights
    return results
