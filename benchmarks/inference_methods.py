"""What each task-inference method costs, at k = 10, 50 and 250 masks, in one run.

FC 1024 (784-1024-1024-500, 10 classes) with ``k`` random masks and, for ``likelihood``,
statistics of the shapes a real PermutedMNIST task banks (one Gaussian per task at rank 32 on
both hidden layers: 139,528 bytes per task; their values do not change the cost). For every
method it times:

* **one inference**: the task of one batch from one image (``infer_tasks`` with one group),
  median of ``--reps`` calls after a warm-up;
* **amortised**: per inference when ``--group`` inferences share one pass (as GN evaluation
  batches a task's test batches; for ``likelihood`` each candidate's masked weights are formed
  once for the whole group).

Methods: the paper's ``one_shot`` and ``binary`` (objective G), ``one_shot`` with its 5 and 25
best refined by the exact G score (``refine: exact``), and ``likelihood`` (every mask scored).

    python benchmarks/inference_methods.py [--ks 10 50 250] [--group 128] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # name -> infer_tasks keywords
    "one_shot (paper)": {"method": "one_shot"},
    "binary (paper)": {"method": "binary"},
    "one_shot + exact G over 5": {"method": "one_shot", "refine": "exact", "refine_candidates": 5},
    "one_shot + exact G over 25": {"method": "one_shot", "refine": "exact", "refine_candidates": 25},
    "likelihood (all masks)": {"method": "likelihood"},
}


def model_with_bank(k: int):
    """FC 1024 with ``k`` random masks, each with likelihood statistics of a real task's shapes."""
    from supsup import masks as M
    from supsup.likelihood import ClassGaussians, TaskLikelihood
    from supsup.model import SupermaskModel

    model = SupermaskModel.from_name("fc1024", num_tasks=k, num_outputs=500, num_classes=10, seed=0)
    gen = torch.Generator().manual_seed(k)
    model.load_bank_state({f"bank.{i}": torch.randint(0, 256, (k, M.packed_nbytes(layer.num_weights)), generator=gen,
                                                       dtype=torch.uint8) for i, layer in enumerate(model.masked_layers)})
    for t in range(k):
        layers = []
        for d in (1024, 1024):
            basis = torch.linalg.qr(torch.randn(d, 32, generator=gen))[0].t().unsqueeze(0)
            layers.append(ClassGaussians(means=torch.randn(1, d, generator=gen), basis=basis.half(),
                                         eigvals=torch.rand(1, 32, generator=gen) + 2, noise=torch.ones(1)))
        model.set_task_likelihood(t, TaskLikelihood(layers))
    return model


def time_call(fn, reps: int) -> float:
    fn()  # warm-up (kernels compiled, caches built)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 250])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference_methods.json"))
    args = p.parse_args(argv)
    set_threads(args.threads)
    from supsup.inference import infer_tasks

    x = torch.randn(args.group, 1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = []
    for k in args.ks:
        model = model_with_bank(k)
        for name, kw in METHODS.items():
            if kw.get("refine_candidates", 0) >= k:
                continue
            one = time_call(lambda m=model, kw=kw: infer_tasks(m, x[:1], num_classes=10, objective="g", **kw), args.reps)
            many = time_call(lambda m=model, kw=kw: infer_tasks(m, x, num_classes=10, objective="g", **kw),
                             max(1, args.reps // 2))
            rows.append({"k": k, "method": name, "ms_one": 1e3 * one, "ms_amortised": 1e3 * many / args.group})
            print(f"k={k:4d} {name:28s} one {1e3 * one:9.1f} ms   amortised over {args.group}: "
                  f"{1e3 * many / args.group:8.2f} ms", flush=True)
    out = {"machine": platform.machine(), "threads": args.threads, "torch": torch.__version__, "group": args.group,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Task inference cost by method (FC 1024, {args.threads} thread(s), {out['date']})", "",
          f"`python benchmarks/inference_methods.py --threads {args.threads}`: median ms for the task of one batch "
          f"from one image, and per inference when {args.group} inferences share a pass (GN evaluation). Random "
          "masks; likelihood statistics of a real task's shapes (rank 32 on both hidden layers).", "",
          "| k | method | one inference (ms) | amortised (ms) |", "|---|---|---|---|"]
    md += [f"| {r['k']} | {r['method']} | {r['ms_one']:.1f} | {r['ms_amortised']:.2f} |" for r in rows]
    Path(args.json).with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
