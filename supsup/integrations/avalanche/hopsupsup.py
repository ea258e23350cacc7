"""HopSupSup as an Avalanche (avalanche-lib 0.6) strategy.

:class:`HopSupSupStrategy` trains one set of neuron scores per training experience (the task
id is the experience's task label or index), adds its masks to the
:class:`~supsup.hopsupsup.NeuronMaskNet`'s Hopfield stores at the end of the experience, and
before evaluating an experience recovers a mask from that experience's images alone (labels
unused, :func:`~supsup.hopsupsup.recover_masks`); the experience is then classified with it, so
Avalanche's accuracy metrics report HopSupSup's GNu accuracy. The algorithm is the library's;
this module only feeds it Avalanche's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate

from ...config import HopfieldConfig, TrainConfig
from ...hopsupsup import NeuronMaskNet, Recovery, binary_masks, evaluation_batches, recover_masks
from ...rng import make_generator
from .data import CachedBatches, ExperienceCache
from .strategy import TASK_ID_SOURCES, experience_task_id

__all__ = ["HopSupSupStrategy"]


class HopSupSupStrategy(SupervisedTemplate):
    """Train neuron masks per experience; recover them per evaluated experience.

    ``train_config``: ``batch_size``, ``lr``, ``momentum``, ``weight_decay`` (SGD) and, when
    ``hopfield_config.epochs`` is None, ``iterations``; ``hopfield_config``: epochs per
    experience, recovery settings, and the evaluation batch size (the masks act through batch
    statistics, so evaluation batches are part of the method). After an evaluation,
    :attr:`recoveries` maps each evaluated experience to its :class:`~supsup.hopsupsup.Recovery`.
    """

    def __init__(self, *, model: NeuronMaskNet, train_config: TrainConfig | None = None,
                 hopfield_config: HopfieldConfig | None = None, seed: int = 0, task_id_source: str = "task_label",
                 device: torch.device | str = "cpu", plugins: Sequence[Any] | None = None,
                 evaluator: Any = default_evaluator, max_eval_batches: int | None = None):
        if not isinstance(model, NeuronMaskNet):
            raise TypeError(f"HopSupSupStrategy trains a NeuronMaskNet, got {type(model).__name__}")
        if task_id_source not in TASK_ID_SOURCES:
            raise ValueError(f"unknown task_id_source {task_id_source!r}; known: {', '.join(TASK_ID_SOURCES)}")
        self.train_config = train_config if train_config is not None else TrainConfig(lr=0.1, optimizer="sgd",
                                                                                      momentum=0.9, weight_decay=1e-4)
        self.hopfield_config = hopfield_config if hopfield_config is not None else HopfieldConfig()
        self.seed, self.task_id_source, self.max_eval_batches = seed, task_id_source, max_eval_batches
        self.scores: list[torch.Tensor] = []
        self.recoveries: dict[int, Recovery] = {}
        self.learned: dict[int, list[torch.Tensor]] = {}
        self.data_cache = ExperienceCache(device=device)
        self._eval_positions: dict[int, list[torch.Tensor]] = {}
        self.last_loss: float | None = None
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.train_config.lr)  # replaced per experience
        super().__init__(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=self.train_config.batch_size, train_epochs=1,
                         eval_mb_size=self.hopfield_config.batch_size, device=device, plugins=plugins,
                         evaluator=evaluator, eval_every=-1)

    def task_id_of(self, experience) -> int:
        return experience_task_id(experience, self.task_id_source, "HopSupSupStrategy (or task_id_source='experience')")

    # ------------------------------------------------------------------ training
    def check_model_and_optimizer(self, **kwargs):
        if self.is_training:  # a new experience: new scores, a new optimizer over them
            self.scores = [s.requires_grad_() for s in self.model.new_scores()]
            tc = self.train_config
            self.optimizer = torch.optim.SGD(self.scores, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)

    def make_optimizer(self, **kwargs):
        pass  # made with the experience's scores in check_model_and_optimizer

    def make_train_dataloader(self, **kwargs):
        data = self.data_cache.get(self.experience.dataset, "train")
        steps = self.hopfield_config.steps_per_task(len(data), self.train_config)
        self.dataloader = CachedBatches.training(data, batch_size=self.train_mb_size, num_batches=steps,
                                                 generator=make_generator(self.seed, "train_order",
                                                                          self.task_id_of(self.experience)))

    def forward(self):
        if self.is_training:
            return self.model(self.mb_x, self.scores)
        return self.model(self.mb_x, self.recoveries[self.experience.current_experience].scores)

    def criterion(self):
        return F.cross_entropy(self.mb_output, self.mb_y)

    def _after_training_iteration(self, **kwargs):
        self.last_loss = float(self.loss.detach())
        super()._after_training_iteration(**kwargs)

    def _after_training_exp(self, **kwargs):
        scores = [s.detach() for s in self.scores]
        self.model.store_task(scores)
        self.learned[self.task_id_of(self.experience)] = binary_masks(scores)
        self.scores = []
        self.data_cache.release(self.experience.dataset, "train")
        super()._after_training_exp(**kwargs)

    # ---------------------------------------------------------------- evaluation
    def dataloader_for(self, experience) -> CachedBatches:
        """The batches ``[x, y, t]`` in which ``experience`` was last recovered and evaluated."""
        return CachedBatches.at(self.data_cache.get(experience.dataset, "eval"),
                                self._eval_positions[experience.current_experience])

    def make_eval_dataloader(self, **kwargs):
        self.dataloader = self.dataloader_for(self.experience)

    def _before_eval_exp(self, **kwargs):
        """Recover this experience's mask from its images (labels unused), in the batches the
        evaluation then classifies: shuffled by ``(seed, task)``, ``hopfield_config.batch_size``."""
        source = self.data_cache.get(self.experience.dataset, "eval")
        positions = evaluation_batches(len(source), self.eval_mb_size, self.seed, self.task_id_of(self.experience))
        exp_id = self.experience.current_experience
        self._eval_positions[exp_id] = positions if self.max_eval_batches is None else positions[: self.max_eval_batches]
        images = [x for x, _, _ in self.dataloader_for(self.experience)]
        with torch.enable_grad():  # Avalanche evaluates under no_grad; recovery needs gradients
            self.recoveries[exp_id] = recover_masks(self.model, images, **self.hopfield_config.recovery_options())
        super()._before_eval_exp(**kwargs)
