"""The backbone and weight-init registries, and the two functions every backbone goes through."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..registry import Registry
from ..rng import make_generator

__all__ = ["BACKBONES", "KEEP_WEIGHTS", "WEIGHT_INITS", "create_backbone", "features", "has_batchnorm", "init_weights",
           "paper_init"]

#: ``weight_init`` that keeps a module's own weights (a pretrained backbone, as in Piggyback)
KEEP_WEIGHTS = "keep"

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


def paper_init(backbone: nn.Module, weight_init: str, seed: int) -> None:
    """Initialise a backbone's Linear/Conv2d weights for masks to learn on (:func:`init_weights`
    from (seed, "backbone")): whether a mask can learn depends on the frozen weights' scale,
    and torch's default init leaves masks of a small MLP near chance (measured in
    ``benchmarks/results/user_backbones.md``). Biases are set to 0, with a warning when there are
    any: a frozen bias would be shared by every task, unmasked, and the paper's networks have none."""
    has_bias = any(isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None and bool(m.bias.detach().any())
                   for m in backbone.modules())
    try:
        init_weights(backbone, weight_init, make_generator(seed, "backbone"))
    except KeyError as err:
        raise ValueError(f"{err.args[0]}, or {KEEP_WEIGHTS!r} (the module's own weights)") from None
    if has_bias:
        warnings.warn(f"the backbone's Linear/Conv2d biases are set to 0 by weight_init={weight_init!r} (SupSup masks "
                      "weights only, and a frozen bias would be shared by every task); weight_init='keep' keeps the "
                      "module's own weights and biases (e.g. a pretrained backbone)", UserWarning, stacklevel=3)


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` holds a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def create_backbone(name: str, *, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Module:
    """Build a registered backbone (weights not yet initialised; see :func:`init_weights`)."""
    return BACKBONES.get(name)(input_shape=tuple(input_shape), num_outputs=num_outputs)
