"""Sparse Evolutionary Training (Mocanu et al. 2018) as a continual-learning baseline at SupSup's memory.

For every task of PermutedMNIST a separate sparse FC 784-1024-1024-10 network (bias-free, ReLU) is
trained and stored; at test time the task id is given (GG) and its own network classifies. The
stored bytes per task match what SupSup stores per task for the same backbone: one bit per weight
of FC 1024 with 500 outputs, ``sum_l supsup.masks.packed_nbytes(n_in_l * n_out_l)`` bytes
(computed from the backbone, 295,424 bytes). A SET weight is stored as an fp16 value (2 bytes) and
an int32 flat index into its layer (4 bytes), so the budget is ``floor(supsup_bytes / 6)``
nonzero weights per task (about 49,000), split over the layers by the Erdős–Rényi rule:

    density_l = eps * (n_in_l + n_out_l) / (n_in_l * n_out_l),   nnz_l = eps * (n_in_l + n_out_l),

with ``eps`` scaled so that ``sum_l nnz_l`` is the budget; a layer whose density would exceed 1
is made dense and ``eps`` recomputed for the others (here: the 1024x10 output layer).

Training per task: ``--iterations`` Adam steps (default 1000, batch 128, lr 1e-3: SupSup's step
budget). An "epoch" is ``iterations / 5`` steps; after each epoch but the last, SET prunes the
``zeta = 0.3`` fraction of each sparse layer's nonzeros with the smallest magnitude and regrows
as many at uniformly random empty positions (local generator), so every layer's nonzero count
is constant. Nonzeros start Kaiming-normal with the sparse fan-in, ``std = sqrt(2 / (density *
n_in))`` (keeps the pre-activation variance of a dense Kaiming net); regrown weights start at 0.
The network evaluated is the one decoded from the stored fp16 values and int32 indices.

    python benchmarks/set_baseline.py [--tasks 10] [--iterations 1000] [--quick] [--json PATH]

Without ``--json`` it writes ``benchmarks/results/set_baseline.json`` and ``set_baseline.md``; with
it, the JSON to ``PATH`` and the table beside it (``PATH`` with suffix ``.md``). ``--quick``: 3
tasks of 200 steps. Runs on 1 CPU thread; every random draw (positions, init, regrowth, batch
order) comes from a local generator.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

VALUE_BYTES = 2  # fp16 value
INDEX_BYTES = 4  # int32 flat index within the layer
BYTES_PER_WEIGHT = VALUE_BYTES + INDEX_BYTES


# ----------------------------------------------------------------------------- memory budget

def linear_shapes(backbone: str, num_outputs: int) -> list[tuple[int, int]]:
    """``(n_out, n_in)`` of every Linear layer of a registered backbone, in order."""
    from supsup.backbones import create_backbone

    net = create_backbone(backbone, num_outputs=num_outputs)
    return [tuple(m.weight.shape) for m in net.modules() if isinstance(m, nn.Linear)]


def supsup_bytes(backbone: str = "fc1024", num_outputs: int = 500) -> dict:
    """What SupSup stores per task: one packed bit mask per layer, ``packed_nbytes(n_out * n_in)``
    bytes each (whole 64-bit words)."""
    from supsup.masks import packed_nbytes

    shapes = linear_shapes(backbone, num_outputs)
    per_layer = [packed_nbytes(a * b) for a, b in shapes]
    return {"backbone": backbone, "num_outputs": num_outputs, "layer_shapes": [list(s) for s in shapes],
            "bytes_per_layer": per_layer, "bytes_per_task": sum(per_layer)}


def erdos_renyi_counts(shapes: Sequence[tuple[int, int]], budget: int) -> list[int]:
    """Nonzeros per layer ``(n_out, n_in)``: ``nnz_l = floor(eps * (n_in + n_out))``, capped at
    ``n_in * n_out`` (dense) with ``eps`` refitted on the uncapped layers, plus the flooring
    remainder spread over the sparse layers: ``sum == budget`` (when the net has that many)."""
    total = sum(a * b for a, b in shapes)
    if budget >= total:
        return [a * b for a, b in shapes]
    dense: set[int] = set()
    while True:
        left = budget - sum(shapes[i][0] * shapes[i][1] for i in dense)
        eps = left / sum(a + b for i, (a, b) in enumerate(shapes) if i not in dense)
        over = {i for i, (a, b) in enumerate(shapes) if i not in dense and eps * (a + b) >= a * b}
        if not over:
            break
        dense |= over
    counts = [a * b if i in dense else int(math.floor(eps * (a + b))) for i, (a, b) in enumerate(shapes)]
    # hand the few weights lost to flooring to the sparse layers, one each, so the budget is met exactly
    sparse = [i for i in range(len(shapes)) if i not in dense]
    for j in range(budget - sum(counts)):
        counts[sparse[j % len(sparse)]] += 1
    return counts


# ----------------------------------------------------------------------------- sparse network

def sparse_init(shape: tuple[int, int], count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` nonzeros at uniformly random positions of an ``(n_out, n_in)`` layer; values
    ``N(0, 2 / (density * n_in))``. Returns ``(weight, mask)``, float and bool ``(n_out, n_in)``."""
    n_out, n_in = shape
    numel = n_out * n_in
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    std = math.sqrt(2.0 / (count / numel * n_in))  # Kaiming with the expected sparse fan-in
    weight = torch.randn(numel, generator=generator) * std * mask
    return weight.view(shape), mask.view(shape)


def prune_regrow(weight: torch.Tensor, mask: torch.Tensor, zeta: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One SET step on a layer: drop the ``round(zeta * nnz)`` kept weights with the smallest
    ``|w|``, then switch on as many positions drawn uniformly from the now-empty ones (which may
    include a just-dropped one), with value 0. Returns the new mask and the bool tensor of the
    positions whose state changed (pruned or regrown); ``weight`` is zeroed at both in place.

    A dense layer (no empty position) is left as it is: there is nowhere to regrow.
    """
    flat_w, flat_m = weight.detach().view(-1), mask.view(-1)
    nnz = int(flat_m.sum())
    n_move = int(round(zeta * nnz))
    changed = torch.zeros_like(flat_m)
    if n_move == 0 or nnz == flat_m.numel():
        return mask.clone(), changed.view_as(mask)
    kept_idx = flat_m.nonzero().squeeze(1)
    drop = kept_idx[torch.topk(flat_w[kept_idx].abs(), n_move, largest=False, sorted=False).indices]
    new_m = flat_m.clone()
    new_m[drop] = False
    empty = (~new_m).nonzero().squeeze(1)
    grow = empty[torch.randperm(empty.numel(), generator=generator)[:n_move]]
    new_m[grow] = True
    changed[drop] = True
    changed[grow] = True
    with torch.no_grad():
        flat_w[changed] = 0.0  # pruned weights are gone; regrown ones start at 0 (no jump in the output)
    return new_m.view_as(mask), changed.view_as(mask)


def forward(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, n_out)`` of ``x`` ``(B, 1, 28, 28)``: ``h_{l+1} = relu(h_l (M_l * W_l)^T)``, no
    ReLU on the last layer. The mask in the forward gives off-mask weights zero gradient."""
    h = x.flatten(1)
    for i, (w, m) in enumerate(zip(weights, masks)):
        h = F.linear(h, w * m)
        if i < len(weights) - 1:
            h = F.relu(h)
    return h


def pack(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[dict]:
    """What is stored per task: per layer the fp16 values and int32 flat indices of the nonzeros."""
    out = []
    for w, m in zip(weights, masks):
        idx = m.flatten().nonzero().squeeze(1)
        out.append({"shape": tuple(w.shape), "values": w.detach().flatten()[idx].to(torch.float16),
                    "indices": idx.to(torch.int32)})
    return out


def packed_bytes(stored: Sequence[dict]) -> int:
    """Bytes of the stored values and indices (the shapes are the same for every task)."""
    return sum(s["values"].numel() * s["values"].element_size()
               + s["indices"].numel() * s["indices"].element_size() for s in stored)


def unpack(stored: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Dense float32 weights and bool masks decoded from :func:`pack`'s output."""
    weights, masks = [], []
    for s in stored:
        numel = s["shape"][0] * s["shape"][1]
        w = torch.zeros(numel)
        w[s["indices"].long()] = s["values"].float()
        m = torch.zeros(numel, dtype=torch.bool)
        m[s["indices"].long()] = True
        weights.append(w.view(s["shape"]))
        masks.append(m.view(s["shape"]))
    return weights, masks


# ----------------------------------------------------------------------------- one task

def train_task(stream, task: int, counts: Sequence[int], shapes: Sequence[tuple[int, int]], *,
               iterations: int, batch_size: int = 128, lr: float = 1e-3, zeta: float = 0.3,
               epochs: int = 5, seed: int = 0) -> dict:
    """Train task ``task``'s sparse network with SET; returns the stored form and statistics."""
    from supsup.rng import make_generator

    init_gen = make_generator(seed, "set_init", task)
    regrow_gen = make_generator(seed, "set_regrow", task)
    layers = [sparse_init(s, c, init_gen) for s, c in zip(shapes, counts)]
    weights = [w.clone().requires_grad_(True) for w, _ in layers]
    masks = [m for _, m in layers]
    opt = torch.optim.Adam(weights, lr=lr)
    epoch_len = max(1, iterations // epochs)
    rewires = 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(stream.train_batches(task, iterations, batch_size), start=1):
        loss = F.cross_entropy(forward(weights, masks, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # SET epoch boundary; not after the last step, which would leave regrown weights untrained
        if step % epoch_len == 0 and step < iterations:
            for i, w in enumerate(weights):
                masks[i], changed = prune_regrow(w, masks[i], zeta, regrow_gen)
                # a rewired position starts afresh: clear its Adam moments too
                for v in opt.state[w].values():
                    if torch.is_tensor(v) and v.shape == w.shape:
                        v[changed] = 0.0
            rewires += 1
    seconds = time.perf_counter() - t0
    stored = pack(weights, masks)
    return {"stored": stored, "train_seconds": seconds, "rewires": rewires, "last_loss": float(loss.detach()),
            "nnz_per_layer": [int(m.sum()) for m in masks]}


@torch.no_grad()
def evaluate(stream, task: int, stored: Sequence[dict], batch_size: int = 128) -> float:
    """Test accuracy of task ``task`` with its own decoded network (task id given: GG)."""
    weights, masks = unpack(stored)
    correct = total = 0
    for x, y in stream.test_batches(task, batch_size):
        correct += int((forward(weights, masks, x).argmax(1) == y).sum())
        total += y.numel()
    return correct / total


# ----------------------------------------------------------------------------- driver

def run(data: dict[str, torch.Tensor], *, tasks: int = 10, iterations: int = 1000, batch_size: int = 128,
        lr: float = 1e-3, zeta: float = 0.3, epochs: int = 5, seed: int = 0) -> dict:
    """Train and evaluate one SET network per task; returns every number."""
    from supsup.data.streams import create_stream

    t_start = time.perf_counter()
    ref = supsup_bytes("fc1024", 500)
    shapes = linear_shapes("fc1024", 10)
    budget_weights = ref["bytes_per_task"] // BYTES_PER_WEIGHT
    counts = erdos_renyi_counts(shapes, budget_weights)
    stream = create_stream("permuted_mnist", data, num_tasks=tasks, seed=seed)
    per_task = []
    for t in range(tasks):
        r = train_task(stream, t, counts, shapes, iterations=iterations, batch_size=batch_size, lr=lr,
                       zeta=zeta, epochs=epochs, seed=seed)
        nbytes = packed_bytes(r["stored"])
        if nbytes > ref["bytes_per_task"]:
            raise AssertionError(f"task {t} stores {nbytes} bytes > SupSup's {ref['bytes_per_task']}")
        per_task.append({"task": t, "test_accuracy": evaluate(stream, t, r["stored"]), "bytes": nbytes,
                         "nnz_per_layer": r["nnz_per_layer"], "train_seconds": r["train_seconds"],
                         "rewires": r["rewires"], "last_train_loss": r["last_loss"]})
        print(f"task {t}: acc {per_task[-1]['test_accuracy']:.4f}, {nbytes} B, "
              f"{r['train_seconds']:.1f} s", flush=True)
    accs = [p["test_accuracy"] for p in per_task]
    return {
        "benchmark": "permuted_mnist", "scenario": "GG (task id given; one network per task)",
        "tasks": tasks, "iterations": iterations, "batch_size": batch_size, "optimizer": "Adam", "lr": lr,
        "zeta": zeta, "epochs_per_task": epochs, "steps_per_epoch": max(1, iterations // epochs), "seed": seed,
        "layer_shapes": [list(s) for s in shapes],
        "nnz_per_layer": counts, "density_per_layer": [c / (a * b) for c, (a, b) in zip(counts, shapes)],
        "nnz_per_task": sum(counts),
        "accounting": {
            "set_bytes_per_weight": BYTES_PER_WEIGHT, "value_bytes": VALUE_BYTES, "index_bytes": INDEX_BYTES,
            "set_value_bytes_per_task": VALUE_BYTES * sum(counts),
            "set_index_bytes_per_task": INDEX_BYTES * sum(counts),
            "set_bytes_per_task": BYTES_PER_WEIGHT * sum(counts),
            "budget_weights": budget_weights,
            "supsup": ref,
        },
        "bytes_per_task": max(p["bytes"] for p in per_task),
        "supsup_bytes_per_task": ref["bytes_per_task"],
        "per_task": per_task,
        "test_accuracy_per_task": accs,
        "mean_test_accuracy": sum(accs) / len(accs),
        "train_seconds_per_task": sum(p["train_seconds"] for p in per_task) / len(per_task),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "total_seconds": time.perf_counter() - t_start,
    }


def supsup_reference() -> dict | None:
    """SupSup's own FC 1024 PermutedMNIST result, if the reproduction run left one (for the table)."""
    path = RESULTS / "reproduce" / "fc1024_250" / "results.json"
    try:
        res = json.loads(path.read_text())
        return {"path": str(path.relative_to(ROOT)), "num_tasks": res.get("num_tasks"),
                "mean_acc_given_task": res.get("mean_acc_given_task")}
    except (OSError, ValueError, AttributeError):
        return None


def markdown(res: dict, command: str) -> str:
    """A short report: accounting, per-task accuracy and time."""
    acc = res["accounting"]
    sup = acc["supsup"]
    lines = [
        "# SET (sparse evolutionary training) at SupSup's memory per task, PermutedMNIST (GG)", "",
        "Produced by:", "", "```", command, "```", "",
        f"{res['machine']}; {res['total_seconds']:.0f} s in all. One sparse FC "
        + "-".join(str(s[1]) for s in res["layer_shapes"]) + f"-{res['layer_shapes'][-1][0]} network per task, "
        f"{res['iterations']} Adam steps (lr {res['lr']}, batch {res['batch_size']}), prune/regrow "
        f"zeta={res['zeta']} every {res['steps_per_epoch']} steps, seed {res['seed']}.", "",
        "## Bytes per task", "",
        "| | bytes |", "|---|---|",
        f"| SupSup: 1 bit per weight of {sup['backbone']} with {sup['num_outputs']} outputs "
        f"(packed_nbytes per layer: {' + '.join(str(b) for b in sup['bytes_per_layer'])}) | {sup['bytes_per_task']:,} |",
        f"| SET budget: floor({sup['bytes_per_task']:,} / {acc['set_bytes_per_weight']}) = "
        f"{acc['budget_weights']:,} weights | - |",
        f"| SET stored: {res['nnz_per_task']:,} nonzeros x ({acc['value_bytes']} B fp16 value + "
        f"{acc['index_bytes']} B int32 index) | {res['bytes_per_task']:,} |", "",
        "Nonzeros per layer (Erdős–Rényi): " + ", ".join(
            f"{c:,} of {a * b:,} ({d:.2%})" for c, (a, b), d in
            zip(res["nnz_per_layer"], res["layer_shapes"], res["density_per_layer"])) + ". A dense layer is "
        "charged 6 B per weight like the others although its indices are redundant (a conservative choice "
        "against SET: as plain fp16 it would free 4 B per weight).", "",
        "## Test accuracy (task id given)", "",
        "| task | test acc. | bytes | train s |", "|---|---|---|---|",
    ]
    for p in res["per_task"]:
        lines.append(f"| {p['task']} | {p['test_accuracy']:.4f} | {p['bytes']:,} | {p['train_seconds']:.1f} |")
    lines.append(f"| **mean** | **{res['mean_test_accuracy']:.4f}** | | {res['train_seconds_per_task']:.1f} |")
    ref = res.get("supsup_reference")
    if ref and ref.get("mean_acc_given_task") is not None:
        lines += ["", f"For comparison, SupSup with the same per-task bytes (`{ref['path']}`, FC 1024, "
                  f"{ref['num_tasks']} tasks, settings in its `config.yaml`): mean accuracy with the task given "
                  f"{ref['mean_acc_given_task']:.4f}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, data: dict[str, torch.Tensor] | None = None) -> dict:
    """Parse ``argv``, run, write the JSON (and the Markdown beside it); returns the results.
    ``data`` (MNIST as :func:`supsup.data.mnist.load_mnist` returns it) skips loading."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, help="PermutedMNIST tasks (default 10, --quick 3)")
    p.add_argument("--iterations", type=int, help="steps per task (default 1000, --quick 200)")
    p.add_argument("--quick", action="store_true", help="3 tasks of 200 steps")
    p.add_argument("--json", help="write the results here (default benchmarks/results/set_baseline.json)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--zeta", type=float, default=0.3, help="fraction pruned and regrown per epoch")
    p.add_argument("--epochs", type=int, default=5, help="SET epochs per task (a prune/regrow between two)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # shared 2-core machine; also keeps the run bitwise reproducible
    tasks = a.tasks if a.tasks is not None else (3 if a.quick else 10)
    iterations = a.iterations if a.iterations is not None else (200 if a.quick else 1000)
    if data is None:
        from supsup.data.mnist import load_mnist

        data = load_mnist(progress=False)
    res = run(data, tasks=tasks, iterations=iterations, lr=a.lr, zeta=a.zeta, epochs=a.epochs, seed=a.seed)
    res["quick"] = a.quick
    res["supsup_reference"] = supsup_reference()
    path = Path(a.json) if a.json else RESULTS / "set_baseline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    args = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    path.with_suffix(".md").write_text(markdown(res, f"python benchmarks/set_baseline.py {args}".rstrip()))
    print(f"mean GG test accuracy {res['mean_test_accuracy']:.4f}; {res['bytes_per_task']:,} B per task "
          f"(SupSup {res['supsup_bytes_per_task']:,} B); {res['train_seconds_per_task']:.1f} s per task")
    return res


if __name__ == "__main__":
    main()
