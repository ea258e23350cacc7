"""How many images does task inference need? Task-inference accuracy against the number of
test images it sees, for permutations and rotations, one-shot and binary, H and G.

    python benchmarks/inference_images.py [--runs DIR] [--threads N] [--tasks 10] [--quick]

Trains (resumably, in ``DIR/<stream>``) FC 1024 with 500 outputs on 10 PermutedMNIST tasks and
on 10 RotatedMNIST tasks 36 degrees apart (1000 steps of 128 per task, the paper's
optimisation), then infers the task of test batches from their first n images, n = 1, 2, 4,
..., 128, with each method and objective over the whole bank (and with ``refine: exact``).
Every test batch of every task counts (79 per task). Writes
``benchmarks/results/inference_images.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128)
SETTINGS = [("one_shot", "g", "none"), ("one_shot", "entropy", "none"), ("binary", "g", "none"),
            ("binary", "entropy", "none"), ("one_shot", "entropy", "exact")]


def _train(stream: str, runs: Path, tasks: int, quick: bool) -> Path:
    from supsup.checkpoint import CHECKPOINT_NAME
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    sets = ["scenario=GG", f"benchmark.name={stream}", f"benchmark.num_tasks={tasks}", "model.backbone=fc1024",
            "model.num_outputs=500", "progress=false", "eval.at_tasks=null"]
    if stream == "rotated_mnist":
        sets.append(f"benchmark.angles={[round(360.0 * t / tasks, 3) for t in range(tasks)]}")
    if quick:
        sets += ["train.iterations=100", "train.lr=1e-3", "eval.max_batches=2"]
    out = runs / stream
    cfg = load_config(ROOT / "configs" / "permuted_mnist_gg.yaml", sets)
    run_experiment(cfg, out, resume=(out / CHECKPOINT_NAME).exists())
    return out


def measure(run: Path, quick: bool) -> dict:
    import torch

    from supsup.config import load_config
    from supsup.experiment import build_model, build_stream
    from supsup.experiment.runstate import restore_checkpoint
    from supsup.inference import infer_tasks

    cfg = load_config(run / "config.yaml")
    model = build_model(cfg, torch.device("cpu"))
    restore_checkpoint(run, cfg, model)
    stream = build_stream(cfg, torch.device("cpu"), progress=False)
    batches = {t: [x for x, _ in stream.test_batches(t, 128, 2 if quick else None)] for t in range(cfg.benchmark.num_tasks)}
    out: dict = {}
    for method, objective, refine in SETTINGS:
        key = f"{method}_{objective}" + ("_exact" if refine == "exact" else "")
        out[key] = {}
        for n in IMAGES:
            hits = total = 0
            t0 = time.perf_counter()
            for t, xs in batches.items():
                full = [x for x in xs if x.shape[0] >= n]
                tasks, _ = infer_tasks(model, torch.stack([x[:n] for x in full]), method=method, objective=objective,
                                       refine=refine, refine_candidates=5)
                hits += int((tasks == t).sum())
                total += len(full)
            out[key][n] = hits / total
            print(f"{run.name:14s} {key:22s} n={n:3d}: {hits / total:.4f} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(5.2 * len(report), 3.8), dpi=120, squeeze=False)
    for ax, (stream, curves) in zip(axes[0], report.items()):
        for key, acc in curves.items():
            ax.plot([int(n) for n in acc], list(acc.values()), "o-", ms=3, label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test images the task is inferred from")
        ax.set_ylabel("task-inference accuracy")
        ax.set_title(stream)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/inference_images")
    p.add_argument("--threads", type=int)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a smoke run: 100 steps per task, 2 test batches")
    a = p.parse_args()
    set_threads(a.threads)
    runs = Path(a.runs)
    report = {s: measure(_train(s, runs, a.tasks, a.quick), a.quick) for s in ("permuted_mnist", "rotated_mnist")}
    if a.quick:
        return 0
    (RESULTS / "inference_images.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "inference_images.png")
    lines = ["# Task inference against the number of test images", "",
             f"FC 1024 with 500 outputs, {a.tasks} tasks (PermutedMNIST; RotatedMNIST {360 // a.tasks} degrees apart), "
             "1000 steps of 128 per task; the task of every test batch (79 per task) inferred from its first n "
             "images over the whole bank. `python benchmarks/inference_images.py`.", ""]
    for stream, curves in report.items():
        lines += [f"## {stream}", "", "| method, objective | " + " | ".join(f"n={n}" for n in IMAGES) + " |",
                  "|---|" + "---|" * len(IMAGES)]
        lines += [f"| {key} | " + " | ".join(f"{acc[n]:.4f}" for n in IMAGES) + " |" for key, acc in curves.items()]
        lines.append("")
    lines += ["![task inference against images](inference_images.png)", ""]
    (RESULTS / "inference_images.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
