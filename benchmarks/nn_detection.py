"""How well NN task detection separates new tasks from seen ones, as the bank grows.

    python benchmarks/nn_detection.py RUN_DIR [--n 5 20 100 250 500] [--batches 6] [--threads 1]
    python benchmarks/nn_detection.py RUN_DIR --first-batches 900 [--threads 1]

RUN_DIR holds a GG or GN run of the stream (``checkpoint.pt`` and ``config.yaml``, e.g.
``runs/reproduce/lenet_2500_gn``): its masks are what NN would learn if every task switch were
detected. NN's check (paper Sec. 3.6, :class:`supsup.detection.NNDetector`) computes
``ratio = n * max_i softmax(-d H / d alpha)_i`` over ``n`` candidate masks at ``alpha = 1/n``
and calls the batch a new task when ``ratio < nn.threshold``. This prints, for the first ``n``
masks of the bank:

* ``new``: the ratio on batches of a task no mask has seen (the last task of the stream);
* ``seen``: the ratio on batches of tasks ``n - 1`` and ``n // 2``, with their trained masks;
* ``after b``: a new mask trained ``b`` batches on the unseen task joins the candidates, and
  the ratio on that task's next batch (what NN's checks inside a task see). The mask starts
  from the scores NN itself would give it, those of task id ``n`` (seeded from (seed, "scores", n)), so
  a row does not depend on how many masks the checkpoint holds.

``--first-batches N`` measures instead the tail that decides whether NN misses a task: the ratio
over all ``k`` masks of the bank on the first batch of each of the last ``N`` unseen tasks (the
batch NN checks at a task switch), as quantiles and counts above candidate thresholds.

Every ``new`` must stay below the threshold and every ``seen`` / ``after b`` (b >= the config's
``nn.min_batches_per_task``) above it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _ratio(model, x: torch.Tensor, candidates) -> tuple[float, int]:
    """NN's statistic times n (uniform = 1), and the best candidate."""
    from supsup.detection import nn_detection_gradients

    grads, confidence = nn_detection_gradients(model, x, candidates)
    return confidence * grads.shape[0], int(grads.argmin())


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def _first_batch_tail(model, stream, tasks: range, batch_size: int, threshold: float) -> None:
    """Ratio over every banked mask on each unseen task's first batch: quantiles and tail counts."""
    k = model.num_banked_tasks
    candidates = model.candidates(num_banked=k)
    ratios = torch.tensor([_ratio(model, next(stream.train_batches(t, 1, batch_size))[0], candidates)[0]
                           for t in tasks])
    print(f"n = {k}: first batch of tasks {tasks.start}-{tasks.stop - 1} ({len(tasks)} unseen tasks), "
          f"nn.threshold in the config {threshold}")
    print(f"mean {ratios.mean():.4f}, std {ratios.std():.4f}, max {ratios.max():.4f}")
    print("| quantile | 0.5 | 0.9 | 0.99 | 0.999 |\n|---|---|---|---|---|")
    print("| ratio | " + " | ".join(f"{ratios.quantile(q):.4f}" for q in (0.5, 0.9, 0.99, 0.999)) + " |")
    cuts = (1.1, 1.125, 1.15, 1.175, 1.2)
    print("| threshold | " + " | ".join(f"{c}" for c in cuts) + " |\n|---|" + "---|" * len(cuts))
    print("| tasks missed (ratio >= threshold) | " + " | ".join(str(int((ratios >= c).sum())) for c in cuts) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a GG/GN run directory (checkpoint.pt, config.yaml)")
    p.add_argument("--n", type=int, nargs="+", default=[5, 20, 100, 250, 500], help="candidate counts")
    p.add_argument("--batches", type=int, default=6, help="batches per measurement")
    p.add_argument("--trained", type=int, nargs="+", default=[100, 200, 1000],
                   help="batches a fresh mask trains on the unseen task before the 'after b' checks")
    p.add_argument("--first-batches", type=int, default=0, metavar="N",
                   help="only measure the ratio at n = k on the first batch of each of the last N unseen tasks")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.first_batches < 0:
        p.error(f"--first-batches must be >= 0, got {a.first_batches}")
    torch.set_num_threads(a.threads)

    from supsup import masks as M
    from supsup.candidates import Candidates
    from supsup.checkpoint import load_checkpoint
    from supsup.config import load_config
    from supsup.experiment import build_model, build_stream
    from supsup.training import make_optimizer, train_loss

    cfg = load_config(a.run / "config.yaml")
    device = torch.device("cpu")
    model = build_model(cfg, device)
    tensors, _ = load_checkpoint(a.run)
    model.load_bank_state({k: v for k, v in tensors.items() if k.startswith("bank.")})
    stream = build_stream(cfg, device, progress=False)
    k = model.num_banked_tasks
    if a.first_batches:
        first = max(k, cfg.benchmark.num_tasks - a.first_batches)
        if first >= cfg.benchmark.num_tasks:
            p.error(f"every task of {a.run} is learned: no unseen task to measure")
        _first_batch_tail(model, stream, range(first, cfg.benchmark.num_tasks), cfg.train.batch_size,
                          cfg.nn.threshold)
        return 0
    sizes = [n for n in a.n if 2 <= n <= k]
    if not sizes:
        p.error(f"{a.run} holds {k} masks: pass --n values between 2 and {k}")
    unseen = cfg.benchmark.num_tasks - 1
    if unseen < k:
        p.error(f"every task of {a.run} is learned: no unseen task to measure 'new' on")
    bs = cfg.train.batch_size
    new_x = [x for x, _ in stream.train_batches(unseen, a.batches, bs)]

    print(f"{a.run}: {k} masks, nn.threshold in its config {cfg.nn.threshold}; ratio = n * max softmax(-grad)")
    print("| n | new task | seen task (its mask found) | " + " | ".join(f"after {b}" for b in a.trained) + " |")
    print("|---|---|---|" + "---|" * len(a.trained))
    model.add_task()  # puts the model in TRAIN mode for the 'after b' rows; the bank is read, never written
    for n in sizes:
        banked = model.candidates(num_banked=n)
        new = [_ratio(model, x, banked)[0] for x in new_x]
        seen, found = [], 0
        for task in (n - 1, n // 2):
            for x, _ in stream.train_batches(task, a.batches // 2 or 1, bs):
                r, best = _ratio(model, x, banked)
                seen.append(r)
                found += best == task
        # NN's next mask after n masks has id n: the scores it would start from
        for layer, scores in zip(model.masked_layers, model.initial_scores(n)):
            layer.set_scores(scores)
        opt = make_optimizer(model.trainable_parameters(), cfg.train)
        batches = stream.train_batches(unseen, max(a.trained) + len(a.trained), bs)
        after, steps = [], 0
        for b in sorted(a.trained):
            while steps < b:
                x, y = next(batches)
                model.train_mode()
                loss = train_loss(model, x, y, cfg.train.precision)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            with_new = Candidates(tuple((layer.bank_rows[:n], M.pack_bits(layer.current_mask()).unsqueeze(0))
                                        for layer in model.masked_layers), (*range(n), None), banked=n)
            r, best = _ratio(model, next(batches)[0], with_new)  # a batch it has not trained on
            after.append(f"{r:.3f}" + ("" if best == n else " (mask not found)"))
        print(f"| {n} | {_span(new)} | {_span(seen)} ({found}/{len(seen)}) | " + " | ".join(after) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
