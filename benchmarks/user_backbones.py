"""A user's own modules wrapped by SupermaskModel, on real MNIST: does the init decide whether
masks can learn?

    python benchmarks/user_backbones.py [--threads N] [--quick]

* A user's ``nn.Sequential`` MLP (784-300-100-10 with biases, torch's default init) on 3
  PermutedMNIST tasks (1000 steps of 128, the paper's RMSprop lr 1e-4): wrapped with its own
  weights and biases (``weight_init="keep"``) and with the paper's init (the default: signed
  constants from the model's seed, biases set to 0).
* torchvision's ``resnet18(weights=None)`` (pretrained weights cannot be downloaded here: this
  measures the ``keep`` path, affine BatchNorm frozen, one per-task statistics set per task) on
  2 PermutedMNIST tasks, images repeated to 3 channels, 150 steps of 64, Adam lr 1e-3; beside it
  the same module with the paper's init.

Test accuracy with the task given, mean over tasks. Writes
``benchmarks/results/user_backbones.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measure(make_module, weight_init: str, *, tasks: int, steps: int, batch: int, train_cfg, channels: int,
            eval_batches: int | None) -> dict:
    import torch

    from supsup import SupermaskModel, train_task
    from supsup.config import load_config
    from supsup.evaluation import evaluate_given_task
    from supsup.experiment import build_stream

    cfg = load_config(ROOT / "configs" / "permuted_mnist_gg.yaml", [f"benchmark.num_tasks={tasks}", "progress=false"])
    stream = build_stream(cfg, torch.device("cpu"), progress=False)

    def widen(batches):
        for x, y in batches:
            yield (x.expand(-1, channels, -1, -1) if channels > 1 else x), y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bias warning: expected here
        model = SupermaskModel(make_module(), num_tasks=tasks, num_classes=10, weight_init=weight_init, likelihood=None)
    accs, t0 = [], time.perf_counter()
    for t in range(tasks):
        train_task(model, widen(stream.train_batches(t, steps, batch)), train_cfg, max_steps=steps)
        accs.append(evaluate_given_task(model, list(widen(stream.test_batches(t, 256, eval_batches))), t)[0])
        print(f"  {weight_init:15s} task {t}: {accs[-1]:.4f}", flush=True)
    return {"weight_init": weight_init, "acc_given_task": accs, "mean": sum(accs) / len(accs),
            "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps")
    p.add_argument("--only", choices=["mlp", "registered", "resnet"], nargs="*",
                   help="measure these only; the other rows of the result file are kept")
    args = p.parse_args()
    set_threads(args.threads)
    import torchvision
    from torch import nn

    from supsup.config import TrainConfig

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))

    def resnet():
        return torchvision.models.resnet18(weights=None, num_classes=10)

    def registered():
        from supsup.backbones import create_backbone

        return create_backbone("lenet_300_100", input_shape=(1, 28, 28), num_outputs=10)

    q = args.quick
    mlp_kw = dict(tasks=3, steps=20 if q else 1000, batch=128, train_cfg=TrainConfig(), channels=1, eval_batches=None)
    plan = [("mlp", "user MLP 784-300-100-10 (torch default init, biases)", mlp, ("keep", "signed_constant"), mlp_kw),
            ("registered", "registered lenet_300_100, 10 outputs", registered, ("signed_constant",), mlp_kw),
            ("resnet", "torchvision resnet18(weights=None)", resnet, ("keep", "signed_constant"),
             dict(tasks=2, steps=5 if q else 150, batch=64, train_cfg=TrainConfig(optimizer="adam", lr=1e-3),
                  channels=3, eval_batches=2 if q else 8))]
    path = RESULTS / "user_backbones.json"
    old = json.loads(path.read_text()) if path.is_file() and args.only else []
    rows = []
    for key, name, make, inits, kw in plan:
        if args.only and key not in args.only:
            rows += [r for r in old if r["module"] == name]
            continue
        print(name, flush=True)
        for init in inits:
            rows.append({"module": name, **measure(make, init, **kw)})
    if q:
        return 0
    path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Your own module, wrapped", "",
             "`python benchmarks/user_backbones.py --threads 2` (real MNIST, PermutedMNIST tasks, test accuracy with the "
             "task given). MLP: 3 tasks, 1000 steps of 128, RMSprop lr 1e-4 (the paper's). resnet18: 2 tasks, 150 "
             "steps of 64, Adam lr 1e-3, images repeated to 3 channels, 2048 test images per task. The registered "
             "`lenet_300_100` of the same shape (no biases), with the same seed and steps, for comparison.", "",
             "| module | weight_init | accuracy per task | mean | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['module']} | {r['weight_init']} | {', '.join(f'{a:.4f}' for a in r['acc_given_task'])} | "
                     f"{r['mean']:.4f} | {r['seconds']:.0f} |")
    (RESULTS / "user_backbones.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
