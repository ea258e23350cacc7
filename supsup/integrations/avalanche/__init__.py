"""SupSup in Avalanche (avalanche-lib 0.6).

* :mod:`.strategy`: :class:`SupSupStrategy`, a ``SupervisedTemplate`` that trains one supermask
  per experience (GG/GN: the task id comes from the experience; NN: new tasks are detected
  from the inputs) and evaluates with the task given or inferred from the inputs (paper
  Sec. 3.3), so that Avalanche's own metrics and loggers report SupSup's accuracy; and the
  :class:`TaskInferenceAccuracy` metric;
* :mod:`.hopsupsup`: :class:`HopSupSupStrategy`, HopSupSup's neuron masks learned per
  experience and recovered from each evaluated experience's images;
* :mod:`.data`: the cached data path (each sample transformed once);
* :mod:`.benchmarks`: models sized from any stream, Avalanche's classic MNIST benchmarks
  matching the native streams.

The ``backend: avalanche`` runner lives in the experiment layer
(:mod:`supsup.experiment.avalanche_backend`).
"""

from .benchmarks import (
    ClassicBenchmark,
    benchmark_input_shape,
    benchmark_num_classes,
    classic_benchmark,
    in_dataset_order,
    per_experience,
    supsup_model_for_benchmark,
)
from .data import CachedBatches, CachedData, CachedExperience, ExperienceCache, dataset_tensors
from .hopsupsup import HopSupSupStrategy
from .strategy import SupSupStrategy, TaskInferenceAccuracy

__all__ = [
    "CachedBatches",
    "CachedData",
    "CachedExperience",
    "ClassicBenchmark",
    "ExperienceCache",
    "HopSupSupStrategy",
    "SupSupStrategy",
    "TaskInferenceAccuracy",
    "benchmark_input_shape",
    "benchmark_num_classes",
    "classic_benchmark",
    "dataset_tensors",
    "in_dataset_order",
    "per_experience",
    "supsup_model_for_benchmark",
]
