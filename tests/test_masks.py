"""Pure mask maths: packing, straight-through estimator, packed-bank products."""

from __future__ import annotations

import math
import os

import pytest
import torch

from supsup import masks as M
from supsup.inference import num_inference_steps
from supsup.kernels import KERNEL_MAX_COLUMNS


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_pack_unpack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.5
    packed = M.pack_bits(mask)
    # whole 64-bit words: at most 7 bytes more than ceil(n / 8), the padding bits zero
    assert packed.dtype == torch.uint8 and packed.numel() == M.packed_nbytes(n) == 8 * ((n + 63) // 64)
    assert packed.numel() - (n + 7) // 8 <= 7
    assert torch.equal(M.unpack_bits(packed, n), mask)
    assert not M.unpack_bits(packed, 8 * packed.numel())[n:].any()


def test_pack_bit_order_is_little_endian():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[0] = mask[9] = True
    assert M.pack_bits(mask).tolist() == [1, 2, 0, 0, 0, 0, 0, 0]


def test_bank_matmul_and_weighted_sum_match_dense():
    g = torch.Generator().manual_seed(0)
    k, p, b = 7, 1003, 5
    masks = torch.rand(k, p, generator=g) < 0.5
    packed = torch.stack([M.pack_bits(m) for m in masks])
    dense = torch.randn(p, b, generator=g)
    alphas = torch.randn(3, k, generator=g)
    ref = masks.float() @ dense
    # compiled kernel (up to 8 columns), and the torch path: tiny budget, many chunks with a
    # ragged last one. With SUPSUP_KERNELS=torch (what a GPU runs) there is no kernel at all.
    assert M.bit_kernels_available() == (os.environ.get("SUPSUP_KERNELS", "auto") != "torch")
    assert torch.allclose(M.bank_matmul(packed, dense, p), ref, atol=1e-5)
    assert torch.allclose(M.bank_matmul(packed, dense, p, use_kernel=True), ref, atol=1e-5)
    for budget in (1 << 22, 64):
        assert torch.allclose(M.bank_matmul(packed, dense, p, budget=budget, use_kernel=False), ref, atol=1e-5)
        for rows in (0, 1):  # an empty bank and a bank of one mask
            assert torch.allclose(M.bank_matmul(packed[:rows], dense, p, budget=budget, use_kernel=False),
                                  ref[:rows], atol=1e-5)
        assert torch.allclose(M.bank_weighted_sum(packed, alphas, p, budget=budget), alphas @ masks.float(), atol=1e-5)
        assert torch.allclose(M.bank_weighted_sum(packed, alphas[0], p, budget=budget), alphas[0] @ masks.float(), atol=1e-5)


def test_bank_matmul_routes_products_to_the_compiled_kernel_as_documented(monkeypatch):
    """Few columns of float32 without a gradient to keep: the compiled kernel (when built);
    use_kernel=False, many columns, float16, or a dense operand that needs a gradient: torch."""
    g = torch.Generator().manual_seed(2)
    k, p = 5, 333
    packed = torch.stack([M.pack_bits(m) for m in torch.rand(k, p, generator=g) < 0.5])
    calls = []
    real = M.kernel_dot
    monkeypatch.setattr(M, "kernel_dot", lambda *a: (calls.append(1), real(*a))[1])
    routes = [(torch.randn(p, 2, generator=g), {}, True),
              (torch.randn(p, 2, generator=g), {"use_kernel": False}, False),
              (torch.randn(p, KERNEL_MAX_COLUMNS + 1, generator=g), {}, False),
              (torch.randn(p, 2, generator=g).half(), {}, False),
              (torch.randn(p, 2, generator=g, requires_grad=True), {}, False)]
    for dense, kw, kernel in routes:
        calls.clear()
        M.bank_matmul(packed, dense, p, **kw)
        assert bool(calls) == (kernel and M.bit_kernels_available()), (dense.shape, dense.dtype, kw)
    with pytest.raises(ValueError) as err:
        M.bank_matmul(packed, torch.randn(p + 1, 2), p)
    assert str(err.value) == f"dense has {p + 1} rows, expected {p}"


def test_bank_matmul_is_differentiable_in_dense():
    """The compiled kernel is not differentiable: a dense operand that needs a gradient must
    take the torch path, whatever the column count."""
    g = torch.Generator().manual_seed(1)
    k, p = 5, 333
    masks = torch.rand(k, p, generator=g) < 0.5
    packed = torch.stack([M.pack_bits(m) for m in masks])
    dense = torch.randn(p, 2, generator=g, requires_grad=True)
    out = M.bank_matmul(packed, dense, p)
    out.sum().backward()
    assert torch.allclose(dense.grad, masks.float().sum(0, keepdim=True).T.expand(p, 2), atol=1e-6)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
def test_topk_density_is_exact(density):
    scores = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    mask = M.binarize(scores, "topk", density)
    assert mask.sum().item() == round(density * scores.numel())
    kept = scores.abs()[mask]
    if density < 1:
        assert kept.min() >= scores.abs()[~mask].max()


def test_topk_keeps_at_least_the_largest_score():
    """A density that rounds to no weight still keeps one (a layer with no weight would cut
    the network): the one with the largest |score|."""
    scores = torch.tensor([[0.1, -3.0, 0.2], [0.5, -0.4, 0.0]])
    assert torch.equal(M.binarize(scores, "topk", 0.01), scores.abs() == 3.0)
    assert M.binarize(scores, "topk", 0.4).sum() == 2  # round(2.4)


def test_threshold_mask_and_straight_through_gradient():
    w = torch.randn(4, 5)
    s = torch.randn(4, 5, requires_grad=True)
    out = M.masked_weight(w, s, "threshold")
    assert torch.equal(out, w * (s.detach() >= 0))
    g = torch.randn(4, 5)
    out.backward(g)
    assert torch.allclose(s.grad, g * w)  # STE: d mask / d scores := 1


def test_threshold_keeps_a_score_of_exactly_zero():
    """The boundary is part of the rule: ``M = [scores >= 0]`` keeps a weight whose score is 0
    (and -0.0), in the banked mask and in the training forward alike."""
    scores = torch.tensor([-1e-30, -0.0, 0.0, 1e-30, -2.0, 3.0])
    expected = [False, True, True, True, False, True]
    assert M.threshold_mask(scores).tolist() == expected
    assert M.binarize(scores, "threshold").tolist() == expected
    w = torch.ones(6)
    assert M.masked_weight(w, scores.clone().requires_grad_(True)).tolist() == [float(e) for e in expected]


def test_binary_steps_bound():
    for k in range(1, 300):
        assert num_inference_steps(k, 2.0) == (math.ceil(math.log2(k)) if k > 1 else 0)


def test_binary_steps_terminate_below_base_two():
    """Regression: with 1 < log_base < 2, keeping ceil(2 / log_base) = 2 of 2 candidates
    never shrank the set, so the search looped forever; every step must drop one."""
    for base in (1.01, 1.25, 1.5, 1.99):
        for k in range(1, 60):
            steps = num_inference_steps(k, base)
            assert steps <= k - 1
            assert steps >= (math.ceil(math.log2(k)) if k > 1 else 0)  # no step more than halves


def test_topk_gradient_goes_through_abs():
    """Regression: topk ranks |scores|, so the gradient must be multiplied by sign(scores);
    without it a negative score that should be pruned grew in magnitude and training stalled
    at chance accuracy."""
    w = torch.randn(6, 5)
    s = torch.randn(6, 5, requires_grad=True)
    out = M.masked_weight(w, s, "topk", 0.5)
    g = torch.randn(6, 5)
    out.backward(g)
    assert torch.allclose(s.grad, g * w * s.detach().sign())


@pytest.mark.parametrize("n, in_f, G", [(1, 16, 4), (3, 13, 4), (2, 6, 4), (1, 16, 30), (2, 13, 30)])
def test_bank_bilinear_matches_dense(n, in_f, G):
    """Every path: the kernel, the row-chunked torch path (k * n > G) and the mask-by-mask one
    (k * n <= G: many inferences, few masks)."""
    g = torch.Generator().manual_seed(n)
    k, out_f = 5, 11
    masks = torch.rand(k, out_f, in_f, generator=g) < 0.5
    packed = torch.stack([M.pack_bits(m) for m in masks])
    w = torch.randn(out_f, in_f, generator=g)
    delta, x = torch.randn(G, n, out_f, generator=g), torch.randn(G, n, in_f, generator=g)
    gw = torch.einsum("gso,gsi->goi", delta, x)  # d obj / d W_eff per inference
    ref = torch.einsum("koi,goi->kg", masks.float() * w, gw)
    assert torch.allclose(M.bank_bilinear(packed, w, delta, x, use_kernel=True), ref, atol=1e-4)
    for budget in (1 << 22, 50):  # torch path: one chunk, many chunks (6 inputs: 4 rows to a byte boundary)
        assert torch.allclose(M.bank_bilinear(packed, w, delta, x, budget=budget, use_kernel=False), ref, atol=1e-4)


def test_kernel_matches_torch_path_on_a_large_bank_and_repeats_bitwise():
    """The compiled kernel blocks masks and words; check a bank with ragged blocks on both
    axes against the torch path, and that two calls agree bit for bit."""
    g = torch.Generator().manual_seed(3)
    k, p = 37, 64 * 1100 + 13
    masks = torch.rand(k, p, generator=g) < 0.5
    packed = torch.stack([M.pack_bits(m) for m in masks])
    dense = torch.randn(p, 3, generator=g)
    fast = M.bank_matmul(packed, dense, p, use_kernel=True)
    assert torch.allclose(fast, M.bank_matmul(packed, dense, p, use_kernel=False), rtol=1e-5, atol=1e-3)
    assert torch.equal(fast, M.bank_matmul(packed, dense, p, use_kernel=True))


def test_fused_rmsprop_matches_torch_rmsprop():
    """FusedRMSprop's one-pass step gives torch's RMSprop update (up to rounding), with the same
    state, and falls back to torch's step for what the kernel does not cover (momentum)."""
    from supsup.optim import FusedRMSprop

    g = torch.Generator().manual_seed(0)
    for kw in ({}, {"weight_decay": 0.01}, {"momentum": 0.9}):
        ps = [torch.nn.Parameter(torch.randn(300, 7, generator=g)), torch.nn.Parameter(torch.randn(11, generator=g))]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        fused, ref = FusedRMSprop(ps, lr=1e-2, **kw), torch.optim.RMSprop(qs, lr=1e-2, **kw)
        for _ in range(10):
            for p, q in zip(ps, qs):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            fused.step()
            ref.step()
        for p, q in zip(ps, qs):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        sf, sr = fused.state_dict()["state"], ref.state_dict()["state"]
        assert sf.keys() == sr.keys() and all(sf[i].keys() == sr[i].keys() for i in sf)
        assert all(torch.allclose(sf[i]["square_avg"], sr[i]["square_avg"]) for i in sf)


def test_kernel_choice_is_read_from_the_environment():
    """``SUPSUP_KERNELS=torch`` disables the compiled kernels; a bad value is a clear error."""
    import subprocess
    import sys

    code = "from supsup import masks as M; print(M.bit_kernels_available())"
    for value, expected in (("torch", "False"), ("auto", "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SUPSUP_KERNELS": value},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == expected
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SUPSUP_KERNELS": "cuda"},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "SUPSUP_KERNELS='cuda'" in r.stderr


def test_the_thread_count_the_user_set_is_kept():
    """numba's OpenMP layer resets the shared OpenMP thread count to every core at its first
    launch; a job given one thread (OMP_NUM_THREADS=1) must stay on one thread through a
    training step (fused RMSprop) and a task inference (bank kernel)."""
    import subprocess
    import sys

    code = """
import torch
from supsup import SupermaskModel, TrainConfig, train_task, infer_task
before = torch.get_num_threads()
m = SupermaskModel.from_name("lenet_300_100", num_tasks=2, num_outputs=20, num_classes=10)
batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))] * 2
train_task(m, batches); train_task(m, batches)
infer_task(m, batches[0][0][:2])
print(before, torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]


def test_bernoulli_masks_are_sampled_in_training_and_banked_at_p_half():
    """mask.kind bernoulli: each training forward samples M ~ Bernoulli(sigmoid(s)) from the
    layer's generator (reproducible), the gradient is grad * W * sigmoid'(s), and the banked
    mask is the most likely one, s >= 0."""
    w = torch.randn(50, 40)
    s = torch.randn(50, 40, requires_grad=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = M.masked_weight(w, s, "bernoulli", generator=g1)
    b = M.masked_weight(w, s, "bernoulli", generator=g2)
    c = M.masked_weight(w, s, "bernoulli", generator=g1)
    assert torch.equal(a, b) and not torch.equal(a, c)  # same stream, same sample; the next one differs
    kept = (a != 0) | (w == 0)
    p = torch.sigmoid(s.detach())
    assert abs(kept.float().mean() - p.mean()) < 0.05
    grad = torch.randn(50, 40)
    a.backward(grad)
    assert torch.allclose(s.grad, grad * w * p * (1 - p))
    assert torch.equal(M.binarize(s.detach(), "bernoulli"), s.detach() >= 0)
    # without a generator (evaluation), the deterministic mask
    assert torch.equal(M.masked_weight(w, s, "bernoulli"), w * (s.detach() >= 0))


def test_the_fused_threshold_kernel_equals_the_torch_product_bitwise():
    """The one-pass kernel gives exactly W * [s >= 0] (signed zeros included) and the same
    straight-through gradient."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g)
    s = torch.randn(300, 70, generator=g)
    s[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0])
    a = s.clone().requires_grad_(True)
    fused = M.masked_weight(w, a, "threshold")
    ref = w * (s >= 0).view(torch.uint8)
    assert torch.equal(fused, ref) and torch.equal(torch.signbit(fused), torch.signbit(ref))
    grad = torch.randn(300, 70, generator=g)
    fused.backward(grad)
    assert torch.equal(a.grad, grad * w)
    if os.environ.get("SUPSUP_KERNELS", "auto") != "torch":
        assert type(fused.grad_fn).__name__.startswith("_ThresholdWeight")


def test_scores_that_broadcast_take_the_torch_path_not_the_kernel():
    """The kernel walks weight and scores in step; scores of another shape (broadcast by torch)
    must not reach it (it would read past their end and return a wrongly shaped gradient)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    s = torch.randn(64, 1, generator=g).requires_grad_(True)
    out = M.masked_weight(w, s, "threshold")
    assert torch.equal(out, w * (s.detach() >= 0).view(torch.uint8))
    out.sum().backward()
    assert s.grad.shape == s.shape and torch.allclose(s.grad, w.sum(1, keepdim=True))
