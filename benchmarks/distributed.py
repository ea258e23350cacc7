"""Several processes on one machine: wall time of a whole run with 2 processes x 1 thread
against 1 process x 2 threads, and what a task costs on the wire.

    python benchmarks/distributed.py [--tasks 4] [--iterations 1000] [--runs DIR]

Runs ``configs/permuted_mnist_gn.yaml`` (FC 1024, 500 outputs, GN one-shot G from one image)
with ``--tasks`` tasks twice, one after the other on an otherwise idle machine: ``supsup run
--threads 2`` and ``torchrun --nproc-per-node 2 -m supsup run --threads 1``; checks that the two
banks are bitwise equal (``bank_sha256``) and reports the wall-time ratio, the bytes each task
sends (its packed mask + statistics + 1 flag byte) and the all-gather time. Then projects the
2500-task LeNet 300-100 run (its measured training and evaluation seconds per task, from
``benchmarks/results/reproduce/lenet_2500_gn/results.json``) on 1, 8 and 64 workers. Writes
``benchmarks/results/distributed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _run(out: Path, procs: int, threads: int, tasks: int, iterations: int) -> tuple[float, dict]:
    sets = [f"benchmark.num_tasks={tasks}", f"train.iterations={iterations}", "progress=false"]
    args = ["run", "permuted_mnist_gn", "--threads", str(threads), "--out", str(out), *sum([["--set", s] for s in sets], [])]
    if procs == 1:
        cmd = [sys.executable, "-m", "supsup", *args]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={procs}", "--master-port=0",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "supsup", *args]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "results.json").read_text())


def project(per_task_train: float, per_task_eval: float, bytes_per_task: int, tasks: int = 2500,
            bandwidth: float = 125e6, latency: float = 1e-3) -> list[dict]:
    """Wall time of a ``tasks``-task run on W workers: rounds of W tasks trained in parallel,
    each round's all-gather moving W tasks' bytes to every worker (ring all-gather: each
    worker receives (W-1)/W of the round's bytes) at ``bandwidth`` bytes/s plus ``latency``
    per step, evaluation split over the workers."""
    out = []
    for w in (1, 8, 64):
        rounds = math.ceil(tasks / w)
        comm = 0.0 if w == 1 else rounds * ((w - 1) * bytes_per_task / bandwidth + (w - 1) * latency)
        wall = rounds * per_task_train + comm + tasks * per_task_eval / w
        out.append({"workers": w, "hours": wall / 3600, "communication_hours": comm / 3600})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--runs", default="runs/distributed")
    a = p.parse_args()
    runs = Path(a.runs)
    one_wall, one = _run(runs / "one", 1, 2, a.tasks, a.iterations)
    two_wall, two = _run(runs / "two", 2, 1, a.tasks, a.iterations)
    same = one["bank_sha256"] == two["bank_sha256"] and one["tasks"] == two["tasks"]
    ratio = two_wall / one_wall
    ref = json.loads((RESULTS / "reproduce" / "lenet_2500_gn" / "results.json").read_text())
    lenet_bytes = 1 + 39408  # one LeNet 300-100 task: its packed mask (rows of whole words) and the flag
    report = {"tasks": a.tasks, "iterations": a.iterations, "one_process_two_threads_s": one_wall,
              "two_processes_one_thread_s": two_wall, "ratio_two_processes_vs_one": ratio, "same_bank": same,
              "bytes_per_task": two["communication_bytes_per_task"],
              "allgather_seconds_per_round": two["communication_seconds"] / math.ceil(a.tasks / 2),
              "projection_lenet_2500": project(ref["train_seconds"] / 2500, ref["eval_seconds"] / 2500, lenet_bytes)}
    (RESULTS / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Several processes", "",
             f"`python benchmarks/distributed.py --tasks {a.tasks} --iterations {a.iterations}`: PermutedMNIST, FC 1024, "
             f"{a.tasks} tasks of {a.iterations} steps, GN, whole runs one after the other on this 2-core machine.", "",
             "| run | wall s |", "|---|---|",
             f"| 1 process x 2 threads | {one_wall:.1f} |", f"| 2 processes x 1 thread (torchrun, gloo) | {two_wall:.1f} |", "",
             f"Ratio 2 processes / 1 process: **{ratio:.3f}**; banks bitwise equal: {same}. Each task sends "
             f"{report['bytes_per_task']:,} bytes (its packed mask and a flag byte); one round's all-gather on "
             f"loopback took {1e3 * report['allgather_seconds_per_round']:.1f} ms.", "",
             "Projection of the 2500-task LeNet 300-100 GN run (measured here in one process: "
             f"{ref['train_seconds'] / 2500:.2f} s of training and {ref['eval_seconds'] / 2500:.2f} s of evaluation "
             "per task), with 1 Gbit/s between machines and 1 ms per all-gather step:", "",
             "| workers | wall hours | of which communication |", "|---|---|---|"]
    lines += [f"| {r['workers']} | {r['hours']:.2f} | {r['communication_hours']:.3f} |"
              for r in report["projection_lenet_2500"]]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
