"""SupSup as an Avalanche (avalanche-lib 0.6) strategy.

The glue only calls the library: task bookkeeping is :class:`~supsup.model.SupermaskModel`'s,
task inference :func:`supsup.evaluation.infer_batch_masks`, scoring the GN protocol
:func:`supsup.evaluation.score_task`, NN detection :class:`supsup.detection.NNDetector`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.evaluation.metric_definitions import GenericPluginMetric
from avalanche.evaluation.metrics import Mean
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate

from ...config import EvalConfig, InferenceConfig, NNConfig, Scenario, TrainConfig
from ...detection import NNDetector
from ...evaluation import BatchOutcome, infer_batch_masks, infer_batches
from ...model import SupermaskModel
from ...rng import make_generator
from ...training import (
    CalibrationBuffer,
    check_learning_rate,
    fit_task_likelihood,
    make_optimizer,
    training_autocast,
)
from .data import CachedBatches, ExperienceCache

__all__ = ["TASK_ID_SOURCES", "SupSupStrategy", "TaskInferenceAccuracy", "experience_task_id"]

TASK_ID_SOURCES = ("experience", "task_label")
EVAL_TASKS = ("given", "inferred")


def experience_task_id(experience, source: str, strategy: str) -> int:
    """The task an experience stands for: its index in the stream (``source="experience"``) or
    its single task label (``"task_label"``; ``strategy`` names who needs one per experience)."""
    if source == "experience":
        return int(experience.current_experience)
    labels = list(experience.task_labels)
    if len(labels) != 1:
        raise ValueError(f"experience {experience.current_experience} has task labels {labels}; "
                         f"{strategy} needs one task per experience")
    return int(labels[0])


#: how far below a row's lowest answerable logit the classes its task does not answer are put
EXCLUDED_MARGIN = 20.0


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` logits where a task answers among its own classes (class-incremental: the
    others are ``-inf``) made finite for Avalanche's loss metric: each excluded class gets
    :data:`EXCLUDED_MARGIN` below the row's lowest answerable logit (a relative probability
    below ``e^-20``), so the argmax is unchanged and the loss of an image whose class the task
    does not answer is the logit range plus about 20, on the scale of the other batches (a
    fixed -1e4 made it about 10,000)."""
    excluded = torch.isneginf(logits)
    if not bool(excluded.any()):
        return logits
    lowest = logits.masked_fill(excluded, float("inf")).amin(dim=1, keepdim=True)
    return torch.where(excluded, lowest - EXCLUDED_MARGIN, logits)


def _take_num_classes(model: SupermaskModel, num_classes: int) -> None:
    """The strategy's former ``num_classes`` argument, kept working: the model's classes."""
    if num_classes == model.num_classes:
        warnings.warn("SupSupStrategy(num_classes=...) is deprecated and will be removed in 0.4: the model's "
                      "num_classes is used; drop the argument", FutureWarning, stacklevel=3)
        return
    if model.num_classes != model.num_outputs:  # the model was told its classes: they differ
        raise ValueError(f"SupSupStrategy(num_classes={num_classes}) conflicts with the model's num_classes "
                         f"{model.num_classes}; drop the argument (the model's is used)")
    if not 1 <= num_classes <= model.num_outputs:
        raise ValueError(f"num_classes must be in 1..{model.num_outputs} (the model's outputs), got {num_classes}")
    warnings.warn(f"SupSupStrategy(num_classes={num_classes}) is deprecated and will be removed in 0.4: build the "
                  f"model with SupermaskModel(..., num_classes={num_classes}); it is set on the model now", FutureWarning,
                  stacklevel=3)
    model.num_classes = num_classes


class SupSupStrategy(SupervisedTemplate):
    """Supermasks in Superposition as an Avalanche strategy.

    Training an experience (``strategy.train(experience)``):

    * GG/GN: the experience's task id (:meth:`task_id_of`: its index in the stream, or its
      task label, as ``task_id_source`` says) selects the mask: a new task gets fresh scores
      (:meth:`SupermaskModel.add_task`) *before* Avalanche collects the parameters to optimise,
      so the optimizer holds exactly the active scores; a task seen before is trained further
      from its mask. The mask is frozen into the bank when the experience ends.
    * NN: the task id is never read; :class:`~supsup.detection.NNDetector` decides before
      every batch whether a new mask is needed (paper Sec. 3.6).
    * Exactly ``train.iterations`` optimizer steps of ``train.batch_size`` per experience
      (whatever the dataset size), in the order of the native streams (reshuffled every epoch
      by a generator from (seed, "train_order", task id)), from cached tensors
      (:class:`~supsup.integrations.avalanche.data.ExperienceCache`).

    Evaluation (``strategy.eval(stream)``, under ``torch.no_grad()``): each minibatch comes
    from one experience and is classified with one mask among the model's ``num_classes`` real
    classes (superfluous neurons are never a class):

    * ``eval_task == "given"`` (default in GG): the experience's task id picks the mask;
    * ``eval_task == "inferred"`` (default in GN/NN): the mask is inferred from the minibatch's
      first ``inference.num_images`` inputs alone (never its task label), then the whole
      minibatch is classified with it. Avalanche's own metrics (``Top1_Acc_Exp``) score those
      predictions as they are; each minibatch is also recorded in :attr:`outcomes` as a
      :class:`~supsup.evaluation.BatchOutcome`, from which
      :func:`supsup.evaluation.score_task` computes the paper's GN protocol (a minibatch whose
      task is inferred wrongly counts as all wrong), as the native runner does.
    * An experience with no mask (its task not learned yet, or nothing learned at all) is
      answered with uniform logits: the model knows nothing about it, so its accuracy is
      chance level (argmax picks class 0) and its loss is ``log(num_classes)``.

    Args:
        model: the :class:`~supsup.model.SupermaskModel`; its capacity bounds the tasks, its
            ``num_classes`` the real classes.
        scenario: ``GG``, ``GN`` or ``NN`` (:class:`~supsup.config.Scenario`).
        train_config / eval_config / inference_config / nn_config: as in a run config.
        task_id_source: ``experience`` (``experience.current_experience``) or ``task_label``
            (Avalanche's classic PermutedMNIST/RotatedMNIST give every experience task label
            0 unless ``return_task_id=True``).
        seed: seeds the data order of each task (default: the model's seed).
        optimizer: any optimizer, built over any parameters (its parameter list is replaced
            by the active scores before every experience; new scores start with fresh state);
            default: ``train_config``'s, via :func:`supsup.training.make_optimizer`.
        per_image: with the task inferred, infer it for every image of a minibatch from that
            image alone and classify the image with its own inferred mask (the class-incremental
            reading: a test image need not come with others of its task); each image is then
            one :class:`~supsup.evaluation.BatchOutcome` of size 1.
        device, plugins, evaluator, eval_every: as for any ``SupervisedTemplate``.
        num_classes: deprecated (the model's ``num_classes`` is used): accepted as before when
            it equals the model's, or when the model was built without one (its every output a
            class), which then takes it, with a ``FutureWarning`` (removed in 0.4); a conflict
            is an error.
    """

    def __init__(self, *, model: SupermaskModel, scenario: Scenario | str = Scenario.GG,
                 train_config: TrainConfig | None = None, eval_config: EvalConfig | None = None,
                 inference_config: InferenceConfig | None = None, nn_config: NNConfig | None = None,
                 task_id_source: str = "experience", seed: int | None = None,
                 optimizer: torch.optim.Optimizer | None = None, device: torch.device | str = "cpu",
                 plugins: Sequence[Any] | None = None, evaluator: Any = default_evaluator,
                 eval_every: int = -1, cache_batch_size: int = 4096, per_image: bool = False,
                 num_classes: int | None = None):
        if not isinstance(model, SupermaskModel):
            raise TypeError(f"SupSupStrategy trains a SupermaskModel, got {type(model).__name__}")
        if num_classes is not None:
            _take_num_classes(model, num_classes)
        try:
            self.scenario = Scenario(scenario)
        except ValueError:
            raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(s.value for s in Scenario)}") from None
        if task_id_source not in TASK_ID_SOURCES:
            raise ValueError(f"unknown task_id_source {task_id_source!r}; known: {', '.join(TASK_ID_SOURCES)}")
        self.train_config = train_config if train_config is not None else TrainConfig()
        check_learning_rate(model.mask_kind, self.train_config.lr)
        self.eval_config = eval_config if eval_config is not None else EvalConfig()
        self.inference_config = inference_config if inference_config is not None else InferenceConfig()
        self.task_id_source = task_id_source
        self.seed = model.seed if seed is None else seed
        self.eval_task = "given" if self.scenario.task_given_at_test else "inferred"
        self.per_image = per_image
        self.detector = NNDetector(model, nn_config if nn_config is not None else NNConfig())
        self.last_inferred_task: int | None = None
        self._last_inference = None
        #: per eval experience index, the GN outcome of each minibatch evaluated with the task inferred
        self.outcomes: dict[int, list[BatchOutcome]] = {}
        self.steps_in_experience = 0
        self.calibration: CalibrationBuffer | None = None
        self.data_cache = ExperienceCache(device=device, batch_size=cache_batch_size)
        if optimizer is None:
            # One empty group for now: make_optimizer fills it with the active scores.
            optimizer = make_optimizer([{"params": []}], self.train_config)
        super().__init__(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=self.train_config.batch_size, train_epochs=1,
                         eval_mb_size=self.eval_config.batch_size, device=device, plugins=plugins,
                         evaluator=evaluator, eval_every=eval_every)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def nn_state(self):
        """NN detection's state (:class:`~supsup.detection.NNState`)."""
        return self.detector.state

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
        return experience_task_id(experience, self.task_id_source, "SupSup")

    def mask_to_task(self) -> dict[int, int]:
        """Each learned mask -> the task it stands for (NN: the true task it trained on most,
        from the experiences' task ids; reporting only)."""
        if self.scenario is Scenario.NN:
            return self.detector.mask_to_task()
        return {t: t for t in range(self.model.num_learned_tasks)}

    def task_to_mask(self) -> dict[int, int]:
        """The inverse of :meth:`mask_to_task` (the lowest mask id when several share a task)."""
        out: dict[int, int] = {}
        for m, t in sorted(self.mask_to_task().items()):
            out.setdefault(t, m)
        return out

    def _begin_task(self) -> None:
        model = self.model
        if self.scenario is Scenario.NN:
            self.detector.start()  # the very first batch of the stream starts mask 0
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

    def make_train_dataloader(self, **kwargs):
        data = self.data_cache.get(self.experience.dataset, "train")
        if self.adapted_dataset is not None and len(self.adapted_dataset) != len(data):
            raise NotImplementedError("a plugin changed the training data; SupSupStrategy trains from the "
                                      "experience's own (cached) samples")
        nn = self.scenario is Scenario.NN
        order_id = self.experience.current_experience if nn else self.task_id_of(self.experience)
        self.dataloader = CachedBatches.training(
            data, batch_size=self.train_mb_size, num_batches=self.train_config.iterations,
            generator=make_generator(self.seed, "train_order", order_id))

    def make_eval_dataloader(self, **kwargs):
        self.dataloader = CachedBatches.evaluation(self.data_cache.get(self.experience.dataset, "eval"),
                                                   batch_size=self.eval_mb_size,
                                                   max_batches=self.eval_config.max_batches)

    def _before_training_exp(self, **kwargs):
        self.steps_in_experience = 0
        if self.scenario is not Scenario.NN and self.model.likelihood is not None:
            # the experience's last training images: its task's likelihood statistics
            self.calibration = CalibrationBuffer(self.model.likelihood.images)
        super()._before_training_exp(**kwargs)

    def _before_training_iteration(self, **kwargs):
        if self.scenario is Scenario.NN and self.detector.observe(self.mb_x).mask_changed:
            self.make_optimizer()  # another mask's scores: a fresh optimizer over them
        super()._before_training_iteration(**kwargs)

    def _after_training_iteration(self, **kwargs):
        self.steps_in_experience += 1
        if self.scenario is Scenario.NN:
            # the true task for reporting only; the logits for the calibrated rule's statistics
            self.detector.after_step(true_task=self.task_id_of(self.experience), logits=self.mb_output,
                                    x=self.mb_x, y=self.mb_y)
        elif self.calibration is not None:
            self.calibration.add(self.mb_x, self.mb_y)
        super()._after_training_iteration(**kwargs)

    def _after_training_exp(self, **kwargs):
        if self.scenario is not Scenario.NN:
            task_id = self.model.finish_task()  # NN keeps its active mask across experience boundaries
            fit_task_likelihood(self.model, task_id, self.calibration)
            classes = sorted(int(c) for c in getattr(self.experience, "classes_in_this_experience", None) or [])
            if classes and len(classes) < self.model.num_classes:  # class-incremental: the task's own classes
                self.model.set_task_classes(task_id, classes)
        self.data_cache.release(self.experience.dataset, "train")
        super()._after_training_exp(**kwargs)

    def _before_eval_exp(self, **kwargs):
        self.outcomes[self.experience.current_experience] = []
        super()._before_eval_exp(**kwargs)

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
        self._last_inference = None
        if self.eval_task == "inferred" and self.per_image and self.model.num_learned_tasks:
            return self._per_image_forward(x)
        mask = self._given_mask() if self.eval_task == "given" else self._inferred_mask(x)
        if mask is None:
            logits = x.new_zeros(x.shape[0], self.num_classes)  # no mask: uniform, chance level
        else:
            with self.model.use_task(mask):
                logits = finite_logits(self.model.class_logits(x))
        if self.eval_task == "inferred":
            stands_for = -1 if mask is None else self.mask_to_task().get(mask, -1)
            correct = int((logits.argmax(dim=1) == self.mb_y).sum())
            ranked = self._last_inference
            self.outcomes[self.experience.current_experience].append(
                BatchOutcome(size=x.shape[0], inferred_task=stands_for, correct=correct,
                             true_rank=None if ranked is None else ranked.true_rank,
                             in_shortlist=None if ranked is None else ranked.in_shortlist))
        return logits

    def _per_image_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``: each image's task inferred from it alone, the image
        classified with that mask; one outcome of size 1 per image."""
        model = self.model
        masks = infer_batch_masks(model, list(x.unsqueeze(1)), dataclasses.replace(self.inference_config, num_images=1),
                                  model.candidates(include_active=True))
        logits = x.new_zeros(x.shape[0], self.num_classes)
        masks_t = torch.tensor(masks, device=x.device)
        for mask in sorted(set(masks)):
            rows = masks_t == mask
            with model.use_task(mask):
                logits[rows] = finite_logits(model.class_logits(x[rows]))
        task_of = self.mask_to_task()
        outcomes = self.outcomes[self.experience.current_experience]
        right = logits.argmax(dim=1) == self.mb_y
        for mask, ok in zip(masks, right.tolist()):
            outcomes.append(BatchOutcome(size=1, inferred_task=task_of.get(mask, -1), correct=int(ok)))
        self.last_inferred_task = max(set(masks), key=masks.count)  # the minibatch's most inferred mask
        return logits

    def _given_mask(self) -> int | None:
        task_id = self.task_id_of(self.experience)
        if self.scenario is Scenario.NN:
            return self.task_to_mask().get(task_id)
        return task_id if task_id < self.model.num_learned_tasks else None

    def _inferred_mask(self, x: torch.Tensor) -> int | None:
        model = self.model
        if model.num_learned_tasks == 0:
            return None
        # Finished masks, plus the one being trained (evaluation during training, or NN):
        # candidate i is mask i.
        own = self.task_to_mask().get(self.task_id_of(self.experience))  # where it ranks: reporting only
        (self._last_inference,) = infer_batches(model, [x], self.inference_config, model.candidates(include_active=True),
                                                true_masks=[own])
        self.last_inferred_task = self._last_inference.mask
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
