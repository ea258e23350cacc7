"""Run configuration: dataclasses validated on construction (:mod:`.sections`), loaded from
and saved to YAML with ``--set`` overrides (:mod:`.loading`)."""

from .loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
    resolve_config,
    save_config,
    shipped_configs,
)
from .sections import (
    PRECISIONS,
    BenchmarkConfig,
    ConfigError,
    EvalConfig,
    HopfieldConfig,
    InferenceConfig,
    LogConfig,
    MaskConfig,
    ModelConfig,
    NNConfig,
    RunConfig,
    Scenario,
    TrainConfig,
)

__all__ = [
    "PRECISIONS",
    "BenchmarkConfig",
    "ConfigError",
    "EvalConfig",
    "HopfieldConfig",
    "InferenceConfig",
    "LogConfig",
    "MaskConfig",
    "ModelConfig",
    "NNConfig",
    "RunConfig",
    "Scenario",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_yaml",
    "resolve_config",
    "save_config",
    "shipped_configs",
]
