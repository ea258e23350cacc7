"""``supsup report DIR``: ``DIR/report.md`` and its figures, from a finished run directory.

It reads ``results.json`` (any version: an older file without the accuracy matrix gets one from
its accuracy-vs-tasks points) and, when ``checkpoint.pt`` is there, the mask bank, for the
mask overlap and density figures (Jaccard index and density per layer, over at most
``max_tasks`` evenly spaced tasks). Nothing is trained or evaluated again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..bank import bank_size, mask_key
from ..checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from ..fileio import atomic_write_text
from .evaluate import sampled_tasks
from .figures import plot_confusion, plot_curve, plot_density, plot_matrix, plot_overlap
from .results import AccuracyMatrix, CurvePoint, RunResults
from .runlock import run_lock

__all__ = ["mask_densities", "mask_statistics", "write_run_report"]

log = logging.getLogger(__name__)

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _ones(rows: torch.Tensor) -> torch.Tensor:
    """Set bits per packed row ``(k, nbytes)`` uint8 -> ``(k,)`` int64, a few rows at a time
    (an int64 table lookup over a 2500-task bank would take 16 bytes per packed byte)."""
    return torch.cat([_POPCOUNT[chunk.int()].sum(dim=1, dtype=torch.int64) for chunk in rows.split(64)])


def mask_densities(bank: dict[str, torch.Tensor], shapes: list[list[int]], tasks: list[int]) -> dict[str, np.ndarray]:
    """Per masked layer, each of ``tasks``' mask density (kept fraction), from the packed rows."""
    return {_layer_name(i, shape): (_ones(bank[mask_key(i)][tasks]).double() / int(np.prod(shape))).numpy()
            for i, shape in enumerate(shapes)}


def _layer_name(i: int, shape: list[int]) -> str:
    return f"layer {i} ({'x'.join(map(str, shape))})"


def mask_statistics(bank: dict[str, torch.Tensor], shapes: list[list[int]], tasks: list[int]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per masked layer, over ``tasks``: the Jaccard index ``|M_a & M_b| / |M_a | M_b|`` of every
    pair and each mask's density, counted on the packed rows (padding bits are zero)."""
    jaccard, density = {}, {}
    for i, shape in enumerate(shapes):
        rows = bank[mask_key(i)][tasks]
        name = _layer_name(i, shape)
        ones = _ones(rows)
        density[name] = (ones.double() / int(np.prod(shape))).numpy()
        k = len(tasks)
        j = np.ones((k, k))
        for a in range(k):
            inter = _ones(rows[a: a + 1] & rows[a:])
            union = ones[a] + ones[a:] - inter
            j[a, a:] = j[a:, a] = (inter.double() / union.clamp(min=1).double()).numpy()
        jaccard[name] = j
    return jaccard, density


def _matrix(res: RunResults) -> AccuracyMatrix | None:
    if res.accuracy_matrix is not None:
        return res.accuracy_matrix
    points = list(res.curve)
    if not points or points[-1].num_tasks_learned != res.num_tasks:
        points.append(CurvePoint(res.num_tasks, [r.task_id for r in res.tasks], res.summary, 0.0, res.tasks))
    inferred = any(r.acc_inferred is not None for p in points for r in p.rows)
    return AccuracyMatrix.from_points(points, res.num_tasks, given=True, inferred=inferred)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def write_run_report(run_dir: str | os.PathLike, *, max_tasks: int = 40) -> Path:
    """Write ``run_dir/report.md`` and its PNGs; returns the report's path."""
    out = Path(run_dir)
    _read_results(out)  # a directory that is not a finished run is refused before anything is written
    with run_lock(out, "supsup report"):  # a run still writing there would change what is reported
        return _write_report(out, _read_results(out), max_tasks)


def _read_results(out: Path) -> RunResults:
    try:
        return RunResults.from_dict(json.loads((out / "results.json").read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{out} has no results.json: report needs a finished run") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{out / 'results.json'} is not a supsup results file ({err})") from None


def _write_report(out: Path, res: RunResults, max_tasks: int) -> Path:
    title = f"{res.benchmark}, {res.num_tasks} tasks, {res.scenario}, {res.method} ({res.backbone})"
    lines = [f"# Run report: {title}", "", f"`{out}`, written by supsup {res.supsup_version}.", "",
             "| | task given | task inferred |", "|---|---|---|",
             f"| mean final accuracy | {_fmt(res.summary.mean_acc_given_task)} | {_fmt(res.summary.inferred.acc_inferred)} |",
             f"| task-inference accuracy | | {_fmt(res.summary.inferred.task_inference_acc)} |"]
    matrix = _matrix(res)
    metrics = matrix.metrics() if matrix is not None else {}
    for name, label in (("average_accuracy", "average accuracy (ACC)"), ("bwt", "backward transfer (BWT)"),
                        ("forgetting", "forgetting"), ("fwt", "forward transfer (FWT)")):
        m = metrics.get(name, {})
        lines.append(f"| {label} | {_fmt(m.get('given'))} | {_fmt(m.get('inferred'))} |")
    lines += ["", f"Training {res.train_seconds:.0f} s, evaluation {res.eval_seconds:.0f} s"
              + (f"; bank {res.bank_bytes / 1e6:.2f} MB" if res.bank_bytes else "")
              + (f"; {res.num_detected_tasks} tasks detected (NN)" if res.num_detected_tasks is not None else "") + ".",
              ""]
    if matrix is not None:
        for kind in ("given", "inferred"):
            rows = getattr(matrix, kind)
            if rows:
                fname = f"report_matrix_{kind}.png"
                plot_matrix(rows, matrix.num_tasks_learned, out / fname,
                            title=f"accuracy matrix, task {kind} ({len(rows)} rows)")
                lines += [f"## Accuracy matrix, task {kind}", "",
                          "Row: after learning n tasks; column: a task; blank: not evaluated then.", "",
                          f"![accuracy matrix, task {kind}]({fname})", ""]
    plot_curve([p.to_dict(with_rows=False) for p in res.curve], [r.to_dict() for r in res.tasks],
               out / "report_curve.png", title=title)
    lines += ["## Accuracy against tasks", "", "![accuracy against tasks](report_curve.png)", ""]
    confusion = res.task_confusion or {r.task_id: r.inferred_counts for r in res.tasks if r.inferred_counts}
    if confusion:
        plot_confusion(confusion, res.num_tasks, out / "report_confusion.png", title=f"task inference, {title}")
        wrong = sorted(((c, t, i) for t, row in confusion.items() for i, c in row.items() if i != t), reverse=True)
        lines += ["## Task-inference confusion", "", "![task-inference confusion](report_confusion.png)", ""]
        if wrong:
            lines += ["Most frequent confusions (test batches):", "", "| true task | inferred | batches |",
                      "|---|---|---|"] + [f"| {t} | {i} | {c} |" for c, t, i in wrong[:10]] + [""]
        else:
            lines += ["Every evaluated batch's task was inferred right.", ""]
    lines += _mask_sections(out, title, max_tasks)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _mask_sections(out: Path, title: str, max_tasks: int) -> list[str]:
    if not (out / CHECKPOINT_NAME).exists():
        return ["## Masks", "", f"No {CHECKPOINT_NAME} in this directory (long runs keep their bank out of the "
                "repository): the mask overlap and density figures need the bank.", ""]
    tensors, meta = load_checkpoint(out)
    shapes = meta.get("model", {}).get("layer_shapes")
    k = bank_size(tensors)
    if not shapes or k == 0:
        return ["## Masks", "", "The checkpoint holds no banked mask yet.", ""]
    tasks = sampled_tasks(k, max_tasks)
    jaccard, density = mask_statistics(tensors, shapes, tasks)
    plot_overlap(jaccard, tasks, out / "report_overlap.png", title=f"mask overlap, {len(tasks)} of {k} tasks")
    all_tasks = sampled_tasks(k, 500)
    dens = mask_densities(tensors, shapes, all_tasks) if len(all_tasks) != len(tasks) else density
    plot_density(dens, all_tasks, out / "report_density.png", title=f"mask density per layer, {title}")
    off = {name: j[~np.eye(len(tasks), dtype=bool)] for name, j in jaccard.items()}
    lines = ["## Masks", "", f"Over {len(tasks)} of the {k} banked tasks (evenly spaced).", "",
             "| layer | density (mean) | Jaccard between tasks (mean, min, max) |", "|---|---|---|"]
    for name in jaccard:
        o = off[name]
        lines.append(f"| {name} | {dens[name].mean():.4f} | "
                     + (f"{o.mean():.4f}, {o.min():.4f}, {o.max():.4f}" if o.size else "-") + " |")
    lines += ["", "![mask overlap](report_overlap.png)", "", "![mask density](report_density.png)", ""]
    return lines
