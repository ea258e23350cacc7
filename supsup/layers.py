"""Supermask layers: a frozen ``nn.Linear`` / ``nn.Conv2d`` plus per-task masks.

Each wrapper keeps the original module as ``base_layer`` with its weight turned into a
*buffer*: it is saved with the model but is not a parameter, so no optimizer (Avalanche adds
every parameter before each experience) can ever touch it. The only parameter is the active
task's ``scores``. Finished tasks live in ``bank``, 1 bit per weight.

The layer's effective weight depends on the mode the owning :class:`~supsup.model.SupermaskModel`
sets (the layers have no public setters of their own):

* ``train``: ``W * binarize(scores)`` with a straight-through estimator (paper Sec. 3.1);
* ``task``: ``W * M_t`` for a mask ``M_t`` read from the bank (cached);
* ``superpose``: ``W * sum_i alpha_i M_i`` (paper eq. 3), either differentiable in ``alphas``
  or with a fixed coefficient (the fast batched task-inference path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import masks as M
from .modes import Mode, as_mode
from .norm import TaskBatchNorm
from .registry import Registry

__all__ = ["SCORE_INITS", "SupermaskLayer", "MaskedLinear", "MaskedConv2d", "wrap_backbone", "wrap_layer",
           "SUPPORTED_LAYERS"]

#: a new task's initial scores by name: ``fn(shape, dtype, generator) -> tensor`` (on the CPU,
#: so that every device gets the same numbers)
SCORE_INITS: Registry = Registry("score_init")


def kaiming_uniform_scores(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with ``a = sqrt(5)``: ``nn.Linear``'s default init, as edge-popup's scores."""
    scores = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
    return scores


SCORE_INITS.register("kaiming_uniform")(kaiming_uniform_scores)
#: "SupSup Transfer" (paper Sec. 4.4): a Kaiming-uniform draw steered by the earlier tasks'
#: masks (see :meth:`SupermaskLayer.transfer_scores`)
SCORE_INITS.register("transfer")(kaiming_uniform_scores)


class _SuperposedMask(torch.autograd.Function):
    """``coef = alphas @ M`` over a packed bank, with ``d coef / d alpha_i = M_i``.

    Memory is O(P) floats plus the packed bank: the float stack of masks that the original
    implementation kept (k x P floats) is never built.
    """

    @staticmethod
    def forward(ctx, alphas: torch.Tensor, packed: torch.Tensor, num_bits: int) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.num_bits = num_bits
        return M.bank_weighted_sum(packed, alphas, num_bits)

    @staticmethod
    def backward(ctx, grad_coef: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad = M.bank_matmul(packed, grad_coef.reshape(-1, 1), ctx.num_bits).squeeze(1)
        return grad, None, None


class SupermaskLayer(nn.Module):
    """Base class: a frozen base layer, the active task's scores and a packed mask bank."""

    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module, *, mask_kind: str = "threshold", density: float = 0.5,
                 score_init: str = "kaiming_uniform"):
        super().__init__()
        weight = base_layer.weight.detach().clone()
        bias = base_layer.bias.detach().clone() if getattr(base_layer, "bias", None) is not None else None
        # Turn the frozen parameters into buffers: saved, moved with .to(), never optimised.
        del base_layer.weight
        base_layer.register_buffer("weight", weight)
        if bias is not None:
            del base_layer.bias
            base_layer.register_buffer("bias", bias)
        self.base_layer = base_layer
        self.mask_kind = mask_kind
        self.density = density
        self.score_init = SCORE_INITS.get(score_init)
        self.scores: nn.Parameter | None = None
        #: a sampled mask kind's generator while a task trains (set by the model)
        self.sampler: torch.Generator | None = None
        self.register_buffer("bank", torch.zeros(0, M.packed_nbytes(weight.numel()), dtype=torch.uint8, device=weight.device))
        self.num_masks = 0
        self._mode = Mode.IDLE
        self._task_mask: torch.Tensor | None = None  # bool, for mode "task"
        self._cached_weight: torch.Tensor | None = None
        self._alphas: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None  # candidates of the superposition
        self._coef: torch.Tensor | None = None  # fixed superposition coefficient (fast path)
        self._count: torch.Tensor | None = None  # sum of the bank's masks, kept up to date

    # --------------------------------------------------------------- sizes and bank storage
    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight ``W``."""
        return self.base_layer.weight

    @property
    def num_weights(self) -> int:
        """``P_l``: number of masked weights of this layer."""
        return self.weight.numel()

    @property
    def bank_rows(self) -> torch.Tensor:
        """``(num_masks, packed_nbytes(P_l))`` uint8: the finished masks, packed (rows in whole
        64-bit words)."""
        return self.bank[: self.num_masks]

    def bank_nbytes(self) -> int:
        """Bytes the bank holds in memory (allocated rows, not only the used ones)."""
        return self.bank.numel() * self.bank.element_size()

    def reserve(self, capacity: int) -> None:
        """Grow the bank's storage to ``capacity`` rows (amortised: callers double)."""
        if capacity <= self.bank.shape[0]:
            return
        new = self.bank.new_zeros(capacity, self.bank.shape[1])
        new[: self.num_masks] = self.bank_rows
        self.bank = new

    def append_mask(self, mask: torch.Tensor, capacity_hint: int | None = None) -> None:
        """Store a finished boolean mask at 1 bit per weight."""
        self._check_mask(mask)
        if self.num_masks == self.bank.shape[0]:
            # Double (amortised O(1) appends), but never past the model's capacity so that a
            # full bank holds exactly num_tasks * packed_nbytes(P) bytes.
            target = 2 * max(1, self.num_masks)
            if capacity_hint is not None:
                target = min(target, capacity_hint)
            self.reserve(max(self.num_masks + 1, target))
        self.bank[self.num_masks] = M.pack_bits(mask)
        self.num_masks += 1
        if self._count is not None:
            self._count += mask.view(torch.uint8)

    def _check_mask(self, mask: torch.Tensor) -> None:
        # Checked before anything is written, so a bad mask leaves the bank and its count as
        # they were.
        if mask.dtype != torch.bool:
            raise TypeError(f"a mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")

    def write_mask(self, task_id: int, mask: torch.Tensor) -> None:
        """Overwrite a finished task's mask (NN: a task trained again)."""
        if not 0 <= task_id < self.num_masks:
            raise IndexError(f"no mask for task {task_id}; the bank holds {self.num_masks}")
        self._check_mask(mask)
        if self._count is not None:
            self._count += mask.view(torch.uint8)
            self._count -= self.stored_mask(task_id).view(torch.uint8)
        self.bank[task_id] = M.pack_bits(mask)

    def load_bank(self, rows: torch.Tensor) -> None:
        """Replace the bank with ``rows`` ``(k, packed_nbytes(P_l))`` uint8."""
        self.bank = rows.to(self.weight.device).clone()
        self.num_masks = rows.shape[0]
        self._count = None

    def cache_nbytes(self) -> int:
        """Bytes of what the layer keeps to speed up task inference (the mask count)."""
        return 0 if self._count is None else self._count.numel() * self._count.element_size()

    def mask_count(self) -> torch.Tensor:
        """``sum_i M_i`` over the bank (float, shape of the weight): with uniform alphas the
        superposed mask is ``count / k`` in O(P). Computed once, then updated in O(P) by every
        bank write (NN rewrites masks thousands of times; a full recount is O(k P))."""
        if self._count is None:
            ones = torch.ones(self.num_masks, dtype=self.weight.dtype, device=self.weight.device)
            self._count = M.bank_weighted_sum(self.bank_rows, ones, self.num_weights).view_as(self.weight).clone()
        return self._count

    def stored_mask(self, task_id: int) -> torch.Tensor:
        """Boolean mask of a finished task, shape of the weight."""
        if not 0 <= task_id < self.num_masks:
            raise IndexError(f"no mask for task {task_id}; the bank holds {self.num_masks}")
        return M.unpack_bits(self.bank[task_id], self.num_weights).view_as(self.weight)

    def current_mask(self) -> torch.Tensor:
        """Boolean mask of the active scores."""
        if self.scores is None:
            raise RuntimeError("no active scores")
        return M.binarize(self.scores.detach(), self.mask_kind, self.density)

    # ----------------------------------------------------------------------- scores
    def initial_scores(self, generator: torch.Generator) -> torch.Tensor:
        """A new task's scores (the layer's score init, :data:`SCORE_INITS`), drawn on the CPU
        so that every device gets the same numbers."""
        return self.score_init(self.weight.shape, self.weight.dtype, generator).to(self.weight.device)

    def transfer_scores(self, fresh: torch.Tensor) -> torch.Tensor:
        """"SupSup Transfer" from 1-bit masks: the official code starts task ``t``'s scores
        from the mean of the earlier tasks' float scores, which are not kept here. The earlier
        masks vote, the fresh draw ``fresh`` gives the magnitudes:

        * sign masks (threshold, Bernoulli: kept iff score >= 0): with the vote
          ``a = (2 count - t) / t`` in [-1, 1], ``a |fresh| + (1 - |a|) fresh``: where the
          earlier masks agree, their sign at a fresh init's magnitude; where they split evenly,
          the fresh draw;
        * top-k masks (ranked by |score|): with ``a = count / t`` in [0, 1], magnitude
          ``(a b + |fresh|) / 2`` (``b`` the Kaiming-uniform bound): weights every earlier mask
          kept lie in [b/2, b], weights none kept in [0, b/2].

        Fresh magnitudes keep as many scores near the threshold as a fresh start has, so a
        small step budget can still move the mask (full-size scores where the masks agree
        would freeze it at the earlier tasks' mask). Costs O(P) from the bank's mask count,
        whatever ``t``."""
        t = self.num_masks
        if t == 0:
            return fresh
        count = self.mask_count().to(fresh.device, fresh.dtype)
        if self.mask_kind == "topk":
            bound = 1.0 / math.sqrt(self.weight[0].numel())  # kaiming_uniform_, a = sqrt(5): sqrt(1/3) sqrt(3/fan_in)
            return fresh.sign() * (bound * count / t + fresh.abs()) / 2
        vote = (2 * count - t) / t
        return vote * fresh.abs() + (1 - vote.abs()) * fresh

    def set_scores(self, scores: torch.Tensor) -> None:
        """Start training from ``scores`` (shape of the weight)."""
        if scores.shape != self.weight.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(self.weight.shape)}")
        self.scores = nn.Parameter(scores.to(device=self.weight.device, dtype=self.weight.dtype))

    def scores_from_mask(self, mask: torch.Tensor, magnitude: float) -> None:
        """Scores that binarise to ``mask`` (to resume training a finished task)."""
        scores = torch.where(mask, magnitude, -magnitude).to(self.weight.dtype)
        self.scores = nn.Parameter(scores)

    def release_scores(self) -> None:
        self.scores = None

    # ------------------------------------------------------------------------ modes
    def set_mode(self, mode: Mode | str, *, task_mask: torch.Tensor | None = None,
                  alphas: torch.Tensor | None = None, packed: torch.Tensor | None = None,
                  coef: torch.Tensor | None = None) -> None:
        self._mode = as_mode(mode)
        self._task_mask = task_mask
        self._cached_weight = None
        self._alphas = alphas
        self._packed = packed
        self._coef = coef

    def effective_weight(self) -> torch.Tensor:
        """The weight the current mode uses; shape of ``W``."""
        mode = self._mode
        if mode is Mode.TRAIN:
            if self.scores is None:
                raise RuntimeError("train mode without active scores")
            return M.masked_weight(self.weight, self.scores, self.mask_kind, self.density, self.sampler)
        if mode is Mode.TASK:
            if self._cached_weight is None:
                # Same product as in training, so a banked mask gives bitwise-identical outputs.
                self._cached_weight = self.weight * self._task_mask
            return self._cached_weight
        if mode is Mode.SUPERPOSE:
            if self._coef is not None:
                return self.weight * self._coef
            coef = _SuperposedMask.apply(self._alphas, self._packed, self.num_weights)
            return self.weight * coef.view_as(self.weight)
        raise RuntimeError("the layer has no task to run: call add_task, set_task or superpose on the model")

    def extra_repr(self) -> str:
        return f"mask_kind={self.mask_kind!r}, num_masks={self.num_masks}, mode={self._mode.value!r}"


class MaskedLinear(SupermaskLayer):
    """A frozen ``nn.Linear`` with supermasks. Input ``(..., in)``, output ``(..., out)``."""

    def __init__(self, base_layer: nn.Linear, **kwargs):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MaskedLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.base_layer.bias)

    def alpha_grads(self, packed: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """This layer's ``d obj_g / d alpha_i``, ``(k, G)``, for inputs ``(G, n, ..., in)``."""
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        grad_out = grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])
        return M.bank_bilinear(packed, self.weight, grad_out, x)


class MaskedConv2d(SupermaskLayer):
    """A frozen ``nn.Conv2d`` with supermasks. Input ``(N, C, H, W)``."""

    def __init__(self, base_layer: nn.Conv2d, **kwargs):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"MaskedConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.padding_mode != "zeros":
            raise TypeError(f"MaskedConv2d supports padding_mode='zeros' only, got {base_layer.padding_mode!r}")
        super().__init__(base_layer, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return F.conv2d(x, self.effective_weight(), b.bias, b.stride, b.padding, b.dilation, b.groups)

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``x`` ``(G, n, C, H, W)``, ``grad_out`` ``(G, n, O, H', W')`` -> ``(G, *W.shape)``."""
        b = self.base_layer
        return torch.stack([
            torch.nn.grad.conv2d_weight(xg, self.weight.shape, gg, b.stride, b.padding, b.dilation, b.groups)
            for xg, gg in zip(x, grad_out)
        ])

    def alpha_grads(self, packed: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """This layer's ``d obj_g / d alpha_i``, ``(k, G)`` (conv layers are small: the
        ``(G, P_l)`` weight gradients are formed explicitly)."""
        gw = self.weight_grad(x, grad_out)
        u = (gw * self.weight).reshape(gw.shape[0], -1).t().contiguous()
        return M.bank_matmul(packed, u, self.num_weights)


SUPPORTED_LAYERS: dict[type, type[SupermaskLayer]] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def wrap_layer(layer: nn.Module, **kwargs) -> SupermaskLayer:
    """Wrap a frozen layer, dispatching on its type (``TypeError`` for anything else)."""
    for cls, wrapper in SUPPORTED_LAYERS.items():
        if type(layer) is cls:
            return wrapper(layer, **kwargs)
    raise TypeError(f"cannot mask {type(layer).__name__}; supported: {', '.join(c.__name__ for c in SUPPORTED_LAYERS)}")


def wrap_backbone(module: nn.Module, norm: str, **layer_kwargs) -> None:
    """Wrap, in place, every ``nn.Linear`` / ``nn.Conv2d`` of ``module`` (:func:`wrap_layer`)
    and every non-affine BatchNorm (:class:`~supsup.norm.TaskBatchNorm` with ``norm``);
    ``TypeError`` for any other module that holds parameters."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(module, name, wrap_layer(child, **layer_kwargs))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, TaskBatchNorm(child, norm=norm))
        elif isinstance(child, (SupermaskLayer, TaskBatchNorm)):
            raise TypeError(f"{name} is already wrapped")
        else:
            if any(True for _ in child.parameters(recurse=False)):
                raise TypeError(
                    f"cannot freeze {type(child).__name__} ({name}): only nn.Linear and nn.Conv2d "
                    "may hold parameters in a SupSup backbone (and non-affine BatchNorm, statistics only)")
            wrap_backbone(child, norm, **layer_kwargs)
