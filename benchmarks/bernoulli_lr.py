"""The learning rate Bernoulli supermasks need: one PermutedMNIST task, FC 1024 (500 outputs),
1000 steps of 128, RMSprop, at several rates; threshold masks at the paper's 1e-4 beside them.

    python benchmarks/bernoulli_lr.py [--threads N] [--quick]

Bernoulli scores start near 0 (``sigmoid(s) = 0.5``: a coin per weight) and RMSprop moves a
score by about ``lr`` per step, so the paper's 1e-4 leaves them coins. Writes
``benchmarks/results/bernoulli_lr.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402
from mask_learners import RESULTS, learn  # noqa: E402

RATES = (1e-4, 1e-2, 0.1, 0.3, 1.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="a smoke run: 50 steps")
    args = p.parse_args()
    set_threads(args.threads)
    rows = [{"kind": "threshold", "lr": 1e-4, **learn("threshold", "permuted_mnist", 1, args.quick)}]
    for lr in RATES:
        rows.append({"kind": "bernoulli", "lr": lr,
                     **learn("bernoulli, lr 1e-4", "permuted_mnist", 1, args.quick, extra=(f"train.lr={lr}",))})
    if args.quick:
        return 0
    (RESULTS / "bernoulli_lr.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Bernoulli supermasks: learning rate", "",
             "`python benchmarks/bernoulli_lr.py --threads 2`: one PermutedMNIST task, FC 1024 with 500 outputs, "
             "1000 steps of 128, RMSprop; test accuracy of the banked mask (`sigmoid(s) >= 0.5`) and the mean of "
             "5 sampled masks.", "",
             "| mask | lr | banked mask | sampled masks |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['lr']:g} | {r['mean']:.4f} | {r.get('sampled_mean', float('nan')):.4f} |")
    (RESULTS / "bernoulli_lr.md").write_text("\n".join(lines).replace("| nan |", "| - |") + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
