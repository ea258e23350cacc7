"""A whole run, not a projection: training seconds per task and GN evaluation seconds of a
10-task FC 1024 PermutedMNIST run, and how much of the training time is not the train step.

    python benchmarks/whole_run.py [--threads 2] [--tasks 10] [--precision fp32] [--runs DIR]

Runs ``configs/permuted_mnist_gn.yaml`` (FC 1024, 500 outputs, 1000 steps of 128 per task, GN
one-shot G from one image per test batch) with ``--tasks`` tasks from scratch, then evaluates
the saved bank once more (GN over all 10,000 test images of every task) and times that alone.
In the same process, before and after the run, ``train_speed.measure`` times the bare masked
step on synthetic batches; the difference between a task's wall time and 1000 bare steps is
what the run adds around the step (data batches, logging, progress, checkpoint). The run also
times its own steps (``train_step_seconds`` in results.json): ``outside_steps_fraction`` is what
the run adds as measured inside the same run, free of the drift between separate timings; with
``inference.method: likelihood`` (the config's) it includes the fit of each task's statistics,
``--method one_shot`` leaves that out. Writes ``benchmarks/results/whole_run_<precision>_<threads>t[_<method>].json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--runs", default="runs/whole_run")
    p.add_argument("--method", default=None, help="inference.method (default: the config's)")
    a = p.parse_args()

    import torch
    import train_speed

    from supsup.config import load_config
    from supsup.experiment import evaluate_saved, run_experiment

    set_threads(a.threads)
    key = "masked_step_ms" if a.precision == "fp32" else "masked_bf16_step_ms"
    first = train_speed.measure(steps=30, repeats=3)
    before, before_mean = first[key], first[key.replace("_ms", "_mean_ms")]
    suffix = "" if a.method is None else f"_{a.method}"
    out = Path(a.runs) / f"{a.precision}_{a.threads}t{suffix}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "permuted_mnist_gn.yaml",
                      [f"benchmark.num_tasks={a.tasks}", f"train.precision={a.precision}", "progress=true",
                       *([] if a.method is None else [f"inference.method={a.method}"])])
    t0 = time.perf_counter()
    res = run_experiment(cfg, out).to_dict()
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = evaluate_saved(out, overrides=["progress=false"]).to_dict()
    eval_wall = time.perf_counter() - t0
    last = train_speed.measure(steps=30, repeats=3)
    after, after_mean = last[key], last[key.replace("_ms", "_mean_ms")]
    step_ms = min(before, after)
    mean_ms = (before_mean + after_mean) / 2
    per_task = res["train_seconds"] / a.tasks
    report = {
        "threads": a.threads, "precision": a.precision, "tasks": a.tasks, "iterations": cfg.train.iterations,
        "train_seconds_per_task": per_task, "run_wall_seconds": wall,
        "gn_eval_seconds": again["eval_seconds"], "gn_eval_wall_seconds": eval_wall,
        "mean_acc_given_task": res["mean_acc_given_task"], "mean_acc_inferred": again["mean_acc_inferred"],
        "task_inference_acc": again["task_inference_acc"],
        "bare_step_ms_before": before, "bare_step_ms_after": after,
        "bare_step_mean_ms": mean_ms,
        # what the run adds around the step: against the best repeat, and against the mean one
        "overhead_fraction": max(0.0, 1.0 - cfg.train.iterations * step_ms / 1e3 / per_task),
        "overhead_fraction_vs_mean_step": max(0.0, 1.0 - cfg.train.iterations * mean_ms / 1e3 / per_task),
        "inference_method": cfg.inference.method,
        "step_seconds_per_task": res["train_step_seconds"] / a.tasks,
        "outside_steps_fraction": 1.0 - res["train_step_seconds"] / res["train_seconds"],
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    path = RESULTS / f"whole_run_{a.precision}_{a.threads}t{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
