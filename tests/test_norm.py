"""Conv and ResNet backbones with BatchNorm statistics kept per task (small, synthetic)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup import SupermaskModel, TrainConfig, train_task
from supsup.backbones import BACKBONES, has_batchnorm
from supsup.inference import alpha_gradients, alpha_gradients_reference
from supsup.likelihood import LikelihoodSpec
from supsup.masks import packed_nbytes
from supsup.model import CapacityError, Mode, ModeError
from supsup.norm import TaskBatchNorm

SHAPES = {"resnet50": (3, 64, 64)}


def _model(backbone="conv4_bn", norm="per_task", num_tasks=3, shape=(1, 16, 16), **kw):
    return SupermaskModel.from_name(backbone, num_tasks=num_tasks, num_outputs=kw.pop("num_outputs", 8),
                                    num_classes=kw.pop("num_classes", 4), input_shape=shape, norm=norm, **kw)


def _batches(task, n=4, size=16, shape=(1, 16, 16), seed=0):
    """Task ``t``: inputs shifted by t and scaled, so each task has its own activation statistics."""
    g = torch.Generator().manual_seed(seed + 100 * task)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (size,), generator=g)
        x = torch.randn(size, *shape, generator=g) * (1 + task) + 2.0 * task
        x[:, 0, : 4 + 4 * int(y.max()), :4] += y.view(-1, 1, 1).float()  # some class signal
        out.append((x, y))
    return out


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_wraps_and_trains_only_its_scores(name):
    """timm-style: every registered backbone runs on its inputs, and every score tensor (and
    nothing else) gets a gradient."""
    shape = SHAPES.get(name, (3, 32, 32) if ("resnet" in name or "conv" in name) else (1, 28, 28))
    model = _model(name, shape=shape, num_tasks=1, num_outputs=6, num_classes=6)
    model.add_task()
    x = torch.randn(2, *shape)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    params = dict(model.named_parameters())
    assert params and all(n.endswith("scores") for n in params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(b.grad is None for b in model.buffers())
    assert len(model.norm_layers) == (sum(isinstance(m, TaskBatchNorm) for m in model.modules()))
    assert bool(model.norm_layers) == (name.endswith("_bn") or name.startswith("resnet"))


def test_a_pretrained_batchnorms_scale_and_shift_stay_frozen_and_shared():
    """An affine BatchNorm (a pretrained backbone, weight_init='keep'): its scale and shift are
    frozen buffers applied after each task's own normalisation, never trained."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(576, 3, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
        net[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert has_batchnorm(net)
    model = SupermaskModel(net, num_tasks=2, weight_init="keep")
    bn = model.norm_layers[0]
    assert not list(bn.parameters()) and torch.equal(bn.frozen_weight, torch.tensor([0.5, 2.0, -1.0, 3.0]))
    x = torch.randn(8, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    model.add_task()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    model.finish_task()
    assert torch.equal(bn.frozen_weight, torch.tensor([0.5, 2.0, -1.0, 3.0]))
    assert torch.equal(bn.frozen_bias, torch.tensor([0.1, -0.2, 0.3, 0.0]))
    model.set_task(0)
    feats = {}
    bn.register_forward_hook(lambda m, a, out: feats.setdefault("out", out))
    model(x)
    mean, var = bn.task_stats(0)
    with torch.no_grad():
        pre = nn.functional.conv2d(x, model.masked_layers[0].effective_weight())
    want = (pre - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    want = want * bn.frozen_weight.view(1, -1, 1, 1) + bn.frozen_bias.view(1, -1, 1, 1)
    assert torch.allclose(feats["out"], want, atol=1e-5)


@pytest.mark.parametrize("kw", [{"momentum": None}, {"track_running_stats": False}])
def test_batchnorm_without_exponential_running_statistics_is_refused(kw):
    """A cumulative average (momentum=None) or no running statistics cannot be kept per task
    the way they are banked here; silently doing something else would be wrong."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False, **kw), nn.Flatten(),
                        nn.Linear(576, 3, bias=False))
    with pytest.raises(TypeError, match="momentum=None or track_running_stats=False"):
        SupermaskModel(net, num_tasks=1)


def _train(model, task, steps=3):
    train_task(model, _batches(task, n=steps), TrainConfig(lr=1e-2))


@pytest.mark.parametrize("backbone", ["conv4_bn", "resnet18"])
def test_earlier_tasks_keep_their_statistics_and_outputs(backbone):
    """per_task: task 0's outputs after learning tasks 1 and 2 equal those right after task 0
    (its mask and its BatchNorm statistics are banked); shared: they change (the official bug)."""
    x = _batches(0, n=1, seed=9)[0][0]
    outs = {}
    for norm in ("per_task", "shared"):
        model = _model(backbone, norm=norm)
        _train(model, 0)
        with model.use_task(0):
            before = model(x)
        _train(model, 1)
        _train(model, 2)
        with model.use_task(0):
            outs[norm] = (before, model(x))
    assert torch.equal(*outs["per_task"])
    assert not torch.allclose(*outs["shared"])


def test_statistics_are_banked_and_counted_in_bank_bytes():
    model = _model("conv4_bn", num_tasks=2)
    _train(model, 0)
    _train(model, 1)
    bn = model.norm_layers[0]
    assert bn.num_stats == 2 and not torch.equal(bn.stats_rows()[0], bn.stats_rows()[1])
    # the task with inputs shifted by 2 has the larger mean before normalisation
    per_task = (sum(packed_nbytes(layer.num_weights) for layer in model.masked_layers)
                + sum(8 * b.num_features for b in model.norm_layers))
    # and the likelihood statistics each task banked, each within its mask's bytes
    likelihood = [model.task_likelihood(t).nbytes() for t in range(2)]
    assert all(0 < b <= model.mask_nbytes for b in likelihood)
    assert model.bank_bytes == 2 * per_task + sum(likelihood)


def test_batch_norm_mode_keeps_no_statistics():
    model = _model("conv4_bn", norm="batch")
    _train(model, 0)
    bn = model.norm_layers[0]
    assert bn.num_stats == 0 and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    x = _batches(0, n=1)[0][0]
    with model.use_task(0):
        full, half = model(x), model(x[:8])
    assert not torch.allclose(full[:8], half)  # each batch normalised with its own statistics
    masks = {k for k in model.bank_state() if not k.startswith("likelihood.")}  # likelihood statistics aside
    assert masks == {f"bank.{i}" for i in range(len(model.masked_layers))}
    other = _model("conv4_bn", norm="batch")  # a batch-statistics bank has no BatchNorm entries to load
    other.load_bank_state(model.bank_state())
    with model.use_task(0), other.use_task(0):
        assert torch.equal(model(x), other(x))


def test_save_load_and_bank_state_keep_the_statistics(tmp_path):
    model = _model("resnet18")
    _train(model, 0)
    _train(model, 1)
    model.save(tmp_path / "m")
    loaded = SupermaskModel.load(tmp_path / "m")
    x = _batches(1, n=1, seed=5)[0][0]
    for t in range(2):
        with model.use_task(t), loaded.use_task(t):
            assert torch.equal(model(x), loaded(x))
    assert loaded.bank_sha256() == model.bank_sha256()
    state = model.bank_state()
    state["norm.0"] = state["norm.0"][:1]
    with pytest.raises(ValueError, match="norm.0"):
        _model("resnet18").load_bank_state(state)


def test_resuming_a_task_starts_from_its_statistics():
    model = _model("conv4_bn")
    _train(model, 0)
    banked = model.norm_layers[0].stats_rows()[0].clone()
    model.resume_task(0)
    bn = model.norm_layers[0]
    assert torch.equal(bn.running_mean, banked[0]) and torch.equal(bn.running_var, banked[1])
    model.finish_task()


@pytest.mark.parametrize("groups", [1, 3])
def test_fast_alpha_gradients_match_the_oracle_with_batchnorm(groups):
    """Superposed BatchNorm normalises each inference with its own images: batching G
    inferences must not mix their statistics (the oracle runs them one by one)."""
    model = _model("conv4_bn")
    for t in range(3):
        _train(model, t, steps=3)
    x = torch.randn(groups, 4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    alphas = torch.full((groups, 3), 1 / 3)
    fast = alpha_gradients(model, x, alphas, objective="entropy", num_classes=4)
    ref = alpha_gradients_reference(model, x, alphas, objective="entropy", num_classes=4)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert model.mode is Mode.IDLE


def test_transfer_scores_follow_the_earlier_masks_at_a_fresh_magnitude():
    """Transfer from 1-bit masks: the earlier tasks' vote a = (2 count - t) / t gives the
    sign, the fresh draw the magnitude, |a| how far to trust the vote:
    a |fresh| + (1 - |a|) fresh. Where every earlier mask agrees, the new task starts from
    their mask with a fresh init's magnitudes (as easy to flip as a fresh start: a mask that
    piled up full-size scores could not move in a small step budget); where they split
    evenly, it is the fresh draw."""
    model = _model("conv4", score_init="transfer", num_tasks=3)
    fresh0 = model.initial_scores(0)
    _train(model, 0)
    _train(model, 1)
    layer = model.masked_layers[1]
    fresh = _model("conv4", num_tasks=3).initial_scores(2)[1]  # the plain draw for task 2
    vote = sum(layer.stored_mask(t).float() * 2 - 1 for t in range(2)) / 2
    got = model.initial_scores(2)[1]
    assert torch.allclose(got, vote * fresh.abs() + (1 - vote.abs()) * fresh, atol=1e-7)
    agree = vote.abs() == 1
    assert agree.any() and (~agree).any()
    assert torch.equal(got[agree] >= 0, vote[agree] > 0) and torch.equal(got[agree].abs(), fresh[agree].abs())
    assert torch.equal(got[~agree], fresh[~agree])
    assert torch.equal(fresh0[1], _model("conv4").initial_scores(0)[1])  # nothing banked: the plain draw


def test_topk_transfer_ranks_the_weights_the_earlier_masks_kept_first():
    model = _model("conv4", score_init="transfer", num_tasks=3, mask_kind="topk", density=0.3)
    _train(model, 0)
    _train(model, 1)
    layer = model.masked_layers[1]
    bound = 1 / math.sqrt(layer.weight[0].numel())
    count = layer.stored_mask(0).float() + layer.stored_mask(1).float()
    got = model.initial_scores(2)[1].abs()
    assert (count == 2).any() and (count == 0).any()
    assert got[count == 2].min() >= bound / 2 and got[count == 2].max() <= bound
    assert got[count == 0].max() <= bound / 2


def test_cosine_schedule_anneals_to_zero_over_the_task():
    lrs = []

    class Probe(torch.optim.SGD):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    from supsup import optim

    optim.OPTIMIZERS.register("probe_sgd")(lambda params, lr, momentum, weight_decay: Probe(params, lr=lr))
    try:
        model = _model("conv4")
        train_task(model, _batches(0, n=5), TrainConfig(optimizer="probe_sgd", lr=0.1, schedule="cosine"))
    finally:
        optim.OPTIMIZERS._items.pop("probe_sgd")
    expected = [0.05 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_exact_refinement_runs_each_banked_mask_with_its_own_statistics(objective):
    """refine exact scores a candidate as it would classify: its mask and its banked BatchNorm
    statistics (the superposed network's per-group batch statistics would erase what sets the
    tasks apart; a ResNet-18 on rotations inferred the task 50% of the time with them)."""
    from supsup.inference import exact_objectives
    from supsup.objectives import exact_score

    model = SupermaskModel.from_name("conv4_bn", num_tasks=3, num_outputs=8, num_classes=4, seed=0,
                                     input_shape=(1, 16, 16))
    for t in range(3):
        _train(model, t)
    x = torch.stack([_batches(t, n=1, size=6)[0][0] for t in range(3)])  # (3 groups, 6 images, ...)
    shortlist = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    exact = exact_objectives(model, x, shortlist, model.candidates(), objective=objective, num_classes=4)
    for g in range(3):
        for slot, t in enumerate(shortlist[g].tolist()):
            with torch.no_grad(), model.use_task(t):
                ref = exact_score(objective)(model(x[g]).unsqueeze(0), 4)[0]
            assert torch.allclose(exact[g, slot], ref, rtol=1e-4, atol=1e-5), (g, t)


def test_superposed_batchnorm_uses_alpha_weighted_banked_statistics_or_the_batchs():
    """superpose(alphas, norm_stats=...): each BatchNorm normalises with sum_i alpha_i stats_i, so
    a one-hot alpha is task i exactly (its mask and its statistics); without norm_stats the
    superposed network normalises with the batch's own statistics, which differ."""
    model = _model("conv4_bn", num_tasks=2)
    _train(model, 0)
    _train(model, 1)
    x = _batches(1, n=1, seed=5)[0][0]
    stats = [bn.stats_rows() for bn in model.norm_layers]  # (2, 2, C) each
    model.eval()
    with torch.no_grad():
        for t in (0, 1):
            with model.use_task(t):
                alone = model(x)
            model.superpose(torch.nn.functional.one_hot(torch.tensor(t), 2).float(), norm_stats=stats)
            assert model.current_task is None
            torch.testing.assert_close(model(x), alone, rtol=1e-4, atol=1e-5)
        half = torch.tensor([0.5, 0.5])
        model.superpose(half, norm_stats=stats)
        mixed = model(x)
        model.superpose(half)
        from_batch = model(x)
    assert torch.isfinite(from_batch).all() and not torch.allclose(mixed, from_batch, atol=1e-3)
    with pytest.raises(ValueError, match=r"alphas must have shape \(2,\), got \(3,\)"):
        model.superpose(torch.ones(3))


def test_a_model_file_keeps_the_norm_kind_its_running_statistics_and_each_tasks_classes(tmp_path):
    """shared statistics (one running pair for all tasks) and per-task class lists survive
    save / load: mean stays mean, var stays var, and a task whose only class is 0 keeps it."""
    model = _model("conv4_bn", norm="shared")
    _train(model, 0)
    _train(model, 1)
    model.set_task_classes(0, [0])
    model.set_task_classes(1, [1, 2, 3])
    model.save(tmp_path / "m.supsup")
    loaded = SupermaskModel.load(tmp_path / "m.supsup")
    assert loaded.norm == "shared" and loaded.task_classes == {0: [0], 1: [1, 2, 3]}
    for a, b in zip(model.norm_layers, loaded.norm_layers):
        assert not torch.equal(a.running_mean, a.running_var)
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    x = _batches(0, n=1, seed=4)[0][0]
    model.eval()
    loaded.eval()
    with torch.no_grad(), model.use_task(0), loaded.use_task(0):
        assert torch.equal(model(x), loaded(x))


def test_an_exported_task_imported_elsewhere_banks_as_if_finished_there():
    """export_task / import_tasks (how processes share finished tasks): the mask and the
    BatchNorm statistics of a task trained in one model bank in another exactly as
    finish_task would have banked them."""
    x = _batches(0, n=1, seed=2)[0][0]
    a, b = _model("conv4_bn", num_tasks=2), _model("conv4_bn", num_tasks=2)
    for m in (a, b):
        m.add_task()
        m(x)  # a training forward: the running statistics move
    task_id, rows = a.export_task()
    assert task_id == 0 and a.num_banked_tasks == 0 and a.active_task is None
    b.finish_task()
    a.import_tasks(rows)
    assert a.num_banked_tasks == 1
    sa, sb = a.bank_state(), b.bank_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.add_task()
    with pytest.raises(ModeError, match="cannot bank tasks while a task is being trained"):
        a.import_tasks(rows)
    a.abandon_task()
    a.import_tasks(rows)
    with pytest.raises(CapacityError, match="1 more tasks do not fit: 2 of 2 are banked"):
        a.import_tasks(rows)


def test_likelihood_features_are_each_conv_maps_channel_means_with_the_tasks_own_statistics():
    """A conv layer's likelihood features are its output channels averaged over space, computed
    with the task's own mask and banked BatchNorm statistics; a task scores its own images as
    more likely than another task's (inputs shifted and scaled per task)."""
    from supsup.inference import likelihood_scores

    model = _model("conv4_bn", num_tasks=2, likelihood=LikelihoodSpec(images=64, max_rank=4))
    _train(model, 0)
    _train(model, 1)
    x, y = (torch.cat(v) for v in zip(*_batches(1, n=4, seed=5)))
    stats = model.fit_likelihood(1, x, y)
    maps = []
    hooks = [layer.register_forward_hook(lambda m, a, o: maps.append(o)) for layer in model.feature_layers]
    with torch.no_grad(), model.use_task(1):
        model(x)
    for h in hooks:
        h.remove()
    for g, m in zip(stats.layers, maps):
        feats = m.mean(dim=(2, 3)) if m.dim() == 4 else m  # conv maps; linear layers as they are
        classes = y.unique().tolist()
        assert g.num_classes == len(classes) == 4  # four classes, each with its 4 directions
        for i, c in enumerate(classes):
            assert torch.allclose(g.means[i], feats[y == c].mean(0), atol=1e-5)
    x0, _ = _batches(0, n=1, seed=9)[0]
    x1, _ = _batches(1, n=1, seed=9)[0]
    scores = likelihood_scores(model, torch.cat([x0, x1]), [0, 1])
    assert (scores[:16].argmin(1) == 0).all() and (scores[16:].argmin(1) == 1).all()
