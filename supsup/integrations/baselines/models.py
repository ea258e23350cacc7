"""Dense networks for the baselines, and fixes for avalanche-lib 0.6.0 defects:

* ``MultiHeadClassifier.adaptation`` indexes a tensor with ``classes_in_this_experience``,
  which ``with_classes_timeline`` makes a ``set``: :class:`MultiHeadClassifierFix` passes a
  sorted list;
* ``WeightAndBiasPackNetModule`` decides ``has_bias`` from the weight, so ``freeze_pruned``
  crashes on bias-free layers: :func:`packnet_model` corrects the flag.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.packnet import PackNetModel, WeightAndBiasPackNetModule
from torch import nn

from ...backbones import create_backbone, init_weights
from ...rng import make_generator

__all__ = ["MultiHeadClassifierFix", "MultiHeadNet", "dense_model", "packnet_model"]


class MultiHeadClassifierFix(MultiHeadClassifier):
    """``MultiHeadClassifier`` that accepts ``classes_in_this_experience`` as a set.

    avalanche-lib 0.6.0 does ``active_units[curr_classes] = 1``, which raises for the sets
    that ``with_classes_timeline`` (and so ``class_incremental_benchmark``) produces."""

    def adaptation(self, experience):
        classes = experience.classes_in_this_experience
        if isinstance(classes, (set, frozenset)):
            experience = copy.copy(experience)
            experience.classes_in_this_experience = sorted(classes)
        super().adaptation(experience)


class MultiHeadNet(MultiTaskModule):
    """A shared ``body`` and one linear head per task (selected by the task label).
    Input ``(B, ...)``, task labels ``(B,)`` -> logits ``(B, num_classes)``."""

    def __init__(self, body: nn.Module, *, in_features: int, num_classes: int):
        super().__init__()
        self.body = body
        self.heads = MultiHeadClassifierFix(in_features, initial_out_features=num_classes)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads(self.body(x), task_label)


def packnet_model(net: nn.Module) -> PackNetModel:
    """``PackNetModel(net)`` that also works for bias-free layers (every supsup backbone).

    avalanche-lib 0.6.0 sets ``WeightAndBiasPackNetModule.has_bias`` from the *weight*, so
    ``freeze_pruned`` sets ``requires_grad`` on a ``None`` bias and raises."""
    model = PackNetModel(net)
    for module in model.modules():
        if isinstance(module, WeightAndBiasPackNetModule):
            module.has_bias = module.wrappee.bias is not None
    return model


def dense_model(backbone: str, *, input_shape: Sequence[int], num_classes: int, seed: int,
                head: str = "single") -> nn.Module:
    """The registered backbone as a dense network to train, Kaiming-normal weights from
    (seed, "backbone").

    Args:
        head: ``single`` (one output layer for every task), ``multi`` (:class:`MultiHeadNet`:
            the backbone's last Linear replaced by a head per task) or ``packnet``
            (:func:`packnet_model` around the single-head network).
    """
    net = create_backbone(backbone, input_shape=input_shape, num_outputs=num_classes)
    init_weights(net, "kaiming_normal", make_generator(seed, "backbone"))
    if head == "single":
        return net
    if head == "packnet":
        return packnet_model(net)
    if head == "multi":
        last = net[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError(f"backbone {backbone!r} does not end with nn.Linear")
        return MultiHeadNet(net[:-1], in_features=last.in_features, num_classes=num_classes)
    raise ValueError(f"unknown head {head!r}; known: single, multi, packnet")
