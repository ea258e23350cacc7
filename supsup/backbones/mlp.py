"""Fully connected backbones (the paper's MNIST networks)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import BACKBONES, features

__all__ = ["fc1024", "fc_300_300", "lenet_300_100", "mlp"]


def mlp(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int) -> nn.Sequential:
    """Flatten, then bias-free Linear layers with ReLU between them."""
    dims = [features(input_shape), *hidden, num_outputs]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def fc1024(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-1024-1024-out MLP (paper, PermutedMNIST)."""
    return mlp(input_shape, (1024, 1024), num_outputs)


def lenet_300_100(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-300-100-out MLP (LeNet 300-100, paper Fig. 3)."""
    return mlp(input_shape, (300, 100), num_outputs)


def fc_300_300(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-300-300-out MLP."""
    return mlp(input_shape, (300, 300), num_outputs)


BACKBONES.register("fc1024")(fc1024)
BACKBONES.register("lenet_300_100")(lenet_300_100)
BACKBONES.register("fc_300_300")(fc_300_300)
