"""What a finished run shows: the summary table on the terminal, ``results.json`` and
``accuracy.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fileio import atomic_write, atomic_write_text
from .results import RunResults

__all__ = ["format_table", "plot_accuracy", "write_report"]


def format_table(results: RunResults) -> str:
    """A plain-text summary table."""
    def f(v):
        return "   -  " if v is None else f"{v:.4f}"

    lines = [f"{results.benchmark} | scenario {results.scenario} | {results.method} | {results.num_tasks} tasks",
             "task  acc_given_task  acc_inferred  task_inference_acc"]
    rows = results.tasks
    shown = rows if len(rows) <= 40 else rows[:10] + [None] + rows[-10:]  # long runs: the ends
    for r in shown:
        if r is None:
            lines.append(f"  ... ({len(rows) - 20} more tasks in results.json)")
            continue
        lines.append(f"{r.task_id:>4}  {f(r.acc_given_task):>14}  {f(r.acc_inferred):>12}  {f(r.task_inference_acc):>18}")
    s = results.summary
    lines.append(f"mean  {f(s.mean_acc_given_task):>14}  {f(s.inferred.acc_inferred):>12}  "
                 f"{f(s.inferred.task_inference_acc):>18}")
    extra = []
    if results.tasks_inferred is not None and results.tasks_inferred < len(rows):
        extra.append(f"task inferred on {results.tasks_inferred} sampled tasks")
    if results.num_detected_tasks is not None:
        extra.append(f"detected tasks: {results.num_detected_tasks}")
    if results.bank_bytes is not None:
        if results.method == "hopsupsup":  # no bank: Hopfield stores, masks on neurons
            extra.append(f"Hopfield stores: {results.bank_bytes / 1e6:.2f} MB for {results.num_masked_weights:,} "
                         "masked neurons")
        else:
            extra.append(f"bank: {results.bank_bytes / 1e6:.2f} MB for {results.num_masked_weights:,} masked weights")
    extra.append(f"train {results.train_seconds:.1f} s, eval {results.eval_seconds:.1f} s")
    lines.append(" | ".join(extra))
    return "\n".join(lines)


def plot_accuracy(results: RunResults, path: str | os.PathLike) -> None:
    """accuracy.png: accuracy per task (task given, and task inferred when available)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = [r.task_id for r in results.tasks]
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 0.25 * len(tasks) + 3)), 3.6), dpi=120)
    few = len(tasks) <= 60  # markers only while they stay readable
    given = [r.acc_given_task for r in results.tasks]
    if any(v is not None for v in given):
        ax.plot(tasks, [float("nan") if v is None else v for v in given], "o-" if few else "-", label="task given (GG)")
    # sampled runs infer the task on some tasks only: plot those as points
    inferred = [(r.task_id, r.acc_inferred) for r in results.tasks if r.acc_inferred is not None]
    if inferred:
        ax.plot(*zip(*inferred), "s--" if few else ".", label="task inferred")
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results.benchmark} ({results.scenario}, {results.method})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_report(out: Path, results: RunResults) -> None:
    """``results.json`` and ``accuracy.png`` in ``out``; with the task inferred (GN/NN) also the
    task-inference confusion matrix, ``confusion.png``."""
    atomic_write_text(out / "results.json", json.dumps(results.to_dict(), indent=2) + "\n")
    plot_accuracy(results, out / "accuracy.png")
    if results.task_confusion:
        from .figures import plot_confusion

        plot_confusion(results.task_confusion, results.num_tasks, out / "confusion.png",
                       title=f"task inference: {results.benchmark}, {results.num_tasks} tasks, {results.scenario}")
