"""SupSup Transfer (``model.score_init: transfer``): does starting a task from the earlier tasks'
masks help when the tasks are related and the step budget small?

    python benchmarks/transfer.py [--runs DIR] [--threads N] [--budgets N ...] [--backbone NAME]

RotatedMNIST, 10 tasks 10 degrees apart (0, 10, ..., 90: neighbours share most of their
features), GG, ``configs/rotated_mnist_gg.yaml`` otherwise (FC 1024, 200 outputs, RMSprop lr
1e-4). Each task trains ``N`` steps of 128 from fresh scores (``kaiming_uniform``) or from the
earlier tasks (``transfer``). A GG mask never changes once learned, so each task's final
accuracy is its accuracy right after its budget: forward transfer is the mean over tasks 1..9
of (transfer - fresh); task 0 has nothing to transfer from and is equal in both.

Runs are resumable in ``DIR/<init>_<N>`` (default ``runs/transfer``). Writes
``benchmarks/results/transfer.json`` and ``transfer.md``.
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

ANGLES = [10.0 * i for i in range(10)]
INITS = ("kaiming_uniform", "transfer")


def run(init: str, steps: int, runs: Path, backbone: str) -> list[float]:
    """Per-task GG accuracy with ``steps`` steps per task from ``init`` scores."""
    from supsup.checkpoint import CHECKPOINT_NAME
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    out = runs / f"{backbone}_{init}_{steps}"
    cfg = load_config(ROOT / "configs" / "rotated_mnist_gg.yaml",
                      ["benchmark.num_tasks=10", f"benchmark.angles={ANGLES}", f"train.iterations={steps}",
                       f"model.score_init={init}", f"model.backbone={backbone}", "progress=false"])
    t0 = time.perf_counter()
    res = run_experiment(cfg, out, resume=(out / CHECKPOINT_NAME).exists()).to_dict()
    accs = [t["acc_given_task"] for t in res["tasks"]]
    print(f"[{time.strftime('%H:%M:%S')}] {backbone} {init} {steps} steps: mean {sum(accs) / len(accs):.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return accs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/transfer"))
    p.add_argument("--threads", type=int, help="torch and numba threads (1 when something else runs)")
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 200], help="steps of 128 per task")
    p.add_argument("--backbone", default="fc1024")
    a = p.parse_args()
    set_threads(a.threads)
    rows = []
    for steps in a.budgets:
        accs = {init: run(init, steps, a.runs, a.backbone) for init in INITS}
        fresh, moved = accs["kaiming_uniform"], accs["transfer"]
        gain = sum(m - f for m, f in zip(moved[1:], fresh[1:])) / (len(fresh) - 1)
        rows.append({"steps": steps, "fresh": fresh, "transfer": moved, "forward_transfer": gain,
                     "mean_fresh_tasks_1_9": sum(fresh[1:]) / (len(fresh) - 1),
                     "mean_transfer_tasks_1_9": sum(moved[1:]) / (len(moved) - 1)})
        print(f"{steps} steps: forward transfer {gain:+.4f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transfer.json").write_text(json.dumps({"backbone": a.backbone, "angles": ANGLES, "rows": rows},
                                                      indent=2) + "\n")
    lines = ["# SupSup Transfer on related tasks", "",
             f"RotatedMNIST, 10 tasks 10 degrees apart, {a.backbone}, GG; each task trained a small budget of steps "
             "of 128 from fresh scores or from the earlier tasks (`model.score_init: transfer`). "
             "`python benchmarks/transfer.py`.", "",
             "| steps per task | fresh scores, tasks 1-9 | transfer, tasks 1-9 | forward transfer |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['mean_fresh_tasks_1_9']:.4f} | {r['mean_transfer_tasks_1_9']:.4f} | "
              f"{r['forward_transfer']:+.4f} |" for r in rows]
    lines += ["", "Per task (task 0 has nothing to transfer from):", "",
              "| steps | init | " + " | ".join(f"{int(x)} deg" for x in ANGLES) + " |",
              "|---|---|" + "---|" * len(ANGLES)]
    for r in rows:
        for init, key in (("fresh", "fresh"), ("transfer", "transfer")):
            lines.append(f"| {r['steps']} | {init} | " + " | ".join(f"{v:.4f}" for v in r[key]) + " |")
    (RESULTS / "transfer.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
