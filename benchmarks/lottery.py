"""Masks chosen by a criterion from a trained dense network, and lottery tickets, on MNIST.

Two experiments on the fully connected LeNet 784-300-100-10 (bias-free Linear + ReLU, as
``supsup.backbones.create_backbone("lenet_300_100", num_outputs=10)``):

1. **Supermasks from a trained network** (Zhou et al. 2019, "Deconstructing Lottery Tickets:
   Zeros, Signs, and the Supermask"). The net starts at Kaiming-normal (fan_in) weights ``w_i``
   drawn from a local generator and is trained densely with Adam to ``w_f``. For every kept
   fraction ``p`` and mask criterion (``large_final``: largest ``|w_f|``; ``magnitude_increase``:
   largest ``|w_f| - |w_i|``; ``large_final_same_sign``: largest ``|w_f|`` among weights with
   ``sign(w_f) == sign(w_i)``; ``random``: a uniformly random mask, the control) a mask ``M`` is
   derived per layer and evaluated **without any training** on the MNIST test set, applied to
   the initial weights ``M * w_i`` and to signed constants ``M * sign(w_i) * std_l``
   (``std_l = sqrt(2 / fan_in)``, the layer's init std). ``M * w_f`` is reported too, for scale.
2. **Lottery tickets** (Frankle & Carbin 2019): iterative magnitude pruning with rewinding to
   ``w_i``: train, prune the smallest ``rate`` of the remaining weights per layer (the output
   layer at half that rate), rewind the survivors to ``w_i``, retrain; test accuracy per round.

Kept-fraction rule: hidden layers keep ``p`` of their weights, the output layer keeps
``min(1, 2 p)`` (Zhou et al. prune the 1000 output weights less, as Frankle & Carbin do; ``--last``
``half_prune`` uses their ``1 - (1 - p) / 2`` instead).

    python benchmarks/lottery.py [--quick] [--json PATH] [--seed 0]

Without ``--json`` it writes ``benchmarks/results/lottery.json`` and ``lottery.md``; with it, the
JSON to ``PATH`` and the table beside it (``PATH`` with suffix ``.md``). ``--quick`` trains for
1000 steps instead of 10000 and runs 2 pruning rounds instead of 5 (well under a minute).
Everything runs on 1 CPU thread; every random draw (init, batch order, random masks) comes from a
local generator derived from ``--seed``.
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

CRITERIA = ("large_final", "magnitude_increase", "large_final_same_sign", "random")
#: the weights a mask is applied to, without training (``final`` is only a reference column)
WEIGHTINGS = ("initial", "signed_constant")
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
LAST_RULES = ("double_keep", "half_prune")

#: published reference, Zhou et al. 2019 (MNIST FC, best over kept fractions)
ZHOU_REFERENCE = {"large_final_same_sign_initial": 0.80, "large_final_same_sign_signed_constant": 0.86}

Weights = list[torch.Tensor]


# ----------------------------------------------------------------------------- data and net

def prepare(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten and normalise MNIST once: ``x`` float ``(N, 784)`` = ``(x / 255 - 0.1307) / 0.3081``,
    ``y`` int64 ``(N,)``, for the train and test splits."""
    def norm(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - 0.1307) / 0.3081).reshape(images.shape[0], -1)

    return {"x_train": norm(data["train_images"]), "y_train": data["train_labels"],
            "x_test": norm(data["test_images"]), "y_test": data["test_labels"]}


def initial_weights(seed: int) -> Weights:
    """``w_i``: the LeNet 300-100 weights ``[(300, 784), (100, 300), (10, 100)]``, Kaiming normal
    (fan_in, ReLU gain) from the local generator ``(seed, "lottery_init")``."""
    from supsup.backbones import create_backbone
    from supsup.backbones.registry import init_weights
    from supsup.rng import make_generator

    net = create_backbone("lenet_300_100", num_outputs=10)
    init_weights(net, "kaiming_normal", make_generator(seed, "lottery_init"))
    return [m.weight.detach().clone() for m in net.modules() if isinstance(m, nn.Linear)]


def init_stds(weights: Weights) -> list[float]:
    """The std each layer was drawn with: ``std_l = sqrt(2 / fan_in)`` (Kaiming, ReLU gain)."""
    return [math.sqrt(2.0 / w.shape[1]) for w in weights]


def forward(weights: Weights, x: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits ``(B, 10)`` of the bias-free MLP: ``h_{l+1} = relu(h_l (M_l * W_l)^T)``, no ReLU on
    the last layer; ``x`` is ``(B, 784)``."""
    h = x
    for i, w in enumerate(weights):
        h = F.linear(h, w if masks is None else w * masks[i])
        if i < len(weights) - 1:
            h = F.relu(h)
    return h


@torch.no_grad()
def accuracy(weights: Weights, x: torch.Tensor, y: torch.Tensor,
             masks: Sequence[torch.Tensor] | None = None, batch: int = 2500) -> float:
    """Top-1 accuracy of ``forward(weights, x, masks)`` on ``(x, y)``."""
    correct = 0
    for s in range(0, x.shape[0], batch):
        correct += int((forward(weights, x[s:s + batch], masks).argmax(1) == y[s:s + batch]).sum())
    return correct / x.shape[0]


def train(start: Weights, d: dict[str, torch.Tensor], *, steps: int, batch: int, lr: float,
          generator: torch.Generator, masks: Sequence[torch.Tensor] | None = None) -> Weights:
    """Adam on the cross-entropy from ``start`` for ``steps`` batches of ``batch`` (reshuffled
    every epoch by ``generator``); with ``masks`` the pruned weights stay at zero.

    The mask sits in the forward (``W * M``), so pruned weights get zero gradient and a fresh Adam
    never moves them; they are also zeroed on return so the result is the ticket itself.
    """
    params = [w.clone().requires_grad_(True) for w in start]
    opt = torch.optim.Adam(params, lr=lr)
    n = d["x_train"].shape[0]
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(forward(params, d["x_train"][idx], masks), d["y_train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = [p.detach().clone() for p in params]
    return out if masks is None else [w * m for w, m in zip(out, masks)]


# ----------------------------------------------------------------------------- mask criteria

def layer_fractions(p: float, num_layers: int, last: str = "double_keep") -> list[float]:
    """Kept fraction per layer: ``p`` for the hidden layers; the output layer keeps ``min(1, 2p)``
    (``double_keep``) or is pruned at half the rate, ``1 - (1 - p) / 2`` (``half_prune``)."""
    if last not in LAST_RULES:
        raise ValueError(f"unknown last-layer rule {last!r}; known: {LAST_RULES}")
    p_last = min(1.0, 2 * p) if last == "double_keep" else 1 - (1 - p) / 2
    return [p] * (num_layers - 1) + [p_last]


def keep_count(fraction: float, numel: int) -> int:
    """``round(fraction * numel)`` clipped to ``[1, numel]``: the exact number of kept weights."""
    return max(1, min(numel, int(round(fraction * numel))))


def top_k_mask(score: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask with ones at the ``k`` largest entries of ``score`` (signed, not ``|score|``)
    among ``eligible`` ones; fewer when fewer are eligible, so an ineligible weight is never kept."""
    flat = score.flatten().double()
    if eligible is not None:
        flat = flat.masked_fill(~eligible.flatten(), -math.inf)
        k = min(k, int(eligible.sum()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(score)


def criterion_mask(criterion: str, w_i: torch.Tensor, w_f: torch.Tensor, k: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One layer's mask of ``k`` kept weights (same shape as ``w_i``) by a Zhou et al. criterion.

    * ``large_final``: score ``|w_f|``;
    * ``magnitude_increase``: score ``|w_f| - |w_i|``;
    * ``large_final_same_sign``: score ``|w_f|``, only weights with ``sign(w_f) == sign(w_i)``
      eligible (if fewer than ``k`` kept their sign, all of those and no others are kept);
    * ``random``: ``k`` positions uniformly at random from ``generator``.
    """
    if criterion == "large_final":
        return top_k_mask(w_f.abs(), k)
    if criterion == "magnitude_increase":
        return top_k_mask(w_f.abs() - w_i.abs(), k)
    if criterion == "large_final_same_sign":
        same = (torch.sign(w_f) == torch.sign(w_i)) & (w_f != 0)
        return top_k_mask(w_f.abs(), k, eligible=same)
    if criterion == "random":
        if generator is None:
            raise ValueError("the random criterion needs a generator")
        mask = torch.zeros(w_i.numel(), dtype=torch.bool)
        mask[torch.randperm(w_i.numel(), generator=generator)[:k]] = True
        return mask.view_as(w_i)
    raise ValueError(f"unknown criterion {criterion!r}; known: {CRITERIA}")


def criterion_masks(criterion: str, w_i: Weights, w_f: Weights, p: float, *, last: str = "double_keep",
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Masks for every layer at kept fraction ``p`` (per layer, by :func:`layer_fractions`)."""
    fracs = layer_fractions(p, len(w_i), last)
    return [criterion_mask(criterion, a, b, keep_count(f, a.numel()), generator)
            for a, b, f in zip(w_i, w_f, fracs)]


def signed_constants(w_i: Weights) -> Weights:
    """``sign(w_i) * std_l`` per layer: Zhou et al.'s "signed constant" reparametrisation."""
    return [torch.sign(w) * s for w, s in zip(w_i, init_stds(w_i))]


def one_shot_table(w_i: Weights, w_f: Weights, d: dict[str, torch.Tensor], fractions: Sequence[float],
                   *, seed: int, last: str) -> list[dict]:
    """One row per (criterion, p): kept fractions per layer and test accuracy of the untrained
    masked initial weights, masked signed constants and (reference) masked final weights."""
    from supsup.rng import make_generator

    consts = signed_constants(w_i)
    rows = []
    for criterion in CRITERIA:
        for j, p in enumerate(fractions):
            gen = make_generator(seed, "lottery_random_mask", j) if criterion == "random" else None
            masks = criterion_masks(criterion, w_i, w_f, p, last=last, generator=gen)
            flips = [int((m & (torch.sign(a) != torch.sign(b))).sum()) for m, a, b in zip(masks, w_i, w_f)]
            rows.append({
                "criterion": criterion, "p": p,
                "kept_fraction_per_layer": [float(m.float().mean()) for m in masks],
                "kept_fraction_total": sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks),
                "kept_sign_flipped": sum(flips),
                "initial": accuracy(w_i, d["x_test"], d["y_test"], masks),
                "signed_constant": accuracy(consts, d["x_test"], d["y_test"], masks),
                "final": accuracy(w_f, d["x_test"], d["y_test"], masks),
            })
    return rows


# ----------------------------------------------------------------------------- lottery tickets

def prune_smallest(w: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """New mask: drop ``round(rate * kept)`` of the kept weights with the smallest ``|w|``."""
    kept = int(mask.sum())
    return top_k_mask(w.abs(), kept - int(round(rate * kept)), eligible=mask)


def iterative_magnitude_pruning(w_i: Weights, d: dict[str, torch.Tensor], *, rounds: int, rate: float,
                                steps: int, batch: int, lr: float, seed: int,
                                w_f: Weights | None = None) -> list[dict]:
    """Frankle & Carbin's procedure: round 0 trains the dense net; each later round prunes
    ``rate`` of the surviving weights per layer by ``|w|`` after training (``rate / 2`` in the
    output layer), rewinds the survivors to ``w_i`` and retrains with the same step budget.
    Every round trains from the same batch order (generator ``(seed, "lottery_order")``)."""
    from supsup.rng import make_generator

    masks = [torch.ones_like(w, dtype=torch.bool) for w in w_i]
    rates = [rate] * (len(w_i) - 1) + [rate / 2]
    out = []
    trained = w_f
    for r in range(rounds + 1):
        if r > 0:
            masks = [prune_smallest(w, m, q) for w, m, q in zip(trained, masks, rates)]
        t0 = time.perf_counter()
        if trained is None or r > 0:
            trained = train(w_i, d, steps=steps, batch=batch, lr=lr, masks=None if r == 0 else masks,
                            generator=make_generator(seed, "lottery_order"))
        out.append({
            "round": r,
            "kept_fraction_per_layer": [float(m.float().mean()) for m in masks],
            "kept_fraction_total": sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks),
            "test_accuracy": accuracy(trained, d["x_test"], d["y_test"], masks),
            # the ticket before retraining: rewound weights under the round's mask, untrained
            "test_accuracy_untrained": accuracy(w_i, d["x_test"], d["y_test"], masks),
            "train_seconds": time.perf_counter() - t0,
        })
    return out


# ----------------------------------------------------------------------------- driver

def run(data: dict[str, torch.Tensor], *, seed: int = 0, steps: int = 10000, batch: int = 60,
        lr: float = 1.2e-3, fractions: Sequence[float] = FRACTIONS, last: str = "double_keep",
        imp_rounds: int = 5, imp_rate: float = 0.2) -> dict:
    """Both experiments; returns every number (see :func:`summary_keys` for the headline keys)."""
    from supsup.rng import make_generator

    t_start = time.perf_counter()
    d = prepare(data)
    w_i = initial_weights(seed)
    t0 = time.perf_counter()
    w_f = train(w_i, d, steps=steps, batch=batch, lr=lr, generator=make_generator(seed, "lottery_order"))
    dense_seconds = time.perf_counter() - t0
    rows = one_shot_table(w_i, w_f, d, fractions, seed=seed, last=last)
    imp = iterative_magnitude_pruning(w_i, d, rounds=imp_rounds, rate=imp_rate, steps=steps, batch=batch,
                                      lr=lr, seed=seed, w_f=w_f)
    out: dict = {
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "optimizer": "Adam",
        "fractions": list(fractions), "last_layer_rule": last,
        "last_layer_fractions": [layer_fractions(p, len(w_i), last)[-1] for p in fractions],
        "layer_shapes": [list(w.shape) for w in w_i], "init_stds": init_stds(w_i),
        "sign_flipped_fraction_per_layer": [float((torch.sign(a) != torch.sign(b)).float().mean())
                                            for a, b in zip(w_i, w_f)],
        "dense_initial_test_accuracy": accuracy(w_i, d["x_test"], d["y_test"]),
        "dense_trained_test_accuracy": accuracy(w_f, d["x_test"], d["y_test"]),
        "dense_train_seconds": dense_seconds,
    }
    for criterion in CRITERIA:
        for weighting in (*WEIGHTINGS, "final"):
            mine = [r for r in rows if r["criterion"] == criterion]
            best = max(mine, key=lambda r, w=weighting: r[w])
            out[f"{criterion}_{weighting}"] = best[weighting]
            out[f"{criterion}_{weighting}_best_p"] = best["p"]
    out["one_shot"] = rows
    out["imp"] = {"rate": imp_rate, "output_layer_rate": imp_rate / 2, "rounds": imp}
    out["reference_zhou2019"] = ZHOU_REFERENCE
    out["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    out["total_seconds"] = time.perf_counter() - t_start
    return out


def summary_keys() -> list[str]:
    """The headline keys: best test accuracy over kept fractions, per criterion x weighting."""
    return [f"{c}_{w}" for c in CRITERIA for w in WEIGHTINGS]


def markdown(res: dict, command: str) -> str:
    """A short report: best accuracies, the per-fraction table and the IMP rounds."""
    lines = [
        "# Supermasks from a trained network, and lottery tickets (LeNet 300-100, MNIST)", "",
        "Produced by:", "", "```", command, "```", "",
        f"{res['machine']}; {res['total_seconds']:.0f} s in all. Dense training: Adam lr {res['lr']}, "
        f"batch {res['batch']}, {res['steps']} steps, seed {res['seed']}: test accuracy "
        f"{res['dense_trained_test_accuracy']:.4f} (untrained {res['dense_initial_test_accuracy']:.4f}). "
        f"Kept fraction `p` in the hidden layers; the output layer keeps "
        + ("`min(1, 2p)`" if res["last_layer_rule"] == "double_keep" else "`1 - (1 - p) / 2`")
        + ". Masks are evaluated without training on the 10000 test images; \"best\" is the maximum over the "
        "kept fractions on that same test set, as Zhou et al. report it (an optimistic selection).", "",
        "## Best test accuracy over kept fractions (untrained)", "",
        "| criterion | `M * w_i` (initial) | `M * sign(w_i) * std` (signed constant) | `M * w_f` (reference) |",
        "|---|---|---|---|",
    ]
    for c in CRITERIA:
        cells = [f"{res[f'{c}_{w}']:.4f} (p={res[f'{c}_{w}_best_p']})" for w in (*WEIGHTINGS, "final")]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ref = res["reference_zhou2019"]
    lines += ["", f"Zhou et al. (2019) report about {ref['large_final_same_sign_initial']:.2f} (initial) and "
              f"{ref['large_final_same_sign_signed_constant']:.2f} (signed constant) for "
              "large_final_same_sign on MNIST FC.", "",
              "## Per kept fraction (initial / signed constant)", "",
              "| criterion | " + " | ".join(f"p={p}" for p in res["fractions"]) + " |",
              "|---|" + "---|" * len(res["fractions"])]
    for c in CRITERIA:
        mine = [r for r in res["one_shot"] if r["criterion"] == c]
        lines.append(f"| {c} | " + " | ".join(f"{r['initial']:.3f} / {r['signed_constant']:.3f}" for r in mine)
                     + " |")
    lines += ["", f"## Lottery tickets: iterative magnitude pruning, rewind to `w_i` (prune {res['imp']['rate']:.0%}"
              f" of the remaining weights per round, output layer {res['imp']['output_layer_rate']:.0%})", "",
              "| round | kept (total) | kept per layer | test acc. after retraining | ticket untrained |",
              "|---|---|---|---|---|"]
    for r in res["imp"]["rounds"]:
        per = ", ".join(f"{f:.3f}" for f in r["kept_fraction_per_layer"])
        lines.append(f"| {r['round']} | {r['kept_fraction_total']:.3f} | {per} | {r['test_accuracy']:.4f} | "
                     f"{r['test_accuracy_untrained']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, data: dict[str, torch.Tensor] | None = None) -> dict:
    """Parse ``argv``, run, write the JSON (and the Markdown beside it); returns the results.
    ``data`` (MNIST as :func:`supsup.data.mnist.load_mnist` returns it) skips loading."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1000 training steps, 2 pruning rounds")
    p.add_argument("--json", help="write the results here (default benchmarks/results/lottery.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps per run (default 10000, --quick 1000)")
    p.add_argument("--imp-rounds", type=int, help="pruning rounds after the dense one (default 5, --quick 2)")
    p.add_argument("--imp-rate", type=float, default=0.2, help="fraction pruned per round (output layer: half)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="kept fractions p")
    p.add_argument("--last", choices=LAST_RULES, default="double_keep", help="output-layer kept-fraction rule")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # shared 2-core machine; also keeps the run bitwise reproducible
    steps = a.steps if a.steps is not None else (1000 if a.quick else 10000)
    rounds = a.imp_rounds if a.imp_rounds is not None else (2 if a.quick else 5)
    if data is None:
        from supsup.data.mnist import load_mnist

        data = load_mnist(progress=False)
    res = run(data, seed=a.seed, steps=steps, fractions=a.fractions, last=a.last, imp_rounds=rounds,
              imp_rate=a.imp_rate)
    res["quick"] = a.quick
    path = Path(a.json) if a.json else RESULTS / "lottery.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    args = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    path.with_suffix(".md").write_text(markdown(res, f"python benchmarks/lottery.py {args}".rstrip()))
    print(json.dumps({k: round(res[k], 4) for k in summary_keys()}, indent=1))
    return res


if __name__ == "__main__":
    main()
