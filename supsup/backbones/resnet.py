"""ResNets with non-affine BatchNorm (no learned scale or shift: SupSup learns masks only).

* ``resnet18``: the reduced ResNet-18 of GEM (Lopez-Paz & Ranzato, 2017) that the paper uses
  for SplitCIFAR-100: BasicBlocks [2, 2, 2, 2] of 20, 40, 80, 160 filters, a 3x3 stride-1 stem,
  stages of stride 1, 2, 2, 2, global average pooling, one linear layer. Built for 3x32x32; any
  (C, H, W) works (1x28x28 MNIST: feature maps 28, 14, 7, 4);
* ``resnet50``: the ImageNet layout (He et al., 2016; torchvision's v1.5, the stride on the 3x3
  conv): 7x7 stride-2 stem, max-pool, Bottlenecks [3, 4, 6, 3] of 64-512 (x4) filters, global
  average pooling, one linear layer (SplitImageNet).

Convolutions and the linear layer are bias-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import BACKBONES

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=False)


def _shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _bn(planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, and the shortcut (a 1x1 conv when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), with BatchNorm; the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = _bn(out)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, four stages of residual blocks, global average pooling, a linear layer.
    Input ``(N, C, H, W)``, output ``(N, num_outputs)``."""

    def __init__(self, block: type[nn.Module], blocks: Sequence[int], widths: Sequence[int], *,
                 in_channels: int, num_outputs: int, stem: str):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}; known: cifar, imagenet")
        if stem == "cifar":  # 3x3, stride 1
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), _bn(widths[0]),
                                      nn.ReLU())
        else:  # "imagenet": 7x7 stride 2, then 3x3 max-pool stride 2
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                                      _bn(widths[0]), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages = []
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(in_planes, width, stride=2 if (j == 0 and i > 0) else 1))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_planes, num_outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def _channels(name: str, input_shape: Sequence[int]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs (C, H, W) inputs, got shape {tuple(input_shape)}")
    return int(input_shape[0])


def resnet18(*, input_shape: Sequence[int] = (3, 32, 32), num_outputs: int = 10) -> ResNet:
    """The reduced ResNet-18 of GEM (20 base filters), as in the paper's SplitCIFAR-100."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (20, 40, 80, 160), in_channels=_channels("resnet18", input_shape),
                  num_outputs=num_outputs, stem="cifar")


def resnet50(*, input_shape: Sequence[int] = (3, 224, 224), num_outputs: int = 1000) -> ResNet:
    """ResNet-50, ImageNet layout, as in the paper's SplitImageNet."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), in_channels=_channels("resnet50", input_shape),
                  num_outputs=num_outputs, stem="imagenet")


BACKBONES.register("resnet18")(resnet18)
BACKBONES.register("resnet50")(resnet50)
