"""Pure tensor maths for supermasks: binarisation with a straight-through estimator, bit
packing, and products of a packed mask bank with dense tensors.

Notation (paper, Sec. 3): a frozen weight ``W`` (``P`` entries), real-valued ``scores`` of the
same shape, a binary mask ``M = binarize(scores)``; the task's effective weight is ``W * M``.
A bank of ``k`` finished masks is stored packed, ``(k, packed_nbytes(P))`` uint8, 1 bit per
weight, bit ``t`` of byte ``j`` holding weight ``8j + t`` (little-endian bit order). Rows are
padded with zero bits to whole 64-bit words (``8 * ceil(P/64)`` bytes, at most 7 bytes more
than ``ceil(P/8)``), so that a row reads as little-endian uint64 words: the compiled CPU
kernel (:mod:`supsup._kernels`) handles 64 weights per word.
"""

from __future__ import annotations

import math

import torch

from .kernels import (
    bit_kernels_available,
    compiled_kernels,
    kernel_dot,
    kernel_ok,
    kernel_threads,
)
from .registry import Registry

__all__ = [
    "MASK_KINDS",
    "SAMPLED_KINDS",
    "masked_weight",
    "sample_mask",
    "topk_mask",
    "threshold_mask",
    "binarize",
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "bank_matmul",
    "bank_bilinear",
    "bank_weighted_sum",
    "bit_kernels_available",
    "kernel_threads",
]


class _MaskedWeight(torch.autograd.Function):
    """``W * M`` with the straight-through estimator ``dM/dscores := 1`` (edge-popup, paper
    Sec. 3.1): the scores receive ``grad_out * W`` while the frozen weight receives nothing."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        # Multiply by the mask's bytes, not the bool tensor: on CPU, float * bool converts the
        # bool tensor on a slow path (4.1 ms vs 0.14 ms for 1024 x 1024, measured here), and
        # torch.where is no faster (2.3 ms). The values are identical (W * 1, W * 0).
        return weight * mask.view(torch.uint8)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_out * weight, None, None


#: mask kinds by name: ``fn(scores, density) -> bool mask`` of the same shape
MASK_KINDS: Registry = Registry("mask kind")


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """``M = [scores >= 0]`` (bool, same shape): the paper's setting for MNIST."""
    return scores >= 0


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * P)`` entries with the largest ``|scores|`` (edge-popup).

    Ties are broken by position so the mask always has exactly that many ones.
    """
    flat = scores.detach().abs().flatten()
    n = flat.numel()
    keep = max(1, min(n, int(round(density * n))))
    if keep == n:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = torch.topk(flat, keep, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[idx] = True
    return mask.view_as(scores)


MASK_KINDS.register("threshold")(lambda scores, density: threshold_mask(scores))
MASK_KINDS.register("topk")(topk_mask)
# Bernoulli supermasks (Zhou et al., 2019): trained on masks sampled with p = sigmoid(scores);
# the banked mask is the most likely one, p >= 0.5, i.e. scores >= 0.
MASK_KINDS.register("bernoulli")(lambda scores, density: threshold_mask(scores))

#: mask kinds whose training forward samples the mask (from a generator the layer is given)
SAMPLED_KINDS = ("bernoulli",)


def binarize(scores: torch.Tensor, kind: str, density: float = 0.5) -> torch.Tensor:
    """Binary mask of ``scores`` for a registered mask kind (:data:`MASK_KINDS`)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_KINDS.names())}")
    return MASK_KINDS.get(kind)(scores, density)


class _SampledWeight(torch.autograd.Function):
    """``W * M`` with ``M ~ Bernoulli(sigmoid(scores))`` sampled in the forward; the straight-
    through gradient treats the sample as its probability: ``d loss / d scores = grad_out * W *
    sigmoid'(scores)`` (Zhou et al., 2019)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scores, weight)
        return weight * mask.view(torch.uint8)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        scores, weight = ctx.saved_tensors
        p = torch.sigmoid(scores)
        return grad_out * weight * p * (1 - p), None, None


class _ThresholdWeight(torch.autograd.Function):
    """``W * [scores >= 0]`` computed by the compiled kernel in one pass (CPU, float32); the
    same straight-through gradient as :class:`_MaskedWeight`."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        with kernel_threads():
            out = compiled_kernels().threshold_weight(weight.detach().numpy().reshape(-1), scores.detach().numpy().reshape(-1))
        return torch.from_numpy(out).view_as(weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_out * weight, None


def _fused_threshold_ok(weight: torch.Tensor, scores: torch.Tensor) -> bool:
    # The kernel walks both arrays in step: same shape (no broadcasting), both on the CPU.
    return (weight.device.type == "cpu" and scores.device.type == "cpu" and weight.shape == scores.shape
            and weight.dtype == torch.float32 and scores.dtype == torch.float32
            and weight.is_contiguous() and scores.is_contiguous() and bit_kernels_available())


def sample_mask(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Bernoulli mask ``M ~ Bernoulli(sigmoid(scores))`` (bool, shape of ``scores``), drawn
    from ``generator`` on its device (the CPU for a CPU generator) and moved to the scores'."""
    u = torch.rand(scores.shape, generator=generator, device=generator.device)
    return u.to(scores.device) < torch.sigmoid(scores.detach())


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, kind: str = "threshold",
                  density: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Effective weight ``W * binarize(scores)``; gradients flow to ``scores`` only (STE). For a
    sampled kind (``bernoulli``) with a ``generator``, ``W * M`` with a freshly sampled mask."""
    if kind in SAMPLED_KINDS and generator is not None:
        return _SampledWeight.apply(scores, weight, sample_mask(scores, generator))
    if kind == "threshold" and _fused_threshold_ok(weight, scores):
        return _ThresholdWeight.apply(scores, weight)
    mask = binarize(scores.detach(), kind, density)
    if kind == "topk":
        # edge-popup ranks |scores|: the straight-through gradient reaches |scores|, and
        # scores through d|s|/ds = sign(s) (without it a pruned negative score would grow).
        return _MaskedWeight.apply(scores.abs(), weight, mask)
    return _MaskedWeight.apply(scores, weight, mask)


# ----------------------------------------------------------------------------- bit packing

def packed_nbytes(num_bits: int) -> int:
    """Bytes of one packed mask of ``num_bits`` bits: whole 64-bit words, ``8 * ceil(num_bits / 64)``."""
    return 8 * ((num_bits + 63) // 64)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor of ``P`` entries (any shape, flattened) into ``packed_nbytes(P)`` uint8
    (the bits past ``P`` are zero)."""
    flat = mask.flatten().to(torch.uint8)
    pad = 8 * packed_nbytes(flat.numel()) - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` on the last dim: ``(..., nbytes)`` -> ``(..., num_bits)`` bool."""
    # a table lookup, 8 bits per byte at once (several times faster than shift, mask and cast)
    bits = torch.nn.functional.embedding(packed.int(), _unpack_table(torch.uint8, packed.device))
    return bits.flatten(-2)[..., :num_bits].view(torch.bool)


def _unpack_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds the 8 bits of byte ``b`` as numbers."""
    b = torch.arange(256, device=device).unsqueeze(1)
    return ((b >> torch.arange(8, device=device)) & 1).to(dtype)


def _chunk_bytes(k: int, nbytes: int, budget: int) -> int:
    """Byte columns per chunk so that an unpacked ``(k, 8 * chunk)`` float block fits ``budget``."""
    return max(1, min(nbytes, budget // max(1, 8 * k)))


def bank_matmul(packed: torch.Tensor, dense: torch.Tensor, num_bits: int,
                budget: int = 1 << 22, *, use_kernel: bool | None = None) -> torch.Tensor:
    """``M @ dense`` for a packed binary matrix, without unpacking it whole.

    Args:
        packed: ``(k, packed_nbytes(P))`` uint8, row ``i`` the packed mask ``M_i``.
        dense: ``(P, B)`` float.
        num_bits: ``P``.
        budget: unpacked entries per chunk (memory stays O(budget + k * B)).
        use_kernel: None (default): the compiled CPU kernel for up to ``KERNEL_MAX_COLUMNS``
            columns, else unpack and matmul; True / False: force one or the other.

    Returns:
        ``(k, B)``: entry ``(i, b) = <M_i, dense[:, b]>``. This is the per-task gradient
        ``d obj / d alpha_i = <(d obj / d W_eff) * W, M_i>`` of superposition (paper eq. 4),
        for ``B`` inferences that share one pass over the bank.
    """
    k, nbytes = packed.shape
    if dense.shape[0] != num_bits:
        raise ValueError(f"dense has {dense.shape[0]} rows, expected {num_bits}")
    if kernel_ok(packed, dense.dtype, dense.shape[1], use_kernel, dense.requires_grad and torch.is_grad_enabled()):
        return kernel_dot(packed, dense.t())
    out = dense.new_zeros(k, dense.shape[1])
    if k == 0:
        return out
    table = _unpack_table(dense.dtype, dense.device)
    step = _chunk_bytes(k, nbytes, budget)
    for start in range(0, nbytes, step):
        stop = min(nbytes, start + step)
        lo, hi = 8 * start, min(num_bits, 8 * stop)
        if lo >= hi:  # only padding bytes left
            break
        # embedding = table lookup: 8 floats per byte, the fastest unpack on CPU (int32 indices:
        # the index copy is half the size of int64's, about 1.4x faster overall).
        bits = torch.nn.functional.embedding(packed[:, start:stop].int(), table).view(k, -1)
        out.addmm_(bits[:, : hi - lo], dense[lo:hi])
    return out


def bank_bilinear(packed: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, x: torch.Tensor,
                  budget: int = 1 << 22, *, use_kernel: bool | None = None) -> torch.Tensor:
    """Per-mask gradients of superposition for a linear layer, for ``G`` inferences at once.

    Entry ``(i, g) = sum_{o,n} M_i[o,n] W[o,n] sum_s delta[g,s,o] x[g,s,n]``: the paper's
    ``d obj_g / d alpha_i`` contribution of this layer, since ``d obj / d W_eff`` is
    ``sum_s delta_s x_s^T`` (eq. 4). Works row-chunk by row-chunk, so neither the ``k x P``
    float stack nor the ``P x G`` matrix of weight gradients is ever built: memory is
    O(budget + G * rows * in); or, when ``k * n <= G``, mask by mask (O(P + G * n * out)).

    Args:
        packed: ``(k, ceil(out*in/8))`` uint8 masks of a ``(out, in)`` weight.
        weight: ``(out, in)`` frozen weight.
        delta: ``(G, n, out)`` gradient of the objective w.r.t. the layer's output.
        x: ``(G, n, in)`` the layer's input.
        use_kernel: as for :func:`bank_matmul` (the kernel path forms the ``(G, P)`` products
            ``(sum_s delta_s x_s^T) * W`` explicitly: O(G * P) floats, G is small there).

    Returns:
        ``(k, G)``.
    """
    k = packed.shape[0]
    out_f, in_f = weight.shape
    G = delta.shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (delta, x, weight))
    if k and kernel_ok(packed, weight.dtype, G, use_kernel, needs_grad):
        u = torch.bmm(delta.transpose(1, 2), x) if delta.shape[1] != 1 else delta.transpose(1, 2) * x
        return kernel_dot(packed, (u * weight).reshape(G, -1))
    res = delta.new_zeros(k, G)
    if k == 0:
        return res
    n = delta.shape[1]
    if k * n <= G:
        # Few masks, many inferences from few images each (GN evaluation: 79 single-image
        # inferences over 10 masks): one masked forward per mask, (W * M_i) applied to every
        # inference's inputs, is k GEMMs and never forms the (P, G) products below (5x faster
        # for FC 1024 at k = 10, G = 79, n = 1).
        xs = x.reshape(G * n, in_f)
        table = _unpack_table(weight.dtype, weight.device)
        for i in range(k):
            bits = torch.nn.functional.embedding(packed[i].int(), table).view(-1)[: out_f * in_f]
            w_i = weight * bits.view(out_f, in_f)
            res[i] = (torch.mm(xs, w_i.t()).view(G, n, out_f) * delta).sum(dim=(1, 2))
        return res
    table = _unpack_table(weight.dtype, weight.device)
    r0 = 8 // math.gcd(in_f, 8)  # chunks must start on a byte boundary
    # Both the unpacked bits (k x rows*in) and u (rows*in x G) stay within the budget.
    rows = max(r0, (budget // max(1, max(k, G) * in_f)) // r0 * r0)
    single = n == 1
    for r in range(0, out_f, rows):
        r1 = min(out_f, r + rows)
        lo, hi = r * in_f, r1 * in_f
        bits = torch.nn.functional.embedding(packed[:, lo // 8: (hi + 7) // 8].int(), table).view(k, -1)[:, : hi - lo]
        if single:  # rank one per inference: an outer product, no matmul needed
            u = delta[:, 0, r:r1].t().unsqueeze(1) * x[:, 0, :].t().unsqueeze(0)  # (rows, in, G)
        else:
            u = torch.einsum("gso,gsi->oig", delta[:, :, r:r1], x)
        u = u * weight[r:r1].unsqueeze(-1)
        res.addmm_(bits, u.view(-1, G))
    return res


def bank_weighted_sum(packed: torch.Tensor, alphas: torch.Tensor, num_bits: int,
                      budget: int = 1 << 22) -> torch.Tensor:
    """``alphas @ M``: the superposed mask ``sum_i alpha_i M_i`` (paper eq. 3).

    Args:
        packed: ``(k, packed_nbytes(P))`` uint8.
        alphas: ``(k,)`` or ``(G, k)`` float (``G`` superpositions at once).
        num_bits: ``P``.

    Returns:
        ``(P,)`` or ``(G, P)`` float.
    """
    squeeze = alphas.dim() == 1
    a = alphas.unsqueeze(0) if squeeze else alphas
    k, nbytes = packed.shape
    if a.shape[1] != k:
        raise ValueError(f"alphas has {a.shape[1]} entries, bank has {k} masks")
    out = a.new_zeros(a.shape[0], num_bits)
    if k:
        table = _unpack_table(a.dtype, a.device)
        step = _chunk_bytes(k, nbytes, budget)
        for start in range(0, nbytes, step):
            stop = min(nbytes, start + step)
            lo, hi = 8 * start, min(num_bits, 8 * stop)
            if lo >= hi:  # only padding bytes left
                break
            bits = torch.nn.functional.embedding(packed[:, start:stop].int(), table).view(k, -1)
            out[:, lo:hi] = a @ bits[:, : hi - lo]
    return out[0] if squeeze else out

