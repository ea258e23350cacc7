"""Training recipes against task inference: how hard can the masks be trained before the
one-shot gradient stops finding their task?

    python benchmarks/recipe_probes.py [--runs DIR] [--threads N] [--only NAME ...]

Each probe is ``configs/reproduce_permuted_fc1024_250_plus.yaml`` (PermutedMNIST, FC 1024 with
500 outputs, GN one-shot G from the first image of each test batch, bf16 training matmuls) on
5 tasks with another learning rate, schedule, step count or per-layer learning rate
(``train.layer_lr``). A run is resumable in ``DIR/<name>`` (default ``runs/probes2``); a
finished one is read, not trained again.

Then the layer swap: the banks of two probes (the same seed, so the same permutations: task
``t`` is the same task in both) are mixed layer by layer, and task inference is measured on
each mix (one-shot G from one image, the first 8 test batches of every task). It shows which
layer's masks decide whether the gradient finds the task.

Writes ``benchmarks/results/recipe_probes.json`` and ``recipe_probes.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402

CONFIG = "configs/reproduce_permuted_fc1024_250_plus.yaml"
COMMON = ["benchmark.num_tasks=5", "eval.at_tasks=[5]", "eval.extra_objectives=[]", "progress=false"]

#: name -> (what it changes, overrides of CONFIG)
PROBES: dict[str, tuple[str, list[str]]] = {
    "paper": ("lr 1e-4 constant, 1000 steps (the paper)",
              ["train.lr=1e-4", "train.schedule=constant", "train.iterations=1000"]),
    "lr1e-3_const_1000": ("lr 1e-3 constant, 1000 steps",
                          ["train.lr=1e-3", "train.schedule=constant", "train.iterations=1000"]),
    "lr3e-4_cos_2000": ("lr 3e-4 cosine, 2000 steps", ["train.lr=3e-4", "train.schedule=cosine", "train.iterations=2000"]),
    "lr2e-4_cos_3000": ("lr 2e-4 cosine, 3000 steps", ["train.lr=2e-4", "train.schedule=cosine", "train.iterations=3000"]),
    "lr1e-4_cos_2000": ("lr 1e-4 cosine, 2000 steps", ["train.lr=1e-4", "train.schedule=cosine", "train.iterations=2000"]),
    "lr1e-4_cos_3000": ("lr 1e-4 cosine, 3000 steps", ["train.lr=1e-4", "train.schedule=cosine", "train.iterations=3000"]),
    "lr1e-3_cos_2000": ("lr 1e-3 cosine, 2000 steps (GG probe of 2 tasks: 0.9824)",
                        ["train.lr=1e-3", "train.schedule=cosine", "train.iterations=2000"]),
    "lr1e-3_cos_2000_l0x0.1": ("lr 1e-3 cosine, 2000 steps, input layer at 0.1x",
                               ["train.lr=1e-3", "train.schedule=cosine", "train.iterations=2000", "train.layer_lr=[0.1,1,1]"]),
    "lr1e-3_cos_2000_l0x0.03": ("lr 1e-3 cosine, 2000 steps, input layer at 0.03x",
                                ["train.lr=1e-3", "train.schedule=cosine", "train.iterations=2000", "train.layer_lr=[0.03,1,1]"]),
}


def run_probe(name: str, runs: Path) -> dict:
    from supsup.checkpoint import CHECKPOINT_NAME
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    out = runs / name
    cfg = load_config(ROOT / CONFIG, [*PROBES[name][1], *COMMON])
    t0 = time.perf_counter()
    res = run_experiment(cfg, out, resume=(out / CHECKPOINT_NAME).exists()).to_dict()
    row = {"name": name, "recipe": PROBES[name][0], "gg": res["mean_acc_given_task"], "gn": res["mean_acc_inferred"],
           "task_inference": res["task_inference_acc"], "train_seconds_per_task": res["train_seconds"] / 5}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: GG {row['gg']:.4f}, GN {row['gn']:.4f}, task inference "
          f"{row['task_inference']:.3f}, {row['train_seconds_per_task']:.1f} s/task ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return row


def layer_swap(runs: Path, low: str, high: str, batches: int = 8) -> dict:
    """Task-inference accuracy with each layer's masks taken from ``high`` and the others from
    ``low``, and the reverse (the first ``batches`` test batches of each task, one image)."""
    import torch

    from supsup.candidates import Candidates
    from supsup.config import load_config
    from supsup.experiment import build_model, build_stream
    from supsup.experiment.runstate import restore_checkpoint
    from supsup.inference import infer_tasks

    def bank(name):
        cfg = load_config(runs / name / "config.yaml")
        model = build_model(cfg, torch.device("cpu"))
        restore_checkpoint(runs / name, cfg, model)
        return cfg, model

    cfg, model = bank(low)
    _, other = bank(high)
    lo = [layer.bank_rows[:5] for layer in model.masked_layers]
    hi = [layer.bank_rows[:5] for layer in other.masked_layers]
    stream = build_stream(cfg, torch.device("cpu"), progress=False)
    test = {t: [x[:1] for x, _ in stream.test_batches(t, 128, batches)] for t in range(5)}

    def accuracy(rows):
        hits = total = 0
        for t, xs in test.items():
            got, _ = infer_tasks(model, torch.stack(xs), method="one_shot", objective="g", num_classes=10,
                                 candidates=Candidates.of_rows(rows))
            hits += int((got == t).sum())
            total += len(xs)
        return hits / total

    L = len(lo)
    out = {"low": low, "high": high, f"all_{low}": accuracy(lo), f"all_{high}": accuracy(hi)}
    for i in range(L):
        out[f"{low}_with_layer{i}_of_{high}"] = accuracy([hi[j] if j == i else lo[j] for j in range(L)])
        out[f"{high}_with_layer{i}_of_{low}"] = accuracy([lo[j] if j == i else hi[j] for j in range(L)])
    for k, v in out.items():
        if isinstance(v, float):
            print(f"layer swap: {k}: task inference {v:.3f}", flush=True)
    return out


def true_task_ranks(runs: Path, name: str, batches: int = 8) -> dict[int, int]:
    """Where the true task falls in the one-shot order (ascending dG/dalpha at alpha = 1/k: rank
    0 is the mask picked), over the first image of ``batches`` test batches per task:
    {rank: count}."""
    from collections import Counter

    import torch

    from supsup.config import load_config
    from supsup.experiment import build_model, build_stream
    from supsup.experiment.runstate import restore_checkpoint
    from supsup.inference import alpha_gradients

    cfg = load_config(runs / name / "config.yaml")
    model = build_model(cfg, torch.device("cpu"))
    restore_checkpoint(runs / name, cfg, model)
    stream = build_stream(cfg, torch.device("cpu"), progress=False)
    k = model.num_banked_tasks
    ranks: Counter = Counter()
    for t in range(k):
        xs = torch.stack([x[:1] for x, _ in stream.test_batches(t, 128, batches)])
        grads = alpha_gradients(model, xs, torch.full((xs.shape[0], k), 1 / k), objective="g", num_classes=10)
        ranks.update((grads.argsort(dim=1) == t).float().argmax(dim=1).tolist())
    return dict(sorted(ranks.items()))


def write_report(rows: list[dict], swap: dict | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipe_probes.json").write_text(json.dumps({"probes": rows, "layer_swap": swap}, indent=2) + "\n")
    lines = ["# Training recipes against task inference", "",
             f"`{CONFIG}` on 5 tasks (PermutedMNIST, FC 1024, 500 outputs, GN one-shot G from one image, bf16 "
             "training matmuls), 2 threads. `python benchmarks/recipe_probes.py`.", "",
             "| recipe | GG | GN | task inference | training s/task |", "|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['gg']:.4f} | {r['gn']:.4f} | {r['task_inference']:.3f} | "
              f"{r['train_seconds_per_task']:.1f} |" for r in rows]
    lines += ["", "Training times are upper bounds: other work shared the machine during some probes.", "",
              "Where the true task falls in the one-shot order (rank 0: picked; 5 candidates; first image of 8 "
              "test batches per task, G):", "", "| recipe | rank: count |", "|---|---|"]
    lines += [f"| {r['recipe']} | {', '.join(f'{k}: {v}' for k, v in r['true_task_ranks'].items())} |" for r in rows]
    if swap:
        lines += ["", f"Layer swap between `{swap['low']}` and `{swap['high']}` (same permutations; task inference, "
                  "one image, 8 test batches per task):", "", "| masks | task inference |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in swap.items() if isinstance(v, float)]
    (RESULTS / "recipe_probes.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/probes2"))
    p.add_argument("--threads", type=int, help="torch and numba threads (1 when something else runs)")
    p.add_argument("--only", nargs="*", choices=list(PROBES), help="run only these probes")
    p.add_argument("--swap", nargs=2, default=["paper", "lr1e-3_const_1000"], metavar=("LOW", "HIGH"),
                   help="the two probes whose banks the layer swap mixes")
    a = p.parse_args()
    set_threads(a.threads)
    rows = [run_probe(name, a.runs) for name in (a.only or PROBES)]
    for row in rows:
        row["true_task_ranks"] = true_task_ranks(a.runs, row["name"])
        print(f"{row['name']}: rank of the true task in the one-shot order: {row['true_task_ranks']}", flush=True)
    swap = layer_swap(a.runs, *a.swap) if all((a.runs / n / "results.json").exists() for n in a.swap) else None
    if not a.only:
        write_report(rows, swap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
