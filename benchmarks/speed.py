"""Speed and memory of SupSup on this machine, measured in one run, as ratios to references.

(a) masked training step vs a dense step of the same backbone (FC 1024, batch 128);
(b) one-shot task inference from one image at k = 10, 50, 250, 2500 learned FC 1024 masks vs
    the float-stack reference (the original implementation's method), per-inference time and
    peak memory, each in a fresh subprocess (the reference is skipped where its float stack
    would not fit: 2500 FC 1024 masks are 23.6 GB of fp32);
(c) bytes per task in the bank (1 bit per weight) vs fp32 scores per task (what the original
    code keeps for every task);
(d) peak RSS of this process and of the inference subprocesses.

    python benchmarks/speed.py [--quick] [--json PATH]

``--quick`` (under a minute): fewer repeats, k = 10, 50, 250, and k = 2500 without reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference_speed  # noqa: E402
import train_speed  # noqa: E402

from supsup import masks as M  # noqa: E402
from supsup.experiment.runstate import peak_rss_bytes  # noqa: E402
from supsup.model import SupermaskModel  # noqa: E402


def bank_bytes(backbone: str = "fc1024", num_outputs: int = 500) -> dict:
    model = SupermaskModel.from_name(backbone, num_tasks=1, num_outputs=num_outputs, seed=0)
    p = model.num_masked_weights
    per_task = sum(M.packed_nbytes(layer.num_weights) for layer in model.masked_layers)
    return {"backbone": backbone, "num_masked_weights": p, "bank_bytes_per_task": per_task,
            "bank_bytes_per_task_bound": (p + 7) // 8 + 8 * len(model.masked_layers),
            "float_scores_bytes_per_task": 4 * p, "ratio": 4 * p / per_task}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="finish within a minute")
    p.add_argument("--json", help="write every number to this file")
    a = p.parse_args()
    t0 = time.perf_counter()
    # quick: fewer repeats of as many steps as a ratio within 10% of the full measurement needs
    train = train_speed.measure("fc1024", steps=30 if a.quick else 50, repeats=4 if a.quick else 6)
    ks = (10, 50, 250, 2500)
    rows = inference_speed.measure(ks, group=32, repeats=1 if a.quick else 3,
                                   reference_max_bytes=8e9 if a.quick else 16e9)
    banks = [bank_bytes("fc1024"), bank_bytes("lenet_300_100")]
    k250 = next(r for r in rows if r["k"] == 250)
    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "quick": a.quick,
        "train": train,
        "inference": rows,
        "bank": banks,
        "train_step_ratio_vs_dense": train["train_step_ratio_vs_dense"],
        "train_step_ratio_vs_dense_bf16": train["train_step_ratio_vs_dense_bf16"],
        "inference_speedup_vs_float_stack_k250": k250.get("speedup_single"),
        "inference_memory_ratio_vs_float_stack_k250": k250.get("memory_ratio"),
        "inference_ms_per_image": {r["k"]: r["ours"].get("single_ms") for r in rows},
        "bank_bytes_per_task": banks[0]["bank_bytes_per_task"],
        "float_scores_bytes_per_task": banks[0]["float_scores_bytes_per_task"],
        "peak_rss_bytes": peak_rss_bytes(),
        "inference_peak_bytes": {r["k"]: r["ours"].get("peak_bytes") for r in rows},
    }
    out["seconds"] = time.perf_counter() - t0

    print(f"(a) train step, fc1024 batch 128: dense {train['dense_step_ms']:.1f} ms; masked fp32 "
          f"{train['masked_step_ms']:.1f} ms = {train['train_step_ratio_vs_dense']:.2f}x dense; masked bf16 "
          f"{train['masked_bf16_step_ms']:.1f} ms = {train['train_step_ratio_vs_dense_bf16']:.2f}x dense")
    print("(b) " + inference_speed.format_rows(rows, 32))
    for b in banks:
        print(f"(c) {b['backbone']}: bank {b['bank_bytes_per_task']:,} bytes per task (ceil(P/8) + at most 8 per layer, "
              f"P = {b['num_masked_weights']:,}) vs fp32 scores {b['float_scores_bytes_per_task']:,} ({b['ratio']:.1f}x)")
    print(f"(d) peak RSS: this process {out['peak_rss_bytes'] / 2**20:.0f} MiB; inference subprocesses add "
          + ", ".join(f"k={k}: {v / 2**20:.0f} MiB" for k, v in out["inference_peak_bytes"].items() if v is not None))
    print(f"measured in {out['seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
