"""The backbone and weight-init registries, and the two functions every backbone goes through."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..registry import Registry

__all__ = ["BACKBONES", "WEIGHT_INITS", "create_backbone", "features", "has_batchnorm", "init_weights"]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
WEIGHT_INITS: Registry[Callable[[torch.Tensor, torch.Generator], None]] = Registry("weight_init")


def features(input_shape: Sequence[int]) -> int:
    """Inputs per sample."""
    return int(math.prod(input_shape))


def signed_constant(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Every weight +-std of Kaiming normal (fan_in, ReLU gain), random sign (paper default)."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)
    fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
    std = nn.init.calculate_gain("relu") / math.sqrt(fan_in)
    with torch.no_grad():
        weight.copy_(weight.sign() * std)


def kaiming_normal(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Kaiming normal, fan_in, ReLU gain."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)


WEIGHT_INITS.register("signed_constant")(signed_constant)
WEIGHT_INITS.register("kaiming_normal")(kaiming_normal)


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


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` holds a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def create_backbone(name: str, *, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Module:
    """Build a registered backbone (weights not yet initialised; see :func:`init_weights`)."""
    return BACKBONES.get(name)(input_shape=tuple(input_shape), num_outputs=num_outputs)
