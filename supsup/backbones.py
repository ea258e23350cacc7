"""Frozen random backbones, registered by name.

Every factory takes ``input_shape`` (C, H, W) or (features,) and ``num_outputs`` (real
classes plus superfluous neurons) keyword-only, and returns a plain ``nn.Sequential`` of
bias-free ``nn.Linear`` / ``nn.Conv2d`` and parameter-free modules (the paper's setting);
:class:`~supsup.model.SupermaskModel` wraps and freezes it. Weights are initialised by
:func:`init_weights` from a local generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .registry import Registry

__all__ = ["BACKBONES", "WEIGHT_INITS", "create_backbone", "init_weights"]

BACKBONES: Registry[Callable[..., nn.Sequential]] = Registry("backbone")
WEIGHT_INITS: Registry[Callable[[torch.Tensor, torch.Generator], None]] = Registry("weight_init")


def _features(input_shape: Sequence[int]) -> int:
    return int(math.prod(input_shape))


def _mlp(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int) -> nn.Sequential:
    dims = [_features(input_shape), *hidden, num_outputs]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@BACKBONES.register("fc1024")
def fc1024(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-1024-1024-out MLP (paper, PermutedMNIST)."""
    return _mlp(input_shape, (1024, 1024), num_outputs)


@BACKBONES.register("lenet_300_100")
def lenet_300_100(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-300-100-out MLP (LeNet 300-100, paper Fig. 3)."""
    return _mlp(input_shape, (300, 100), num_outputs)


@BACKBONES.register("fc_300_300")
def fc_300_300(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """784-300-300-out MLP."""
    return _mlp(input_shape, (300, 300), num_outputs)


@BACKBONES.register("conv4")
def conv4(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """Small conv net: 2 x (3x3 conv 32/64, ReLU, 2x2 max-pool), FC 256, FC out."""
    if len(input_shape) != 3:
        raise ValueError(f"conv4 needs (C, H, W) inputs, got shape {tuple(input_shape)}")
    c, h, w = input_shape
    if h < 4 or w < 4:
        raise ValueError(f"conv4 needs images of at least 4x4, got {h}x{w}")
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 256, bias=False), nn.ReLU(),
        nn.Linear(256, num_outputs, bias=False),
    )


@WEIGHT_INITS.register("signed_constant")
def signed_constant(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Every weight +-std of Kaiming normal (fan_in, ReLU gain), random sign (paper default)."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)
    fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
    std = nn.init.calculate_gain("relu") / math.sqrt(fan_in)
    with torch.no_grad():
        weight.copy_(weight.sign() * std)


@WEIGHT_INITS.register("kaiming_normal")
def kaiming_normal(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Kaiming normal, fan_in, ReLU gain."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)


def init_weights(backbone: nn.Module, weight_init: str, generator: torch.Generator) -> None:
    """Re-initialise every Linear/Conv2d weight in order with one generator (on CPU)."""
    init = WEIGHT_INITS.get(weight_init)
    for module in backbone.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = torch.empty(module.weight.shape, dtype=module.weight.dtype)
            init(w, generator)
            with torch.no_grad():
                module.weight.copy_(w)
            if module.bias is not None:
                with torch.no_grad():
                    module.bias.zero_()


def create_backbone(name: str, *, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """Build a registered backbone (weights not yet initialised; see :func:`init_weights`)."""
    return BACKBONES.get(name)(input_shape=tuple(input_shape), num_outputs=num_outputs)
