"""Avalanche benchmarks for SupSup: models sized from any stream, and Avalanche's classic
MNIST benchmarks matching the native streams sample for sample.

* :func:`supsup_model_for_benchmark`: a :class:`~supsup.model.SupermaskModel` sized from any
  stream's sample shape and class count;
* :func:`classic_benchmark`: Avalanche's PermutedMNIST / RotatedMNIST / SplitMNIST for a run
  config, in the dataset's sample order (:func:`in_dataset_order`);
* :func:`per_experience`: a per-experience metric out of ``strategy.eval(...)``'s result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ...config import ConfigError, RunConfig
from ...model import SupermaskModel

__all__ = ["ClassicBenchmark", "benchmark_input_shape", "benchmark_num_classes", "classic_benchmark",
           "in_dataset_order", "per_experience", "supsup_model_for_benchmark"]

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
                               density: float = 0.5, norm: str = "per_task", score_init: str = "kaiming_uniform",
                               device: torch.device | str = "cpu") -> SupermaskModel:
    """A :class:`~supsup.model.SupermaskModel` whose input layer fits the stream's samples.

    Args:
        benchmark: any Avalanche benchmark with a ``train_stream`` (classic, or built with
            ``benchmark_from_datasets`` / ``tensors_benchmark``).
        num_outputs: output width (default: the class count). GN/NN with the ``g`` objective
            need superfluous neurons: pass more, e.g. 500.
        num_tasks: bank capacity (default: the number of training experiences).
        weight_init, mask_kind, density, norm, score_init: as the config keys of those names
            (``norm``: how a BatchNorm backbone keeps statistics, ``per_task`` by default).
    """
    num_classes = benchmark_num_classes(benchmark)
    outputs = num_classes if num_outputs is None else num_outputs
    if outputs < num_classes:
        raise ValueError(f"num_outputs ({outputs}) is smaller than the stream's {num_classes} classes")
    return SupermaskModel.from_name(
        backbone, num_tasks=len(benchmark.train_stream) if num_tasks is None else num_tasks,
        num_outputs=outputs, num_classes=num_classes, seed=seed, input_shape=benchmark_input_shape(benchmark),
        weight_init=weight_init, mask_kind=mask_kind, density=density, norm=norm, score_init=score_init, device=device)


# ----------------------------------------------------------------------- classic benchmarks

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

    from ...data.mnist import ensure_mnist

    b = cfg.benchmark
    root = ensure_mnist(b.data_root, progress=cfg.progress)
    n = b.num_tasks
    if b.name == "permuted_mnist":  # the config guarantees permutation_source == "avalanche"
        bench = PermutedMNIST(n, return_task_id=True, seed=cfg.seed, dataset_root=root)
    elif b.name == "rotated_mnist":
        angles = [float(a) for a in b.angles[:n]] if b.angles is not None else [360.0 * t / n for t in range(n)]
        bench = RotatedMNIST(n, return_task_id=True, seed=cfg.seed, rotations_list=angles, dataset_root=root)
    elif b.name == "split_mnist":
        # Native task t = digits 2t, 2t+1, relabelled 0/1 (labels task) or kept (labels global,
        # class-incremental): five fixed pairs, the first n kept.
        bench = SplitMNIST(5, return_task_id=True, seed=cfg.seed, fixed_class_order=list(range(10)),
                           class_ids_from_zero_in_each_exp=b.labels == "task", dataset_root=root)
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


