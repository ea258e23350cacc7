"""Avalanche's ``WandBLogger`` for current wandb releases.

avalanche-lib 0.6's logger calls ``wandb.util.generate_id`` and ``wandb.viz.CustomChart``, which
newer wandb releases no longer have. :class:`SupSupWandBLogger` is that logger with its run id
given up front and its metric dispatch written without ``wandb.viz``; everything else (its run,
steps, experience counter, images) is Avalanche's.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from avalanche.evaluation.metric_results import AlternativeValues, TensorImage
from avalanche.logging import WandBLogger
from matplotlib.figure import Figure
from PIL.Image import Image
from torch import Tensor

__all__ = ["SupSupWandBLogger"]


class SupSupWandBLogger(WandBLogger):
    def __init__(self, *args, params: dict | None = None, **kwargs):
        params = dict(params or {})
        params.setdefault("id", os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
        super().__init__(*args, params=params, **kwargs)

    def log_single_metric(self, name, value, x_plot):
        self.step = x_plot
        if name.startswith("WeightCheckpoint"):
            return super().log_single_metric(name, value, x_plot)
        if isinstance(value, AlternativeValues):
            value = value.best_supported_value(Image, Tensor, TensorImage, Figure, float, int)
        if isinstance(value, Image):
            self.wandb.log({name: self.wandb.Image(value)}, step=self.step)
        elif isinstance(value, Tensor):
            self.wandb.log({name: self.wandb.Histogram(np_histogram=np.histogram(value.view(-1).numpy()))},
                           step=self.step)
        elif isinstance(value, (float, int, Figure)):
            self.wandb.log({name: value}, step=self.step)
        elif isinstance(value, TensorImage):
            self.wandb.log({name: self.wandb.Image(np.array(value))}, step=self.step)
