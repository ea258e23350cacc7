"""SupSup (GG, GN, NN) against Avalanche's baselines on PermutedMNIST and RotatedMNIST, all
through the Avalanche backend: same streams, same backbone shape, same optimizer steps per task.

    python benchmarks/compare.py [--tasks 10] [--iterations 1000] [--methods all]
        [--benchmarks permuted_mnist,rotated_mnist] [--backbone fc1024] [--out benchmarks/results] [--resume]

Writes ``OUT/compare.md`` (one table, the exact command, the settings, the data-path timing)
and ``OUT/compare.png``; every run's own output (results.json, config.yaml, accuracy.png,
avalanche_log.txt) goes to ``OUT/runs/<benchmark>/<method>``.

Methods: ``supsup_gg``, ``supsup_gn``, ``supsup_nn`` and the baselines ``naive``, ``ewc``,
``si``, ``lwf``, ``replay``, ``gem`` (one head, no task id at test) and ``packnet`` (task id at
test). SupSup runs the benchmark's paper config (``configs/<benchmark>_gn.yaml``) with the
scenario changed; every run uses ``--backbone`` and ``--iterations``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from supsup.config import load_config
from supsup.experiment import run_experiment

SUPSUP = {"supsup_gg": "GG", "supsup_gn": "GN", "supsup_nn": "NN"}
BASELINES = ("naive", "ewc", "si", "lwf", "replay", "gem", "packnet")
#: SupSup's Hopfield variant: its own recipe (``configs/split_mnist_hopsupsup.yaml``: network,
#: 1 epoch per task, SGD), the same stream and test sets; ``--iterations``/``--backbone`` do not apply
HOPSUPSUP = "hopsupsup"
ALL_METHODS = (*SUPSUP, HOPSUPSUP, *BASELINES)
BENCHMARKS = {"permuted_mnist": "PermutedMNIST", "rotated_mnist": "RotatedMNIST",
              "split_mnist_gnu": "SplitMNIST (class-incremental)"}
#: the config each benchmark starts from (``configs/<benchmark>_gn.yaml`` unless named here)
CONFIGS = {"split_mnist_gnu": "split_mnist_gnu.yaml"}
ROOT = Path(__file__).resolve().parent.parent


def run_overrides(benchmark: str, method: str, args) -> tuple[str, list[str]]:
    """(scenario, ``--set`` overrides) of one run."""
    if method == HOPSUPSUP:
        if benchmark != "split_mnist_gnu":
            raise SystemExit(f"hopsupsup runs on split_mnist_gnu (its paper setting), not {benchmark}")
        sets = ["backend=avalanche", f"benchmark.num_tasks={args.tasks}", f"seed={args.seed}", "progress=false",
                "eval.at_tasks=null"]
        if args.eval_max_batches is not None:
            sets.append(f"eval.max_batches={args.eval_max_batches}")
        return "GN", sets
    if method in SUPSUP:
        scenario, name = SUPSUP[method], "supsup"
    else:
        scenario, name = ("GG" if method == "packnet" else "GN"), method
    sets = [f"scenario={scenario}", f"method={name}", "backend=avalanche", f"benchmark.num_tasks={args.tasks}",
            f"train.iterations={args.iterations}", f"model.backbone={args.backbone}", f"seed={args.seed}",
            "progress=false", "eval.at_tasks=null"]
    if benchmark == "permuted_mnist":
        sets.append("benchmark.permutation_source=avalanche")
    if args.eval_max_batches is not None:
        sets.append(f"eval.max_batches={args.eval_max_batches}")
    return scenario, sets


def finished_run(run_dir: Path, cfg) -> dict | None:
    """results.json of a finished run in ``run_dir`` made with exactly ``cfg``, else None. A
    baseline never reads SupSup's ``inference.*`` keys: those may differ."""
    try:
        saved = load_config(run_dir / "config.yaml")
        if cfg.method != "supsup":
            saved = dataclasses.replace(saved, inference=cfg.inference)
        if saved != cfg:
            return None
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):  # missing, unreadable, or an old config that no longer validates
        return None


def run_all(args, out: Path) -> list[dict]:
    rows = []
    for benchmark in args.benchmarks:
        for method in args.methods:
            scenario, sets = run_overrides(benchmark, method, args)
            name = "split_mnist_hopsupsup.yaml" if method == HOPSUPSUP else CONFIGS.get(benchmark, f"{benchmark}_gn.yaml")
            cfg = load_config(ROOT / "configs" / name, sets)
            run_dir = out / "runs" / benchmark / f"{method}"
            res = finished_run(run_dir, cfg) if args.resume else None
            if res is not None:
                seconds = sum(res.get(k) or 0.0 for k in ("train_seconds", "eval_seconds", "data_cache_seconds"))
            else:
                t0 = time.perf_counter()
                res = run_experiment(cfg, run_dir).to_dict()
                seconds = time.perf_counter() - t0
            uses_task_id = scenario == "GG" if method in (*SUPSUP, HOPSUPSUP) else res["accuracy_uses_task_id"]
            acc = res["mean_acc_given_task"] if scenario == "GG" else res["mean_acc_inferred"]
            kind = "given" if uses_task_id else "inferred"
            metrics = {k: (res.get(k) or {}).get(kind) for k in ("average_accuracy", "bwt", "forgetting", "fwt")}
            rows.append({"benchmark": benchmark, "method": method, "scenario": scenario, "task_id_at_test": uses_task_id,
                         "acc": acc, "acc_given_task": res["mean_acc_given_task"], **metrics,
                         "task_inference_acc": res.get("task_inference_acc"), "seconds": seconds,
                         "acc_per_image": res.get("mean_acc_inferred_per_image"),
                         "hparams": res.get("baseline_hparams", {}).get(method),
                         "bank_bytes": res.get("bank_bytes"), "num_tasks": res["num_tasks"],
                         "eval_seconds": res.get("eval_seconds"),
                         "hopsupsup": {k: v for k, v in (res.get("hopsupsup") or {}).items() if k != "tasks"} or None})
            print(f"{benchmark:15s} {method:10s} {scenario}  acc {acc:.4f}  ({seconds:.0f} s)", flush=True)
    return rows


def set_rows(args, path: Path = ROOT / "benchmarks" / "results" / "set_baseline.json") -> list[dict]:
    """SET at SupSup's bytes per task (``benchmarks/set_baseline.py``: one sparse FC 1024 per
    PermutedMNIST task, task given), when its results are there for the same stream (tasks,
    seed), steps and backbone: SET's networks are FC 1024, so another backbone gets no row."""
    if "permuted_mnist" not in args.benchmarks or args.backbone != "fc1024" or not path.exists():
        return []
    r = json.loads(path.read_text())
    if (r.get("tasks"), r.get("iterations"), r.get("seed")) != (args.tasks, args.iterations, args.seed):
        return []
    if "set" not in args.methods:
        args.methods = [*args.methods, "set"]
    return [{"benchmark": "permuted_mnist", "method": "set", "scenario": "GG", "task_id_at_test": True,
             "acc": r["mean_test_accuracy"], "acc_given_task": r["mean_test_accuracy"], "task_inference_acc": None,
             "seconds": r["total_seconds"], "hparams": {"bytes_per_task": r["bytes_per_task"], "zeta": r["zeta"]},
             "average_accuracy": r["mean_test_accuracy"], "bwt": 0.0, "forgetting": 0.0, "fwt": None}]


def measure_data_path(args) -> dict:
    """Seconds to feed one PermutedMNIST experience to a strategy: Avalanche's own training
    loader (per-sample transforms, every epoch) vs the cache (transform once, then batch
    from tensors), for one epoch and for the run's step budget."""
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader

    from supsup.data.mnist import ensure_mnist
    from supsup.integrations.avalanche import CachedBatches, ExperienceCache, in_dataset_order
    from supsup.rng import make_generator

    exp = in_dataset_order(PermutedMNIST(1, seed=0, dataset_root=ensure_mnist(progress=False))).train_stream[0]
    n, bs = len(exp.dataset), 128
    t0 = time.perf_counter()
    for _ in TaskBalancedDataLoader(exp.dataset.train(), batch_size=bs, shuffle=True):
        pass
    avalanche_epoch = time.perf_counter() - t0
    cache = ExperienceCache()
    t0 = time.perf_counter()
    source = cache.get(exp.dataset, "train")
    source.fill(torch.arange(n))
    cache_fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in CachedBatches.training(source, batch_size=bs, num_batches=n // bs, generator=make_generator(0, "t", 0)):
        pass
    cached_epoch = time.perf_counter() - t0
    epochs = args.iterations * bs / n
    return {"samples": n, "batch_size": bs, "avalanche_epoch_s": avalanche_epoch, "cache_fill_s": cache_fill,
            "cached_epoch_s": cached_epoch, "budget_epochs": epochs,
            "budget_avalanche_s": epochs * avalanche_epoch,
            "budget_cached_s": min(1.0, epochs) * cache_fill + epochs * cached_epoch}


def write_markdown(path: Path, rows: list[dict], args, command: str, timing: dict | None, wall: float) -> None:
    benches = list(args.benchmarks)
    lines = [
        "# SupSup vs Avalanche baselines",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {wall / 60:.1f} min of runs in all. Settings: {args.tasks} tasks, {args.iterations} optimizer "
        f"steps of 128 per task, backbone `{args.backbone}`, seed {args.seed}"
        + (f", first {args.eval_max_batches} test batches per task" if args.eval_max_batches else ", full test sets") + "."
        + (" With `--resume`, runs already finished in `runs/` with the same config were reused, each counted with "
           "the time it took." if args.resume else ""),
        "",
        "Mean final test accuracy over the tasks. *Task id at test*: the accuracy uses the task id "
        "(SupSup GG, PackNet); otherwise it does not (SupSup GN/NN infer it from the inputs, the other "
        "baselines share one head). SupSup GN/NN also show their task-inference accuracy; HopSupSup, whether the "
        "mask it recovered is nearest to the task's own (its own recipe: 784-2048-2048 network, neuron masks, "
        "1 epoch per task; `configs/split_mnist_hopsupsup.yaml`).",
        "",
        "| method | scenario | task id at test | " + " | ".join(BENCHMARKS[b] for b in benches) + " |",
        "|---|---|---|" + "---|" * len(benches),
    ]
    for method in args.methods:
        mine = {r["benchmark"]: r for r in rows if r["method"] == method}
        if not mine:
            continue
        any_row = next(iter(mine.values()))
        cells = []
        for b in benches:
            r = mine.get(b)
            if r is None or r["acc"] is None:
                cells.append("-")
                continue
            cell = f"{r['acc']:.4f}"
            if r["task_inference_acc"] is not None:
                cell += f" (task inf. {r['task_inference_acc']:.3f})"
            if r.get("acc_per_image") is not None:
                cell += f"; per image {r['acc_per_image']:.4f}"
            if method == HOPSUPSUP:
                cell += "; mask recovered per task from its test set, batches of 64 (no per-image answer)"
            cells.append(cell)
        lines.append(f"| {method} | {any_row['scenario']} | {'yes' if any_row['task_id_at_test'] else 'no'} | "
                     + " | ".join(cells) + " |")
    def f(v):
        return "-" if v is None else f"{v:+.4f}"

    lines += ["", "Forgetting, from the accuracy matrix (a row after every task): backward transfer BWT "
              "(final minus just-learned accuracy, averaged over the earlier tasks; negative is forgetting), "
              "average forgetting F (best earlier accuracy minus final) and, for methods that answer tasks "
              "they have not learned yet, forward transfer FWT (accuracy just before learning a task minus "
              "before any training). Definitions: `supsup/metrics.py`.", "",
              "| method | " + " | ".join(f"{BENCHMARKS[b]} BWT | F | FWT" for b in benches) + " |",
              "|---|" + "---|---|---|" * len(benches)]
    for method in args.methods:
        mine = {r["benchmark"]: r for r in rows if r["method"] == method}
        if mine:
            lines.append(f"| {method} | " + " | ".join(
                " | ".join(f(mine[b].get(k)) if b in mine else "-" for k in ("bwt", "forgetting", "fwt"))
                for b in benches) + " |")
    lines += memory_section(rows, args)
    hp = {r["method"]: r["hparams"] for r in rows if r["hparams"] is not None}
    if hp:
        lines += ["", "Baseline hyperparameters (Adam, lr 1e-4, for all):", ""]
        lines += [f"- {m}: `{json.dumps(v)}`" for m, v in hp.items()]
    if timing:
        lines += [
            "", "## Data path (one PermutedMNIST training experience)", "",
            "| | seconds |", "|---|---|",
            f"| Avalanche's loader, one epoch of {timing['samples']} samples (per-sample transforms) | {timing['avalanche_epoch_s']:.2f} |",
            f"| cache: transform every sample once | {timing['cache_fill_s']:.2f} |",
            f"| cached loader, one epoch | {timing['cached_epoch_s']:.3f} |",
            f"| Avalanche's loader, this run's budget ({timing['budget_epochs']:.2f} epochs) | {timing['budget_avalanche_s']:.2f} |",
            f"| cache, this run's budget | {timing['budget_cached_s']:.2f} |",
            "",
            f"Speed-up per epoch once cached: {timing['avalanche_epoch_s'] / timing['cached_epoch_s']:.0f}x; "
            f"over this run's budget: {timing['budget_avalanche_s'] / timing['budget_cached_s']:.1f}x "
            "(evaluation passes after the first read cached test sets too).",
        ]
    lines += ["", "![accuracy](compare.png)", ""]
    path.write_text("\n".join(lines))


def memory_section(rows: list[dict], args) -> list[str]:
    """What SupSup GN and HopSupSup keep to find a task's mask again, and what that costs at test."""
    mine = [r for r in rows if r["method"] in ("supsup_gn", HOPSUPSUP) and r.get("bank_bytes")]
    if not mine:
        return []
    lines = ["", "## Memory and test-time cost (SupSup GN and HopSupSup)", "",
             "HopSupSup keeps no mask: one Hopfield matrix per masked layer, whose size does not grow with the "
             "tasks, and recovers a task's neuron masks from the task's unlabelled test set (one pass, batches of "
             "64: the masks act through batch statistics, so it classifies batches, not single images). SupSup "
             "keeps every task's weight mask at 1 bit per weight and infers the task from each batch (or image).",
             "", "| method | benchmark | kept | bytes in all | bytes per task | test-time cost |", "|---|---|---|---|---|---|"]
    for r in mine:
        per = r["bank_bytes"] / r["num_tasks"]
        if r["method"] == HOPSUPSUP:
            h = r["hopsupsup"]
            kept = (f"{len(h['hidden'])} Hopfield matrices of {'x'.join(map(str, h['hidden'][:1] * 2))} fp32 "
                    f"({h['rule']}); explicit neuron masks would be {h['explicit_mask_bytes_per_task']} B per task")
            cost = (f"{h['mean_recovery_steps']:.0f} recovery steps, {h['mean_recovery_seconds']:.2f} s per task "
                    f"(evaluation {r['eval_seconds']:.1f} s in all)")
        else:
            kept = "weight masks, 1 bit per weight, and each task's likelihood statistics"
            cost = f"evaluation {r['eval_seconds']:.1f} s in all"
        lines.append(f"| {r['method']} | {BENCHMARKS[r['benchmark']]} | {kept} | {r['bank_bytes']:,} | {per:,.0f} | {cost} |")
    for r in rows:  # the rehearsal baselines keep images: count them as the float32 tensors Avalanche holds
        hp = r.get("hparams") or {}
        pixels = 784 if r["benchmark"] in BENCHMARKS else None
        if r["method"] == "replay" and "mem_size" in hp and pixels:
            total = hp["mem_size"] * pixels * 4
            lines.append(f"| replay | {BENCHMARKS[r['benchmark']]} | {hp['mem_size']} training images (float32) | "
                         f"{total:,} | {total / r['num_tasks']:,.0f} | none |")
        elif r["method"] == "gem" and "patterns_per_experience" in hp and pixels:
            per = hp["patterns_per_experience"] * pixels * 4
            lines.append(f"| gem | {BENCHMARKS[r['benchmark']]} | {hp['patterns_per_experience']} training images per "
                         f"task (float32) | {per * r['num_tasks']:,} | {per:,} | none |")
    return lines


def plot(path: Path, rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(args.benchmarks))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(methods) + 3.5), 3.8), dpi=120)
    for i, b in enumerate(args.benchmarks):
        vals = []
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["benchmark"] == b), None)
            vals.append(float("nan") if r is None or r["acc"] is None else r["acc"])
        xs = [j + (i - (len(args.benchmarks) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, vals, width, label=BENCHMARKS[b])
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("mean final test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{args.tasks} tasks, {args.iterations} steps/task, {args.backbone}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = list(choices) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} (or all)")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--iterations", type=int, default=1000, help="optimizer steps (of 128) per task")
    p.add_argument("--methods", type=_csv(ALL_METHODS), default=list(ALL_METHODS), help="comma-separated, or all")
    p.add_argument("--benchmarks", type=_csv(tuple(BENCHMARKS)), default=list(BENCHMARKS))
    p.add_argument("--backbone", default="fc1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-max-batches", type=int, default=None, help="test batches per task (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-data-timing", action="store_true", help="skip the data-path measurement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--resume", action="store_true",
                   help="reuse every run already finished in OUT/runs with the same config; run the rest")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    timing = None if args.no_data_timing else measure_data_path(args)
    rows = run_all(args, args.out)
    rows += set_rows(args)
    wall = sum(r["seconds"] for r in rows)  # reused runs count with the time they took
    (args.out / "compare.json").write_text(json.dumps({"command": command, "rows": rows, "data_path": timing},
                                                      indent=2) + "\n")
    write_markdown(args.out / "compare.md", rows, args, command, timing, wall)
    plot(args.out / "compare.png", rows, args)
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'} ({wall / 60:.1f} min)")
    return 0 if all(r["acc"] is not None and not math.isnan(r["acc"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
