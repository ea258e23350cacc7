"""HopSupSup (paper Sec. 3.5): masks on neurons, kept only as attractors of Hopfield networks,
recovered from unlabelled test data.

The network (the official code's ``BNNet`` for SplitMNIST): ``784 -> 2048 -> 2048 -> classes``
with Swish, every weight frozen at a signed constant, no bias. After each hidden linear layer a
BatchNorm without affine parameters or running statistics (always the batch's own statistics)
whose per-neuron weight is the task's binary mask ``m = 1[s >= 0]`` (straight-through
gradient to the scores ``s``); one head shared by all tasks.

- Training a task (:func:`train_neuron_masks`): scores start at 0 (all neurons on), SGD on the
  cross-entropy; then each layer's mask is added to that layer's :class:`~supsup.hopfield.
  HopfieldStore` and the scores are dropped.
- Recovery (:func:`recover_masks`, the official ``hopfield_recovery``): new scores start at the
  mean of the stored patterns; one pass over the task's unlabelled test batches, SGD on

      L_b = (1 - t_b) H(f(x_b; m(s))) + gamma t_b sum_l E_l(2 m_l(s_l) - 1),   t_b = (b + 1) / N

  where ``H`` is the mean output entropy of batch ``b`` of ``N``, ``E_l(x) = -1/2 x^T W_l x``
  the energy of layer ``l``'s store. Early batches follow the entropy (which mask makes the
  network confident on these images), later ones the energy (fall into the nearest stored
  mask); the last batch is energy alone.

Because the masks act through batch statistics, a prediction needs a batch (of the paper's 64
test images): HopSupSup cannot classify one image alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.registry import signed_constant
from .hopfield import HopfieldStore
from .objectives import entropy
from .rng import make_generator

__all__ = ["NeuronMaskNet", "Recovery", "batch_positions", "binary_masks", "evaluate_neuron_masks",
           "evaluation_batches", "hamming", "mask_bytes", "mask_of", "recover_masks", "recovery_loss",
           "scores_for", "train_neuron_masks"]


class _Binarize(torch.autograd.Function):
    """``1[s >= 0]`` forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def mask_of(scores: torch.Tensor) -> torch.Tensor:
    """The binary mask ``1[scores >= 0]`` ``(d,)``, differentiable straight-through."""
    return _Binarize.apply(scores)


def binary_masks(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The masks ``1[s >= 0]`` of scores (one ``(d,)`` per layer), as float tensors, no gradient."""
    return [(s >= 0).float() for s in scores]


def scores_for(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores ``2 m - 1`` whose masks are the binary ``masks`` (to run the network with a given mask)."""
    return [2 * m.float() - 1 for m in masks]


class NeuronMaskNet(nn.Module):
    """Frozen ``in -> hidden[0] -> ... -> num_classes`` MLP with a masked, non-affine BatchNorm
    (batch statistics) and Swish after every hidden layer, and one Hopfield store per hidden layer.

    ``forward(x, scores)``: ``x`` ``(B, ...)`` flattened to ``(B, in_features)``; ``scores`` one
    ``(hidden[l],)`` tensor per hidden layer; returns logits ``(B, num_classes)``. ``B >= 2``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *, seed: int = 0,
                 rule: str = "storkey", weight_init=signed_constant, device: torch.device | str | None = None):
        super().__init__()
        if not hidden:
            raise ValueError("NeuronMaskNet needs at least one hidden layer (the masks live there)")
        widths = [in_features, *hidden, num_classes]
        self.hidden = list(hidden)
        self.num_classes = num_classes
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        gen = make_generator(seed, "hopsupsup_weights")
        for lin in self.linears:  # on CPU with one generator, in order: the same weights on any device
            weight_init(lin.weight.data, gen)
            lin.weight.requires_grad_(False)
        self.stores = nn.ModuleList(HopfieldStore(d, rule) for d in hidden)
        if device is not None:
            self.to(device)

    @property
    def num_tasks(self) -> int:
        """Masks stored so far."""
        return self.stores[0].num_patterns

    @property
    def store_bytes(self) -> int:
        """Bytes of the Hopfield stores: fixed, whatever the number of tasks."""
        return sum(s.nbytes for s in self.stores)

    def new_scores(self) -> list[torch.Tensor]:
        """A new task's scores: zeros (every neuron on), as the official ``bn_mask_initv2``."""
        dev = self.linears[0].weight.device
        return [torch.zeros(d, device=dev) for d in self.hidden]

    def forward(self, x: torch.Tensor, scores: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(scores) != len(self.hidden):
            raise ValueError(f"expected scores for {len(self.hidden)} hidden layers, got {len(scores)}")
        h = x.flatten(1)
        for lin, s in zip(self.linears[:-1], scores):
            h = F.batch_norm(lin(h), None, None, weight=mask_of(s), bias=None, training=True, eps=1e-5)
            h = h * torch.sigmoid(h)  # Swish
        return self.linears[-1](h)

    @torch.no_grad()
    def store_task(self, scores: Sequence[torch.Tensor]) -> None:
        """Add a learned task's masks ``1[s >= 0]`` to the stores (the scores can then go)."""
        for store, mask in zip(self.stores, binary_masks(scores)):
            store.store(mask)


def train_neuron_masks(model: NeuronMaskNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                       lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> tuple[list[torch.Tensor], list[float]]:
    """Learn one task's neuron scores by SGD on the cross-entropy over ``batches`` of
    ``(x (B, ...), y (B,))``; only the scores change. Returns the scores (one ``(d,)`` per
    hidden layer) and the loss of every step."""
    scores = [s.requires_grad_() for s in model.new_scores()]
    opt = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x, scores), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return [s.detach() for s in scores], losses


def recovery_loss(model: NeuronMaskNet, x: torch.Tensor, scores: Sequence[torch.Tensor], t: float,
                  gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - t) H + gamma t sum_l E_l`` on one batch ``x`` ``(B, ...)`` (see the module doc);
    returns ``(loss, H, sum_l E_l)``, scalars."""
    logits = model(x, scores)
    h = entropy(logits, logits.shape[-1])  # mean over the batch
    e = sum(store.energy(2 * mask_of(s) - 1) for store, s in zip(model.stores, scores))
    return (1 - t) * h + gamma * t * e, h, e


@dataclass
class Recovery:
    """A recovered mask: ``scores`` per hidden layer, the ``steps`` taken, the wall time, and
    the entropy and energy of every step."""

    scores: list[torch.Tensor]
    steps: int
    seconds: float
    entropies: list[float] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)

    def masks(self) -> list[torch.Tensor]:
        return binary_masks(self.scores)


def recover_masks(model: NeuronMaskNet, images: Sequence[torch.Tensor], *, lr: float = 500.0,
                  momentum: float = 0.9, weight_decay: float = 1e-4, gamma: float = 1.5e-3) -> Recovery:
    """Recover a task's masks from its unlabelled test batches ``images`` (each ``(B, ...)``,
    ``B >= 2``): one SGD step per batch on :func:`recovery_loss` with ``t = (b + 1) / N``,
    starting from the mean of the stored patterns. The official settings are the defaults."""
    if model.num_tasks == 0:
        raise ValueError("no mask is stored: learn a task before recovering one")
    n = len(images)
    if n == 0:
        raise ValueError("recovery needs at least one batch of images")
    t0 = time.perf_counter()
    scores = [store.mean_pattern().clone().requires_grad_() for store in model.stores]
    opt = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay)
    out = Recovery(scores=scores, steps=n, seconds=0.0)
    for b, x in enumerate(images):
        loss, h, e = recovery_loss(model, x, scores, (b + 1) / n, gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.entropies.append(float(h.detach()))
        out.energies.append(float(e.detach()))
    out.scores = [s.detach() for s in scores]
    out.seconds = time.perf_counter() - t0
    return out


@torch.no_grad()
def evaluate_neuron_masks(model: NeuronMaskNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          scores: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(correct, total)`` of the model with the masks of ``scores`` over labelled batches."""
    correct = total = 0
    for x, y in batches:
        correct += int((model(x, scores).argmax(1) == y).sum())
        total += y.numel()
    return correct, total


def batch_positions(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Positions ``0..n-1`` (shuffled with ``generator`` when given) cut into batches of
    ``batch_size``; a last batch of one image joins the one before (batch statistics need two)."""
    if n < 2:
        raise ValueError(f"a batch-statistics network needs at least 2 images, got {n}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    cuts = list(order.split(batch_size))
    if len(cuts) > 1 and cuts[-1].numel() == 1:
        cuts[-2] = torch.cat(cuts[-2:])
        cuts.pop()
    return cuts


def evaluation_batches(num_images: int, batch_size: int, seed: int, task_id: int) -> list[torch.Tensor]:
    """A task's test images, shuffled by ``(seed, task_id)``, in the batches recovery and
    evaluation share (:func:`batch_positions`): the same order in every runner."""
    return batch_positions(num_images, batch_size, make_generator(seed, "hopsupsup_test_order", task_id))


def hamming(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> int:
    """Neurons whose mask differs between two masks sets (one ``(d,)`` per layer each)."""
    return int(sum(int((x != y).sum()) for x, y in zip(a, b)))


def mask_bytes(hidden: Sequence[int]) -> int:
    """What one task's neuron masks would cost kept explicitly, at 1 bit per neuron."""
    return sum(math.ceil(d / 8) for d in hidden)
