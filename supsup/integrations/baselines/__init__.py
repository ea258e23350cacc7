"""Avalanche's baselines on the same streams, backbone shapes and step budgets as SupSup.

:data:`BASELINES` maps each method (``naive | ewc | si | lwf | replay | gem | packnet``) to
the factory of its Avalanche plugins; :func:`make_baseline_strategy` builds the strategy (a
``SupervisedTemplate`` plus the method's plugin) with exactly ``iterations`` optimizer steps per
experience (:class:`~.plugins.IterationBudget`) from cached tensors
(:class:`~.plugins.TensorCachePlugin`). Default hyperparameters: :data:`DEFAULT_HPARAMS`.

Workaround: the ``PackNet`` strategy wrapper of avalanche-lib 0.6.0 passes
``plugins=[plugins, PackNetPlugin(...)]``, so user plugins sit inside a list and are never
called: the strategy here is a ``SupervisedTemplate`` with the plugin list flat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from avalanche.models.packnet import PackNetPlugin
from avalanche.training.plugins import LwFPlugin, ReplayPlugin, SynapticIntelligencePlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ...registry import Registry
from .models import MultiHeadClassifierFix, MultiHeadNet, dense_model, packnet_model
from .plugins import CachedEWCPlugin, GEMPluginFix, IterationBudget, TensorCachePlugin, gem_project

__all__ = [
    "BASELINES",
    "DEFAULT_HPARAMS",
    "CachedEWCPlugin",
    "GEMPluginFix",
    "IterationBudget",
    "MultiHeadClassifierFix",
    "MultiHeadNet",
    "TensorCachePlugin",
    "dense_model",
    "gem_project",
    "make_baseline_strategy",
    "packnet_model",
]

#: Defaults (untuned), recorded in results.json. The optimizer follows van de Ven & Tolias
#: (2019, "Three scenarios for continual learning") for permuted MNIST (Adam, lr 1e-4); SI's
#: lambda and eps are those of Avalanche's own permuted-MNIST baseline (note that 0.6 clips SI
#: importances at 1e-3); GEM's memory and margin from Lopez-Paz & Ranzato (2017); PackNet gives
#: every task an equal share of the weights (task t prunes 1 - 1/(T - t) of the free ones) and
#: fine-tunes the kept ones for the last quarter of its steps.
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "optimizer": {"name": "adam", "lr": 1e-4},
    "naive": {},
    "ewc": {"ewc_lambda": 1000.0, "mode": "separate"},
    "si": {"si_lambda": 10.0, "eps": 0.1},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
    "replay": {"mem_size": 2000},
    "gem": {"patterns_per_experience": 256, "memory_strength": 0.5},
    "packnet": {"train_epochs": 4, "post_prune_epochs": 1, "prune_proportion": "1 - 1/(num_tasks - t)"},
}

#: baseline name -> ``fn(hparams, num_tasks) -> [plugins]``
BASELINES: Registry[Callable[[dict[str, Any], int], list]] = Registry("baseline")


def _packnet_plugins(hp: dict[str, Any], num_tasks: int) -> list:
    # Equal shares: task t keeps 1/(T - t) of the weights still free.
    shares = [1.0 - 1.0 / (num_tasks - t) for t in range(num_tasks)]
    return [PackNetPlugin(post_prune_epochs=hp["post_prune_epochs"], prune_proportion=shares)]


BASELINES.register("naive")(lambda hp, num_tasks: [])
BASELINES.register("ewc")(lambda hp, num_tasks: [CachedEWCPlugin(hp["ewc_lambda"], mode=hp["mode"])])
BASELINES.register("si")(lambda hp, num_tasks: [SynapticIntelligencePlugin(hp["si_lambda"], eps=hp["eps"])])
BASELINES.register("lwf")(lambda hp, num_tasks: [LwFPlugin(alpha=hp["alpha"], temperature=hp["temperature"])])
BASELINES.register("replay")(lambda hp, num_tasks: [ReplayPlugin(mem_size=hp["mem_size"])])
BASELINES.register("gem")(lambda hp, num_tasks: [GEMPluginFix(hp["patterns_per_experience"], hp["memory_strength"])])
BASELINES.register("packnet")(_packnet_plugins)


def make_baseline_strategy(method: str, *, model: nn.Module, num_tasks: int, iterations: int,
                           train_mb_size: int, eval_mb_size: int, eval_max_batches: int | None = None,
                           hparams: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                           plugins: Sequence[Any] | None = None, evaluator: Any = None,
                           cache: bool = True, seed: int = 0) -> SupervisedTemplate:
    """Avalanche's ``method`` as a ``SupervisedTemplate`` with the method's plugin, an
    :class:`IterationBudget` of ``iterations`` steps per experience and (``cache``) the
    :class:`TensorCachePlugin`. ``hparams`` override :data:`DEFAULT_HPARAMS` (keys
    ``optimizer`` and ``method``'s own). User ``plugins`` are kept (PackNet included)."""
    method_plugins = BASELINES.get(method)
    hp = {"optimizer": dict(DEFAULT_HPARAMS["optimizer"]), method: dict(DEFAULT_HPARAMS.get(method, {}))}
    for key, value in (hparams or {}).items():
        hp.setdefault(key, {}).update(value)
    opt = hp["optimizer"]
    if opt["name"] != "adam":
        raise ValueError(f"unsupported baseline optimizer {opt['name']!r}")
    optimizer = torch.optim.Adam(model.parameters(), lr=opt["lr"])
    epochs = hp[method].get("train_epochs", 1)
    extra = [IterationBudget(iterations, eval_max_batches=eval_max_batches)]
    if cache:
        extra.append(TensorCachePlugin(device=device, train_samples=iterations * train_mb_size, seed=seed,
                                       eval_max_samples=None if eval_max_batches is None
                                       else eval_max_batches * eval_mb_size))
    kwargs = {} if evaluator is None else {"evaluator": evaluator}
    return SupervisedTemplate(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                              train_mb_size=train_mb_size, train_epochs=epochs, eval_mb_size=eval_mb_size,
                              device=device, plugins=[*(plugins or []), *method_plugins(hp[method], num_tasks),
                                                      *extra], **kwargs)
