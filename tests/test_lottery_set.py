"""benchmarks/lottery.py (supermask criteria, lottery tickets) and benchmarks/set_baseline.py (SET at
SupSup's memory): the criteria on constructed weights, SET's prune/regrow and byte budget, and both
drivers end to end on tiny settings with real MNIST."""

from __future__ import annotations

import json

import pytest
import torch

from supsup.masks import packed_nbytes
from supsup.rng import make_generator


@pytest.fixture(scope="module")
def lottery(benchmark_driver):
    return benchmark_driver("lottery")


@pytest.fixture(scope="module")
def set_baseline(benchmark_driver):
    return benchmark_driver("set_baseline")


# ----------------------------------------------------------------------------- lottery criteria

# positions (flat):      0     1     2     3      4     5     6     7
W_I = torch.tensor([[2.9, -1.0, 1.0, -1.0], [0.5, 0.5, -0.5, -0.5]])
W_F = torch.tensor([[3.0, 2.0, -4.0, -0.1], [0.2, -5.0, -1.0, 1.0]])
# sign kept at 0, 3, 4, 6; |w_f| = 3, 2, 4, .1, .2, 5, 1, 1; |w_f| - |w_i| = .1, 1, 3, -.9, -.3, 4.5, .5, .5


def _kept(mask: torch.Tensor) -> set[int]:
    return set(mask.flatten().nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("criterion, expected", [
    ("large_final", {5, 2, 0}),
    ("magnitude_increase", {5, 2, 1}),
    ("large_final_same_sign", {0, 6, 4}),
])
def test_criteria_on_a_constructed_layer(lottery, criterion, expected):
    assert _kept(lottery.criterion_mask(criterion, W_I, W_F, 3)) == expected


def test_same_sign_never_keeps_a_flipped_weight_even_when_short(lottery):
    # 4 weights kept their sign; asking for 6 keeps those 4 and no flipped one
    assert _kept(lottery.criterion_mask("large_final_same_sign", W_I, W_F, 6)) == {0, 3, 4, 6}


def test_random_criterion_exact_count_and_reproducible(lottery):
    a = lottery.criterion_mask("random", W_I, W_F, 5, make_generator(0, "t", 0))
    b = lottery.criterion_mask("random", W_I, W_F, 5, make_generator(0, "t", 0))
    assert int(a.sum()) == 5 and torch.equal(a, b)
    with pytest.raises(ValueError):
        lottery.criterion_mask("random", W_I, W_F, 5)
    with pytest.raises(ValueError):
        lottery.criterion_mask("nope", W_I, W_F, 5)


def test_kept_fractions_exact_on_lenet_shapes(lottery):
    w_i = lottery.initial_weights(0)
    assert [tuple(w.shape) for w in w_i] == [(300, 784), (100, 300), (10, 100)]
    g = make_generator(0, "test_noise")
    w_f = [w + 0.05 * torch.randn(w.shape, generator=g) for w in w_i]  # some signs flip
    assert lottery.layer_fractions(0.3, 3) == [0.3, 0.3, 0.6]
    assert lottery.layer_fractions(0.7, 3) == [0.7, 0.7, 1.0]
    assert lottery.layer_fractions(0.5, 3, "half_prune") == [0.5, 0.5, 0.75]
    for criterion in lottery.CRITERIA:
        masks = lottery.criterion_masks(criterion, w_i, w_f, 0.3, generator=make_generator(0, "t"))
        for m, f in zip(masks, (0.3, 0.3, 0.6)):
            assert int(m.sum()) == round(f * m.numel())
        if criterion == "large_final_same_sign":
            for m, a, b in zip(masks, w_i, w_f):
                assert not (m & (torch.sign(a) != torch.sign(b))).any()


def test_signed_constants_and_prune_smallest(lottery):
    w_i = lottery.initial_weights(1)
    consts = lottery.signed_constants(w_i)
    for c, w, s in zip(consts, w_i, lottery.init_stds(w_i)):
        assert s == pytest.approx((2 / w.shape[1]) ** 0.5)
        assert torch.equal(c.abs(), torch.full_like(c, s)) and torch.equal(torch.sign(c), torch.sign(w))
    w = torch.arange(1.0, 11.0)
    m = torch.ones(10, dtype=torch.bool)
    m[9] = False
    new = lottery.prune_smallest(w, m, 0.2)  # 9 kept, drop round(1.8) = 2 smallest: 1 and 2
    assert _kept(new) == {2, 3, 4, 5, 6, 7, 8}


def test_lottery_main_tiny(lottery, mnist_data, tmp_path):
    path = tmp_path / "lottery.json"
    res = lottery.main(["--quick", "--steps", "60", "--imp-rounds", "1", "--fractions", "0.3",
                        "--json", str(path)], data=mnist_data)
    saved = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("# Supermasks")
    for key in lottery.summary_keys():
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == res[key]  # the file holds what was measured
    assert "large_final_same_sign_signed_constant" in saved
    assert len(saved["one_shot"]) == len(lottery.CRITERIA)
    rounds = saved["imp"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["kept_fraction_per_layer"] == pytest.approx([0.8, 0.8, 0.9], abs=1e-3)
    assert saved["dense_trained_test_accuracy"] > 0.5  # 60 Adam steps already learn MNIST


# ----------------------------------------------------------------------------- SET


def test_set_budget_matches_supsup_bytes(set_baseline):
    ref = set_baseline.supsup_bytes("fc1024", 500)
    shapes = [(1024, 784), (1024, 1024), (500, 1024)]
    assert ref["layer_shapes"] == [list(s) for s in shapes]
    assert ref["bytes_per_task"] == sum(packed_nbytes(a * b) for a, b in shapes) == 295_424
    budget = ref["bytes_per_task"] // set_baseline.BYTES_PER_WEIGHT
    set_shapes = set_baseline.linear_shapes("fc1024", 10)
    counts = set_baseline.erdos_renyi_counts(set_shapes, budget)
    assert sum(counts) == budget
    assert counts[2] == 10 * 1024  # the output layer would exceed density 1: dense
    # Erdős–Rényi: the sparse layers' counts are proportional to n_in + n_out
    assert counts[0] / counts[1] == pytest.approx((784 + 1024) / (2048), rel=1e-3)
    assert set_baseline.BYTES_PER_WEIGHT * sum(counts) <= ref["bytes_per_task"]


def test_prune_regrow_keeps_the_count(set_baseline):
    g = make_generator(0, "test_set")
    w, m = set_baseline.sparse_init((64, 50), 400, g)
    assert int(m.sum()) == 400 and not w[~m].any()
    w = w.clone()
    order = m.flatten().nonzero().squeeze(1)[w.flatten()[m.flatten()].abs().argsort()]
    smallest, largest = set(order[:120].tolist()), set(order[120:].tolist())  # round(0.3 * 400) = 120
    new_m, changed = set_baseline.prune_regrow(w, m, 0.3, g)
    assert int(new_m.sum()) == 400
    assert largest <= _kept(new_m)  # only the 120 smallest magnitudes were pruned
    dropped = _kept(m & ~new_m)
    # changed = pruned (120) + regrown (120) - regrown into a just-pruned position
    assert dropped <= smallest and len(dropped) == int(changed.sum()) - 120
    assert not w[changed].any() and not w[~new_m].any()  # regrown weights start at 0
    # a dense layer has nowhere to regrow: unchanged
    wd, md = set_baseline.sparse_init((4, 5), 20, g)
    md2, ch = set_baseline.prune_regrow(wd, md, 0.3, g)
    assert torch.equal(md2, md) and not ch.any()


def test_pack_roundtrip_and_bytes(set_baseline):
    g = make_generator(0, "test_pack")
    layers = [set_baseline.sparse_init(s, c, g) for s, c in (((30, 20), 50), ((10, 30), 300))]
    stored = set_baseline.pack([w for w, _ in layers], [m for _, m in layers])
    assert set_baseline.packed_bytes(stored) == 6 * 350
    weights, masks = set_baseline.unpack(stored)
    for (w, m), w2, m2 in zip(layers, weights, masks):
        assert torch.equal(m, m2)
        assert torch.equal(w.half().float(), w2)


def test_set_main_tiny(set_baseline, mnist_data, tmp_path):
    path = tmp_path / "set.json"
    res = set_baseline.main(["--tasks", "2", "--iterations", "20", "--json", str(path)], data=mnist_data)
    saved = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("# SET")
    assert saved["tasks"] == 2 and len(saved["test_accuracy_per_task"]) == 2
    assert saved["bytes_per_task"] <= saved["supsup_bytes_per_task"] == 295_424
    for p in saved["per_task"]:
        assert p["nnz_per_layer"] == saved["nnz_per_layer"]  # prune/regrow kept every layer's count
        assert p["rewires"] == 4 and p["bytes"] == 6 * saved["nnz_per_task"]
        assert p["test_accuracy"] > 0.3  # 20 steps on a permuted task: well above chance
    assert res["mean_test_accuracy"] == pytest.approx(sum(saved["test_accuracy_per_task"]) / 2)


def test_compare_takes_the_set_row_only_for_the_same_stream_steps_and_backbone(tmp_path, benchmark_driver):
    import argparse

    compare = benchmark_driver("compare")
    path = tmp_path / "set_baseline.json"
    path.write_text(json.dumps({"tasks": 10, "iterations": 1000, "seed": 0, "mean_test_accuracy": 0.95,
                                "total_seconds": 300.0, "bytes_per_task": 295422, "zeta": 0.3}))

    def args(**kw):
        base = {"benchmarks": ["permuted_mnist"], "backbone": "fc1024", "tasks": 10, "iterations": 1000, "seed": 0,
                "methods": ["supsup_gg"]}
        return argparse.Namespace(**{**base, **kw})

    a = args()
    (row,) = compare.set_rows(a, path)
    assert row["method"] == "set" and row["acc"] == 0.95 and row["forgetting"] == 0.0 and a.methods[-1] == "set"
    for other in ({"backbone": "lenet_300_100"}, {"tasks": 5}, {"iterations": 500}, {"seed": 1},
                  {"benchmarks": ["rotated_mnist"]}):
        assert compare.set_rows(args(**other), path) == [], other
    assert compare.set_rows(a, tmp_path / "absent.json") == []
