"""Shared fixtures: real MNIST (provisioned once per machine) and tiny models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
