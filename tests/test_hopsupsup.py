"""HopSupSup: the Hopfield store, the neuron-mask network, recovery, and the runs on real MNIST."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supsup.config import ConfigError, load_config
from supsup.experiment import check_config, run_experiment
from supsup.hopfield import HopfieldStore, hebbian_update, recall, storkey_update
from supsup.hopsupsup import (
    NeuronMaskNet,
    batch_positions,
    mask_of,
    recover_masks,
    recovery_loss,
    train_neuron_masks,
)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "split_mnist_hopsupsup.yaml"


def random_patterns(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1


# ---------------------------------------------------------------------------- the store


def test_storkey_and_hebbian_matrices_match_hand_computation():
    # x1 = [1, 1, -1, -1], x2 = [1, -1, 1, -1] are orthogonal, so Storkey's local field of x2 is
    # h = W1 x2 = -x2 / 4 and W2 = (x1 x1^T + 1.5 x2 x2^T - 2 I) / 4; Hebbian: (x1 x1^T + x2 x2^T - 2 I) / 4
    x1 = torch.tensor([1.0, 1, -1, -1])
    x2 = torch.tensor([1.0, -1, 1, -1])
    eye = torch.eye(4)
    W = storkey_update(storkey_update(torch.zeros(4, 4), x1), x2)
    torch.testing.assert_close(W, (torch.outer(x1, x1) + 1.5 * torch.outer(x2, x2) - 2 * eye) / 4)
    W = hebbian_update(hebbian_update(torch.zeros(4, 4), x1), x2)
    torch.testing.assert_close(W, (torch.outer(x1, x1) + torch.outer(x2, x2) - 2 * eye) / 4)


@pytest.mark.parametrize("rule", ["storkey", "hebbian"])
def test_stored_patterns_are_fixed_points(rule):
    patterns = random_patterns(12, 256)
    store = HopfieldStore(256, rule)
    for x in patterns:
        store.store((x > 0).float())
    assert store.num_patterns == 12
    final, steps = recall(store.W, patterns)
    assert steps == 0 and torch.equal(final, patterns)
    torch.testing.assert_close(store.mean_pattern(), patterns.mean(0))


def test_storkey_keeps_correlated_patterns_that_hebbian_loses():
    # 30 patterns of 200 neurons, each entry shared with a common pattern with probability 0.2:
    # the Hebbian matrix pulls every pattern towards the common part and beyond its capacity
    # (0.138 d = 28), the Storkey update subtracts what is already stored
    g = torch.Generator().manual_seed(1)
    d, n = 200, 30
    base = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
    patterns = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    patterns = torch.where(torch.rand(n, d, generator=g) < 0.2, base, patterns)
    fixed = {}
    for rule in ("storkey", "hebbian"):
        store = HopfieldStore(d, rule)
        for x in patterns:
            store.store((x > 0).float())
        final, _ = recall(store.W, patterns, max_steps=1)
        fixed[rule] = int((final == patterns).all(1).sum())
    assert fixed["storkey"] == n
    assert fixed["hebbian"] < n // 2


@pytest.mark.parametrize("rule", ["storkey", "hebbian"])
def test_recall_from_a_corrupted_pattern(rule):
    patterns = random_patterns(8, 512, seed=3)
    store = HopfieldStore(512, rule)
    for x in patterns:
        store.store((x > 0).float())
    g = torch.Generator().manual_seed(4)
    flip = torch.rand(512, generator=g) < 0.15
    corrupted = torch.where(flip, -patterns[5], patterns[5])
    assert int(flip.sum()) > 50
    final, _ = recall(store.W, corrupted)
    assert torch.equal(final, patterns[5])


def test_energy_descent_recovers_a_corrupted_mask():
    # what recovery does at t = 1: SGD on E(2 m(s) - 1) through the straight-through mask
    patterns = random_patterns(6, 512, seed=5)
    store = HopfieldStore(512)
    for x in patterns:
        store.store((x > 0).float())
    g = torch.Generator().manual_seed(6)
    flip = torch.rand(512, generator=g) < 0.2
    s = torch.where(flip, -patterns[2], patterns[2]).clone().requires_grad_()
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(10):
        opt.zero_grad()
        store.energy(2 * mask_of(s) - 1).backward()
        opt.step()
    assert torch.equal(2 * (s.detach() >= 0).float() - 1, patterns[2])


def test_store_rejects_what_is_not_a_mask():
    store = HopfieldStore(4)
    with pytest.raises(ValueError, match="shape"):
        store.store(torch.ones(5))
    with pytest.raises(ValueError, match="binary"):
        store.store(torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="no pattern"):
        store.mean_pattern()
    with pytest.raises(ValueError, match="rule"):
        HopfieldStore(4, "oja")


# -------------------------------------------------------------------- the network and loss


def tiny_net(rule: str = "hebbian") -> NeuronMaskNet:
    """in 2 -> hidden [1] -> 2 classes: head weights (1, -1), so the logits of an image are
    +-swish(batch-normalised hidden value)."""
    net = NeuronMaskNet(2, [1], 2, seed=0, rule=rule)
    with torch.no_grad():
        net.linears[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net.linears[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return net


def binary_entropy_of_logit_gap(gap: float) -> float:
    p = 1 / (1 + math.exp(-gap))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_recovery_loss_at_t0_is_the_entropy_and_at_t1_the_energy():
    net = NeuronMaskNet(3, [3], 2, seed=0, rule="hebbian")
    x = torch.tensor([1.0, -1.0, 1.0])
    net.stores[0].store((x > 0).float())  # W = (x x^T - I) / 3
    images = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    on = [torch.ones(3)]  # mask all ones: s = (1, 1, 1), x . s = 1: E = -1/2 (1 - 3) / 3 = 1/3
    logits = net(images, on)
    logp = logits.log_softmax(-1)
    h = float(-(logp.exp() * logp).sum(-1).mean())
    gamma = 0.01
    loss0, h0, e0 = recovery_loss(net, images, on, 0.0, gamma)
    assert float(loss0) == pytest.approx(h, rel=1e-6)
    assert float(e0) == pytest.approx(1 / 3, rel=1e-6)
    loss1, _, _ = recovery_loss(net, images, on, 1.0, gamma)
    assert float(loss1) == pytest.approx(gamma / 3, rel=1e-6)
    stored = [x.clone()]  # the stored pattern itself: E = -1/2 (9 - 3) / 3 = -1
    loss1, _, e1 = recovery_loss(net, images, stored, 1.0, gamma)
    assert float(e1) == pytest.approx(-1.0, rel=1e-6) and float(loss1) == pytest.approx(-gamma, rel=1e-6)


def test_entropy_through_the_masked_batchnorm_by_hand():
    net = tiny_net()
    images = torch.tensor([[2.0, 5.0], [0.0, -3.0]])  # hidden values 2 and 0: normalised to +-1 (biased variance 1)
    swish = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    eps_scale = 1 / math.sqrt(1 + 1e-5)
    gaps = [2 * swish(eps_scale), 2 * swish(-eps_scale)]
    expected = sum(binary_entropy_of_logit_gap(g) for g in gaps) / 2
    net.stores[0].store(torch.ones(1))
    loss, h, _ = recovery_loss(net, images, [torch.tensor([0.5])], 0.0, 1.0)
    assert float(h) == pytest.approx(expected, rel=1e-5)
    _, h_off, _ = recovery_loss(net, images, [torch.tensor([-0.5])], 0.0, 1.0)  # neuron masked: logits 0
    assert float(h_off) == pytest.approx(math.log(2), rel=1e-6)


def test_training_changes_only_the_scores_and_storing_only_the_stores():
    net = NeuronMaskNet(20, [16, 16], 3, seed=1)
    frozen = [lin.weight.clone() for lin in net.linears]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(20)]
    scores, losses = train_neuron_masks(net, batches, lr=0.1, momentum=0.9)
    assert all(not lin.weight.requires_grad for lin in net.linears)
    assert all(torch.equal(a, lin.weight) for a, lin in zip(frozen, net.linears))
    assert net.num_tasks == 0 and all(float(s.W.abs().sum()) == 0 for s in net.stores)
    assert any(bool((s < 0).any()) for s in scores), "no neuron was switched off"
    assert losses[-1] < losses[0]
    net.store_task(scores)
    assert net.num_tasks == 1
    torch.testing.assert_close(net.stores[0].mean_pattern(), 2 * (scores[0] >= 0).float() - 1)


def test_recovery_finds_the_task_whose_images_it_sees():
    # two synthetic tasks whose classes live in different input dimensions
    net = NeuronMaskNet(8, [64], 4, seed=2, rule="storkey")
    g = torch.Generator().manual_seed(3)

    def task_batches(task, n):
        out = []
        for _ in range(n):
            y = torch.randint(0, 2, (64,), generator=g) + 2 * task
            x = torch.randn(64, 8, generator=g) * 0.3
            x[torch.arange(64), (y % 2) + 4 * task] += 3.0
            out.append((x, y))
        return out

    learned = []
    for task in range(2):
        scores, _ = train_neuron_masks(net, task_batches(task, 150), lr=0.1, momentum=0.9, weight_decay=1e-4)
        net.store_task(scores)
        learned.append((scores[0] >= 0).float())
    assert int((learned[0] != learned[1]).sum()) > 5
    for task in range(2):
        rec = recover_masks(net, [x for x, _ in task_batches(task, 30)], lr=500.0, gamma=1.5e-3)
        got = rec.masks()[0]
        assert int((got != learned[task]).sum()) < int((got != learned[1 - task]).sum())
        assert rec.steps == 30 and len(rec.energies) == 30


def test_batch_positions_never_leave_a_single_image():
    cuts = batch_positions(129, 64)
    assert [c.numel() for c in cuts] == [64, 65]
    assert torch.equal(torch.cat(cuts), torch.arange(129))
    shuffled = batch_positions(130, 64, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(shuffled).tolist()) == list(range(130)) and [c.numel() for c in shuffled] == [64, 64, 2]


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("sets, key", [
    (["scenario=GG"], "scenario"),
    (["train.optimizer=rmsprop"], "train.optimizer"),
    (["hopfield.rule=oja"], "hopfield.rule"),
    (["hopfield.hidden=[]"], "hopfield.hidden"),
    (["hopfield.batch_size=1"], "hopfield.batch_size"),
    (["train.checkpoint_every=10"], "train.checkpoint_every"),
])
def test_config_errors_name_the_key(sets, key):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(CONFIG, sets))
    assert err.value.key == key


# ------------------------------------------------------------------- runs on real MNIST

SMALL = ["benchmark.num_tasks=2", "hopfield.hidden=[256,256]", "train.iterations=40", "hopfield.epochs=null",
         "eval.max_batches=10", "progress=false"]


def small_run(tmp_path, name, *extra):
    cfg = load_config(CONFIG, SMALL + list(extra))
    return run_experiment(cfg, tmp_path / name), tmp_path / name


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """One small native run, shared by the tests that compare against it."""
    return small_run(tmp_path_factory.mktemp("hopsupsup"), "native")


def test_native_run_on_split_mnist(native):
    results, out = native
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "hopsupsup" and saved["bank_bytes"] == 2 * (256 * 256 + 256) * 4 + 2 * 8
    for row in saved["tasks"]:
        assert row["acc_given_task"] > 0.9  # the learned masks classify their digits among all 10
        # 10 recovery steps on a small net come close to the learned mask, nearer than to the other
        assert row["acc_inferred"] > 0.85 and row["task_inference_acc"] == 1.0
    hop = saved["hopsupsup"]
    assert [d["recovery_steps"] for d in hop["tasks"]] == [10, 10]
    assert [d["nearest_learned_mask"] for d in hop["tasks"]] == [0, 1]
    assert saved["accuracy_matrix"]["inferred"][0][0] is not None  # a row after the first task
    assert (out / "accuracy.png").stat().st_size > 0
    proc = subprocess.run([sys.executable, "-m", "supsup", "eval", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "hopsupsup run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_resume_after_a_kill_gives_the_uninterrupted_results(tmp_path, native):
    whole, _ = native
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "supsup", "run", str(CONFIG), "--out", str(out), "--threads", "1"]
    for s in SMALL:
        cmd += ["--set", s]
    env = dict(os.environ, SUPSUP_CRASH_AT="hopsupsup_task:1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    env.pop("SUPSUP_CRASH_AT")
    # the config comes from the checkpoint
    proc = subprocess.run([sys.executable, "-m", "supsup", "run", "--resume", str(out), "--threads", "1"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())
    assert [r.to_dict() for r in whole.tasks] == resumed["tasks"]
    assert resumed["bank_sha256"] == whole.bank_sha256


def test_avalanche_strategy_gives_the_native_results(tmp_path, native):
    native, _ = native
    avalanche, out = small_run(tmp_path, "avalanche", "backend=avalanche")
    assert avalanche.bank_sha256 == native.bank_sha256  # the same masks were stored
    for a, n in zip(avalanche.tasks, native.tasks):
        assert a.acc_inferred == pytest.approx(n.acc_inferred, abs=1e-9)
        assert a.acc_given_task == n.acc_given_task
    assert (out / "avalanche_log.txt").read_text()
