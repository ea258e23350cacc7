"""Shared fixtures: real MNIST (provisioned once per machine) and tiny models."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def mnist_data() -> dict[str, torch.Tensor]:
    """Real MNIST as uint8 tensors (provisioned into the default root on first use)."""
    from supsup.data.mnist import load_mnist

    return load_mnist(progress=False)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Results are compared bitwise across runs in one process: keep the thread count fixed.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def benchmark_driver():
    """Loads ``benchmarks/<name>.py`` as a module: the drivers are scripts, not a package."""
    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_driver", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _write_cifar100(root, n_train=1000, n_test=200, seed=0):
    """cifar-100-python/{train,test} as torchvision reads them: pickled dicts (protocol 2, as
    the original Python 2 files), uint8 'data' (N, 3072), list 'fine_labels'."""
    rs = np.random.RandomState(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % 100 for i in range(n)]
        data = rs.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 2  # the red plane encodes the class
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f, protocol=2)
    return d


@pytest.fixture
def write_cifar100():
    """Writes small synthetic CIFAR-100 files in torchvision's layout: ``write(root, ...)``."""
    return _write_cifar100
