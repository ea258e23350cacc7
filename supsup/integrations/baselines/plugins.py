"""Plugins that make Avalanche's baselines run on SupSup's budget and data path, and fixes for
avalanche-lib 0.6.0 defects (each with a test):

* :class:`IterationBudget`: exactly ``train.iterations`` optimizer steps per experience;
* :class:`TensorCachePlugin`: each sample transformed once (cached tensors);
* :class:`CachedEWCPlugin`: EWC's importances estimated on those cached samples;
* :class:`GEMPluginFix`: ``GEMPlugin`` hard-codes qpsolvers' ``quadprog`` solver, which neither
  avalanche-lib nor qpsolvers installs: the same dual QP solved exactly with NNLS
  (:func:`gem_project`) when quadprog is missing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EWCPlugin, GEMPlugin
from avalanche.training.utils import copy_params_dict

from ...rng import make_generator
from ..avalanche.data import ExperienceCache

__all__ = ["CachedEWCPlugin", "GEMPluginFix", "IterationBudget", "TensorCachePlugin", "gem_project"]


# ----------------------------------------------------------------------- step budget, data

class _StepBudget:
    """Iterates ``steps[k]`` batches in epoch ``k`` from ``loader``, restarting it when it runs
    out, so the epochs together take exactly ``sum(steps)`` batches."""

    def __init__(self, loader, steps: Sequence[int]):
        self.loader = loader
        self.steps = list(steps)
        self.epoch = 0
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return self.steps[min(self.epoch, len(self.steps) - 1)]

    def __iter__(self):
        n = len(self)
        self.epoch += 1
        for _ in range(n):
            try:
                batch = next(self._it) if self._it is not None else None
            except StopIteration:
                batch = None
            if batch is None:
                self._it = iter(self.loader)
                batch = next(self._it)
            yield batch


class _FirstBatches:
    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            yield batch


class IterationBudget(SupervisedPlugin):
    """Exactly ``iterations`` optimizer steps per experience, split evenly over the
    strategy's ``train_epochs`` (PackNet prunes between epochs), whatever the dataset size;
    at most ``eval_max_batches`` minibatches per evaluated experience.

    The training loader is wrapped at the first epoch, after every plugin (e.g. replay) has
    built its own loader."""

    def __init__(self, iterations: int, *, eval_max_batches: int | None = None):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = iterations
        self.eval_max_batches = eval_max_batches

    def steps_per_epoch(self, epochs: int) -> list[int]:
        if epochs > self.iterations:
            raise ValueError(f"{epochs} epochs cannot share {self.iterations} steps")
        base, extra = divmod(self.iterations, epochs)
        return [base + (e < extra) for e in range(epochs)]

    def before_training_epoch(self, strategy, **kwargs):
        if not isinstance(strategy.dataloader, _StepBudget):
            strategy.dataloader = _StepBudget(strategy.dataloader, self.steps_per_epoch(strategy.train_epochs))

    def before_eval_exp(self, strategy, **kwargs):
        if self.eval_max_batches is not None:
            strategy.dataloader = _FirstBatches(strategy.dataloader, self.eval_max_batches)


def _tensor_dataset(data):
    # avalanche-lib 0.6's tensor dataset factory (what tensors_benchmark uses); the samples are
    # already transformed, so it carries no transform.
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    # The task label is appended by the dataset's task-label attribute: samples are (x, y, t)
    # like the experience's own, which replay concatenates with them.
    return _make_taskaware_tensor_classification_dataset(data.x, data.y, targets=data.y, task_labels=data.t.tolist())


class TensorCachePlugin(SupervisedPlugin):
    """The fast data path for any Avalanche strategy: the strategy's loaders read a tensor
    dataset of the current experience's samples, each transformed once
    (:class:`~supsup.integrations.avalanche.ExperienceCache`), instead of transforming every
    sample on every epoch.

    Training uses the samples a step budget can reach: all of them, or, when
    ``train_samples`` (steps x batch size) is smaller than the experience, a random subset of
    that size drawn from (seed, experience) -- what the first steps of a shuffled epoch see.
    Evaluation uses the first ``eval_max_samples`` samples (default: all). Only
    ``strategy.adapted_dataset`` is replaced; plugins that read ``strategy.experience.dataset``
    (replay and GEM memories) see the original.
    """

    def __init__(self, *, device: torch.device | str = "cpu", train_samples: int | None = None,
                 eval_max_samples: int | None = None, seed: int = 0):
        super().__init__()
        self.cache = ExperienceCache(device=device)
        self.train_samples = train_samples
        self.eval_max_samples = eval_max_samples
        self.seed = seed

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        entry = self.cache.get(strategy.experience.dataset, "train")
        n = len(entry)
        if self.train_samples is None or self.train_samples >= n:
            rows = torch.arange(n)
        else:
            gen = make_generator(self.seed, "train_subset", strategy.experience.current_experience)
            rows = torch.randperm(n, generator=gen)[: self.train_samples].sort().values
        strategy.adapted_dataset = _tensor_dataset(entry.tensors(rows))

    def after_training_exp(self, strategy, **kwargs):
        self.cache.release(strategy.experience.dataset, "train")

    def after_eval_dataset_adaptation(self, strategy, **kwargs):
        entry = self.cache.get(strategy.experience.dataset, "eval")
        n = len(entry) if self.eval_max_samples is None else min(len(entry), self.eval_max_samples)
        strategy.adapted_dataset = _tensor_dataset(entry.tensors(torch.arange(n)))


class CachedEWCPlugin(EWCPlugin):
    """Avalanche's ``EWCPlugin`` with the importances estimated on the samples the strategy
    trained on (``strategy.adapted_dataset``: with :class:`TensorCachePlugin`, the cached
    tensors) rather than on the experience's dataset, whose samples would all be transformed
    again. With a full step budget they are the same samples."""

    def after_training_exp(self, strategy, **kwargs):
        exp_counter = strategy.clock.train_exp_counter
        importances = self.compute_importances(strategy.model, strategy._criterion, strategy.optimizer,
                                               strategy.adapted_dataset, strategy.device, strategy.train_mb_size)
        self.update_importances(importances, exp_counter)
        self.saved_params[exp_counter] = copy_params_dict(strategy.model)
        if exp_counter > 0 and not self.keep_importance_data:
            del self.saved_params[exp_counter - 1]



# ---------------------------------------------------------------------------------- GEM

def gem_project(memories: torch.Tensor, g: torch.Tensor, margin: float) -> torch.Tensor:
    """GEM's projected gradient (Lopez-Paz & Ranzato 2017, eq. 10-11), as Avalanche's
    ``GEMPlugin.solve_quadprog`` computes it with quadprog.

    Dual: ``min_v 1/2 v'Pv + (Mg)'v`` s.t. ``v >= margin``, ``P = M M' + 1e-3 I``; returns
    ``M'v + g``. With ``v = margin + u`` and ``P = L L'`` this is the non-negative least squares
    ``min_{u>=0} ||L'u + L^-1 (P margin + Mg)||``, solved exactly (Lawson-Hanson).

    Args:
        memories: ``(t, p)`` gradients of the previous experiences' memories.
        g: ``(p,)`` current gradient.
    """
    from scipy.optimize import nnls

    m = memories.detach().cpu().double().numpy()
    gv = g.detach().cpu().contiguous().view(-1).double().numpy()
    t = m.shape[0]
    p = m @ m.T
    p = 0.5 * (p + p.T) + np.eye(t) * 1e-3
    d = p @ np.full(t, margin) + m @ gv
    chol = np.linalg.cholesky(p)
    u, _ = nnls(chol.T, -np.linalg.solve(chol, d))
    v = u + margin
    return torch.from_numpy(v @ m + gv).float()


class GEMPluginFix(GEMPlugin):
    """Avalanche's ``GEMPlugin``, with its QP solved by :func:`gem_project` when qpsolvers has
    no ``quadprog`` backend (avalanche-lib 0.6.0 installs qpsolvers without any solver)."""

    def solve_quadprog(self, g):
        import qpsolvers

        if "quadprog" in qpsolvers.available_solvers:
            return super().solve_quadprog(g)
        return gem_project(self.G, g, self.memory_strength)
