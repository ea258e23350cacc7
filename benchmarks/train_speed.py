"""Masked vs dense training step, FC 1024 (784-1024-1024-500), batch 128, RMSprop, measured in
one run (interleaved repeats, best of each), reporting the ratio masked / dense.

    python benchmarks/train_speed.py [--steps 50] [--repeats 5] [--backbone fc1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from supsup.backbones import create_backbone, init_weights
from supsup.model import SupermaskModel
from supsup.rng import make_generator


def _time_steps(step, steps: int) -> float:
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def measure(backbone: str = "fc1024", num_outputs: int = 500, batch: int = 128, steps: int = 50,
            repeats: int = 5) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    dense = create_backbone(backbone, num_outputs=num_outputs)
    init_weights(dense, "signed_constant", make_generator(0, "backbone"))
    opt_d = torch.optim.RMSprop(dense.parameters(), lr=1e-4)

    def dense_step():
        loss = F.cross_entropy(dense(x), y)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    model = SupermaskModel.from_name(backbone, num_tasks=1, num_outputs=num_outputs, seed=0)
    model.add_task()
    opt_m = torch.optim.RMSprop(model.trainable_parameters(), lr=1e-4)

    def masked_step():
        loss = F.cross_entropy(model(x), y)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()

    d, m = [], []
    for _ in range(repeats):  # interleave so both see the same machine load
        d.append(_time_steps(dense_step, steps))
        m.append(_time_steps(masked_step, steps))
    dense_ms, masked_ms = 1e3 * min(d), 1e3 * min(m)  # min: the least-disturbed repeat
    return {"backbone": backbone, "batch_size": batch, "dense_step_ms": dense_ms, "masked_step_ms": masked_ms,
            "train_step_ratio_vs_dense": masked_ms / dense_ms, "threads": torch.get_num_threads(),
            "projected_seconds_per_task_1000_steps": masked_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="fc1024")
    p.add_argument("--num-outputs", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()
    r = measure(a.backbone, a.num_outputs, a.batch_size, a.steps, a.repeats)
    print(f"{r['backbone']} batch {r['batch_size']} ({r['threads']} threads): dense {r['dense_step_ms']:.2f} ms/step, "
          f"masked {r['masked_step_ms']:.2f} ms/step, ratio {r['train_step_ratio_vs_dense']:.3f}x "
          f"(1000 steps ~ {r['masked_step_ms']:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
