"""Run configuration: dataclasses validated on construction, loaded from YAML.

YAML keys equal field names, one section per dataclass::

    seed: 0
    scenario: GG
    benchmark: {name: permuted_mnist, num_tasks: 5}
    model: {backbone: fc1024, num_outputs: 500, weight_init: signed_constant}
    mask: {kind: threshold, density: 0.5}
    train: {iterations: 1000, batch_size: 128, lr: 1.0e-4, optimizer: rmsprop}

Every mistake (unknown key, wrong type, value out of range, impossible combination) raises
:class:`ConfigError`, whose message is one line that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "BenchmarkConfig",
    "ConfigError",
    "EvalConfig",
    "InferenceConfig",
    "MaskConfig",
    "ModelConfig",
    "NNConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

# Names that other modules register; repeated here (not imported) so that validating a config
# never imports torch. tests/test_config.py checks that these match the registries.
BENCHMARKS = ("permuted_mnist", "rotated_mnist", "split_mnist")
BACKBONES = ("fc1024", "lenet_300_100", "fc_300_300", "conv4")
WEIGHT_INITS = ("signed_constant", "kaiming_normal")
SCORE_INITS = ("kaiming_uniform",)
MASK_KINDS = ("threshold", "topk")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
PRECISIONS = ("fp32", "bf16")
INFERENCE_METHODS = ("one_shot", "binary")
OBJECTIVES = ("entropy", "g")
SCENARIOS = ("GG", "GN", "NN")
BACKENDS = ("native", "avalanche")
METHODS = ("supsup", "naive", "ewc", "si", "lwf", "replay", "gem", "packnet")
PERMUTATION_SOURCES = ("torch", "avalanche")
#: classes per task of each built-in benchmark (split MNIST relabels each pair as 0/1)
BENCHMARK_CLASSES = {"permuted_mnist": 10, "rotated_mnist": 10, "split_mnist": 2}


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a one-line message naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(key, f"unknown value {value!r}{extra}; choose one of {', '.join(choices)}")


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
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

    name: str = field(default="permuted_mnist", metadata={"help": "permuted_mnist | rotated_mnist | split_mnist"})
    num_tasks: int = field(default=5, metadata={"help": "tasks in the stream; also the mask bank's capacity"})
    angles: list[float] | None = field(default=None, metadata={"help": "rotated_mnist: explicit angles in degrees (default: evenly spaced over 360)"})
    permutation_source: str = field(default="torch", metadata={"help": "permuted_mnist: 'torch' (generator seeded by seed and task id) or 'avalanche' (np.random.RandomState(seed).permutation, as Avalanche's PermutedMNIST)"})
    data_root: str | None = field(default=None, metadata={"help": "MNIST root (default $SUPSUP_DATA or ~/.cache/supsup)"})

    def __post_init__(self) -> None:
        _check_choice("benchmark.name", self.name, BENCHMARKS)
        _check_range("benchmark.num_tasks", self.num_tasks, 1)
        _check_choice("benchmark.permutation_source", self.permutation_source, PERMUTATION_SOURCES)
        if self.name == "split_mnist" and self.num_tasks > 5:
            raise ConfigError("benchmark.num_tasks", f"split_mnist has at most 5 tasks, got {self.num_tasks}")
        if self.angles is not None:
            if len(self.angles) < self.num_tasks:
                raise ConfigError("benchmark.angles", f"needs one angle per task ({self.num_tasks}), got {len(self.angles)}")
            for a in self.angles:
                _check_range("benchmark.angles", a)

    @property
    def num_classes(self) -> int:
        return BENCHMARK_CLASSES[self.name]


@dataclass
class ModelConfig:
    """The frozen backbone."""

    backbone: str = field(default="fc1024", metadata={"help": "fc1024 | lenet_300_100 | fc_300_300 | conv4"})
    num_outputs: int = field(default=500, metadata={"help": "output width: the real classes plus superfluous neurons"})
    weight_init: str = field(default="signed_constant", metadata={"help": "signed_constant | kaiming_normal"})
    score_init: str = field(default="kaiming_uniform", metadata={"help": "initial scores of a new task"})
    capacity: int | None = field(default=None, metadata={"help": "masks the bank may hold (default: benchmark.num_tasks); NN may use fewer"})

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone, BACKBONES)
        _check_range("model.num_outputs", self.num_outputs, 1)
        _check_choice("model.weight_init", self.weight_init, WEIGHT_INITS)
        _check_choice("model.score_init", self.score_init, SCORE_INITS)
        if self.capacity is not None:
            _check_range("model.capacity", self.capacity, 1)


@dataclass
class MaskConfig:
    """How scores become a binary mask."""

    kind: str = field(default="threshold", metadata={"help": "threshold (mask = scores >= 0) | topk (keep the `density` fraction with the largest |score|)"})
    density: float = field(default=0.5, metadata={"help": "topk: fraction of weights kept, in (0, 1]"})

    def __post_init__(self) -> None:
        _check_choice("mask.kind", self.kind, MASK_KINDS)
        _check_range("mask.density", self.density, 0.0, 1.0, lo_open=True)


@dataclass
class TrainConfig:
    """Per-task optimisation (paper, PermutedMNIST: 1000 steps of 128, RMSprop, lr 1e-4)."""

    iterations: int = field(default=1000, metadata={"help": "optimizer steps per task"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop | adam | sgd"})
    momentum: float = field(default=0.0, metadata={"help": "sgd/rmsprop momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay on the scores"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16: training matmuls in bfloat16 with fp32 accumulation (torch.autocast); scores, optimizer and all evaluation stay fp32"})

    def __post_init__(self) -> None:
        _check_range("train.iterations", self.iterations, 1)
        _check_range("train.batch_size", self.batch_size, 1)
        _check_range("train.lr", self.lr, 0.0, lo_open=True)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_range("train.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_range("train.weight_decay", self.weight_decay, 0.0)
        _check_choice("train.precision", self.precision, PRECISIONS)


@dataclass
class InferenceConfig:
    """Task inference (GN/NN evaluation)."""

    method: str = field(default="one_shot", metadata={"help": "one_shot | binary"})
    objective: str = field(default="g", metadata={"help": "entropy (H) | g (G, superfluous neurons)"})
    num_images: int = field(default=1, metadata={"help": "images of each test batch used to infer its task"})
    log_base: float = field(default=2.0, metadata={"help": "binary: keep the best 1/log_base of the candidates each step"})
    group_size: int = field(default=128, metadata={"help": "inferences that share one pass over the packed bank "
                                                           "(speed only: each inference is computed on its own)"})

    def __post_init__(self) -> None:
        _check_choice("inference.method", self.method, INFERENCE_METHODS)
        _check_choice("inference.objective", self.objective, OBJECTIVES)
        _check_range("inference.num_images", self.num_images, 1)
        _check_range("inference.log_base", self.log_base, 1.0, lo_open=True)
        _check_range("inference.group_size", self.group_size, 1)


@dataclass
class EvalConfig:
    """Evaluation on the test split."""

    batch_size: int = field(default=128, metadata={"help": "test batch size; each GN batch comes from one task"})
    max_batches: int | None = field(default=None, metadata={"help": "evaluate at most this many test batches per task (None: all)"})
    at_tasks: list[int] | None = field(default=None, metadata={"help": "also evaluate every learned task after this many tasks (accuracy-vs-tasks curve)"})
    sample_tasks: int | None = field(default=None, metadata={"help": "curve points and the final task-inferred evaluation evaluate at most this many learned tasks, evenly spaced (None: all)"})
    extra_objectives: list[str] = field(default_factory=list, metadata={"help": "task-inference objectives evaluated besides inference.objective (same masks)"})

    def __post_init__(self) -> None:
        _check_range("eval.batch_size", self.batch_size, 1)
        if self.max_batches is not None:
            _check_range("eval.max_batches", self.max_batches, 1)
        if self.sample_tasks is not None:
            _check_range("eval.sample_tasks", self.sample_tasks, 1)
        for n in self.at_tasks or []:
            _check_range("eval.at_tasks", n, 1)
        for obj in self.extra_objectives:
            _check_choice("eval.extra_objectives", obj, OBJECTIVES)


@dataclass
class NNConfig:
    """NN scenario: task-boundary detection while training without task labels."""

    check_every: int = field(default=100, metadata={"help": "batches between two detection checks"})
    min_candidates: int = field(default=5, metadata={"help": "superpose at least this many masks, padding with untrained ones"})
    threshold: float = field(default=1.125, metadata={"help": "new task if max softmax(-grad) < threshold / n"})
    min_batches_per_task: int = field(default=100, metadata={"help": "guard: a mask trains at least this many batches before another new mask may be allocated"})

    def __post_init__(self) -> None:
        _check_range("nn.check_every", self.check_every, 1)
        _check_range("nn.min_candidates", self.min_candidates, 1)
        _check_range("nn.threshold", self.threshold, 0.0, lo_open=True)
        _check_range("nn.min_batches_per_task", self.min_batches_per_task, 0)


@dataclass
class RunConfig:
    """A whole experiment."""

    seed: int = field(default=0, metadata={"help": "seeds the backbone, every task's scores, data order and permutations"})
    scenario: str = field(default="GG", metadata={"help": "GG (task id at train and test) | GN (inferred at test) | NN (never given)"})
    backend: str = field(default="native", metadata={"help": "native (fast tensor streams) | avalanche (Avalanche benchmark and strategy)"})
    method: str = field(default="supsup", metadata={"help": "supsup, or an Avalanche baseline: naive | ewc | si | lwf | replay | gem | packnet"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nn: NNConfig = field(default_factory=NNConfig)

    def __post_init__(self) -> None:
        _check_choice("scenario", self.scenario, SCENARIOS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("method", self.method, METHODS)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        self.validate_combinations()

    @property
    def capacity(self) -> int:
        """Masks the bank may hold."""
        return self.model.capacity if self.model.capacity is not None else self.benchmark.num_tasks

    def validate_combinations(self) -> None:
        """Checks that span sections (also called after overrides)."""
        classes = self.benchmark.num_classes
        if self.model.num_outputs < classes:
            raise ConfigError("model.num_outputs", f"must be at least the {classes} classes of {self.benchmark.name}, got {self.model.num_outputs}")
        for n in self.eval.at_tasks or []:
            if n > self.benchmark.num_tasks:
                raise ConfigError("eval.at_tasks", f"{n} is more than the {self.benchmark.num_tasks} tasks of the stream")
        if "g" in self.eval.extra_objectives and self.model.num_outputs <= classes:
            raise ConfigError("eval.extra_objectives", f"'g' needs superfluous neurons: model.num_outputs ({self.model.num_outputs}) must exceed the {classes} classes")
        if self.scenario != "GG" and self.inference.objective == "g" and self.model.num_outputs <= classes:
            raise ConfigError("inference.objective", f"'g' needs superfluous neurons: model.num_outputs ({self.model.num_outputs}) must exceed the {classes} classes")
        if self.scenario == "GN" and self.inference.num_images > self.eval.batch_size:
            raise ConfigError("inference.num_images", f"({self.inference.num_images}) is larger than the evaluation batch eval.batch_size ({self.eval.batch_size})")
        if self.scenario in ("GG", "GN") and self.capacity < self.benchmark.num_tasks:
            raise ConfigError("model.capacity", f"({self.capacity}) is smaller than the {self.benchmark.num_tasks} tasks to learn in {self.scenario}")
        if self.mask.kind == "topk" and not (0.0 < self.mask.density <= 1.0):
            raise ConfigError("mask.density", "topk needs a density in (0, 1]")
        if self.backend == "avalanche":
            if self.benchmark.name == "permuted_mnist" and self.benchmark.permutation_source != "avalanche":
                raise ConfigError("benchmark.permutation_source",
                                  "backend avalanche uses Avalanche's PermutedMNIST permutations: set "
                                  "benchmark.permutation_source=avalanche (the native backend then draws the same ones)")
            for key in ("at_tasks", "sample_tasks", "extra_objectives"):  # native-only evaluation options
                if getattr(self.eval, key):
                    raise ConfigError(f"eval.{key}", "is not supported by backend avalanche; use backend native")
        if self.method != "supsup" and self.backend != "avalanche":
            raise ConfigError("method", f"baseline {self.method!r} runs on Avalanche: set backend: avalanche")
        if self.method != "supsup" and self.scenario == "NN":
            raise ConfigError("scenario", "NN is a SupSup scenario; baselines run GG or GN")


_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(name, known, n=1)
    extra = f" (did you mean {key[: len(key) - len(name)]}{hint[0]!r}?)" if hint else ""
    return ConfigError(key, f"unknown key{extra}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(str(dotted), names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # pragma: no cover - defensive
        raise ConfigError(prefix.rstrip(".") or "config", str(err)) from None


def config_from_dict(data: Any) -> RunConfig:
    """Validate a nested mapping (e.g. parsed YAML) into a :class:`RunConfig`."""
    return _build(RunConfig, data, "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The nested mapping that :func:`config_from_dict` turns back into ``cfg``."""
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys, YAML values) to a nested mapping, in order."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value, e.g. train.iterations=300")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = data
        cls: Any = RunConfig
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(".".join(parts[: i + 1]), names)
            tp = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(key, "is a section; set one of its keys, e.g. " + f"{key}.{dataclasses.fields(tp)[0].name}=...")
                node[part] = _parse_scalar(text)
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(".".join(parts[: i + 1]), "is not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node, cls = child, tp
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file safely; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), f"cannot read config file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (keys equal field names)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
