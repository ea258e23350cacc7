"""Cost per inference of the exact refinement next to one-shot and binary search, in one run.

    python benchmarks/refine_cost.py [--k 36] [--images 128] [--group 8] [--repeats 5] [--json PATH]

The RotatedMNIST-36 setting: FC 1024 with 200 outputs, ``k`` banked masks (random: timing does
not depend on their values), each inference from ``--images`` images, ``--group`` inferences
batched together as GN evaluation does. Timed, interleaved, best repeat of each: one_shot,
binary, binary + exact over 5 shortlisted masks, and the exact objective under every mask
(``refine_candidates = k``: the gradient's shortlist is all of them). Objective H.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import random_bank_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=36)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from supsup.inference import infer_tasks

    model = random_bank_model(args.k, "fc1024", 200)
    model.num_classes = 10
    x = torch.randn(args.group, args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    settings = {
        "one_shot": dict(method="one_shot"),
        "binary": dict(method="binary"),
        "binary + exact 5": dict(method="binary", refine="exact", refine_candidates=5),
        f"exact, all {args.k}": dict(method="one_shot", refine="exact", refine_candidates=args.k),
    }
    best = {name: float("inf") for name in settings}
    for kw in settings.values():  # warm-up (compiled kernels, caches)
        infer_tasks(model, x[:1], objective="entropy", num_classes=10, **kw)
    for _ in range(args.repeats):
        for name, kw in settings.items():
            t0 = time.perf_counter()
            infer_tasks(model, x, objective="entropy", num_classes=10, **kw)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.group)
    ref = best["binary"]
    print(f"k = {args.k} masks, FC 1024 (200 outputs), {args.images} images per inference, "
          f"{args.group} inferences per call, {torch.get_num_threads()} threads, best of {args.repeats}")
    for name, s in best.items():
        print(f"{name:>18}: {1e3 * s:8.1f} ms per inference = {s / ref:.2f}x binary")
    if args.json:
        Path(args.json).write_text(json.dumps({"k": args.k, "images": args.images, "group": args.group,
                                               "threads": torch.get_num_threads(),
                                               "ms_per_inference": {n: 1e3 * s for n, s in best.items()},
                                               "ratio_to_binary": {n: s / ref for n, s in best.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
