"""Conv nets with BatchNorm on real MNIST: per-task statistics against the official bug, task
inference through BatchNorm, and SupSup Transfer.

    python benchmarks/conv_bn.py [--runs DIR] [--threads N] [--only NAME ...] [--quick]

Runs (each resumable, in ``DIR/<name>``; ``benchmarks/results/conv_bn/`` gets the small files):

* ``split_per_task`` / ``split_shared``: ``configs/resnet18_split_mnist_gg.yaml`` (ResNet-18,
  SplitMNIST 5 tasks, GG) with ``model.norm`` per_task / shared: the accuracy of every task with
  the final bank, and right after it was learned;
* ``rotated_per_task`` / ``rotated_shared``: ``configs/resnet18_rotated_mnist_gn.yaml``
  (RotatedMNIST, 5 tasks 72 degrees apart, GN binary H from the test batch of 128), then the
  same bank evaluated with the task inferred from one image (one-shot and binary, H);
* superposed BatchNorm: on the ``rotated_per_task`` bank, task inference with the superposed
  network normalised by each batch's own statistics (the library's) against the alpha-weighted
  banked statistics (``mean = sum_i alpha_i mean_i``, ``var = sum_i alpha_i var_i``; computed
  here with autograd through the differentiable superposition), from 128 and from 1 image;
* ``transfer_*``: RotatedMNIST, 5 tasks, a small step budget per task, with and without
  ``model.score_init: transfer`` (forward transfer: accuracy after the budget).

Writes ``benchmarks/results/conv_bn.json``; ``conv_bn.md`` is written from it by hand, with the
``supsup eval`` commands that scored the ``rotated_per_task`` bank with ``inference.refine: exact``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402


def _run(name: str, config: str, overrides: list[str], runs: Path) -> dict:
    from supsup.checkpoint import CHECKPOINT_NAME
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    out = runs / name
    cfg = load_config(ROOT / "configs" / config, [*overrides, "progress=false"])
    t0 = time.perf_counter()
    res = run_experiment(cfg, out, resume=(out / CHECKPOINT_NAME).exists()).to_dict()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: GG {res['mean_acc_given_task']:.4f}"
          + (f", GN {res['mean_acc_inferred']:.4f}" if res.get("mean_acc_inferred") is not None else "")
          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    dst = RESULTS / "conv_bn" / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "config.yaml", "accuracy.png"):
        if (out / f).exists():
            shutil.copy2(out / f, dst / f)
    return res


def _eval_again(name: str, runs: Path, sets: list[str]) -> dict:
    from supsup.experiment import evaluate_saved

    res = evaluate_saved(runs / name, overrides=[*sets, "progress=false"]).to_dict()
    return {"mean_acc_inferred": res["mean_acc_inferred"], "task_inference_acc": res["task_inference_acc"]}


def _weighted_inference(model, x, method: str) -> int:
    """Task inference with alpha-weighted banked BatchNorm statistics (exact autograd through the
    differentiable superposition: masks read packed, statistics weighted by alpha)."""
    import torch

    from supsup.objectives import entropy

    k = model.num_banked_tasks
    stats = [bn.stats_rows() for bn in model.norm_layers]
    alive = torch.ones(k, dtype=torch.bool)
    count = k
    while True:
        a = (alive.float() / count).requires_grad_(True)
        model.superpose(a, norm_stats=stats)
        with torch.enable_grad():
            obj = entropy(model(x).unsqueeze(0), model.num_classes).sum()
            (grad,) = torch.autograd.grad(obj, a)
        model.restore_mode()
        grad = grad.masked_fill(~alive, math.inf)
        if method == "one_shot" or count <= 2:
            return int(grad.argmin())
        count = math.ceil(count / 2)
        keep = grad.argsort()[:count]
        alive = torch.zeros(k, dtype=torch.bool)
        alive[keep] = True


def superposed_norm_comparison(runs: Path, name: str = "rotated_per_task", max_batches: int | None = None) -> dict:
    """Task-inference accuracy on ``name``'s bank: batch statistics (the library) against
    alpha-weighted banked statistics, per number of images and method."""
    import torch

    from supsup.config import load_config
    from supsup.experiment import build_model, build_stream
    from supsup.experiment.runstate import restore_checkpoint
    from supsup.inference import infer_tasks

    cfg = load_config(runs / name / "config.yaml")
    model = build_model(cfg, torch.device("cpu"))
    restore_checkpoint(runs / name, cfg, model)
    stream = build_stream(cfg, torch.device("cpu"), progress=False)
    out = {}
    for images in (128, 1):
        for method in ("binary", "one_shot"):
            hits = {"batch": 0, "weighted": 0}
            total = 0
            for t in range(cfg.benchmark.num_tasks):
                for x, _ in stream.test_batches(t, 128, max_batches):
                    xs = x[:images]
                    got, _ = infer_tasks(model, xs.unsqueeze(0), method=method, objective="entropy")
                    hits["batch"] += int(got[0]) == t
                    hits["weighted"] += _weighted_inference(model, xs, method) == t
                    total += 1
            out[f"{method}_{images}"] = {**{k: v / total for k, v in hits.items()}, "inferences": total}
            print(f"superposed BN, {method}, {images} image(s): batch statistics {out[f'{method}_{images}']['batch']:.4f}, "
                  f"alpha-weighted {out[f'{method}_{images}']['weighted']:.4f} ({total} batches)", flush=True)
    return out


def bytes_per_task(backbone: str = "resnet18", shape=(3, 32, 32), outputs: int = 5) -> dict:
    from supsup import SupermaskModel
    from supsup.masks import packed_nbytes

    m = SupermaskModel.from_name(backbone, num_tasks=1, num_outputs=outputs, input_shape=shape)
    masks = sum(packed_nbytes(layer.num_weights) for layer in m.masked_layers)
    stats = sum(8 * bn.num_features for bn in m.norm_layers)
    return {"backbone": backbone, "input_shape": list(shape), "masked_weights": m.num_masked_weights,
            "ceil_P_over_8": math.ceil(m.num_masked_weights / 8), "mask_bytes": masks, "batchnorm_stat_bytes": stats,
            "bank_bytes_per_task": masks + stats, "fp32_scores_bytes": 4 * m.num_masked_weights}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/conv_bn", help="where the runs and their checkpoints go")
    p.add_argument("--threads", type=int, help="torch and numba threads (1 when something else runs)")
    p.add_argument("--only", nargs="*", help="run only these parts: split rotated superposed transfer bytes")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 tasks, few steps, few test batches")
    p.add_argument("--max-batches", type=int, help="test batches of 128 per task for the superposed comparison "
                   "(default: all; each batch is one inference per method and statistic)")
    p.add_argument("--norms", nargs="*", default=["per_task", "shared"], choices=["per_task", "shared", "batch"],
                   help="model.norm settings for the split and rotated runs")
    a = p.parse_args()
    set_threads(a.threads)
    runs = Path(a.runs)
    parts = set(a.only or ["split", "rotated", "superposed", "transfer", "bytes"])
    quick = ["benchmark.num_tasks=2", "train.iterations=20", "eval.max_batches=2"] if a.quick else []
    path = RESULTS / "conv_bn.json"
    report = json.loads(path.read_text()) if path.exists() and not a.quick else {}
    if "bytes" in parts:
        report["bytes"] = [bytes_per_task(), bytes_per_task("resnet18", (1, 28, 28), 10)]
    for norm in a.norms:
        if "split" in parts:
            report[f"split_{norm}"] = _run(f"split_{norm}", "resnet18_split_mnist_gg.yaml",
                                           [f"model.norm={norm}", *quick], runs)
        if "rotated" in parts:
            res = _run(f"rotated_{norm}", "resnet18_rotated_mnist_gn.yaml", [f"model.norm={norm}", *quick], runs)
            res["one_image"] = {m: _eval_again(f"rotated_{norm}", runs, ["inference.num_images=1",
                                                                          f"inference.method={m}"])
                                for m in ("one_shot", "binary")}
            print(f"rotated_{norm}, one image: {res['one_image']}", flush=True)
            report[f"rotated_{norm}"] = res
    if "superposed" in parts:
        report["superposed_norm"] = superposed_norm_comparison(runs, max_batches=2 if a.quick else a.max_batches)
    if "transfer" in parts:
        steps = "train.iterations=10" if a.quick else "train.iterations=60"
        for init in ("kaiming_uniform", "transfer"):
            report[f"transfer_{init}"] = _run(f"transfer_{init}", "resnet18_rotated_mnist_gn.yaml",
                                              [f"model.score_init={init}", steps, "scenario=GG", *quick[:1]], runs)
    if not a.quick:
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
