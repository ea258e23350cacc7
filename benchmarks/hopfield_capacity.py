"""How many masks a HopSupSup Hopfield store holds: Storkey against Hebbian, random patterns
and masks learned on real MNIST, against the classical capacity estimates.

    python benchmarks/hopfield_capacity.py [--tasks 2,3,5,7,10,15,20] [--benchmark permuted_mnist]
        [--random 50,100,...] [--out benchmarks/results/hopsupsup] [--threads 1]

1. Random patterns (``d = 2048``, one layer of the HopSupSup network): ``P`` random +-1
   patterns stored; a pattern counts as recalled when the sign dynamics started from it with
   10% of its entries flipped end exactly on it.
2. Learned masks: HopSupSup's network (784-2048-2048, SplitMNIST's recipe: 1 epoch per task,
   SGD lr 0.1) learns a stream of tasks; after ``P`` tasks every task's mask is recovered from
   its unlabelled test images (batches of 64, at most ``--eval-batches``) as in a run, with the
   masks kept by a Storkey store and by a Hebbian store (the same masks: training does not
   depend on the rule). Reported: accuracy with the recovered mask, with the mask as learned, and
   how often the recovered mask is nearest to the task's own.

Writes ``OUT/capacity.json`` (resumable: finished points are kept), ``OUT/capacity.md`` and
``OUT/capacity.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from supsup.backbones.registry import signed_constant
from supsup.data import STREAMS, create_stream
from supsup.hopfield import HopfieldStore, capacity_estimates, recall
from supsup.hopsupsup import (
    NeuronMaskNet,
    binary_masks,
    evaluate_neuron_masks,
    evaluation_batches,
    hamming,
    recover_masks,
    scores_for,
    train_neuron_masks,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ("storkey", "hebbian")


def random_capacity(d: int, counts: list[int], seed: int, flip: float = 0.1) -> dict:
    """Fraction of ``P`` random patterns recalled exactly from ``flip`` corruption, per rule."""
    out = {rule: {} for rule in RULES}
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (max(counts), d), generator=g).float() * 2 - 1
    noise = torch.rand(max(counts), d, generator=g) < flip
    for rule in RULES:
        store = HopfieldStore(d, rule)
        for p in range(max(counts)):
            store.store((patterns[p] > 0).float())
            if p + 1 in counts:
                stored = patterns[: p + 1]
                final, _ = recall(store.W, torch.where(noise[: p + 1], -stored, stored))
                fixed, _ = recall(store.W, stored, max_steps=1)
                out[rule][str(p + 1)] = {"recalled": float((final == stored).all(1).float().mean()),
                                    "fixed_points": float((fixed == stored).all(1).float().mean())}
    return out


def all_layers(finals: list[torch.Tensor], stacked: list[torch.Tensor]) -> float:
    """Fraction of tasks whose patterns (``stacked[layer]`` ``(tasks, d)``) end in ``finals``
    exactly, in every layer."""
    ok = torch.ones(stacked[0].shape[0], dtype=torch.bool)
    for final, patterns in zip(finals, stacked):
        ok &= (final == patterns).all(1)
    return float(ok.float().mean())


def learned_capacity(args, results: dict, save) -> None:
    """Train tasks one by one; at each count in ``args.tasks`` recover every task with both stores."""
    data = STREAMS.get(args.benchmark).load_data(None, progress=False)
    stream = create_stream(args.benchmark, data, num_tasks=max(args.tasks), seed=args.seed, device="cpu")
    net = NeuronMaskNet(784, [2048, 2048], stream.num_classes, seed=args.seed, rule="storkey",
                        weight_init=signed_constant)
    hebbian = [HopfieldStore(2048, "hebbian") for _ in range(2)]
    learned: list[list[torch.Tensor]] = []
    done = results.setdefault("learned", {})
    train_seconds = 0.0
    for t in range(max(args.tasks)):
        t0 = time.perf_counter()
        steps = stream.num_samples(t, "train") // 128
        scores, _ = train_neuron_masks(net, stream.train_batches(t, steps, 128), lr=0.1, momentum=0.9,
                                       weight_decay=1e-4)
        net.store_task(scores)
        masks = binary_masks(scores)
        for store, mask in zip(hebbian, masks):
            store.store(mask)
        learned.append(masks)
        train_seconds += time.perf_counter() - t0
        n = t + 1
        if n not in args.tasks or str(n) in done:
            continue
        point = {"train_seconds_so_far": train_seconds}
        storkey_stores = list(net.stores)
        for rule, stores in (("storkey", storkey_stores), ("hebbian", hebbian)):
            net.stores = torch.nn.ModuleList(stores)
            accs, given, nearest, dist, secs = [], [], [], [], []
            for task in range(n):
                pos = evaluation_batches(stream.num_samples(task, "test"), 64, args.seed, task)[: args.eval_batches]
                batches = [stream.batch(task, "test", p) for p in pos]
                rec = recover_masks(net, [x for x, _ in batches])
                c, total = evaluate_neuron_masks(net, batches, rec.scores)
                cg, _ = evaluate_neuron_masks(net, batches, scores_for(learned[task]))
                d = [hamming(rec.masks(), learned[j]) for j in range(n)]
                accs.append(c / total)
                given.append(cg / total)
                nearest.append(min(range(n), key=lambda j: (d[j], j)) == task)
                dist.append(d[task])
                secs.append(rec.seconds)
            # is the store at fault? each layer's learned patterns as fixed points of the sign
            # dynamics, and recalled from 10% flipped entries
            stacked = [torch.stack([2 * learned[j][k] - 1 for j in range(n)]) for k in range(2)]
            noisy_start = [torch.where(torch.rand(p.shape, generator=torch.Generator().manual_seed(n + k)) < 0.1, -p, p)
                           for k, p in enumerate(stacked)]
            fixed = all_layers([recall(stores[k].W, stacked[k], max_steps=1)[0] for k in range(2)], stacked)
            noisy = all_layers([recall(stores[k].W, noisy_start[k])[0] for k in range(2)], stacked)
            point[rule] = {"acc_recovered": sum(accs) / n, "store_fixed_points": fixed, "store_recall_10pct": noisy, "acc_learned_mask": sum(given) / n,
                           "nearest_is_own": sum(nearest) / n, "mean_hamming_to_own": sum(dist) / n,
                           "exact_recoveries": sum(1 for x in dist if x == 0) / n,
                           "recovery_seconds": sum(secs) / n}
        net.stores = torch.nn.ModuleList(storkey_stores)
        masks = torch.stack([torch.cat(m) for m in learned])
        point["mean_fraction_on"] = float(masks.mean())
        point["mean_pairwise_overlap"] = float(((2 * masks - 1) @ (2 * masks - 1).T).fill_diagonal_(0).sum()
                                               / (n * (n - 1) * masks.shape[1])) if n > 1 else None
        done[str(n)] = point
        print(f"{n} tasks: " + ", ".join(f"{r} acc {point[r]['acc_recovered']:.4f} own {point[r]['nearest_is_own']:.2f}"
                                         for r in RULES), flush=True)
        save()


def write_report(args, results: dict, out: Path, command: str) -> None:
    est = capacity_estimates(2048)
    lines = ["# HopSupSup: Hopfield capacity, Storkey against Hebbian", "", "Produced by:", "", "```", command, "```", "",
             f"{results['date']}, {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}.", "",
             "Classical estimates for d = 2048 neurons: Hebbian with few errors 0.138 d = "
             f"{est['hebbian_0.138d']:.0f}, Hebbian exact d / (2 ln d) = {est['hebbian_exact']:.0f}, "
             f"Storkey d / sqrt(2 ln d) = {est['storkey']:.0f} patterns.", "",
             "## Random patterns (d = 2048, recall from 10% flipped entries, sign dynamics)", "",
             "| patterns | Storkey recalled | Storkey fixed points | Hebbian recalled | Hebbian fixed points |",
             "|---|---|---|---|---|"]
    rnd = results["random"]
    for p in sorted(int(k) for k in rnd["storkey"]):
        s, h = rnd["storkey"][str(p)], rnd["hebbian"][str(p)]
        lines.append(f"| {p} | {s['recalled']:.3f} | {s['fixed_points']:.3f} | {h['recalled']:.3f} | {h['fixed_points']:.3f} |")
    lines += ["", f"## Masks learned on {args.benchmark} (HopSupSup's recovery from each task's unlabelled test images)", "",
              f"784-2048-2048 network, 1 epoch per task (batch 128, SGD lr 0.1), recovery on at most "
              f"{args.eval_batches} batches of 64 test images per task. *own*: the recovered mask is nearest to the "
              "task's own; *exact*: it is the task's own.", "",
              "*fixed*: the learned masks are fixed points of the store's sign dynamics (every layer); *10%*: "
              "recalled by them from 10% flipped entries.", "",
              "| tasks stored | Storkey acc | own | exact | fixed | 10% | Hebbian acc | own | exact | fixed | 10% | "
              "acc with learned masks | masks' mean overlap |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(int(k) for k in results.get("learned", {})):
        p = results["learned"][str(n)]
        s, h = p["storkey"], p["hebbian"]
        ov = "-" if p["mean_pairwise_overlap"] is None else f"{p['mean_pairwise_overlap']:.3f}"
        lines.append(f"| {n} | {s['acc_recovered']:.4f} | {s['nearest_is_own']:.2f} | {s['exact_recoveries']:.2f} | "
                     f"{s['store_fixed_points']:.2f} | {s['store_recall_10pct']:.2f} | "
                     f"{h['acc_recovered']:.4f} | {h['nearest_is_own']:.2f} | {h['exact_recoveries']:.2f} | "
                     f"{h['store_fixed_points']:.2f} | {h['store_recall_10pct']:.2f} | "
                     f"{s['acc_learned_mask']:.4f} | {ov} |")
    lines += ["", "![capacity](capacity.png)", ""]
    (out / "capacity.md").write_text("\n".join(lines))
    plot(results, out / "capacity.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    est = capacity_estimates(2048)
    for rule, style in (("storkey", "-o"), ("hebbian", "--s")):
        rnd = results["random"][rule]
        ps = sorted(int(k) for k in rnd)
        a.plot(ps, [rnd[str(p)]["recalled"] for p in ps], style, label=rule)
        lrn = results.get("learned", {})
        ns = sorted(int(k) for k in lrn)
        if ns:
            b.plot(ns, [lrn[str(n)][rule]["acc_recovered"] for n in ns], style, label=f"{rule}: recovered mask")
    for name, x in est.items():
        a.axvline(x, color="gray", lw=0.8, ls=":")
        a.text(x, 0.5, name, rotation=90, fontsize=7, va="center")
    a.set(xlabel="random patterns stored (d = 2048)", ylabel="recalled exactly from 10% noise", title="random patterns")
    lrn = results.get("learned", {})
    ns = sorted(int(k) for k in lrn)
    if ns:
        b.plot(ns, [lrn[str(n)]["storkey"]["acc_learned_mask"] for n in ns], ":k", label="mask as learned")
    b.set(xlabel="tasks stored", ylabel="mean test accuracy", title="masks learned on MNIST")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=_ints, default=_ints("2,3,5,7,10,15,20"))
    p.add_argument("--random", type=_ints, default=_ints("50,100,150,200,250,300,400,500,600,800"))
    p.add_argument("--benchmark", default="permuted_mnist", choices=["permuted_mnist", "rotated_mnist"])
    p.add_argument("--eval-batches", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hopsupsup")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "capacity.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    command = "python benchmarks/hopfield_capacity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results.update({"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})

    def save() -> None:
        path.write_text(json.dumps(results, indent=1) + "\n")

    if "random" not in results:
        results["random"] = random_capacity(2048, args.random, args.seed)
        save()
    learned_capacity(args, results, save)
    save()
    write_report(args, results, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
