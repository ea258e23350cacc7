"""Convolutional backbones: a small conv net and the edge-popup family (Ramanujan et al., 2020;
the paper's supermask baselines), optionally with non-affine BatchNorm after every conv."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import BACKBONES

__all__ = ["conv2", "conv4", "conv4_bn", "conv6", "conv6_bn", "edge_popup_convnet"]


def _image_shape(name: str, input_shape: Sequence[int], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs (C, H, W) inputs, got shape {tuple(input_shape)}")
    c, h, w = (int(d) for d in input_shape)
    if h < min_side or w < min_side:
        raise ValueError(f"{name} needs images of at least {min_side}x{min_side}, got {h}x{w}")
    return c, h, w


def conv2(*, input_shape: Sequence[int] = (1, 28, 28), num_outputs: int = 10) -> nn.Sequential:
    """Small conv net: 2 x (3x3 conv 32/64, ReLU, 2x2 max-pool), FC 256, FC out."""
    c, h, w = _image_shape("conv2", input_shape, 4)
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 256, bias=False), nn.ReLU(),
        nn.Linear(256, num_outputs, bias=False),
    )


def edge_popup_convnet(stages: Sequence[int], *, input_shape: Sequence[int], num_outputs: int,
                       batchnorm: bool) -> nn.Sequential:
    """The edge-popup ConvN: per stage two 3x3 convs (padding 1) of ``stages[i]`` channels with
    ReLU, then 2x2 max-pool; then FC 256, FC 256, FC out. ``batchnorm``: non-affine BatchNorm
    after every conv."""
    c, h, w = _image_shape(f"conv{2 * len(stages)}", input_shape, 2 ** len(stages))
    layers: list[nn.Module] = []
    for width in stages:
        for _ in range(2):
            layers.append(nn.Conv2d(c, width, 3, padding=1, bias=False))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width, affine=False))
            layers.append(nn.ReLU())
            c = width
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, 256, bias=False), nn.ReLU(),
               nn.Linear(256, 256, bias=False), nn.ReLU(), nn.Linear(256, num_outputs, bias=False)]
    return nn.Sequential(*layers)


def conv4(*, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10) -> nn.Sequential:
    """edge-popup Conv4: 64, 64, pool, 128, 128, pool, FC 256, 256, out."""
    return edge_popup_convnet((64, 128), input_shape=input_shape, num_outputs=num_outputs, batchnorm=False)


def conv6(*, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10) -> nn.Sequential:
    """edge-popup Conv6: Conv4 with a third stage of 256 channels."""
    return edge_popup_convnet((64, 128, 256), input_shape=input_shape, num_outputs=num_outputs, batchnorm=False)


def conv4_bn(*, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10) -> nn.Sequential:
    """Conv4 with non-affine BatchNorm after every conv."""
    return edge_popup_convnet((64, 128), input_shape=input_shape, num_outputs=num_outputs, batchnorm=True)


def conv6_bn(*, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10) -> nn.Sequential:
    """Conv6 with non-affine BatchNorm after every conv."""
    return edge_popup_convnet((64, 128, 256), input_shape=input_shape, num_outputs=num_outputs, batchnorm=True)


BACKBONES.register("conv2")(conv2)
BACKBONES.register("conv4")(conv4)
BACKBONES.register("conv6")(conv6)
BACKBONES.register("conv4_bn")(conv4_bn)
BACKBONES.register("conv6_bn")(conv6_bn)
