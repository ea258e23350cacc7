"""Frozen random backbones, registered by name.

Every factory takes ``input_shape`` (C, H, W) or (features,) and ``num_outputs`` (real classes
plus superfluous neurons) keyword-only, and returns a module whose parameters all belong to
bias-free ``nn.Linear`` / ``nn.Conv2d`` layers, plus parameter-free modules and non-affine
BatchNorm (the paper's setting); :class:`~supsup.model.SupermaskModel` wraps and freezes it.
Weights are initialised by :func:`init_weights` from a local generator.

* :mod:`.mlp`: ``fc1024`` (paper, PermutedMNIST), ``lenet_300_100``, ``fc_300_300``;
* :mod:`.convnets`: ``conv2`` (a small conv net), ``conv4`` / ``conv6`` of the edge-popup
  family, ``conv4_bn`` / ``conv6_bn`` with non-affine BatchNorm after every conv;
* :mod:`.resnet`: ``resnet18`` (the reduced ResNet-18 of GEM, as in the paper's
  SplitCIFAR-100) and ``resnet50`` (ImageNet layout, SplitImageNet), non-affine BatchNorm.
"""

from . import convnets, mlp, resnet  # noqa: F401  (each registers its backbones)
from .registry import (
    BACKBONES,
    KEEP_WEIGHTS,
    WEIGHT_INITS,
    create_backbone,
    has_batchnorm,
    init_weights,
    paper_init,
)

__all__ = ["BACKBONES", "KEEP_WEIGHTS", "WEIGHT_INITS", "create_backbone", "has_batchnorm", "init_weights", "paper_init"]
