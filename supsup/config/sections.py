"""The run configuration: one dataclass per YAML section, validated on construction.

Names a config may use (backbones, benchmarks, mask kinds, optimizers, objectives, inference
methods, score and weight inits) are checked against the registries that define them, so a
new registered component is usable in a config at once. ``backend`` and ``method`` belong to
the experiment layer, which checks them (:func:`supsup.experiment.check_config`).

Every mistake raises :class:`ConfigError`, whose message is one line that names the dotted key.
"""

from __future__ import annotations

import difflib
import enum
import math
from dataclasses import dataclass, field

__all__ = [
    "BenchmarkConfig",
    "ConfigError",
    "EvalConfig",
    "HopfieldConfig",
    "InferenceConfig",
    "LogConfig",
    "MaskConfig",
    "ModelConfig",
    "NNConfig",
    "PRECISIONS",
    "SCHEDULES",
    "RunConfig",
    "Scenario",
    "TrainConfig",
]

PRECISIONS = ("fp32", "bf16", "auto")
SCHEDULES = ("constant", "cosine")


class Scenario(str, enum.Enum):
    """When the task id is given (paper Sec. 3): ``GG`` at train and test, ``GN`` at train
    only (inferred at test), ``NN`` never (new tasks detected while training)."""

    GG = "GG"
    GN = "GN"
    NN = "NN"

    def __str__(self) -> str:
        return self.value

    @property
    def task_given_at_test(self) -> bool:
        return self is Scenario.GG

    @property
    def task_given_at_train(self) -> bool:
        return self is not Scenario.NN


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a one-line message naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def check_choice(key: str, value: str, choices) -> None:
    """``value`` must be one of ``choices`` (a sequence, or a registry with ``names()``)."""
    names = choices.names() if hasattr(choices, "names") else list(choices)
    if value not in names:
        hint = difflib.get_close_matches(str(value), names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(key, f"unknown value {value!r}{extra}; choose one of {', '.join(names)}")


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(key, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(key, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")


@dataclass
class BenchmarkConfig:
    """Which task stream to learn."""

    name: str = field(default="permuted_mnist", metadata={"help": "a registered stream (supsup.data.streams.STREAMS): permuted_mnist | rotated_mnist | split_mnist"})
    num_tasks: int = field(default=5, metadata={"help": "tasks in the stream; also the mask bank's capacity"})
    angles: list[float] | None = field(default=None, metadata={"help": "rotated_mnist: explicit angles in degrees (default: evenly spaced over 360)"})
    permutation_source: str = field(default="torch", metadata={"help": "permuted_mnist: 'torch' (generator seeded by seed and task id) or 'avalanche' (np.random.RandomState(seed).permutation, as Avalanche's PermutedMNIST)"})
    data_root: str | None = field(default=None, metadata={"help": "data root (default $SUPSUP_DATA or ~/.cache/supsup)"})
    labels: str = field(default="task", metadata={"help": "split streams: task (each task's classes numbered 0..c-1) | global (class-incremental: classes keep their dataset label, every test image classified among all of them)"})
    validation: int | None = field(default=None, metadata={"help": "hold out this many training images per task (seeded) and evaluate on them instead of the test set: for choosing hyperparameters (supsup tune); native backend"})

    def __post_init__(self) -> None:
        from ..data.streams import STREAMS

        check_choice("benchmark.name", self.name, STREAMS)
        check_range("benchmark.num_tasks", self.num_tasks, 1)
        check_choice("benchmark.permutation_source", self.permutation_source, ("torch", "avalanche"))
        check_choice("benchmark.labels", self.labels, ("task", "global"))
        if self.labels == "global" and not STREAMS.get(self.name).supports_global_labels:
            raise ConfigError("benchmark.labels", f"{self.name} has no task-local labels to make global; "
                                                  "labels global is for the split streams")
        if self.validation is not None:
            check_range("benchmark.validation", self.validation, 1)
        max_tasks = STREAMS.get(self.name).max_tasks
        if max_tasks is not None and self.num_tasks > max_tasks:
            raise ConfigError("benchmark.num_tasks", f"{self.name} has at most {max_tasks} tasks, got {self.num_tasks}")
        if self.angles is not None:
            if len(self.angles) < self.num_tasks:
                raise ConfigError("benchmark.angles", f"needs one angle per task ({self.num_tasks}), got {len(self.angles)}")
            for a in self.angles:
                check_range("benchmark.angles", a)

    @property
    def num_classes(self) -> int:
        """Classes the model tells apart: per task, or all of them with labels global."""
        from ..data.streams import STREAMS

        cls = STREAMS.get(self.name)
        return cls.total_classes if self.labels == "global" else cls.num_classes


@dataclass
class ModelConfig:
    """The frozen backbone."""

    backbone: str = field(default="fc1024", metadata={"help": "a registered backbone (supsup.backbones.BACKBONES): fc1024 | lenet_300_100 | fc_300_300 | conv4"})
    num_outputs: int = field(default=500, metadata={"help": "output width: the real classes plus superfluous neurons"})
    weight_init: str = field(default="signed_constant", metadata={"help": "signed_constant | kaiming_normal"})
    score_init: str = field(default="kaiming_uniform", metadata={"help": "initial scores of a new task (supsup.layers.SCORE_INITS)"})
    capacity: int | None = field(default=None, metadata={"help": "masks the bank may hold (default: benchmark.num_tasks); NN may use fewer"})
    norm: str = field(default="per_task", metadata={"help": "BatchNorm statistics (backbones with BN): per_task (banked with each mask) | batch (the batch's own, always) | shared (one set for all tasks: the official code's first-release bug)"})

    def __post_init__(self) -> None:
        from ..backbones import BACKBONES, WEIGHT_INITS
        from ..layers import SCORE_INITS
        from ..norm import NORMS

        check_choice("model.backbone", self.backbone, BACKBONES)
        check_range("model.num_outputs", self.num_outputs, 1)
        check_choice("model.weight_init", self.weight_init, WEIGHT_INITS)
        check_choice("model.score_init", self.score_init, SCORE_INITS)
        if self.capacity is not None:
            check_range("model.capacity", self.capacity, 1)
        check_choice("model.norm", self.norm, NORMS)


@dataclass
class MaskConfig:
    """How scores become a binary mask."""

    kind: str = field(default="threshold", metadata={"help": "threshold (mask = scores >= 0) | topk (keep the `density` fraction with the largest |score|)"})
    density: float = field(default=0.5, metadata={"help": "topk: fraction of weights kept, in (0, 1]"})

    def __post_init__(self) -> None:
        from ..masks import MASK_KINDS

        check_choice("mask.kind", self.kind, MASK_KINDS)
        check_range("mask.density", self.density, 0.0, 1.0, lo_open=True)


@dataclass
class TrainConfig:
    """Per-task optimisation (paper, PermutedMNIST: 1000 steps of 128, RMSprop, lr 1e-4)."""

    iterations: int = field(default=1000, metadata={"help": "optimizer steps per task"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop | adam | sgd (supsup.optim.OPTIMIZERS)"})
    momentum: float = field(default=0.0, metadata={"help": "sgd/rmsprop momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay on the scores"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16: training matmuls in bfloat16 with fp32 accumulation (torch.autocast); scores, optimizer and all evaluation stay fp32; auto: bf16 only where it is faster (the runner times a few steps of each at start-up and records its choice; elsewhere bf16 on a GPU that supports it, else fp32)"})
    schedule: str = field(default="constant", metadata={"help": "learning rate over a task's steps: constant | cosine (annealed to 0 at the last step, as the paper's SplitCIFAR/SplitImageNet runs)"})
    layer_lr: list[float] | None = field(default=None, metadata={"help": "learning-rate multiplier per masked layer, input to output (default: 1 for every layer), e.g. [0.1, 1, 1]; native backend"})
    checkpoint_every: int | None = field(default=None, metadata={"help": "also checkpoint inside a task every N optimizer steps (default: after each task only); a resume goes on bitwise from the last one; GG/GN, native backend (one process or torchrun)"})

    def __post_init__(self) -> None:
        from ..optim import OPTIMIZERS

        check_range("train.iterations", self.iterations, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.lr", self.lr, 0.0, lo_open=True)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_range("train.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("train.weight_decay", self.weight_decay, 0.0)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        if self.checkpoint_every is not None:
            check_range("train.checkpoint_every", self.checkpoint_every, 1)
        if self.layer_lr is not None:
            if not isinstance(self.layer_lr, list) or not self.layer_lr:
                raise ConfigError("train.layer_lr", f"must be a non-empty list of multipliers, got {self.layer_lr!r}")
            for i, m in enumerate(self.layer_lr):
                check_range(f"train.layer_lr[{i}]", m, 0.0, lo_open=True)


@dataclass
class InferenceConfig:
    """Task inference (GN/NN evaluation)."""

    method: str = field(default="one_shot", metadata={"help": "one_shot | binary (the paper's gradients) | likelihood (beyond the paper: every mask scored by the likelihood of the images' features under the statistics its task banked; supsup.inference.INFERENCE_METHODS)"})
    objective: str = field(default="g", metadata={"help": "entropy (H) | g (G, superfluous neurons)"})
    num_images: int = field(default=1, metadata={"help": "images of each test batch used to infer its task"})
    log_base: float = field(default=2.0, metadata={"help": "binary: keep the best 1/log_base of the candidates each step"})
    group_size: int = field(default=128, metadata={"help": "inferences that share one pass over the packed bank "
                                                           "(speed only: each inference is computed on its own)"})
    memory_mb: int = field(default=2048, metadata={"help": "activation memory one inference pass may hold: groups "
                                                           "shrink so that their images fit (speed only)"})
    refine: str = field(default="none", metadata={"help": "none (the paper: the gradient decides) | exact (beyond the paper: the objective evaluated exactly under each of the gradient's refine_candidates best masks picks the task)"})
    refine_candidates: int = field(default=5, metadata={"help": "refine exact: masks the gradient shortlists"})
    refine_temperature: float = field(default=1.0, metadata={"help": "refine exact: the exact objective is taken of the logits / this (above 1, a batch's confident images count too; choose it on validation data: benchmarks/refine_temperature.py)"})
    likelihood_images: int = field(default=1024, metadata={"help": "likelihood: each task's statistics are fitted on its last this many training images"})
    likelihood_rank: int = field(default=32, metadata={"help": "likelihood: principal directions per class and feature layer at most (fewer when a task's statistics would exceed its mask's bytes)"})

    def __post_init__(self) -> None:
        from ..inference import INFERENCE_METHODS, REFINEMENTS
        from ..objectives import OBJECTIVES

        check_choice("inference.method", self.method, INFERENCE_METHODS)
        check_choice("inference.objective", self.objective, OBJECTIVES)
        check_range("inference.num_images", self.num_images, 1)
        check_range("inference.log_base", self.log_base, 1.0, lo_open=True)
        check_range("inference.group_size", self.group_size, 1)
        check_range("inference.memory_mb", self.memory_mb, 1)
        check_choice("inference.refine", self.refine, REFINEMENTS)
        check_range("inference.refine_candidates", self.refine_candidates, 2)
        check_range("inference.refine_temperature", self.refine_temperature, 0.0, lo_open=True)
        check_range("inference.likelihood_images", self.likelihood_images, 2)
        check_range("inference.likelihood_rank", self.likelihood_rank, 0)


@dataclass
class EvalConfig:
    """Evaluation on the test split."""

    batch_size: int = field(default=128, metadata={"help": "test batch size; each GN batch comes from one task"})
    max_batches: int | None = field(default=None, metadata={"help": "evaluate at most this many test batches per task (None: all)"})
    at_tasks: list[int] | None = field(default=None, metadata={"help": "also evaluate every learned task after this many tasks (accuracy-vs-tasks curve)"})
    sample_tasks: int | None = field(default=None, metadata={"help": "curve points and the final task-inferred evaluation evaluate at most this many learned tasks, evenly spaced (None: all)"})
    extra_objectives: list[str] = field(default_factory=list, metadata={"help": "task-inference objectives evaluated besides inference.objective (same masks)"})

    def __post_init__(self) -> None:
        from ..objectives import OBJECTIVES

        check_range("eval.batch_size", self.batch_size, 1)
        if self.max_batches is not None:
            check_range("eval.max_batches", self.max_batches, 1)
        if self.sample_tasks is not None:
            check_range("eval.sample_tasks", self.sample_tasks, 1)
        for n in self.at_tasks or []:
            check_range("eval.at_tasks", n, 1)
        for obj in self.extra_objectives:
            check_choice("eval.extra_objectives", obj, OBJECTIVES)


@dataclass
class NNConfig:
    """NN scenario: task-boundary detection while training without task labels."""

    check_every: int = field(default=100, metadata={"help": "batches between two detection checks"})
    min_candidates: int = field(default=5, metadata={"help": "superpose at least this many masks, padding with untrained ones"})
    threshold: float = field(default=1.125, metadata={"help": "new task if max softmax(-grad) < threshold / n"})
    min_batches_per_task: int = field(default=100, metadata={"help": "guard: a mask trains at least this many batches before another new mask may be allocated"})
    rule: str = field(default="paper", metadata={"help": "paper (n * max softmax(-grad) below threshold / n) | calibrated (a batch's entropy under a mask against that mask's own, z-scored: works on rotations too)"})
    z_threshold: float = field(default=4.0, metadata={"help": "calibrated: a mask keeps a batch whose entropy is at most this many standard deviations above its own mean"})
    calibration_momentum: float = field(default=0.05, metadata={"help": "calibrated: weight of each training batch in a mask's moving entropy mean and variance"})
    calibration_min_std: float = field(default=0.02, metadata={"help": "calibrated: floor of a mask's entropy standard deviation (nats)"})
    shortlist: int = field(default=10, metadata={"help": "calibrated: banked masks evaluated at a check, shortlisted by the entropy gradient"})

    def __post_init__(self) -> None:
        check_range("nn.check_every", self.check_every, 1)
        check_choice("nn.rule", self.rule, ("paper", "calibrated"))
        check_range("nn.z_threshold", self.z_threshold, 0.0, lo_open=True)
        check_range("nn.calibration_momentum", self.calibration_momentum, 0.0, 1.0, lo_open=True)
        check_range("nn.calibration_min_std", self.calibration_min_std, 0.0, lo_open=True)
        check_range("nn.shortlist", self.shortlist, 1)
        check_range("nn.min_candidates", self.min_candidates, 1)
        check_range("nn.threshold", self.threshold, 0.0, lo_open=True)
        check_range("nn.min_batches_per_task", self.min_batches_per_task, 0)


@dataclass
class HopfieldConfig:
    """HopSupSup (``method: hopsupsup``): neuron masks kept in Hopfield networks and recovered
    from each task's unlabelled test data (supsup.hopsupsup). Training uses ``train.lr``,
    ``train.optimizer`` (sgd), ``train.momentum``, ``train.weight_decay``, ``train.batch_size``."""

    hidden: list[int] = field(default_factory=lambda: [2048, 2048], metadata={"help": "widths of the masked hidden layers (official: 784-2048-2048-classes, Swish)"})
    rule: str = field(default="storkey", metadata={"help": "storkey (the official code) | hebbian (the paper's text): how a mask is added to a layer's Hopfield matrix"})
    epochs: int | None = field(default=1, metadata={"help": "passes over a task's training set (official: 1); null: train.iterations steps"})
    gamma: float = field(default=1.5e-3, metadata={"help": "weight of the Hopfield energy in the recovery loss (1 - t) H + gamma t E"})
    recovery_lr: float = field(default=500.0, metadata={"help": "SGD learning rate of mask recovery"})
    recovery_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of mask recovery"})
    recovery_weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay of mask recovery"})
    batch_size: int = field(default=64, metadata={"help": "unlabelled test images per recovery step and per evaluated batch (the masks act through batch statistics)"})

    def __post_init__(self) -> None:
        from ..hopfield import HOPFIELD_RULES

        if not isinstance(self.hidden, list) or not self.hidden:
            raise ConfigError("hopfield.hidden", f"must be a non-empty list of layer widths, got {self.hidden!r}")
        for i, d in enumerate(self.hidden):
            if not isinstance(d, int) or d < 2:
                raise ConfigError(f"hopfield.hidden[{i}]", f"must be an integer >= 2, got {d!r}")
        check_choice("hopfield.rule", self.rule, HOPFIELD_RULES)
        if self.epochs is not None:
            check_range("hopfield.epochs", self.epochs, 1)
        check_range("hopfield.gamma", self.gamma, 0.0)
        check_range("hopfield.recovery_lr", self.recovery_lr, 0.0, lo_open=True)
        check_range("hopfield.recovery_momentum", self.recovery_momentum, 0.0, 1.0, hi_open=True)
        check_range("hopfield.recovery_weight_decay", self.recovery_weight_decay, 0.0)
        check_range("hopfield.batch_size", self.batch_size, 2)

    def steps_per_task(self, num_train: int, train: TrainConfig) -> int:
        """Optimizer steps for a task with ``num_train`` images: ``epochs`` passes in batches of
        ``train.batch_size`` (the last partial batch dropped), or ``train.iterations``."""
        if self.epochs is None:
            return train.iterations
        return max(1, self.epochs * (num_train // train.batch_size))

    def recovery_options(self) -> dict[str, float]:
        """The keyword arguments of :func:`supsup.hopsupsup.recover_masks`."""
        return {"lr": self.recovery_lr, "momentum": self.recovery_momentum,
                "weight_decay": self.recovery_weight_decay, "gamma": self.gamma}


LOG_BACKENDS = ("csv", "tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    """Where a run logs its progress, task by task."""

    backends: list[str] = field(default_factory=lambda: ["csv"], metadata={"help": "csv (DIR/metrics.csv), tensorboard (DIR/tensorboard/; needs the tensorboard package), wandb (DIR/wandb/; WANDB_MODE=offline works without a network), mlflow (MLFLOW_TRACKING_URI, default the SQLite store DIR/mlflow.db); wandb and mlflow need supsup[track]"})

    def __post_init__(self) -> None:
        for name in self.backends:
            check_choice("log.backends", name, LOG_BACKENDS)
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError("log.backends", f"lists a backend twice: {self.backends}")


@dataclass
class RunConfig:
    """A whole experiment."""

    seed: int = field(default=0, metadata={"help": "seeds the backbone, every task's scores, data order and permutations"})
    scenario: Scenario = field(default=Scenario.GG, metadata={"help": "GG (task id at train and test) | GN (inferred at test) | NN (never given)"})
    backend: str = field(default="native", metadata={"help": "native (fast tensor streams) | avalanche (Avalanche benchmark and strategy)"})
    method: str = field(default="supsup", metadata={"help": "supsup | hopsupsup (masks in Hopfield networks, GN; hopfield.*) | an Avalanche baseline (backend avalanche): naive | ewc | si | lwf | replay | gem | packnet"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nn: NNConfig = field(default_factory=NNConfig)
    hopfield: HopfieldConfig = field(default_factory=HopfieldConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        try:
            self.scenario = Scenario(self.scenario)
        except ValueError:
            check_choice("scenario", str(self.scenario), [s.value for s in Scenario])
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        self.validate_combinations()

    @property
    def capacity(self) -> int:
        """Masks the bank may hold."""
        return self.model.capacity if self.model.capacity is not None else self.benchmark.num_tasks

    def validate_combinations(self) -> None:
        """Checks that span sections."""
        classes = self.benchmark.num_classes
        outputs = self.model.num_outputs
        if outputs < classes:
            raise ConfigError("model.num_outputs", f"must be at least the {classes} classes of {self.benchmark.name}, got {outputs}")
        for n in self.eval.at_tasks or []:
            if n > self.benchmark.num_tasks:
                raise ConfigError("eval.at_tasks", f"{n} is more than the {self.benchmark.num_tasks} tasks of the stream")
        if "g" in self.eval.extra_objectives and outputs <= classes:
            raise ConfigError("eval.extra_objectives", f"'g' needs superfluous neurons: model.num_outputs ({outputs}) must exceed the {classes} classes")
        inferred_by_supsup = not self.scenario.task_given_at_test and self.method != "hopsupsup"  # hopsupsup recovers
        if inferred_by_supsup and self.inference.objective == "g" and outputs <= classes:
            raise ConfigError("inference.objective", f"'g' needs superfluous neurons: model.num_outputs ({outputs}) must exceed the {classes} classes")
        if inferred_by_supsup and self.scenario is Scenario.GN and self.inference.num_images > self.eval.batch_size:
            raise ConfigError("inference.num_images", f"({self.inference.num_images}) is larger than the evaluation batch eval.batch_size ({self.eval.batch_size})")
        if self.scenario is Scenario.NN and self.benchmark.labels == "global":
            raise ConfigError("benchmark.labels", "global labels need each task's classes, which NN never sees "
                                                  "as a task: use GN")
        if self.scenario is Scenario.NN and self.train.schedule != "constant":
            raise ConfigError("train.schedule", "NN never knows where a task ends, so its learning rate cannot follow "
                                                "a per-task schedule: use constant")
        if self.scenario.task_given_at_train and self.capacity < self.benchmark.num_tasks:
            raise ConfigError("model.capacity", f"({self.capacity}) is smaller than the {self.benchmark.num_tasks} tasks to learn in {self.scenario}")
