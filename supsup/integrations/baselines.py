"""Avalanche baselines on the same streams, backbone shapes and step budgets as SupSup.

``method: naive | ewc | si | lwf | replay | gem | packnet`` (with ``backend: avalanche``) runs
Avalanche's strategy (a ``SupervisedTemplate`` plus the method's own plugin) on the stream
:func:`~supsup.integrations.avalanche.classic_benchmark` builds for SupSup:

* model: the registered backbone (``model.backbone``) as a dense, trained network with
  Kaiming-normal weights from (seed, "backbone"); scenario GN: one head shared by all tasks
  (no task id at test: the accuracy is reported as ``acc_inferred``), scenario GG: one head
  per task picked by the task id (``acc_given_task``); PackNet always selects its weights by
  task id (GG only);
* exactly ``train.iterations`` optimizer steps of ``train.batch_size`` per experience
  (:class:`IterationBudget`), from cached tensors (:class:`TensorCachePlugin`);
* default hyperparameters in :data:`DEFAULT_HPARAMS`, recorded in ``results.json`` under
  ``baseline_hparams``.

Workarounds for avalanche-lib 0.6.0 defects (each with a test):

* the ``PackNet`` strategy wrapper passes ``plugins=[plugins, PackNetPlugin(...)]``, so user
  plugins sit inside a list and are never called: we build ``SupervisedTemplate`` with the
  plugin list flat;
* ``WeightAndBiasPackNetModule`` decides ``has_bias`` from the weight, so ``freeze_pruned``
  crashes on bias-free layers: :func:`packnet_model` corrects the flag;
* ``MultiHeadClassifier.adaptation`` indexes a tensor with ``classes_in_this_experience``,
  which ``with_classes_timeline`` makes a ``set``: :class:`MultiHeadClassifierFix` passes a
  sorted list;
* ``GEMPlugin`` hard-codes qpsolvers' ``quadprog`` solver, which neither avalanche-lib nor
  qpsolvers installs: :class:`GEMPluginFix` solves the same dual QP exactly with NNLS when
  quadprog is missing.

And one speed-up: :class:`CachedEWCPlugin` estimates EWC's importances on the cached samples
the strategy trained on instead of transforming the experience's samples again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.packnet import PackNetModel, PackNetPlugin, WeightAndBiasPackNetModule
from avalanche.training.plugins import (
    EWCPlugin,
    GEMPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import copy_params_dict
from torch import nn

from ..backbones import create_backbone, init_weights
from ..config import ConfigError, RunConfig
from ..rng import make_generator
from ..training import safe_mean
from .avalanche import ExperienceCache, classic_benchmark, per_experience, run_evaluator, start_run

__all__ = [
    "BASELINES",
    "DEFAULT_HPARAMS",
    "IterationBudget",
    "TensorCachePlugin",
    "CachedEWCPlugin",
    "MultiHeadClassifierFix",
    "MultiHeadNet",
    "GEMPluginFix",
    "gem_project",
    "packnet_model",
    "dense_model",
    "make_baseline_strategy",
    "run_baseline_experiment",
]

BASELINES = ("naive", "ewc", "si", "lwf", "replay", "gem", "packnet")

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


# ------------------------------------------------------------------------------- models

class MultiHeadClassifierFix(MultiHeadClassifier):
    """``MultiHeadClassifier`` that accepts ``classes_in_this_experience`` as a set.

    avalanche-lib 0.6.0 does ``active_units[curr_classes] = 1``, which raises for the sets
    that ``with_classes_timeline`` (and so ``class_incremental_benchmark``) produces."""

    def adaptation(self, experience):
        classes = experience.classes_in_this_experience
        if isinstance(classes, (set, frozenset)):
            experience = copy.copy(experience)
            experience.classes_in_this_experience = sorted(classes)
        super().adaptation(experience)


class MultiHeadNet(MultiTaskModule):
    """A shared ``body`` and one linear head per task (selected by the task label).
    Input ``(B, ...)``, task labels ``(B,)`` -> logits ``(B, num_classes)``."""

    def __init__(self, body: nn.Module, *, in_features: int, num_classes: int):
        super().__init__()
        self.body = body
        self.heads = MultiHeadClassifierFix(in_features, initial_out_features=num_classes)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads(self.body(x), task_label)


def packnet_model(net: nn.Module) -> PackNetModel:
    """``PackNetModel(net)`` that also works for bias-free layers (every supsup backbone).

    avalanche-lib 0.6.0 sets ``WeightAndBiasPackNetModule.has_bias`` from the *weight*, so
    ``freeze_pruned`` sets ``requires_grad`` on a ``None`` bias and raises."""
    model = PackNetModel(net)
    for module in model.modules():
        if isinstance(module, WeightAndBiasPackNetModule):
            module.has_bias = module.wrappee.bias is not None
    return model


def dense_model(backbone: str, *, input_shape: Sequence[int], num_classes: int, seed: int,
                head: str = "single") -> nn.Module:
    """The registered backbone as a dense network to train, Kaiming-normal weights from
    (seed, "backbone").

    Args:
        head: ``single`` (one output layer for every task), ``multi`` (:class:`MultiHeadNet`:
            the backbone's last Linear replaced by a head per task) or ``packnet``
            (:func:`packnet_model` around the single-head network).
    """
    net = create_backbone(backbone, input_shape=input_shape, num_outputs=num_classes)
    init_weights(net, "kaiming_normal", make_generator(seed, "backbone"))
    if head == "single":
        return net
    if head == "packnet":
        return packnet_model(net)
    if head == "multi":
        last = net[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError(f"backbone {backbone!r} does not end with nn.Linear")
        return MultiHeadNet(net[:-1], in_features=last.in_features, num_classes=num_classes)
    raise ValueError(f"unknown head {head!r}; known: single, multi, packnet")


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


# ------------------------------------------------------------------------------ strategy

def _method_plugins(method: str, hp: dict[str, Any], num_tasks: int) -> list:
    if method == "naive":
        return []
    if method == "ewc":
        return [CachedEWCPlugin(hp["ewc_lambda"], mode=hp["mode"])]
    if method == "si":
        return [SynapticIntelligencePlugin(hp["si_lambda"], eps=hp["eps"])]
    if method == "lwf":
        return [LwFPlugin(alpha=hp["alpha"], temperature=hp["temperature"])]
    if method == "replay":
        return [ReplayPlugin(mem_size=hp["mem_size"])]
    if method == "gem":
        return [GEMPluginFix(hp["patterns_per_experience"], hp["memory_strength"])]
    if method == "packnet":
        # Equal shares: task t keeps 1/(T - t) of the weights still free.
        shares = [1.0 - 1.0 / (num_tasks - t) for t in range(num_tasks)]
        return [PackNetPlugin(post_prune_epochs=hp["post_prune_epochs"], prune_proportion=shares)]
    raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")


def make_baseline_strategy(method: str, *, model: nn.Module, num_tasks: int, iterations: int,
                           train_mb_size: int, eval_mb_size: int, eval_max_batches: int | None = None,
                           hparams: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                           plugins: Sequence[Any] | None = None, evaluator: Any = None,
                           cache: bool = True, seed: int = 0) -> SupervisedTemplate:
    """Avalanche's ``method`` as a ``SupervisedTemplate`` with the method's plugin, an
    :class:`IterationBudget` of ``iterations`` steps per experience and (``cache``) the
    :class:`TensorCachePlugin`. ``hparams`` override :data:`DEFAULT_HPARAMS` (keys
    ``optimizer`` and ``method``'s own). User ``plugins`` are kept (PackNet included)."""
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
                              device=device, plugins=[*(plugins or []), *_method_plugins(method, hp[method], num_tasks),
                                                      *extra], **kwargs)


def run_baseline_experiment(cfg: RunConfig, out_dir, *, resume: bool = False) -> dict[str, Any]:
    """``supsup run`` with ``backend: avalanche`` and a baseline ``method``: same stream,
    backbone and step budget as SupSup; writes results.json in the native schema plus
    ``baseline_hparams``, ``accuracy_uses_task_id`` and ``head``."""
    from avalanche.training.determinism.rng_manager import RNGManager

    from ..runner import new_results, resolve_device, task_row, write_report

    method = cfg.method
    if method not in BASELINES:
        raise ConfigError("method", f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    if cfg.scenario not in ("GG", "GN"):
        raise ConfigError("scenario", "baselines run GG (task id at test) or GN (no task id at test)")
    if method == "packnet" and cfg.scenario != "GG":
        raise ConfigError("scenario", "packnet selects its weights by task id at test: run it in scenario GG")
    out = start_run(cfg, out_dir, resume=resume)
    device = resolve_device(cfg.device)
    # Avalanche draws from the global generators (loader shuffling, memories, new heads).
    RNGManager.set_random_seeds(cfg.seed)
    bench = classic_benchmark(cfg)
    head = "packnet" if method == "packnet" else ("multi" if cfg.scenario == "GG" else "single")
    model = dense_model(cfg.model.backbone, input_shape=bench.input_shape, num_classes=bench.num_classes,
                        seed=cfg.seed, head=head)
    num_tasks = cfg.benchmark.num_tasks
    hparams = {"optimizer": dict(DEFAULT_HPARAMS["optimizer"]), method: dict(DEFAULT_HPARAMS[method])}
    results = new_results(cfg)
    with run_evaluator(cfg, out) as evaluator:
        strategy = make_baseline_strategy(method, model=model, num_tasks=num_tasks, iterations=cfg.train.iterations,
                                          train_mb_size=cfg.train.batch_size, eval_mb_size=cfg.eval.batch_size,
                                          eval_max_batches=cfg.eval.max_batches, hparams=hparams, device=device,
                                          evaluator=evaluator, seed=cfg.seed)
        for exp in bench.train:
            t0 = time.perf_counter()
            strategy.train(exp)
            results["train_seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
        results["eval_seconds"] += time.perf_counter() - t0

    uses_task_id = head != "single"
    key = "acc_given_task" if uses_task_id else "acc_inferred"
    for exp in bench.test:
        row = task_row(exp.current_experience)
        row[key] = acc.get(exp.current_experience)
        results["tasks"].append(row)
    results[f"mean_{key}"] = safe_mean([r[key] for r in results["tasks"]])
    results["baseline_hparams"] = hparams
    results["accuracy_uses_task_id"] = uses_task_id
    results["head"] = head
    results["num_parameters"] = sum(p.numel() for p in model.parameters())
    results["optimizer_steps_per_task"] = cfg.train.iterations
    cache = next(p for p in strategy.plugins if isinstance(p, TensorCachePlugin))
    results["data_cache_seconds"] = cache.cache.seconds
    write_report(out, results)
    return results
