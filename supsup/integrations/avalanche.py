"""SupSup as an Avalanche (avalanche-lib 0.6) strategy, and the ``backend: avalanche`` runner.

* :class:`SupSupStrategy`: a ``SupervisedTemplate`` that trains one supermask per experience
  (GG/GN: the task id comes from the experience; NN: new tasks are detected from the inputs)
  and evaluates with the task given or inferred from the inputs (paper Sec. 3.3), so that
  Avalanche's own metrics and loggers report SupSup's accuracy;
* :class:`ExperienceCache` / :class:`CachedBatches`: each sample an experience needs is
  transformed once, kept as a tensor and batched from there (Avalanche's loaders transform
  every sample again on every epoch and every evaluation);
* :func:`supsup_model_for_benchmark`: a :class:`~supsup.model.SupermaskModel` sized from any
  stream's sample shape and class count;
* :func:`run_avalanche_experiment`: ``supsup run`` with ``backend: avalanche``; writes the
  same ``results.json`` as the native runner.

The glue only calls the library: task bookkeeping is :class:`~supsup.model.SupermaskModel`'s,
task inference is :func:`supsup.inference.infer_tasks`, NN detection is
:mod:`supsup.training`'s.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from avalanche.evaluation.metric_definitions import GenericPluginMetric
from avalanche.evaluation.metrics import Mean
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import DataLoader

from ..checkpoint import CHECKPOINT_NAME, CheckpointError, atomic_write_text
from ..config import (
    ConfigError,
    EvalConfig,
    InferenceConfig,
    NNConfig,
    RunConfig,
    TrainConfig,
    config_to_dict,
)
from ..inference import infer_tasks
from ..model import SupermaskModel
from ..rng import make_generator
from ..training import NNState, make_optimizer, mask_to_task, nn_check, safe_mean, training_autocast

__all__ = [
    "CachedData",
    "CachedExperience",
    "ExperienceCache",
    "CachedBatches",
    "dataset_tensors",
    "SupSupStrategy",
    "TaskInferenceAccuracy",
    "benchmark_input_shape",
    "benchmark_num_classes",
    "supsup_model_for_benchmark",
    "ClassicBenchmark",
    "classic_benchmark",
    "in_dataset_order",
    "per_experience",
    "run_avalanche_experiment",
]

log = logging.getLogger(__name__)

SCENARIOS = ("GG", "GN", "NN")
TASK_ID_SOURCES = ("experience", "task_label")
EVAL_TASKS = ("given", "inferred")


# ------------------------------------------------------------------------------ data cache

@dataclass(frozen=True)
class CachedData:
    """Samples as tensors: ``x`` ``(N, *sample_shape)``, ``y`` ``(N,)`` int64 class labels,
    ``t`` ``(N,)`` int64 task labels (0 when the dataset has none)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return self.y.numel()


def dataset_tensors(dataset, *, batch_size: int = 4096, device: torch.device | str = "cpu") -> CachedData:
    """Run an Avalanche dataset once, in its current transform group, and stack its samples
    (``(x, y[, ..., t])`` each)."""
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    xs, ys, ts = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None))
    for batch in loader:
        y = torch.as_tensor(batch[1]).long()
        xs.append(torch.as_tensor(batch[0]))
        ys.append(y)
        ts.append(torch.as_tensor(batch[-1]).long() if len(batch) >= 3 else torch.zeros_like(y))
    return CachedData(torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ts).to(device))


class CachedExperience:
    """One experience's dataset in one split's transforms (``train`` or ``eval``), each
    sample transformed the first time it is read and kept as a tensor from then on.

    Memory: the rows read so far, ``prod(sample_shape)`` floats each (a whole MNIST
    experience: 188 MB train, 31 MB test).
    """

    def __init__(self, dataset, split: str, *, device: torch.device | str = "cpu", batch_size: int = 4096):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.dataset = dataset
        self.view = dataset.train() if split == "train" else dataset.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        n = len(self.view)
        self.x: torch.Tensor | None = None  # allocated (not written) at the first read
        self.y = torch.empty(n, dtype=torch.long, device=self.device)
        self.t = torch.empty(n, dtype=torch.long, device=self.device)
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.seconds = 0.0  # time spent transforming samples

    def __len__(self) -> int:
        return self.filled.numel()

    def fill(self, rows: torch.Tensor) -> None:
        """Transform the samples at ``rows`` not read before, in one pass."""
        rows = rows.detach().cpu().long()
        missing = torch.unique(rows[~self.filled[rows]])
        if missing.numel() == 0:
            return
        t0 = time.perf_counter()
        data = dataset_tensors(self.view.subset(missing.tolist()), batch_size=self.batch_size, device=self.device)
        if self.x is None:
            self.x = torch.empty((len(self), *data.x.shape[1:]), dtype=data.x.dtype, device=self.device)
        dev_rows = missing.to(self.device)
        self.x[dev_rows], self.y[dev_rows], self.t[dev_rows] = data.x, data.y, data.t
        self.filled[missing] = True
        self.seconds += time.perf_counter() - t0

    def tensors(self, rows: torch.Tensor) -> CachedData:
        """The samples at ``rows`` ``(B,)``, transformed if not yet cached."""
        self.fill(rows)
        rows = rows.to(self.device)
        return CachedData(self.x[rows], self.y[rows], self.t[rows])


class ExperienceCache:
    """:class:`CachedExperience` per (experience dataset, split).

    Entries are keyed by the experience's dataset object (kept alive by the entry, so its id
    cannot be reused): Avalanche streams hand out the same dataset object every time an
    experience is accessed. :meth:`release` drops an entry (e.g. a training set once its
    experience is learned).
    """

    def __init__(self, *, device: torch.device | str = "cpu", batch_size: int = 4096):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._entries: dict[tuple[int, str], CachedExperience] = {}
        self._released_seconds = 0.0

    @property
    def seconds(self) -> float:
        """Total time spent transforming samples (the one-off cost of the cache)."""
        return self._released_seconds + sum(e.seconds for e in self._entries.values())

    def get(self, dataset, split: str) -> CachedExperience:
        key = (id(dataset), split)
        entry = self._entries.get(key)
        if entry is None or entry.dataset is not dataset:
            entry = CachedExperience(dataset, split, device=self.device, batch_size=self.batch_size)
            self._entries[key] = entry
        return entry

    def release(self, dataset, split: str) -> None:
        entry = self._entries.pop((id(dataset), split), None)
        if entry is not None:
            self._released_seconds += entry.seconds

    def clear(self) -> None:
        for dataset, split in [(e.dataset, s) for (_, s), e in list(self._entries.items())]:
            self.release(dataset, split)


class CachedBatches:
    """Minibatches ``[x, y, t]`` from a :class:`CachedExperience`, shaped as Avalanche's
    loaders yield them. Every sample the batches need is transformed up front, once.

    Build with :meth:`training` (exactly ``num_batches`` batches of ``batch_size``, reshuffled
    every epoch by a seeded generator, an epoch's last partial batch dropped: the order of
    :meth:`supsup.data.streams.TaskStream.train_batches`) or :meth:`evaluation` (in order, at
    most ``max_batches`` batches, the last possibly smaller).
    """

    def __init__(self, source: CachedExperience, *, batch_size: int, num_batches: int | None,
                 generator: torch.Generator | None, max_batches: int | None = None):
        self.source = source
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.generator = generator
        self.max_batches = max_batches

    @classmethod
    def training(cls, source: CachedExperience, *, batch_size: int, num_batches: int,
                 generator: torch.Generator) -> CachedBatches:
        if batch_size > len(source):
            raise ValueError(f"batch_size {batch_size} exceeds the experience's {len(source)} training samples")
        return cls(source, batch_size=batch_size, num_batches=num_batches, generator=generator)

    @classmethod
    def evaluation(cls, source: CachedExperience, *, batch_size: int, max_batches: int | None = None) -> CachedBatches:
        return cls(source, batch_size=batch_size, num_batches=None, generator=None, max_batches=max_batches)

    def __len__(self) -> int:
        if self.generator is not None:
            return self.num_batches
        n = -(-len(self.source) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def _index_batches(self) -> list[torch.Tensor]:
        n, bs = len(self.source), self.batch_size
        if self.generator is None:
            return [torch.arange(i * bs, min(n, (i + 1) * bs)) for i in range(len(self))]
        out = []
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        for _ in range(self.num_batches):
            if pos + bs > order.numel():
                order = torch.randperm(n, generator=self.generator)
                pos = 0
            out.append(order[pos: pos + bs])
            pos += bs
        return out

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        batches = self._index_batches()
        if batches:
            self.source.fill(torch.cat(batches))
        for rows in batches:
            d = self.source.tensors(rows)
            yield [d.x, d.y, d.t]


# -------------------------------------------------------------------------------- strategy

class SupSupStrategy(SupervisedTemplate):
    """Supermasks in Superposition as an Avalanche strategy.

    Training an experience (``strategy.train(experience)``):

    * GG/GN: the experience's task id (:meth:`task_id_of`: its index in the stream, or its
      task label, as ``task_id_source`` says) selects the mask: a new task gets fresh scores
      (:meth:`SupermaskModel.add_task`) *before* Avalanche collects the parameters to optimise,
      so the optimizer holds exactly the active scores; a task seen before is trained further
      from its mask. The mask is frozen into the bank when the experience ends.
    * NN: the task id is never read; every ``nn.check_every`` batches a one-shot entropy check
      decides whether a new mask is needed (paper Sec. 3.6, :func:`supsup.training.nn_detect`).
    * Exactly ``train.iterations`` optimizer steps of ``train.batch_size`` per experience
      (whatever the dataset size), in the order of the native streams (reshuffled every epoch
      by a generator from (seed, "train_order", task id)), from cached tensors
      (:class:`ExperienceCache`).

    Evaluation (``strategy.eval(stream)``, under ``torch.no_grad()``): each minibatch comes
    from one experience and is classified with one mask, the logits cut to ``num_classes``
    (superfluous neurons are never a class):

    * ``eval_task == "given"`` (default in GG): the experience's task id picks the mask;
    * ``eval_task == "inferred"`` (default in GN/NN): the task is inferred from the
      minibatch's first ``inference.num_images`` inputs alone (never its task label) with
      :func:`supsup.inference.infer_tasks` over the learned masks, then the whole minibatch is
      classified with the inferred mask (the paper's protocol). The inferred mask id is kept
      in :attr:`last_inferred_task` for :class:`TaskInferenceAccuracy`.
    * An experience with no mask (its task not learned yet, or nothing learned at all) is
      answered with uniform logits: the model knows nothing about it, so its accuracy is
      chance level (argmax picks class 0) and its loss is ``log(num_classes)``.

    Args:
        model: the :class:`~supsup.model.SupermaskModel`; its capacity bounds the tasks.
        num_classes: real classes per task (outputs beyond them are superfluous neurons).
        scenario: ``GG``, ``GN`` or ``NN``.
        train_config / eval_config / inference_config / nn_config: as in a run config.
        task_id_source: ``experience`` (``experience.current_experience``) or ``task_label``
            (Avalanche's classic PermutedMNIST/RotatedMNIST give every experience task label
            0 unless ``return_task_id=True``).
        seed: seeds the data order of each task (default: the model's seed).
        optimizer: any optimizer, built over any parameters (its parameter list is replaced
            by the active scores before every experience; new scores start with fresh state);
            default: ``train_config``'s, via :func:`supsup.training.make_optimizer`.
        device, plugins, evaluator, eval_every: as for any ``SupervisedTemplate``.
    """

    def __init__(self, *, model: SupermaskModel, num_classes: int, scenario: str = "GG",
                 train_config: TrainConfig | None = None, eval_config: EvalConfig | None = None,
                 inference_config: InferenceConfig | None = None, nn_config: NNConfig | None = None,
                 task_id_source: str = "experience", seed: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, device: torch.device | str = "cpu",
                 plugins: Sequence[Any] | None = None, evaluator: Any = default_evaluator,
                 eval_every: int = -1, cache_batch_size: int = 4096):
        if not isinstance(model, SupermaskModel):
            raise TypeError(f"SupSupStrategy trains a SupermaskModel, got {type(model).__name__}")
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
        if task_id_source not in TASK_ID_SOURCES:
            raise ValueError(f"unknown task_id_source {task_id_source!r}; known: {', '.join(TASK_ID_SOURCES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.scenario = scenario
        self.train_config = train_config if train_config is not None else TrainConfig()
        self.eval_config = eval_config if eval_config is not None else EvalConfig()
        self.inference_config = inference_config if inference_config is not None else InferenceConfig()
        self.nn_config = nn_config if nn_config is not None else NNConfig()
        self.task_id_source = task_id_source
        self.seed = model.seed if seed is None else seed
        self.eval_task = "given" if scenario == "GG" else "inferred"
        self.nn_state = NNState()
        self.last_inferred_task: int | None = None
        self.steps_in_experience = 0
        self.data_cache = ExperienceCache(device=device, batch_size=cache_batch_size)
        if optimizer is None:
            # One empty group for now: make_optimizer fills it with the active scores.
            optimizer = make_optimizer([{"params": []}], self.train_config)
        super().__init__(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=self.train_config.batch_size, train_epochs=1,
                         eval_mb_size=self.eval_config.batch_size, device=device, plugins=plugins,
                         evaluator=evaluator, eval_every=eval_every)

    # ------------------------------------------------------------------ task ids and masks
    @property
    def eval_task(self) -> str:
        """``given`` (the experience's task picks the mask) or ``inferred`` (from the inputs)."""
        return self._eval_task

    @eval_task.setter
    def eval_task(self, value: str) -> None:
        if value not in EVAL_TASKS:
            raise ValueError(f"eval_task must be one of {', '.join(EVAL_TASKS)}, got {value!r}")
        self._eval_task = value

    def task_id_of(self, experience) -> int:
        """The task an experience stands for. Selects the mask when training GG/GN and when
        evaluating with the task given; otherwise used for reporting only."""
        if self.task_id_source == "experience":
            return int(experience.current_experience)
        labels = list(experience.task_labels)
        if len(labels) != 1:
            raise ValueError(f"experience {experience.current_experience} has task labels {labels}; "
                             "SupSup needs one task per experience")
        return int(labels[0])

    def mask_to_task(self) -> dict[int, int]:
        """Each learned mask -> the task it stands for (NN: the true task it trained on most,
        from the experiences' task ids; reporting only)."""
        if self.scenario == "NN":
            return mask_to_task(self.nn_state.counts)
        return {t: t for t in range(self.model.num_learned_tasks)}

    def task_to_mask(self) -> dict[int, int]:
        """The inverse of :meth:`mask_to_task` (the lowest mask id when several share a task)."""
        out: dict[int, int] = {}
        for m, t in sorted(self.mask_to_task().items()):
            out.setdefault(t, m)
        return out

    def _begin_task(self) -> None:
        model = self.model
        if self.scenario == "NN":
            if model.active_task is None:  # the very first batch of the stream starts mask 0
                model.add_task()
                self.nn_state.allocations.append(self.nn_state.batches_seen)
                self.nn_state.batches_on_mask = 0
            return
        task_id = self.task_id_of(self.experience)
        if task_id < model.num_banked_tasks:
            model.resume_task(task_id)  # the stream comes back to a task: train its mask further
        elif task_id == model.num_learned_tasks:
            model.add_task()
        else:
            raise ValueError(f"SupSup learns tasks in order: the model knows tasks 0..{model.num_learned_tasks - 1}, "
                             f"the experience is task {task_id} (task_id_source={self.task_id_source!r})")

    # -------------------------------------------------------------- Avalanche's hooks
    def check_model_and_optimizer(self, **kwargs):
        # Avalanche collects the parameters to optimise right here: the experience's scores
        # must exist first.
        if self.is_training:
            self._begin_task()
        super().check_model_and_optimizer(**kwargs)

    def make_optimizer(self, **kwargs):
        """Point the optimizer at exactly the active task's scores; released scores of
        finished tasks are removed. New scores start with fresh state (as a native run's new
        optimizer per task); NN's mask carried over from the previous experience keeps its
        state (as the native NN loop's optimizer)."""
        self.optimized_param_id = update_optimizer(
            self.optimizer, dict(self.model.named_parameters()), self.optimized_param_id,
            reset_state=False, remove_params=True)

    def _fresh_optimizer(self) -> torch.optim.Optimizer:
        self.make_optimizer()
        return self.optimizer

    def make_train_dataloader(self, **kwargs):
        data = self.data_cache.get(self.experience.dataset, "train")
        if self.adapted_dataset is not None and len(self.adapted_dataset) != len(data):
            raise NotImplementedError("a plugin changed the training data; SupSupStrategy trains from the "
                                      "experience's own (cached) samples")
        order_id = self.experience.current_experience if self.scenario == "NN" else self.task_id_of(self.experience)
        self.dataloader = CachedBatches.training(
            data, batch_size=self.train_mb_size, num_batches=self.train_config.iterations,
            generator=make_generator(self.seed, "train_order", order_id))

    def make_eval_dataloader(self, **kwargs):
        self.dataloader = CachedBatches.evaluation(self.data_cache.get(self.experience.dataset, "eval"),
                                                   batch_size=self.eval_mb_size,
                                                   max_batches=self.eval_config.max_batches)

    def _before_training_exp(self, **kwargs):
        self.steps_in_experience = 0
        super()._before_training_exp(**kwargs)

    def _before_training_iteration(self, **kwargs):
        state = self.nn_state
        if self.scenario == "NN" and state.batches_seen > 0 and state.batches_seen % self.nn_config.check_every == 0:
            nn_check(self.model, self._fresh_optimizer, self.optimizer, self.mb_x, state, self.nn_config)
        super()._before_training_iteration(**kwargs)

    def _after_training_iteration(self, **kwargs):
        self.steps_in_experience += 1
        if self.scenario == "NN":
            state = self.nn_state
            counts = state.counts.setdefault(self.model.active_task, {})
            true_task = self.task_id_of(self.experience)  # reporting: which mask saw which task
            counts[true_task] = counts.get(true_task, 0) + 1
            state.batches_seen += 1
            state.batches_on_mask += 1
        super()._after_training_iteration(**kwargs)

    def _after_training_exp(self, **kwargs):
        if self.scenario != "NN":
            self.model.finish_task()  # NN keeps its active mask across experience boundaries
        self.data_cache.release(self.experience.dataset, "train")
        super()._after_training_exp(**kwargs)

    def forward(self):
        if self.is_training:
            with training_autocast(self.train_config.precision, self.mb_x.device):
                logits = self.model(self.mb_x)
            return logits.float()
        return self._eval_forward(self.mb_x)

    # -------------------------------------------------------------------- evaluation
    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of one eval minibatch ``x`` ``(B, ...)``."""
        self.last_inferred_task = None
        mask = self._given_mask() if self.eval_task == "given" else self._inferred_mask(x)
        if mask is None:
            return x.new_zeros(x.shape[0], self.num_classes)  # no mask: uniform, chance level
        self.model.set_task(mask)
        try:
            return self.model(x)[:, : self.num_classes]
        finally:
            self.model.restore_mode()

    def _given_mask(self) -> int | None:
        task_id = self.task_id_of(self.experience)
        if self.scenario == "NN":
            return self.task_to_mask().get(task_id)
        return task_id if task_id < self.model.num_learned_tasks else None

    def _inferred_mask(self, x: torch.Tensor) -> int | None:
        model = self.model
        if model.num_learned_tasks == 0:
            return None
        # Finished masks, plus the one being trained (evaluation during training, or NN):
        # candidate i is mask i.
        extra = model.candidate_extras(include_active=True)
        cfg = self.inference_config
        n = min(cfg.num_images, x.shape[0])
        tasks, _ = infer_tasks(model, x[:n].unsqueeze(0), method=cfg.method, objective=cfg.objective,
                               num_classes=self.num_classes, log_base=cfg.log_base, extra=extra)
        self.last_inferred_task = int(tasks[0])
        return self.last_inferred_task


class TaskInferenceAccuracy(GenericPluginMetric[float, Mean]):
    """Per eval experience, the fraction of minibatches whose mask :class:`SupSupStrategy`
    inferred for the experience's own task (NN: a mask stands for the task it trained on
    most). Emits nothing for an experience where nothing was inferred (task given, or no mask
    yet). Name: ``TaskInference_Acc_Exp/eval_phase/<stream>/Task<t>/Exp<e>``."""

    def __init__(self):
        super().__init__(Mean(), reset_at="experience", emit_at="experience", mode="eval")

    def reset(self) -> None:
        self._metric.reset()

    def result(self) -> float:
        return self._metric.result()

    def update(self, strategy) -> None:
        inferred = getattr(strategy, "last_inferred_task", None)
        if inferred is None:
            return
        true_task = strategy.task_id_of(strategy.experience)
        self._metric.update(float(strategy.mask_to_task().get(inferred, -1) == true_task))

    def _package_result(self, strategy):
        if self._metric.weight == 0:
            return []
        return super()._package_result(strategy)

    def __str__(self) -> str:
        return "TaskInference_Acc_Exp"


_METRIC_KEY = re.compile(r"^(?P<name>[^/]+)/eval_phase/(?P<stream>[^/]+)/Task\d+/Exp(?P<exp>\d+)$")


def per_experience(metrics: dict[str, Any], name: str, stream: str = "test_stream") -> dict[int, float]:
    """``{experience index: value}`` of a per-experience eval metric in
    ``strategy.eval(...)``'s result (e.g. ``name="Top1_Acc_Exp"``)."""
    out = {}
    for key, value in metrics.items():
        m = _METRIC_KEY.match(key)
        if m and m["name"] == name and m["stream"] == stream:
            out[int(m["exp"])] = float(value)
    return out


# ------------------------------------------------------------------- models for any stream

def benchmark_input_shape(benchmark) -> tuple[int, ...]:
    """Shape of one input of the first training experience, after its eval transforms:
    ``(C, H, W)`` for images, ``(F,)`` for feature vectors."""
    first = next(iter(benchmark.train_stream))
    return tuple(torch.as_tensor(first.dataset.eval()[0][0]).shape)


def benchmark_num_classes(benchmark) -> int:
    """Classes per task: 1 + the largest class label of any training experience."""
    return 1 + max(int(max(exp.dataset.targets.uniques)) for exp in benchmark.train_stream)


def supsup_model_for_benchmark(benchmark, *, backbone: str, num_outputs: int | None = None,
                               num_tasks: int | None = None, seed: int = 0,
                               weight_init: str = "signed_constant", mask_kind: str = "threshold",
                               density: float = 0.5, device: torch.device | str = "cpu") -> SupermaskModel:
    """A :class:`~supsup.model.SupermaskModel` whose input layer fits the stream's samples.

    Args:
        benchmark: any Avalanche benchmark with a ``train_stream`` (classic, or built with
            ``benchmark_from_datasets`` / ``tensors_benchmark``).
        num_outputs: output width (default: the class count). GN/NN with the ``g`` objective
            need superfluous neurons: pass more, e.g. 500.
        num_tasks: bank capacity (default: the number of training experiences).
    """
    num_classes = benchmark_num_classes(benchmark)
    outputs = num_classes if num_outputs is None else num_outputs
    if outputs < num_classes:
        raise ValueError(f"num_outputs ({outputs}) is smaller than the stream's {num_classes} classes")
    return SupermaskModel.from_name(
        backbone, num_tasks=len(benchmark.train_stream) if num_tasks is None else num_tasks,
        num_outputs=outputs, seed=seed, input_shape=benchmark_input_shape(benchmark),
        weight_init=weight_init, mask_kind=mask_kind, density=density, device=device)


# --------------------------------------------------------------------------------- runner

@dataclass
class ClassicBenchmark:
    """The first ``num_tasks`` experiences of an Avalanche classic benchmark."""

    benchmark: Any
    train: list
    test: list
    num_classes: int
    input_shape: tuple[int, ...]


def classic_benchmark(cfg: RunConfig) -> ClassicBenchmark:
    """Avalanche's PermutedMNIST / RotatedMNIST / SplitMNIST matching the native stream of
    ``cfg`` (same permutations, angles, digit pairs and labels), with task labels
    ``0..num_tasks-1``, read from the provisioned MNIST root (no network)."""
    from avalanche.benchmarks.classic import PermutedMNIST, RotatedMNIST, SplitMNIST

    from ..data.mnist import ensure_mnist

    b = cfg.benchmark
    root = ensure_mnist(b.data_root, progress=cfg.progress)
    n = b.num_tasks
    if b.name == "permuted_mnist":  # the config guarantees permutation_source == "avalanche"
        bench = PermutedMNIST(n, return_task_id=True, seed=cfg.seed, dataset_root=root)
    elif b.name == "rotated_mnist":
        angles = [float(a) for a in b.angles[:n]] if b.angles is not None else [360.0 * t / n for t in range(n)]
        bench = RotatedMNIST(n, return_task_id=True, seed=cfg.seed, rotations_list=angles, dataset_root=root)
    elif b.name == "split_mnist":
        # Native task t = digits 2t, 2t+1 relabelled 0/1: five fixed pairs, the first n kept.
        bench = SplitMNIST(5, return_task_id=True, seed=cfg.seed, fixed_class_order=list(range(10)),
                           class_ids_from_zero_in_each_exp=True, dataset_root=root)
    else:  # pragma: no cover - the config validates the name
        raise ConfigError("benchmark.name", f"no Avalanche benchmark for {b.name!r}")
    bench = in_dataset_order(bench)
    train, test = list(bench.train_stream)[:n], list(bench.test_stream)[:n]
    return ClassicBenchmark(bench, train, test, b.num_classes, benchmark_input_shape(bench))


def in_dataset_order(benchmark):
    """An ``nc_benchmark`` (all of Avalanche's classic benchmarks) rebuilt with every
    experience's samples in the order of the underlying dataset.

    ``nc_benchmark`` groups an experience's samples by class, so the first test minibatches
    are all one digit: evaluating ``eval.max_batches`` of them would measure one class, and
    task inference would only ever see single-class minibatches. In the dataset's order the
    experiences hold exactly the native streams' tensors, in the same order, so a run with the
    same seed trains on the same minibatches. Task labels and class timelines are kept
    (``benchmark_from_datasets`` + ``with_task_labels`` + ``with_classes_timeline``).
    """
    from avalanche.benchmarks import (
        benchmark_from_datasets,
        with_classes_timeline,
        with_task_labels,
    )

    def reorder(stream, assignment):
        return [exp.dataset.subset(torch.as_tensor(a).argsort().tolist()) for exp, a in zip(stream, assignment)]

    return with_classes_timeline(with_task_labels(benchmark_from_datasets(
        train=reorder(benchmark.train_stream, benchmark.train_exps_patterns_assignment),
        test=reorder(benchmark.test_stream, benchmark.test_exps_patterns_assignment))))


@contextlib.contextmanager
def run_evaluator(cfg: RunConfig, out: Path, *metrics):
    """An ``EvaluationPlugin`` with per-experience accuracy (plus ``metrics``), logging to
    ``out/avalanche_log.txt`` (and the terminal when ``cfg.progress``)."""
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.logging import InteractiveLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    with open(out / "avalanche_log.txt", "w") as text:
        loggers = [TextLogger(text)] + ([InteractiveLogger()] if cfg.progress else [])
        yield EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(experience=True),
                               *metrics, loggers=loggers)


def start_run(cfg: RunConfig, out_dir, *, resume: bool) -> Path:
    """Checks shared by every Avalanche run; writes ``config.yaml``."""
    if resume:
        raise CheckpointError("backend avalanche does not checkpoint, so it cannot resume: rerun without "
                              "--resume, or use backend native")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{out} holds a native run's checkpoint; choose another --out")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return out


def run_avalanche_experiment(cfg: RunConfig, out_dir, *, resume: bool = False) -> dict[str, Any]:
    """``supsup run`` with ``backend: avalanche``: the classic Avalanche benchmark, SupSup
    through :class:`SupSupStrategy` (or a baseline, :mod:`supsup.integrations.baselines`);
    writes ``config.yaml``, ``results.json`` (native schema), ``accuracy.png`` and
    ``avalanche_log.txt``; returns results.json's content.

    Accuracies are Avalanche's ``Top1_Acc_Exp`` metric with the final bank: ``acc_given_task``
    from an evaluation with the task given, ``acc_inferred`` (GN/NN) from one with the task
    inferred per minibatch, ``task_inference_acc`` from :class:`TaskInferenceAccuracy`. A
    minibatch whose task is inferred wrong is scored by its predictions (the native runner
    counts it as all wrong); with task inference near 1 the two agree.
    """
    from ..runner import (
        build_model,
        new_results,
        peak_rss_bytes,
        record_nn_detection,
        resolve_device,
        task_row,
        write_report,
    )

    if cfg.method != "supsup":
        from .baselines import run_baseline_experiment

        return run_baseline_experiment(cfg, out_dir, resume=resume)
    out = start_run(cfg, out_dir, resume=resume)
    device = resolve_device(cfg.device)
    bench = classic_benchmark(cfg)
    model = build_model(cfg, device, input_shape=bench.input_shape)
    results = new_results(cfg)
    with run_evaluator(cfg, out, TaskInferenceAccuracy()) as evaluator:
        strategy = SupSupStrategy(model=model, num_classes=bench.num_classes, scenario=cfg.scenario,
                                  train_config=cfg.train, eval_config=cfg.eval, inference_config=cfg.inference,
                                  nn_config=cfg.nn, task_id_source="task_label", seed=cfg.seed, device=device,
                                  evaluator=evaluator)
        for exp in bench.train:
            t0 = time.perf_counter()
            strategy.train(exp)
            results["train_seconds"] += time.perf_counter() - t0
            log.info("experience %d trained (%d steps)", exp.current_experience, strategy.steps_in_experience)
        if model.active_task is not None:  # NN: the last mask is still being trained
            model.finish_task()
        t0 = time.perf_counter()
        strategy.eval_task = "given"
        given = per_experience(strategy.eval(bench.test), "Top1_Acc_Exp")
        inferred: dict[int, float] = {}
        task_inf: dict[int, float] = {}
        if cfg.scenario != "GG":
            strategy.eval_task = "inferred"
            metrics = strategy.eval(bench.test)
            inferred = per_experience(metrics, "Top1_Acc_Exp")
            task_inf = per_experience(metrics, "TaskInference_Acc_Exp")
        results["eval_seconds"] += time.perf_counter() - t0

    mapped = set(strategy.task_to_mask())
    for exp in bench.test:
        task_id = strategy.task_id_of(exp)
        row = task_row(task_id)
        if cfg.scenario != "NN" or task_id in mapped:
            row["acc_given_task"] = given.get(exp.current_experience)
        row["acc_inferred"] = inferred.get(exp.current_experience)
        row["task_inference_acc"] = task_inf.get(exp.current_experience)
        results["tasks"].append(row)
    rows = results["tasks"]
    results["mean_acc_given_task"] = safe_mean([r["acc_given_task"] for r in rows])
    if cfg.scenario != "GG":
        results["mean_acc_inferred"] = safe_mean([r["acc_inferred"] for r in rows])
        results["task_inference_acc"] = safe_mean([r["task_inference_acc"] for r in rows])
    if cfg.scenario == "NN":
        record_nn_detection(results, model, strategy.nn_state, cfg.nn.check_every)
    results["bank_bytes"] = model.bank_bytes
    results["num_masked_weights"] = model.num_masked_weights
    results["peak_rss_bytes"] = peak_rss_bytes()
    if cfg.scenario != "GG":
        results["tasks_inferred"] = len(bench.test)
    results["data_cache_seconds"] = strategy.data_cache.seconds
    write_report(out, results)
    return results
