"""Figures of a run for ``supsup report``: the accuracy matrix, accuracy against tasks, the
task-inference confusion matrix, mask overlap and mask density (from the bank).

Every function takes plain data and a path, writes one PNG (atomically) and stays readable at
2500 tasks: long axes are aggregated into blocks or sampled, as each docstring says.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from ..fileio import atomic_write

__all__ = ["plot_confusion", "plot_curve", "plot_density", "plot_matrix", "plot_overlap"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, path: str | os.PathLike) -> None:
    plt = _plt()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _blocks(matrix: np.ndarray, max_side: int, reduce, *, rows_too: bool = True) -> tuple[np.ndarray, int]:
    """``matrix`` aggregated into blocks of ``b`` columns (and ``b`` rows, with ``rows_too``) so
    that no aggregated side exceeds ``max_side`` (``reduce`` over each block, ignoring NaN);
    returns it and ``b``."""
    b = max(1, math.ceil((max(matrix.shape) if rows_too else matrix.shape[1]) / max_side))
    if b == 1:
        return matrix, 1
    br = b if rows_too else 1
    rows, cols = math.ceil(matrix.shape[0] / br), math.ceil(matrix.shape[1] / b)
    padded = np.full((rows * br, cols * b), np.nan)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        out = reduce(padded.reshape(rows, br, cols, b), axis=(1, 3))
    return out, b


def plot_matrix(rows: Sequence[Sequence[float | None]], learned: Sequence[int], path, *, title: str) -> None:
    """Heatmap of ``R[r][j]`` (rows: after n tasks; columns: task j; blank: not evaluated)."""
    plt = _plt()
    m = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    cols = m.shape[1]
    shown, b = _blocks(m, 200, np.nanmean, rows_too=False) if cols > 200 else (m, 1)
    fig, ax = plt.subplots(figsize=(min(10, 3 + 0.35 * shown.shape[1]), min(8, 2.2 + 0.3 * shown.shape[0])), dpi=120)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=np.nanmin(m) if np.isfinite(m).any() else 0, vmax=1,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_xlabel("task" + (f" (blocks of {b})" if b > 1 else ""))
    ax.set_ylabel("after learning n tasks")
    step = max(1, len(learned) // 12)
    ax.set_yticks(list(range(0, len(learned), step)))
    ax.set_yticklabels([str(n) for n in learned][::step])
    if len(rows) <= 12 and cols <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    _save(fig, path)


def plot_curve(points: Sequence[dict], tasks: Sequence[dict], path, *, title: str) -> None:
    """Mean accuracy after n tasks (given and inferred) and every task's final accuracy."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=120)
    for key, label in (("mean_acc_given_task", "task given"), ("mean_acc_inferred", "task inferred")):
        xy = [(p["num_tasks_learned"], p[key]) for p in points if p.get(key) is not None]
        if xy:
            a1.plot(*zip(*xy), "o-" if len(xy) <= 40 else "-", label=label)
    a1.set_xlabel("tasks learned")
    a1.xaxis.set_major_locator(_integer_ticks())
    a1.set_ylabel("mean accuracy over learned tasks")
    a1.grid(alpha=0.3)
    if a1.lines:
        a1.legend()
    for key, label in (("acc_given_task", "task given"), ("acc_inferred", "task inferred")):
        xy = [(t["task_id"], t[key]) for t in tasks if t.get(key) is not None]
        if xy:
            a2.plot(*zip(*xy), "." if len(xy) > 60 else "o", ms=3 if len(xy) > 60 else 5, label=label)
    a2.set_xlabel("task")
    a2.xaxis.set_major_locator(_integer_ticks())
    a2.set_ylabel("final test accuracy")
    a2.grid(alpha=0.3)
    if a2.lines:
        a2.legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_confusion(confusion: dict[int, dict[int, int]], num_tasks: int, path, *, title: str) -> None:
    """True task x inferred task, as the fraction of each true task's test batches (log
    colour scale, so rare confusions show). More than 100 tasks: blocks of tasks, summed."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    m = np.zeros((num_tasks, num_tasks))
    for t, row in confusion.items():
        total = sum(row.values())
        for i, c in row.items():
            if 0 <= i < num_tasks and 0 <= t < num_tasks:
                m[t, i] = c / total
    evaluated = np.array([t in confusion for t in range(num_tasks)])
    shown, b = _blocks(np.where(evaluated[:, None], m, np.nan), 100, np.nansum) if num_tasks > 100 else (m, 1)
    if b > 1:  # a block's row sum is over its evaluated tasks: back to a fraction
        counts, _ = _blocks(np.repeat(evaluated[:, None].astype(float), num_tasks, axis=1), 100, np.nansum)
        shown = shown / np.maximum(counts, 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
    positive = shown[shown > 0]
    vmin = min(1e-2, max(1e-4, float(positive.min()))) if positive.size else 1e-2
    im = ax.imshow(np.where(shown > 0, shown, np.nan), cmap="magma_r", interpolation="nearest",
                   norm=LogNorm(vmin=vmin, vmax=1))
    fig.colorbar(im, ax=ax, label="fraction of the true task's batches")
    unit = f" (blocks of {b} tasks)" if b > 1 else ""
    ax.set_xlabel("inferred task" + unit)
    ax.set_ylabel("true task" + unit)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_overlap(jaccard: dict[str, np.ndarray], tasks: Sequence[int], path, *, title: str) -> None:
    """Jaccard index of every pair of (sampled) tasks' masks, one panel per layer."""
    plt = _plt()
    names = list(jaccard)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1, 3.0 * rows + 0.6), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        im = ax.imshow(jaccard[name], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=8)
        step = max(1, len(tasks) // 6)
        ax.set_xticks(range(0, len(tasks), step))
        ax.set_xticklabels([str(t) for t in tasks][::step], fontsize=6)
        ax.set_yticks(range(0, len(tasks), step))
        ax.set_yticklabels([str(t) for t in tasks][::step], fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Jaccard index of the masks")
    fig.suptitle(title)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def plot_density(density: dict[str, np.ndarray], tasks: Sequence[int], path, *, title: str) -> None:
    """Fraction of weights each (sampled) task's mask keeps, per layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    for name, values in density.items():
        ax.plot(tasks, values, ".-" if len(tasks) <= 60 else "-", ms=3, label=name)
    ax.set_xlabel("task")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("mask density (fraction kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(density) > 8 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    _save(fig, path)
