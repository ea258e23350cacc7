"""Reproduce the paper's scale experiments on this machine, resumably, and report them.

    python benchmarks/reproduce.py [NAME ...] [--threads N] [--runs DIR] [--results DIR]
    python benchmarks/reproduce.py --report            # figures and table from what exists

Each experiment is a config in ``configs/`` run with ``supsup.experiment.run_experiment`` into
``RUNS/NAME`` (default ``runs/reproduce``). A checkpoint is written after every task, so a
killed run loses at most one task: running the same command again resumes it. After each
run, and with ``--report``, the results are copied to ``RESULTS/NAME`` (default
``benchmarks/results/reproduce``: results.json or, for a run still going, progress.json, plus
config.yaml) and ``RESULTS/README.md`` and the accuracy-vs-tasks figures are rebuilt from
every run found, finished or not.

Experiments (paper: Wortsman et al. 2020, Fig. 3 and Fig. 5; values read off the figures):

* ``fc1024_250``: PermutedMNIST, 250 tasks, FC 1024, GN one-shot from 1 image, G and H;
* ``fc1024_250_plus``: the same with 3000 steps per task at lr 2e-4 annealed by a cosine, and
  the task inferred by likelihood (every mask scored by its task's banked statistics; beyond
  the paper). The committed run was trained by supsup at commit 3a288b3 (one_shot inference,
  no curve points: ``--set "eval.at_tasks=[]" --set inference.refine=none``; its own final
  evaluation is ``results_paper_one_shot.json``), then given its statistics by ``supsup
  calibrate`` and evaluated with ``supsup eval --curve --set inference.method=likelihood``
  (``results.json``). A first run at lr 1e-4, stopped at 54 tasks, is in ``fc1024_250_plus_lr1e-4``;
* ``lenet_250``: the same with LeNet 300-100 and 100 outputs (as the paper's LeNet-250 runs);
* ``lenet_2500_gn``: 2500 tasks, LeNet 300-100, 500 outputs, GN one-shot G;
* ``lenet_2500_nn``: 2500 tasks, LeNet 300-100, NN (no task labels at all);
* ``rotated_36``: RotatedMNIST, 36 tasks 10 degrees apart, FC 1024, GN binary H, 128 images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402


@dataclass(frozen=True)
class Experiment:
    name: str
    config: str
    title: str


EXPERIMENTS = {e.name: e for e in [
    Experiment("fc1024_250", "configs/reproduce_permuted_fc1024_250.yaml", "PermutedMNIST, 250 tasks, FC 1024, GN"),
    Experiment("fc1024_250_plus", "configs/reproduce_permuted_fc1024_250_plus.yaml",
               "PermutedMNIST, 250 tasks, FC 1024, GN, 3000 steps at lr 2e-4 cosine, likelihood inference (beyond the paper)"),
    Experiment("lenet_250", "configs/reproduce_permuted_lenet_250.yaml",
               "PermutedMNIST, 250 tasks, LeNet 300-100 (100 outputs), GN"),
    Experiment("lenet_2500_gn", "configs/reproduce_permuted_lenet_2500_gn.yaml",
               "PermutedMNIST, 2500 tasks, LeNet 300-100, GN, G"),
    Experiment("lenet_2500_nn", "configs/reproduce_permuted_lenet_2500_nn.yaml",
               "PermutedMNIST, 2500 tasks, LeNet 300-100, NN"),
    Experiment("rotated_36", "configs/rotated_mnist_gn.yaml", "RotatedMNIST, 36 tasks, FC 1024, GN binary H"),
]}

#: the paper's accuracies at the last task count, read off its figures
PAPER = {
    "fc1024_250": {"G": 0.959, "H": 0.957, "upper bound": 0.967},
    "lenet_250": {"G": 0.936, "H": 0.936},
    "lenet_2500": {"GN": 0.935, "NN": (0.925, 0.935)},
}


# ---------------------------------------------------------------------------------- running

def run(name: str, runs: Path, threads: int | None) -> dict:
    from supsup.checkpoint import CHECKPOINT_NAME
    from supsup.config import load_config
    from supsup.experiment import format_table, run_experiment

    set_threads(threads)
    exp = EXPERIMENTS[name]
    cfg = load_config(ROOT / exp.config)
    out = runs / name
    resume = (out / CHECKPOINT_NAME).exists()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {'resuming' if resume else 'starting'} in {out}", flush=True)
    results = run_experiment(cfg, out, resume=resume)
    print(format_table(results), flush=True)
    return results.to_dict()


# -------------------------------------------------------------------------------- reporting

def _load(runs: Path, results: Path, name: str) -> dict | None:
    """results.json (a finished run) or else progress.json for ``name``, from the run
    directory if it exists, else from the copy under ``results``."""
    for base in (runs / name, results / name):
        for fname in ("results.json", "progress.json"):
            path = base / fname
            if path.exists():
                data = json.loads(path.read_text())
                data["_final"] = fname == "results.json"
                return data
    return None


def collect(runs: Path, results: Path) -> dict[str, dict]:
    """Copy each run's small files to ``results`` and return what was found."""
    found = {}
    for name in EXPERIMENTS:
        src = runs / name
        dst = results / name
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            for fname in ("results.json", "progress.json", "config.yaml", "accuracy.png"):
                if (src / fname).exists():
                    shutil.copy2(src / fname, dst / fname)
        data = _load(runs, results, name)
        if data is not None:
            found[name] = data
    return found


def _points(data: dict | None, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for p in (data or {}).get("curve", []):
        if p.get(key) is not None:
            xs.append(p["num_tasks_learned"])
            ys.append(p[key])
    return xs, ys


def _figure(path: Path, title: str, series: list[tuple[str, tuple, str]], paper: list[tuple[str, int, object]],
            xmax: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=130)
    for label, (xs, ys), style in series:
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    for label, x, value in paper:
        if isinstance(value, tuple):
            ax.errorbar([x], [sum(value) / 2], yerr=[[(value[1] - value[0]) / 2]], fmt="k*", markersize=9,
                        capsize=4, label=label)
        else:
            ax.plot([x], [value], "*", markersize=11, markeredgecolor="k", label=label)
    ax.set_xlim(0, xmax * 1.04)
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("accuracy (mean over learned tasks)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def figures(found: dict[str, dict], results: Path) -> list[str]:
    """The paper-style accuracy-vs-tasks figures; returns their file names."""
    made = []
    g_and_h = [  # runs evaluated with G and, on the same masks, H
        ("fc1024_250", "permuted_fc1024_250.png", "PermutedMNIST, FC 1024, GN one-shot, 1 image",
         [("paper, G", 250, PAPER["fc1024_250"]["G"]), ("paper, H", 250, PAPER["fc1024_250"]["H"]),
          ("paper, upper bound", 250, PAPER["fc1024_250"]["upper bound"])]),
        ("lenet_250", "permuted_lenet_250.png", "PermutedMNIST, LeNet 300-100 (100 outputs), GN, 1 image",
         [("paper, G and H", 250, PAPER["lenet_250"]["G"])]),
    ]
    for name, png, title, paper in g_and_h:
        d = found.get(name)
        if d:
            curves = [
                ("SupSup GN, G", _points(d, "mean_acc_inferred"), "o-"),
                ("SupSup GN, H", _points(d, "mean_acc_inferred_entropy"), "s-"),
                ("task given (GG)", _points(d, "mean_acc_given_task"), "k--"),
            ]
            plus = found.get(f"{name}_plus")
            if plus:  # the longer recipe beside the paper's settings
                curves += [("3000 steps, lr 1e-4 cosine: GN, G", _points(plus, "mean_acc_inferred"), "^-"),
                           ("3000 steps, lr 1e-4 cosine: GG", _points(plus, "mean_acc_given_task"), "g--")]
            _figure(results / png, title, curves, paper, d["num_tasks"])
            made.append(png)
    gn, nn = found.get("lenet_2500_gn"), found.get("lenet_2500_nn")
    if gn or nn:
        _figure(results / "permuted_lenet_2500.png", "PermutedMNIST, 2500 tasks, LeNet 300-100", [
            ("SupSup GN, G", _points(gn, "mean_acc_inferred"), "o-"),
            ("SupSup NN", _points(nn, "mean_acc_inferred"), "s-"),
            ("task given (GG)", _points(gn, "mean_acc_given_task"), "k--"),
        ], [("paper, GN", 2500, PAPER["lenet_2500"]["GN"]), ("paper, NN", 2500, PAPER["lenet_2500"]["NN"])], 2500)
        made.append("permuted_lenet_2500.png")
    rot = found.get("rotated_36")
    if rot:
        _figure(results / "rotated_36.png", "RotatedMNIST, 36 tasks, FC 1024, GN binary H, 128 images", [
            ("SupSup GN, H", _points(rot, "mean_acc_inferred"), "o-"),
            ("task given (GG)", _points(rot, "mean_acc_given_task"), "k--"),
        ], [], 36)
        made.append("rotated_36.png")
    return made


def _fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def table(found: dict[str, dict]) -> str:
    lines = ["| experiment | status | tasks | mean acc, task inferred | task inference acc | "
             "mean acc, task given (GG) | train s / task | eval s | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in EXPERIMENTS:
        d = found.get(name)
        if d is None:
            lines.append(f"| {name} | not run | | | | | | | |")
            continue
        last = (d.get("curve") or [{}])[-1]
        src = d if d["_final"] else last
        done = d["num_tasks"] if d["_final"] else d.get("tasks_done", 0)
        inferred = _fmt(src.get("mean_acc_inferred"))
        if src.get("mean_acc_inferred_entropy") is not None:
            inferred += f" (G); {_fmt(src['mean_acc_inferred_entropy'])} (H)"
        status = "finished" if d["_final"] else f"partial: {done} of {d['num_tasks']} tasks trained"
        if not d["_final"] and d.get("num_learned_masks") is not None:
            status += f" ({d['num_learned_masks']} masks)"
        if not d["_final"] and last:
            status += f", last curve point at {last.get('num_tasks_learned')}"
        if d.get("num_detected_tasks") is not None:
            status += f"; {d['num_detected_tasks']} tasks detected"
        per_task = d["train_seconds"] / max(1, done)
        rss = d.get("peak_rss_bytes")
        lines.append(f"| {name} | {status} | {d['num_tasks']} | {inferred} | {_fmt(src.get('task_inference_acc'))} | "
                     f"{_fmt(src.get('mean_acc_given_task'))} | {per_task:.1f} | {d['eval_seconds']:.0f} | "
                     f"{'-' if rss is None else f'{rss / 2**20:.0f} MiB'} |")
    return "\n".join(lines)


def report(runs: Path, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    found = collect(runs, results)
    made = figures(found, results)
    text = [
        "# Scale reproduction (paper Fig. 3 and Fig. 5)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}. Generated by `python benchmarks/reproduce.py --report` "
        f"on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "Commands: `python benchmarks/reproduce.py NAME --threads N` per experiment (resumes from its "
        "checkpoint when run again); configs in `configs/` (see the table of experiments in "
        "`benchmarks/reproduce.py`). Accuracy is the mean over the learned tasks (or over the sampled "
        "tasks the config names) of each task's test accuracy; with the task inferred, a test batch "
        "whose task is inferred wrong counts as all wrong.",
        "",
        table(found),
        "",
        "Curve points (accuracy after n tasks):",
        "",
    ]
    for name, d in found.items():
        curve = d.get("curve", [])
        both = any(p.get("mean_acc_inferred_entropy") is not None for p in curve)
        pts = [f"{p['num_tasks_learned']}: {_fmt(p.get('mean_acc_inferred'))}"
               + (f" / {_fmt(p.get('mean_acc_inferred_entropy'))}" if both else "") for p in curve]
        text.append(f"- {name}{' (G / H)' if both else ''}: " + (", ".join(pts) if pts else "none yet"))
    text += [""] + [f"![{m}]({m})" for m in made]
    (results / "README.md").write_text("\n".join(text) + "\n")
    print(f"wrote {results / 'README.md'} and {', '.join(made) or 'no figures'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"experiments to run ({', '.join(EXPERIMENTS)}); default: none with --report")
    p.add_argument("--threads", type=int, help="torch/numba threads (e.g. 1 to run two experiments side by side)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "reproduce"), help="run directories (checkpoints)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "reproduce"), help="where reports go")
    p.add_argument("--report", action="store_true", help="only rebuild the report from existing runs")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    if not a.names and not a.report:
        p.error("name experiments to run, or pass --report")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    runs, results = Path(a.runs), Path(a.results)
    if len(a.names) == 1:
        run(a.names[0], runs, a.threads)
        report(runs, results)
    else:  # one process per experiment: its own memory, and its own peak RSS in the report
        for name in a.names:
            cmd = [sys.executable, __file__, name, "--runs", str(runs), "--results", str(results)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if subprocess.run(cmd).returncode != 0:
                return 1
    if a.report:
        report(runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
