"""Masked vs dense training step, measured in one run (interleaved repeats, best of each).

FC 1024 (784-1024-1024-500) by default, batch 128. Dense: the same backbone trained normally
(torch's RMSprop on the weights; BatchNorm layers in training mode). Masked: SupSup's step
(scores, straight-through mask, supsup's optimizer, per-task BatchNorm statistics), in fp32 and
with ``train.precision: bf16``. Reports the ratios masked / dense and the projected seconds per
task of 1000 steps.

    python benchmarks/train_speed.py [--steps 50] [--repeats 5] [--backbone fc1024] [--json PATH]
    python benchmarks/train_speed.py --backbone resnet18 --input-shape 3,32,32 --num-outputs 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from supsup.backbones import create_backbone, init_weights
from supsup.config import TrainConfig
from supsup.model import SupermaskModel
from supsup.rng import make_generator
from supsup.training import make_optimizer, train_loss


def _time_steps(step, steps: int) -> float:
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def measure(backbone: str = "fc1024", num_outputs: int = 500, batch: int = 128, steps: int = 50,
            repeats: int = 5, input_shape: tuple[int, ...] = (1, 28, 28), mask_kind: str = "threshold",
            density: float = 0.5) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=gen)
    y = torch.randint(0, min(10, num_outputs), (batch,), generator=gen)

    dense = create_backbone(backbone, input_shape=input_shape, num_outputs=num_outputs).train()
    init_weights(dense, "signed_constant", make_generator(0, "backbone"))
    opt_d = torch.optim.RMSprop(dense.parameters(), lr=1e-4)

    def dense_step():
        loss = F.cross_entropy(dense(x), y)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    def masked(precision):
        model = SupermaskModel.from_name(backbone, num_tasks=1, num_outputs=num_outputs, seed=0,
                                         input_shape=input_shape, mask_kind=mask_kind, density=density)
        model.add_task()
        opt = make_optimizer(model.trainable_parameters(), TrainConfig(precision=precision))

        def step():
            loss = train_loss(model, x, y, precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps_fns = {"dense": dense_step, "masked_fp32": masked("fp32"), "masked_bf16": masked("bf16")}
    times: dict[str, list[float]] = {k: [] for k in steps_fns}
    for _ in range(repeats):  # interleave so that all see the same machine load
        for name, fn in steps_fns.items():
            times[name].append(_time_steps(fn, steps))
    ms = {k: 1e3 * min(v) for k, v in times.items()}  # min: the least-disturbed repeat
    mean_ms = {k: 1e3 * sum(v) / len(v) for k, v in times.items()}
    return {"backbone": backbone, "input_shape": list(input_shape), "mask_kind": mask_kind, "batch_size": batch,
            "threads": torch.get_num_threads(),
            "dense_step_ms": ms["dense"], "masked_step_ms": ms["masked_fp32"], "masked_bf16_step_ms": ms["masked_bf16"],
            "dense_step_mean_ms": mean_ms["dense"], "masked_step_mean_ms": mean_ms["masked_fp32"],
            "masked_bf16_step_mean_ms": mean_ms["masked_bf16"],
            "train_step_ratio_vs_dense": ms["masked_fp32"] / ms["dense"],
            "train_step_ratio_vs_dense_bf16": ms["masked_bf16"] / ms["dense"],
            "projected_seconds_per_task_1000_steps": ms["masked_fp32"],
            "projected_seconds_per_task_1000_steps_bf16": ms["masked_bf16"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="fc1024")
    p.add_argument("--num-outputs", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W (or F) of one input")
    p.add_argument("--mask-kind", default="threshold")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()
    shape = tuple(int(d) for d in a.input_shape.split(","))
    r = measure(a.backbone, a.num_outputs, a.batch_size, a.steps, a.repeats, shape, a.mask_kind, a.density)
    print(f"{r['backbone']} {a.input_shape} {a.mask_kind} batch {r['batch_size']} ({r['threads']} threads): dense {r['dense_step_ms']:.2f} ms/step; "
          f"masked fp32 {r['masked_step_ms']:.2f} ms ({r['train_step_ratio_vs_dense']:.2f}x dense), "
          f"bf16 {r['masked_bf16_step_ms']:.2f} ms ({r['train_step_ratio_vs_dense_bf16']:.2f}x dense); "
          f"1000 steps ~ {r['masked_step_ms']:.1f} s (fp32), {r['masked_bf16_step_ms']:.1f} s (bf16)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
