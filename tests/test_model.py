"""SupermaskModel invariants on small synthetic data (fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup import masks as M
from supsup.inference import (
    alpha_gradients,
    alpha_gradients_reference,
    infer_tasks,
    num_inference_steps,
)
from supsup.model import CapacityError, Mode, ModeError, SupermaskModel


def _data(seed=0, n=64, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model, x, y, steps=5, lr=1e-2):
    opt = torch.optim.RMSprop(model.trainable_parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _model(backbone="lenet_300_100", num_tasks=4, num_outputs=20, seed=0, **kw):
    return SupermaskModel.from_name(backbone, num_tasks=num_tasks, num_outputs=num_outputs, seed=seed, **kw)


@pytest.mark.parametrize("backbone", ["lenet_300_100", "fc_300_300", "conv4"])
def test_frozen_weights_unchanged_and_not_parameters(backbone):
    model = _model(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    assert before, "frozen weights must be saved in the state dict"
    x, y = _data()
    for _ in range(2):
        model.add_task()
        _train(model, x, y)
        model.finish_task()
    after = {k: v for k, v in model.state_dict().items() if "base_layer" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Avalanche adds every parameter to its optimizer: the frozen weights must not be among them.
    assert all("scores" in name for name, _ in model.named_parameters())
    assert list(model.parameters()) == []  # no task active: nothing trainable


def test_only_active_scores_get_gradients():
    model = _model()
    x, y = _data()
    model.add_task()
    _train(model, x, y)
    model.finish_task()
    model.add_task()
    params = list(model.parameters())
    assert len(params) == len(model.masked_layers)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(b.grad is None for b in model.buffers())


def test_earlier_tasks_unchanged_after_later_ones_and_bank_readback_identical():
    model = _model(num_tasks=3)
    x, y = _data()
    model.add_task()
    _train(model, x, y)
    model.set_task(0)
    live = model(x).clone()  # task 0 from its live scores
    model.finish_task()
    model.set_task(0)
    assert torch.equal(model(x), live)  # read back from the 1-bit bank: bitwise identical
    for _ in range(2):
        model.add_task()
        _train(model, *_data(seed=model.active_task))
        model.finish_task()
    model.set_task(0)
    assert torch.equal(model(x), live)


def test_batch_of_one():
    model = _model()
    model.add_task()
    x, y = _data(n=1)
    out = model(x)
    assert out.shape == (1, 20)
    F.cross_entropy(out, y).backward()
    # one image trains the active task's scores like a batch does (BatchNorm-free backbone)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_bank_bytes_bound_and_capacity():
    model = _model(num_tasks=5)
    p = model.num_masked_weights
    x, y = _data()
    for _ in range(5):
        model.add_task()
        _train(model, x, y, steps=1)
        model.finish_task()
        # rows are whole 64-bit words: per layer at most 7 bytes over its ceil(P_l / 8)
        assert model.bank_bytes <= model.num_tasks * (math.ceil(p / 8) + 8 * len(model.masked_layers))
    assert model.bank_bytes == 5 * sum(8 * math.ceil(layer.num_weights / 64) for layer in model.masked_layers)
    with pytest.raises(CapacityError):
        model.add_task()


def test_mode_guards():
    model = _model()
    with pytest.raises(ModeError):
        model(_data()[0])
    model.add_task()
    with pytest.raises(ModeError):
        model.add_task()
    assert model.mode is Mode.TRAIN
    model.finish_task()
    with pytest.raises(IndexError):
        model.set_task(1)


def test_unsupported_layers_are_refused():
    with pytest.raises(TypeError, match="cannot freeze LayerNorm"):
        SupermaskModel(nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4)), num_tasks=1)


def test_same_seed_bit_identical_masks():
    def run():
        model = _model(seed=3)
        x, y = _data()
        model.add_task()
        _train(model, x, y)
        model.finish_task()
        return model.bank_state(), model.frozen_weights_digest()

    (a, da), (b, db) = run(), run()
    assert da == db and all(torch.equal(a[k], b[k]) for k in a)
    assert _model(seed=4).frozen_weights_digest() != da


def _trained(num_tasks=3, backbone="lenet_300_100", num_outputs=20, capacity=None):
    model = _model(backbone, num_tasks=capacity or num_tasks, num_outputs=num_outputs)
    for t in range(num_tasks):
        model.add_task()
        _train(model, *_data(seed=t))
        model.finish_task()
    return model


def test_one_hot_alpha_equals_single_task_forward():
    model = _trained()
    x, _ = _data(seed=9)
    for t in range(3):
        alphas = torch.zeros(3)
        alphas[t] = 1
        model.superpose(alphas)
        sup = model(x)
        model.set_task(t)
        assert torch.equal(sup, model(x))


@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("backbone, groups", [("lenet_300_100", 4), ("lenet_300_100", 12), ("conv4", 4)])
def test_fast_alpha_gradient_matches_float_stack_oracle(objective, backbone, groups):
    """Up to 8 groups go through the compiled kernel, more through unpack-and-matmul."""
    model = _trained(backbone=backbone)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(groups, 3, 1, 28, 28, generator=g)
    alphas = torch.full((groups, 3), 1 / 3)
    alphas[2] = torch.tensor([0.5, 0.0, 0.5])  # groups may have different alphas (binary search)
    fast = alpha_gradients(model, x, alphas, objective=objective, num_classes=10)
    ref = alpha_gradients_reference(model, x, alphas, objective=objective, num_classes=10)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    # the differentiable superposition (autograd through the packed bank) agrees too
    a = alphas[0].clone().requires_grad_(True)
    model.superpose(a)
    from supsup.objectives import OBJECTIVES

    OBJECTIVES.get(objective)(model(x[0]).unsqueeze(0), 10).sum().backward()
    assert torch.allclose(a.grad, ref[0], rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_extra_candidates_read_the_bank_in_place_and_match_the_oracle():
    """NN's candidates: the bank (read in place, never copied), the mask in training and
    untrained masks of future task ids; gradients equal the float-stack oracle's over the
    concatenated candidates, and one-shot picks among all of them."""
    from supsup.candidates import Candidates

    model = _trained(num_tasks=3, capacity=6)  # three finished tasks
    model.add_task()
    _train(model, *_data(seed=7))  # a fourth in training
    candidates = model.candidates(include_active=True, pad_to=5)
    assert candidates.tasks == (0, 1, 2, 3, None) and candidates.banked == 3 and candidates.whole_bank
    assert [b[1].shape[0] for b in candidates.blocks] == [2] * len(model.masked_layers)  # active + one untrained
    assert candidates.blocks[0][0].data_ptr() == model.masked_layers[0].bank.data_ptr()
    untrained = model.initial_scores(4)  # the padding is what task 4 will start from
    assert torch.equal(M.unpack_bits(candidates.row(0, 4), model.masked_layers[0].num_weights),
                       M.binarize(untrained[0], "threshold", 0.5).flatten())
    x = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    alphas = torch.full((2, 5), 1 / 5)
    fast = alpha_gradients(model, x, alphas, objective="entropy", num_classes=10, candidates=candidates)
    ref = alpha_gradients_reference(model, x, alphas, objective="entropy", num_classes=10,
                                    candidates=Candidates.of_rows(candidates.rows()))
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert model.mode is Mode.TRAIN  # inference restores the training mode
    tasks, _ = infer_tasks(model, x, method="binary", objective="entropy", candidates=candidates)
    assert ((0 <= tasks) & (tasks < 5)).all()


def test_mask_count_follows_bank_writes():
    model = _trained(num_tasks=3, capacity=4)
    layer = model.masked_layers[0]
    layer.mask_count()  # built once, then updated by every write
    model.resume_task(1)
    _train(model, *_data(seed=11))
    model.finish_task()  # overwrites mask 1
    model.add_task()
    model.finish_task()  # appends mask 3
    recount = sum(layer.stored_mask(t).float() for t in range(layer.num_masks))
    assert torch.equal(layer.mask_count(), recount)


def test_loading_a_bank_drops_the_previous_mask_count():
    """Regression guard: the mask count (the uniform superposition's fast path) belongs to the
    bank it was built from. After inference has built it, loading another bank must give the
    new bank's count, so the fast alpha gradients still equal the float-stack oracle."""
    model = _trained(num_tasks=3)
    x = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    alphas = torch.full((2, 3), 1 / 3)
    alpha_gradients(model, x, alphas, objective="entropy", num_classes=10)  # builds the count
    fresh = SupermaskModel.from_name("lenet_300_100", num_tasks=3, num_outputs=20, seed=1)
    for t in range(3):  # another backbone seed: other initial scores, other masks
        fresh.add_task()
        _train(fresh, *_data(seed=10 + t))
        fresh.finish_task()
    model.load_bank_state(fresh.bank_state())
    for layer in model.masked_layers:
        recount = sum(layer.stored_mask(t).float() for t in range(3))
        assert torch.equal(layer.mask_count(), recount)
    fast = alpha_gradients(model, x, alphas, objective="entropy", num_classes=10)
    ref = alpha_gradients_reference(model, x, alphas, objective="entropy", num_classes=10)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_bad_masks_are_refused_before_the_bank_changes():
    model = _trained(num_tasks=2, capacity=3)
    layer = model.masked_layers[0]
    count, rows = layer.mask_count().clone(), layer.bank_rows.clone()
    with pytest.raises(TypeError, match="bool"):
        layer.write_mask(0, torch.ones_like(layer.weight, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        layer.append_mask(torch.ones(3, 3, dtype=torch.bool))
    assert layer.num_masks == 2 and torch.equal(layer.bank_rows, rows) and torch.equal(layer.mask_count(), count)


def test_bank_state_errors_name_the_problem():
    model = _trained(num_tasks=3)
    state = model.bank_state()
    with pytest.raises(ValueError) as err:
        _model(num_tasks=3).load_bank_state({**state, "bank.9": state["bank.0"]})
    assert str(err.value) == ("bank state has keys ['bank.0', 'bank.1', 'bank.2', 'bank.9'], "
                              "expected ['bank.0', 'bank.1', 'bank.2']")
    with pytest.raises(ValueError) as err:
        _model(num_tasks=3).load_bank_state({**state, "bank.1": state["bank.1"][:2]})
    assert str(err.value) == "bank layers hold different numbers of masks: [2, 3]"
    with pytest.raises(ValueError) as err:
        _model(num_tasks=2).load_bank_state(state)
    assert str(err.value) == "bank holds 3 masks, more than the model's capacity 2"


def test_bank_sha256_of_a_prefix_is_the_sha256_of_the_shorter_bank():
    """``bank_sha256(num_layers, n)``: the digest of the state after n tasks (what a distributed
    or resumed run compares), also for a model with a single masked layer."""
    from supsup.bank import bank_sha256

    model = _trained(num_tasks=3)
    shorter = _model(num_tasks=3)
    shorter.load_bank_state({k: v[:2] for k, v in model.bank_state().items()})
    assert bank_sha256(model.masked_layers, 2) == shorter.bank_sha256() != model.bank_sha256()
    assert bank_sha256(model.masked_layers) == model.bank_sha256()
    probe = SupermaskModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), num_tasks=2)
    probe.add_task()
    probe.finish_task()
    assert bank_sha256(probe.masked_layers) == probe.bank_sha256()


def test_banks_packed_to_whole_bytes_still_load():
    """Checkpoints of 0.1.0 stored rows of ceil(P_l / 8) bytes; rows are now whole 64-bit
    words (LeNet's 300 x 100 layer: 3750 bytes then, 3752 now)."""
    model = _trained(num_tasks=2)
    x = _data(seed=5)[0][:8]
    legacy = {k: v[:, : (layer.num_weights + 7) // 8].clone()
              for (k, v), layer in zip(model.bank_state().items(), model.masked_layers)}
    assert any(v.shape[1] % 8 for v in legacy.values())
    other = _model(num_tasks=2)
    other.load_bank_state(legacy)
    for t in range(2):
        model.set_task(t)
        other.set_task(t)
        assert torch.equal(model(x), other(x))


def test_inference_works_under_no_grad():
    model = _trained()
    x = torch.randn(2, 1, 1, 28, 28)
    with torch.no_grad():
        tasks, steps = infer_tasks(model, x, method="one_shot", objective="entropy")
    assert tasks.shape == (2,) and steps == 1
    assert torch.equal(tasks, infer_tasks(model, x, method="one_shot", objective="entropy")[0])


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_binary_search_step_bound(k):
    model = _trained(num_tasks=k)
    x = torch.randn(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(k))
    tasks, steps = infer_tasks(model, x, method="binary", objective="entropy")
    assert steps <= math.ceil(math.log2(k))
    assert ((0 <= tasks) & (tasks < k)).all()


@pytest.mark.parametrize("log_base", [1.25, 1.5])
def test_binary_search_below_base_two_terminates(log_base):
    """Regression: 1 < log_base < 2 kept both of the last two candidates forever."""

    model = _trained(num_tasks=5)
    x = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    tasks, steps = infer_tasks(model, x, method="binary", objective="entropy", log_base=log_base)
    assert steps == num_inference_steps(5, log_base)
    assert ((0 <= tasks) & (tasks < 5)).all()


def test_nonfinite_input_is_a_clear_error():
    from supsup.inference import InferenceError

    model = _trained()
    x = torch.randn(1, 2, 1, 28, 28)
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InferenceError, match="non-finite"):
        infer_tasks(model, x)


def test_task_ids_out_of_range_are_refused_with_their_reason():
    model = _trained(num_tasks=2, capacity=3)
    layer = model.masked_layers[0]
    with pytest.raises(IndexError, match="no mask for task 2; the bank holds 2"):
        layer.write_mask(2, layer.stored_mask(0))
    with pytest.raises(IndexError, match="task 2 has no mask in the bank"):
        model.resume_task(2)
    with pytest.raises(ModeError, match="no task is being trained"):
        model.abandon_task()
    model.add_task()
    with pytest.raises(ModeError, match="task 2 is still being trained"):
        model.resume_task(0)


def test_resumed_scores_binarise_to_the_banked_mask_at_the_given_magnitude():
    """NN retraining restarts a task from its mask: scores +-1e-2 by default (small, so the
    first steps can move them), positive exactly where the mask keeps a weight."""
    model = _trained(num_tasks=2, capacity=2)
    model.resume_task(1)
    for layer in model.masked_layers:
        mask = layer.stored_mask(1)
        assert torch.equal(layer.scores.detach(), torch.where(mask, 1e-2, -1e-2).to(layer.weight.dtype))
    model.abandon_task()


def test_bank_bytes_count_the_allocated_rows():
    model = _trained(num_tasks=2, capacity=3)
    for layer in model.masked_layers:
        # uint8 rows of packed bits (1 per weight, padded to whole words), one row per task
        rows, width = layer.bank.shape
        assert layer.bank.dtype == torch.uint8 and rows >= 2
        assert layer.num_weights / 8 <= width < layer.num_weights / 8 + 8
        assert layer.bank_nbytes() == rows * width


def test_log_base_and_bank_loading_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"log_base must be > 1, got 1\.0"):
        num_inference_steps(5, 1.0)
    model = _model()
    state = model.bank_state()
    model.add_task()
    with pytest.raises(ModeError, match="cannot load a bank while a task is being trained"):
        model.load_bank_state(state)


def test_an_abandoned_sampled_mask_task_starts_again_as_a_fresh_one():
    """Bernoulli masks sample from a per-task generator: a task abandoned and added again draws
    the samples a fresh model draws for it (the generator is dropped with the task)."""
    def first_step_output(model):
        model.add_task()
        torch.manual_seed(0)
        return model(torch.ones(2, 1, 28, 28))

    a = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=10, mask_kind="bernoulli")
    a.add_task()
    a(torch.ones(2, 1, 28, 28))  # draws from task 0's generator
    a.abandon_task()
    b = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=10, mask_kind="bernoulli")
    assert torch.equal(first_step_output(a), first_step_output(b))


def test_a_topk_task_banks_the_density_it_trained_with():
    """The mask banked at finish_task is the forward pass's: top-k at the model's density (0.2
    here, not the 0.5 default), for every layer."""
    model = _model(mask_kind="topk", density=0.2)
    model.add_task()
    current = [layer.current_mask() for layer in model.masked_layers]
    for layer, mask in zip(model.masked_layers, current):
        assert mask.sum().item() == pytest.approx(0.2 * layer.num_weights, abs=1)
        assert torch.equal(layer.effective_weight() != 0, mask & (layer.weight != 0))
    model.finish_task()
    assert all(torch.equal(m, s) for m, s in zip(current, model.task_masks(0)))
