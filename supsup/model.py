"""SupermaskModel: a frozen random backbone with a bank of per-task supermasks.

State changes only through methods, guarded by :class:`Mode`:

* :meth:`SupermaskModel.add_task` starts a new task (fresh scores, mode ``TRAIN``);
* :meth:`SupermaskModel.finish_task` packs its mask into the bank (1 bit per weight) and
  releases the float scores (mode ``IDLE``);
* :meth:`SupermaskModel.set_task` runs one task's mask (mode ``TASK``); ``with
  model.use_task(t):`` does the same for a block and restores the previous mode after it;
* :meth:`SupermaskModel.superpose` runs ``W * sum_i alpha_i M_i`` (mode ``SUPERPOSE``).

:meth:`SupermaskModel.save` / :meth:`SupermaskModel.load` keep a model in one small,
self-contained file: the packed bank and the backbone's identity, from which the frozen
weights are rebuilt (and checked against their digest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masks as M
from .backbones import KEEP_WEIGHTS, create_backbone, paper_init
from .bank import (
    LIKELIHOOD_PREFIX,
    TASK_CLASSES_KEY,
    bank_sha256,
    bank_size,
    bank_state,
    check_bank_state,
    likelihood_state,
    mask_key,
    norm_key,
    norm_running_key,
    task_classes_state,
    task_rows,
    task_sha256,
)
from .candidates import Candidates
from .checkpoint import CheckpointError
from .errors import CapacityError, ModeError
from .layers import SupermaskLayer, wrap_backbone
from .likelihood import (
    DEFAULT_LIKELIHOOD,
    LikelihoodSpec,
    TaskLikelihood,
    fit_task_likelihood,
    layer_features,
    unpack_likelihoods,
)
from .modelfile import (
    check_fresh_backbone,
    constructor_kwargs,
    frozen_weights_digest,
    read_model_file,
    read_pretrained,
    write_model_file,
    write_pretrained,
)
from .modes import Mode
from .norm import NORMS, TaskBatchNorm
from .rng import make_generator

__all__ = ["Mode", "ModeError", "CapacityError", "SupermaskModel"]

class SupermaskModel(nn.Module):
    """A frozen backbone whose Linear/Conv2d layers carry per-task supermasks.

    Args:
        backbone: any module whose only parameterised submodules are ``nn.Linear`` /
            ``nn.Conv2d``; they are wrapped in place and their weights frozen as buffers.
        num_tasks: capacity of the mask bank.
        num_classes: real classes per task; outputs beyond them are superfluous neurons (paper
            Sec. 3.5), never predicted (default: every output is a class).
        seed: seeds every task's initial scores, via generators derived from (seed, task id).
        mask_kind: a registered mask kind (:data:`supsup.masks.MASK_KINDS`): ``threshold``,
            ``topk``.
        density: fraction kept by ``topk``.
        score_init: a registered score init (:data:`supsup.layers.SCORE_INITS`).
        norm: how non-affine BatchNorm layers keep statistics (:mod:`supsup.norm`):
            ``per_task`` (default), ``batch`` or ``shared``.
        likelihood: what each task banks for task inference by likelihood
            (:mod:`supsup.likelihood`): :func:`~supsup.training.learn_task` fits it on the
            task's last training images when the task finishes; None banks nothing besides
            the masks (the paper's gradient inference needs nothing else).
    """

    def __init__(self, backbone: nn.Module, *, num_tasks: int, num_classes: int | None = None, seed: int = 0,
                 mask_kind: str = "threshold", density: float = 0.5, score_init: str = "kaiming_uniform",
                 norm: str = "per_task", likelihood: LikelihoodSpec | None = DEFAULT_LIKELIHOOD,
                 weight_init: str = "signed_constant"):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        if any(isinstance(m, SupermaskLayer) for m in backbone.modules()):
            raise TypeError("this backbone is already wrapped (it belongs to a SupermaskModel): pass a fresh instance "
                            "of your module, or SupermaskModel.load(path, backbone=YourModule())")
        if weight_init != KEEP_WEIGHTS:
            paper_init(backbone, weight_init, seed)
        wrap_backbone(backbone, norm, mask_kind=mask_kind, density=density, score_init=score_init)
        self.backbone = backbone
        if not self.masked_layers:
            raise TypeError("the backbone has no nn.Linear or nn.Conv2d layer to mask")
        self.num_tasks = num_tasks
        self.num_outputs = int(self.masked_layers[-1].weight.shape[0])
        self.num_classes = self.num_outputs if num_classes is None else int(num_classes)
        if not 1 <= self.num_classes <= self.num_outputs:
            raise ValueError(f"num_classes must be in 1..{self.num_outputs} (the outputs), got {num_classes}")
        self.seed = seed
        self.weight_init = weight_init
        self.mask_kind = mask_kind
        self.density = density
        self.score_init = score_init
        self.norm = norm
        self.likelihood = likelihood
        #: task id -> its feature statistics (:meth:`fit_likelihood`)
        self._likelihoods: dict[int, TaskLikelihood] = {}
        #: how :meth:`load` rebuilds the backbone (set by :meth:`from_name`; None for a module
        #: built by the caller, which :meth:`load` then needs to be given)
        self.spec: dict[str, Any] | None = None
        self._mode = Mode.IDLE
        self._active_task: int | None = None
        self._current_task: int | None = None
        self._num_learned = 0
        #: task id -> the classes it answers among (class-incremental streams only)
        self.task_classes: dict[int, list[int]] = {}

    @classmethod
    def from_name(cls, backbone: str, *, num_tasks: int, num_outputs: int, num_classes: int | None = None,
                  seed: int = 0, input_shape: Sequence[int] = (1, 28, 28), weight_init: str = "signed_constant",
                  mask_kind: str = "threshold", density: float = 0.5, score_init: str = "kaiming_uniform",
                  norm: str = "per_task", likelihood: LikelihoodSpec | None = DEFAULT_LIKELIHOOD,
                  device: torch.device | str = "cpu") -> SupermaskModel:
        """Build a registered backbone (:data:`supsup.backbones.BACKBONES`) with ``num_outputs``
        outputs, its weights initialised from (seed, "backbone")."""
        net = create_backbone(backbone, input_shape=input_shape, num_outputs=num_outputs)
        model = cls(net, num_tasks=num_tasks, num_classes=num_classes, seed=seed, mask_kind=mask_kind,
                    density=density, score_init=score_init, norm=norm, likelihood=likelihood, weight_init=weight_init)
        model.spec = {"backbone": backbone, "input_shape": [int(d) for d in input_shape],
                      "num_outputs": num_outputs, "weight_init": weight_init}
        return model.to(device)

    # ------------------------------------------------------------------------ properties
    @property
    def masked_layers(self) -> list[SupermaskLayer]:
        return [m for m in self.backbone.modules() if isinstance(m, SupermaskLayer)]

    @property
    def norm_layers(self) -> list[TaskBatchNorm]:
        """The BatchNorm layers (per-task statistics, :mod:`supsup.norm`)."""
        return [m for m in self.backbone.modules() if isinstance(m, TaskBatchNorm)]

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def num_learned_tasks(self) -> int:
        """Tasks with a mask: finished ones plus the one being trained, if new."""
        return self._num_learned

    @property
    def num_banked_tasks(self) -> int:
        """Masks in the bank (finished tasks)."""
        return self.masked_layers[0].num_masks

    @property
    def active_task(self) -> int | None:
        """The task whose scores are being trained, if any."""
        return self._active_task

    @property
    def current_task(self) -> int | None:
        """The task selected by :meth:`set_task` (mode TASK)."""
        return self._current_task

    @property
    def num_masked_weights(self) -> int:
        """``P``: weights that carry a mask."""
        return sum(layer.num_weights for layer in self.masked_layers)

    @property
    def bank_bytes(self) -> int:
        """Bytes the packed bank holds in memory: ``<= num_tasks * (ceil(P/8) + 8 * num_layers)``
        (each layer's rows are padded to whole 64-bit words), BatchNorm statistics and the tasks'
        likelihood statistics (each at most its mask's bytes)."""
        masks = sum(layer.bank_nbytes() for layer in [*self.masked_layers, *self.norm_layers])
        return masks + sum(t.nbytes() for t in self._likelihoods.values())

    @property
    def mask_nbytes(self) -> int:
        """Bytes of one task's packed mask (every layer's row): what a task's likelihood
        statistics may take at most."""
        return sum(layer.bank.shape[1] for layer in self.masked_layers)

    @property
    def feature_layers(self) -> list[SupermaskLayer]:
        """The masked layers whose outputs the likelihood statistics model: all but the output
        layer (the only one, for a backbone with one masked layer)."""
        layers = self.masked_layers
        return layers[:-1] if len(layers) > 1 else layers

    @property
    def cache_bytes(self) -> int:
        """Bytes kept besides the bank to speed up task inference (one float per weight: the
        count of the bank's masks, built by the first inference)."""
        return sum(layer.cache_nbytes() for layer in self.masked_layers)

    @property
    def device(self) -> torch.device:
        return self.masked_layers[0].weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The active task's scores (empty when no task is being trained)."""
        return [layer.scores for layer in self.masked_layers if layer.scores is not None]

    # ------------------------------------------------------------------------ task bank
    def _set_layers(self, mode: Mode) -> None:
        for layer in [*self.masked_layers, *self.norm_layers]:
            layer.set_mode(mode)

    def add_task(self, task_id: int | None = None) -> int:
        """Start the next task: fresh scores from (seed, task id), mode TRAIN. Returns its id.
        ``task_id`` may name a later task (several processes train tasks in parallel): its mask
        is then taken out with :meth:`export_task`, and banked in order by :meth:`import_tasks`."""
        if self._active_task is not None:
            raise ModeError(f"task {self._active_task} is still being trained: call finish_task() first")
        next_id = self._num_learned
        task_id = next_id if task_id is None else task_id
        if task_id < next_id:
            raise IndexError(f"task {task_id} is already learned: resume_task trains it again")
        if task_id >= self.num_tasks:
            raise CapacityError(f"the bank is full: all {self.num_tasks} tasks are learned")
        for layer, scores in zip(self.masked_layers, self.initial_scores(task_id)):
            layer.set_scores(scores)
        for bn in self.norm_layers:
            bn.reset_running()
        self._active_task = task_id
        if task_id == next_id:
            self._num_learned += 1
        self.train_mode()
        return task_id

    def initial_scores(self, task_id: int) -> list[torch.Tensor]:
        """Task ``task_id``'s initial scores, one tensor per masked layer, drawn from a
        generator seeded by (seed, "scores", task id) (with ``score_init: transfer``, averaged
        with the banked tasks' masks)."""
        gen = make_generator(self.seed, "scores", task_id)
        fresh = [layer.initial_scores(gen) for layer in self.masked_layers]
        if self.score_init == "transfer":  # from the banked tasks' masks (paper Sec. 4.4)
            return [layer.transfer_scores(f) for layer, f in zip(self.masked_layers, fresh)]
        return fresh

    def resume_task(self, task_id: int, magnitude: float = 1e-2) -> None:
        """Train a finished task again (NN scenario): scores are rebuilt from its mask with
        ``|score| = magnitude`` and the task's bank row is overwritten by :meth:`finish_task`."""
        if self._active_task is not None:
            raise ModeError(f"task {self._active_task} is still being trained: call finish_task() first")
        if not 0 <= task_id < self.num_banked_tasks:
            raise IndexError(f"task {task_id} has no mask in the bank")
        for layer in self.masked_layers:
            layer.scores_from_mask(layer.stored_mask(task_id), magnitude)
        for bn in self.norm_layers:
            bn.load_stats(task_id)
        self._likelihoods.pop(task_id, None)  # the mask will change: its statistics with it
        self._active_task = task_id
        self.train_mode()

    def sampler(self) -> torch.Generator | None:
        """The generator a sampled mask kind (``bernoulli``) draws the training masks from:
        one per task, from (seed, "mask_samples", task id); None for other kinds. An NN
        checkpoint keeps its state (``get_state``)."""
        return self.masked_layers[0].sampler

    def train_mode(self) -> None:
        """Run the active task's scores with straight-through gradients (mode TRAIN)."""
        if self._active_task is None:
            raise ModeError("no task is being trained: call add_task() first")
        if self.mask_kind in M.SAMPLED_KINDS and self.masked_layers[0].sampler is None:
            gen = make_generator(self.seed, "mask_samples", self._active_task)
            for layer in self.masked_layers:
                layer.sampler = gen
        self._set_layers(Mode.TRAIN)
        self._mode = Mode.TRAIN
        self._current_task = self._active_task

    def finish_task(self) -> int:
        """Freeze the active task's mask into the bank and release its scores."""
        task_id = self._active_task
        if task_id is None:
            raise ModeError("no task is being trained")
        for layer in self.masked_layers:
            mask = layer.current_mask()
            if task_id < layer.num_masks:
                layer.write_mask(task_id, mask)
            else:
                layer.append_mask(mask, capacity_hint=self.num_tasks)
            layer.release_scores()
            layer.sampler = None
        for bn in self.norm_layers:
            bn.bank_stats(task_id, self.num_tasks)
        self._active_task = None
        self._set_layers(Mode.IDLE)
        self._mode = Mode.IDLE
        self._current_task = None
        return task_id

    def abandon_task(self) -> None:
        """Drop the task in training without banking its mask (e.g. after a failed step): a
        new task's id is given again by the next :meth:`add_task`; a finished task trained
        again keeps its banked mask."""
        task_id = self._active_task
        if task_id is None:
            raise ModeError("no task is being trained")
        for layer in self.masked_layers:
            layer.release_scores()
            layer.sampler = None
        if task_id == self._num_learned - 1 and task_id >= self.num_banked_tasks:  # a new task: its id is free
            self._num_learned = task_id
        self._active_task = None
        self.restore_mode()

    def export_task(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Take the task in training out without banking it: its id and its bank state rows
        (``bank.<i>`` ``(1, nbytes)``, ``norm.<j>`` ``(1, 2, C)``, its likelihood statistics if
        fitted), for :meth:`import_tasks`."""
        task_id = self._active_task
        if task_id is None:
            raise ModeError("no task is being trained")
        state = task_rows([layer.current_mask() for layer in self.masked_layers], self.norm_layers)
        if task_id in self._likelihoods:  # fitted under the mask in training (fit_likelihood)
            state.update(likelihood_state([self._likelihoods.pop(task_id)]))
        self.abandon_task()
        return task_id, state

    def import_tasks(self, state: dict[str, torch.Tensor]) -> None:
        """Bank the next tasks from bank state rows (``bank.<i>`` ``(k, nbytes)``, ...), in order."""
        if self._active_task is not None:
            raise ModeError("cannot bank tasks while a task is being trained")
        k = bank_size(state)
        if self.num_banked_tasks + k > self.num_tasks:
            raise CapacityError(f"{k} more tasks do not fit: {self.num_banked_tasks} of {self.num_tasks} are banked")
        for i, layer in enumerate(self.masked_layers):
            rows = state[mask_key(i)].to(layer.weight.device)
            for r in rows:
                layer.append_mask(M.unpack_bits(r, layer.num_weights).view_as(layer.weight), capacity_hint=self.num_tasks)
        for j, bn in enumerate(self.norm_layers):
            if bn.keeps_stats:
                for row in state[norm_key(j)]:
                    bn.append_stats(row, self.num_tasks)
        likelihood = {key[len(LIKELIHOOD_PREFIX):]: v for key, v in state.items() if key.startswith(LIKELIHOOD_PREFIX)}
        first = self.num_banked_tasks - k
        for i, lk in enumerate(unpack_likelihoods(likelihood, k, [layer.weight.shape[0] for layer in self.feature_layers])):
            if lk is not None:
                self._likelihoods[first + i] = lk.to(self.device)
        self._num_learned = self.num_banked_tasks

    def candidates(self, *, num_banked: int | None = None, include_active: bool = False,
                   pad_to: int = 0) -> Candidates:
        """The masks task inference chooses among (:class:`~supsup.candidates.Candidates`): the
        bank's first ``num_banked`` tasks (default: all; fewer is the state after that many
        tasks), read in place; then, with ``include_active``, the mask in training of a new
        task; then untrained masks of future task ids (the initial scores they will get) until
        there are ``pad_to`` (NN detection's floor on the candidate count)."""
        layers = self.masked_layers
        n = self.num_banked_tasks if num_banked is None else num_banked
        if not 0 <= n <= self.num_banked_tasks:
            raise IndexError(f"num_banked must be in 0..{self.num_banked_tasks}, got {num_banked}")
        rows: list[list[torch.Tensor]] = [[] for _ in layers]
        tasks: list[int | None] = list(range(n))
        active = self._active_task
        if include_active and active is not None and active >= self.num_banked_tasks:
            for r, layer in zip(rows, layers):
                r.append(M.pack_bits(layer.current_mask()).unsqueeze(0))
            tasks.append(active)
        next_id = max(len(tasks), self._num_learned)
        while len(tasks) < pad_to:
            for r, layer, scores in zip(rows, layers, self.initial_scores(next_id)):
                r.append(M.pack_bits(M.binarize(scores, layer.mask_kind, layer.density)).unsqueeze(0))
            tasks.append(None)
            next_id += 1
        blocks = tuple((layer.bank_rows[:n], torch.cat(r)) if r else (layer.bank_rows[:n],)
                       for r, layer in zip(rows, layers))
        return Candidates(blocks, tuple(tasks), banked=n, whole_bank=n == self.num_banked_tasks)

    def task_masks(self, task_id: int) -> list[torch.Tensor]:
        """Boolean masks of a task, one per masked layer."""
        if task_id == self._active_task:
            return [layer.current_mask() for layer in self.masked_layers]
        return [layer.stored_mask(task_id) for layer in self.masked_layers]

    # ------------------------------------------------------------ likelihood statistics
    def task_likelihood(self, task_id: int) -> TaskLikelihood | None:
        """Task ``task_id``'s feature statistics (:meth:`fit_likelihood`), or None."""
        return self._likelihoods.get(task_id)

    def set_task_likelihood(self, task_id: int, stats: TaskLikelihood) -> None:
        """Bank ``stats`` as task ``task_id``'s likelihood statistics (fitted elsewhere: another
        process, or :meth:`fit_likelihood`), checked against the feature layers' widths."""
        if not 0 <= task_id < self.num_learned_tasks:
            raise IndexError(f"task {task_id} is not learned; learned tasks: 0..{self.num_learned_tasks - 1}")
        dims = [layer.weight.shape[0] for layer in self.feature_layers]
        if [g.means.shape[1] for g in stats.layers] != dims:
            raise ValueError(f"statistics over features of widths {[g.means.shape[1] for g in stats.layers]}, "
                             f"the model's feature layers have {dims}")
        self._likelihoods[task_id] = stats.to(self.device)

    @torch.no_grad()
    def fit_likelihood(self, task_id: int, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512) -> TaskLikelihood:
        """Fit and bank task ``task_id``'s likelihood statistics (:mod:`supsup.likelihood`) from
        images ``x`` ``(n, ...)`` of the task with labels ``y`` ``(n,)``: the features its own mask
        (and BatchNorm statistics) compute, a probabilistic PCA Gaussian per feature layer, within
        the mask's bytes (:func:`supsup.likelihood.fit_task_likelihood`)."""
        if self.likelihood is None:
            raise ModeError("this model keeps no likelihood statistics (likelihood=None)")
        if x.shape[0] != y.shape[0] or x.shape[0] < 2:
            raise ValueError(f"fit_likelihood needs at least 2 images with one label each, got {x.shape[0]} "
                             f"images and {y.shape[0]} labels")
        with self.use_task(task_id):
            feats = [torch.cat(f) for f in zip(*(layer_features(self, self.feature_layers, xc)
                                                 for xc in x.split(chunk)))]
        try:
            fitted = fit_task_likelihood(feats, y.to(feats[0].device), self.mask_nbytes, self.likelihood)
        except ValueError as err:
            raise ValueError(f"task {task_id}: {err}") from None
        self._likelihoods[task_id] = fitted
        return fitted

    def set_task(self, task_id: int) -> None:
        """Run task ``task_id``'s mask (mode TASK); the active task uses its current scores."""
        if not (0 <= task_id < self._num_learned or task_id == self._active_task):  # a later task in training too
            raise IndexError(f"task {task_id} is not learned; learned tasks: 0..{self._num_learned - 1}")
        for layer, mask in zip(self.masked_layers, self.task_masks(task_id)):
            layer.set_mode(Mode.TASK, task_mask=mask)
        for bn in self.norm_layers:
            bn.set_mode(Mode.TASK, stats=bn.task_stats(None if task_id == self._active_task else task_id))
        self._mode = Mode.TASK
        self._current_task = task_id

    @contextlib.contextmanager
    def use_task(self, task_id: int) -> Iterator[SupermaskModel]:
        """``with model.use_task(t): ...`` runs task ``t``'s mask inside the block, then puts
        the model back in the mode it was in (training the active task, or idle)."""
        self.set_task(task_id)
        try:
            yield self
        finally:
            self.restore_mode()

    def set_task_classes(self, task_id: int, classes: Sequence[int]) -> None:
        """Task ``task_id`` answers among ``classes`` only (class-incremental streams, where
        labels are global: a task's mask predicts one of its own classes)."""
        classes = sorted({int(c) for c in classes})
        if not classes or classes[0] < 0 or classes[-1] >= self.num_classes:
            raise ValueError(f"task classes must be in 0..{self.num_classes - 1}, got {classes}")
        self.task_classes[task_id] = classes

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of the real classes in the current mode; a task with its
        own classes (:meth:`set_task_classes`) gets ``-inf`` for the others."""
        logits = self(x)[:, : self.num_classes]
        classes = self.task_classes.get(self._current_task) if self._mode is Mode.TASK else None
        if classes is None:
            return logits
        allowed = torch.zeros(self.num_classes, dtype=torch.bool, device=logits.device)
        allowed[classes] = True
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class predictions ``(B,)`` int64 for inputs ``(B, ...)`` in the current mode, among
        the ``num_classes`` real classes (superfluous neurons are never a class) and, for a task
        with its own classes, among those."""
        return self.class_logits(x).argmax(dim=1)

    # --------------------------------------------------------------------- superposition
    def superpose(self, alphas: torch.Tensor, packed: list[torch.Tensor] | None = None,
                  norm_stats: list[torch.Tensor] | None = None) -> None:
        """Mode SUPERPOSE: effective weights ``W * sum_i alpha_i M_i`` (paper eq. 3).

        Args:
            alphas: ``(n,)``, may require grad; gradients reach it through the packed bank
                without a float stack of masks.
            packed: candidates per layer (default: the bank's finished tasks).
            norm_stats: per BatchNorm layer, the candidates' statistics ``(n, 2, C)``: the
                layers then use the alpha-weighted statistics (``weighted``); default: the
                statistics of the batch (``batch``).
        """
        packed = packed if packed is not None else [layer.bank_rows for layer in self.masked_layers]
        n = packed[0].shape[0]
        if alphas.shape != (n,):
            raise ValueError(f"alphas must have shape ({n},), got {tuple(alphas.shape)}")
        for layer, p in zip(self.masked_layers, packed):
            layer.set_mode(Mode.SUPERPOSE, alphas=alphas, packed=p)
        for i, bn in enumerate(self.norm_layers):
            weighted = norm_stats is not None
            bn.set_mode(Mode.SUPERPOSE, alphas=alphas.unsqueeze(0) if weighted else None,
                        candidates=norm_stats[i] if weighted else None)
        self._mode = Mode.SUPERPOSE
        self._current_task = None

    def superpose_fixed(self, coefs: list[torch.Tensor], *, groups: int = 1,
                        norm_task: int | None = None) -> None:
        """Mode SUPERPOSE with a fixed coefficient per layer (``sum_i alpha_i M_i``, shaped
        like the weight): used by the batched task-inference path, which computes the alpha
        gradients itself (:mod:`supsup.inference`). BatchNorm layers normalise each of the
        ``groups`` equal parts of a batch (one inference each) with its own statistics, or,
        with ``norm_task``, with that banked task's (a single mask evaluated as itself)."""
        for layer, c in zip(self.masked_layers, coefs):
            layer.set_mode(Mode.SUPERPOSE, coef=c)
        for bn in self.norm_layers:
            if norm_task is not None and bn.keeps_stats:
                bn.set_mode(Mode.TASK, stats=bn.task_stats(norm_task))
            else:
                bn.set_mode(Mode.SUPERPOSE, groups=groups)
        self._mode = Mode.SUPERPOSE
        self._current_task = None

    def restore_mode(self) -> None:
        """Back to TRAIN if a task is being trained, else IDLE (after evaluation/inference)."""
        if self._active_task is not None:
            self.train_mode()
        else:
            self._set_layers(Mode.IDLE)
            self._mode = Mode.IDLE
            self._current_task = None

    # ------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode is Mode.IDLE:
            raise ModeError("no task selected: call add_task(), set_task(t) or superpose(alphas) first")
        return self.backbone(x)

    # ------------------------------------------------------------------- (de)serialise
    def load_bank_state(self, state: dict[str, torch.Tensor], num_learned: int | None = None) -> None:
        """Replace the bank (strict: every layer, right shapes, uint8; see
        :func:`supsup.bank.check_bank_state`)."""
        if self._active_task is not None:
            raise ModeError("cannot load a bank while a task is being trained")
        rows, norm_entries, likelihoods = check_bank_state(self.masked_layers, state, self.num_tasks, self.norm_layers,
                                                           [layer.weight.shape[0] for layer in self.feature_layers])
        for layer, t in zip(self.masked_layers, rows):
            layer.load_bank(t)
        self._likelihoods = {t: lk.to(self.device) for t, lk in enumerate(likelihoods) if lk is not None}
        if TASK_CLASSES_KEY in state:
            self.task_classes = {t: [int(c) for c in row if c >= 0] for t, row in enumerate(state[TASK_CLASSES_KEY].tolist())
                                 if any(c >= 0 for c in row)}
        for j, bn in enumerate(self.norm_layers):
            if norm_key(j) in norm_entries:
                bn.load_bank(norm_entries[norm_key(j)])
            if norm_running_key(j) in norm_entries:
                bn.running_mean.copy_(norm_entries[norm_running_key(j)][0])
                bn.running_var.copy_(norm_entries[norm_running_key(j)][1])
        self._num_learned = rows[0].shape[0] if num_learned is None else num_learned
        self.restore_mode()

    def frozen_weights_digest(self) -> str:
        """SHA-256 of the frozen weights (:func:`supsup.modelfile.frozen_weights_digest`)."""
        return frozen_weights_digest(self.backbone)

    def bank_state(self) -> dict[str, torch.Tensor]:
        """Packed bank rows per layer (exactly ``num_banked_tasks`` rows each), BatchNorm and
        likelihood statistics and task classes, on the CPU (:func:`supsup.bank.bank_state`)."""
        state = bank_state(self.masked_layers, self.norm_layers)
        state.update(task_classes_state(self.task_classes, self.num_banked_tasks))  # class-incremental
        state.update(likelihood_state([self._likelihoods.get(t) for t in range(self.num_banked_tasks)]))
        return state

    def bank_sha256(self) -> str:
        """SHA-256 of the bank, task by task (:func:`supsup.bank.bank_sha256`)."""
        return bank_sha256(self.masked_layers, norms=self.norm_layers,
                           likelihoods=[self._likelihoods.get(t) for t in range(self.num_banked_tasks)])

    def task_sha256(self, task_id: int) -> str:
        """SHA-256 of a banked task's mask and BatchNorm statistics (:func:`supsup.bank.task_sha256`)."""
        return task_sha256(self.masked_layers, task_id, self.norm_layers)

    def identity(self) -> dict[str, Any]:
        """What defines this model besides its masks: the backbone spec (if built by name), the
        output and class counts, capacity, seed, mask kind and the frozen weights' digest."""
        return {"spec": self.spec, "num_outputs": self.num_outputs, "num_classes": self.num_classes,
                "num_tasks": self.num_tasks, "seed": self.seed, "weight_init": self.weight_init,
                "mask_kind": self.mask_kind, "density": self.density, "score_init": self.score_init, "norm": self.norm,
                "likelihood": None if self.likelihood is None else dataclasses.asdict(self.likelihood),
                "num_masked_weights": self.num_masked_weights,
                "layer_shapes": [list(layer.weight.shape) for layer in self.masked_layers],
                "frozen_weights_sha256": self.frozen_weights_digest()}

    def save(self, path: str | os.PathLike) -> None:
        """Save the banked tasks and the model's identity to one checksummed file (written
        atomically; nothing in it is pickled). A task still in training is not saved: call
        :meth:`finish_task` first."""
        self._check_saveable("save")
        write_model_file(path, self.bank_state(), self.identity())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the banked tasks as ``DIR/supermasks.safetensors`` + ``DIR/supsup_config.json``
        (:func:`supsup.modelfile.write_pretrained`: peft's layout, no pickle)."""
        self._check_saveable("save_pretrained")
        return write_pretrained(directory, self.bank_state(), self.identity(), num_banked_tasks=self.num_banked_tasks,
                                bank_sha256=self.bank_sha256())

    def _check_saveable(self, how: str) -> None:
        if self._active_task is not None:
            raise ModeError(f"task {self._active_task} is still being trained: call finish_task() before {how}()")

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: nn.Module | None = None,
             device: torch.device | str = "cpu") -> SupermaskModel:
        """A model saved by :meth:`save`, with its banked tasks; outputs equal the saved model's.

        Args:
            backbone: the backbone module, for a model that was not built by :meth:`from_name`
                (the file then holds no recipe for it); its weights must be the saved ones.

        Raises:
            CheckpointError: a missing, corrupt or foreign file, or frozen weights that differ
                from the saved model's.
        """
        check_fresh_backbone(backbone)
        state, identity = read_model_file(path)
        return cls._rebuild(identity, state, backbone, where=str(path)).to(device)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backbone: nn.Module | None = None,
                        device: torch.device | str = "cpu") -> SupermaskModel:
        """A model written by :meth:`save_pretrained` (or ``supsup export``); outputs equal the
        saved model's. ``backbone``: as for :meth:`load`.

        Raises:
            CheckpointError: a missing or unreadable file, tensors that do not match the config's
                digest, or frozen weights that differ from the saved model's.
        """
        check_fresh_backbone(backbone)
        state, identity, digest = read_pretrained(directory)
        model = cls._rebuild(identity, state, backbone, where=str(directory))
        if model.bank_sha256() != digest:
            raise CheckpointError(f"{directory}: the loaded bank's digest differs from the saved one")
        return model.to(device)

    @classmethod
    def _rebuild(cls, identity: dict[str, Any], state: dict[str, torch.Tensor], backbone: nn.Module | None, *,
                 where: str) -> SupermaskModel:
        """A saved model: rebuilt from its identity (the frozen weights checked), its bank loaded."""
        try:
            kwargs, spec = constructor_kwargs(identity), identity["spec"]
            if backbone is not None:
                # files written before weight_init was recorded kept the module's own weights
                model = cls(backbone, weight_init=identity.get("weight_init") or KEEP_WEIGHTS, **kwargs)
            elif spec is not None:
                model = cls.from_name(spec["backbone"], num_outputs=spec["num_outputs"], input_shape=spec["input_shape"],
                                      weight_init=spec["weight_init"], **kwargs)
            else:
                raise CheckpointError(f"{where} holds a model built from a custom backbone: pass it as "
                                      "SupermaskModel.load(path, backbone=module) (or from_pretrained(dir, backbone=module))")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: unusable model identity ({type(err).__name__}: {err})") from None
        if model.frozen_weights_digest() != identity["frozen_weights_sha256"]:
            raise CheckpointError(f"{where}: the rebuilt backbone's frozen weights differ from the saved model's "
                                  "(another torch version's initialisation, or another backbone module)")
        try:
            model.load_bank_state(state)
        except ValueError as err:
            raise CheckpointError(f"{where} has an unusable mask bank: {err}") from None
        return model
