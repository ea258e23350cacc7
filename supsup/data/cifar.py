"""CIFAR-10 / CIFAR-100 from torchvision's files under the data root, read safely.

The files are the ones torchvision's ``CIFAR10`` / ``CIFAR100(root, download=True)`` place
(the "python version" archives of https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)::

    ROOT/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    ROOT/cifar-100-python/train, test

Each is a Python pickle of a dict; it is read with a restricted unpickler that admits only
what numpy arrays need (:mod:`supsup.data.safe_pickle`), so a crafted file cannot run code.
Nothing is downloaded here: when the files are absent, :class:`DataUnavailableError` says
where they go and how to obtain them.
"""

from __future__ import annotations

import os
import pathlib
import pickle

import numpy as np
import torch

from .errors import DataUnavailableError
from .mnist import resolve_root
from .safe_pickle import safe_load_pickle

__all__ = ["CIFAR_FILES", "CIFAR_MEAN", "CIFAR_STD", "DataUnavailableError", "load_cifar"]

#: per-channel mean and std of the training images, scaled to [0, 1] (the values the paper's
#: SplitCIFAR-100 normalisation uses)
CIFAR_MEAN = (0.491, 0.482, 0.447)
CIFAR_STD = (0.247, 0.243, 0.262)

#: directory, training files, test files and label key of each dataset
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _how_to_obtain(name: str, directory: pathlib.Path) -> str:
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    return (f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in "
            f"{directory.parent} (or run torchvision.datasets.{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}"
            f"({str(directory.parent)!r}, download=True) on a machine with internet access)")


def _read_split(directory: pathlib.Path, files: list[str], label_key: str, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fname in files:
        path = directory / fname
        try:
            with open(path, "rb") as f:
                entry = safe_load_pickle(f)
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise DataUnavailableError(f"{path}: unreadable CIFAR file ({err})") from None
        if not isinstance(entry, dict):
            raise DataUnavailableError(f"{path}: not a CIFAR batch (a {type(entry).__name__}, expected a dict)")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data, y = entry.get("data"), entry.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataUnavailableError(f"{path}: 'data' must be uint8 (N, 3072)")
        bad = f"{path}: '{label_key}' must hold {data.shape[0] if isinstance(data, np.ndarray) else 'N'} integer labels"
        try:
            raw = np.asarray(y)
        except (TypeError, ValueError):
            raise DataUnavailableError(bad) from None
        if y is None or raw.dtype.kind not in "iu":  # a missing key, or floats that would be truncated
            raise DataUnavailableError(bad)
        y = raw.astype(np.int64)
        if y.shape != (data.shape[0],) or (y.size and (y.min() < 0 or y.max() >= num_classes)):
            raise DataUnavailableError(f"{path}: '{label_key}' must hold {data.shape[0]} labels in 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``) as tensors.

    Returns:
        ``{"train_images": uint8 (50000, 3, 32, 32), "train_labels": int64 (50000,),
        "test_images": uint8 (10000, 3, 32, 32), "test_labels": int64}`` (fine labels for
        CIFAR-100).

    Raises:
        DataUnavailableError: files missing (the message names the directory, the files and how
            to obtain them) or malformed.
    """
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; known: {', '.join(CIFAR_FILES)}")
    dirname, train_files, test_files, label_key, num_classes = CIFAR_FILES[name]
    directory = resolve_root(root) / dirname
    missing = [f for f in train_files + test_files if not (directory / f).is_file()]
    if missing:
        raise DataUnavailableError(f"{name} not found: {directory} lacks {', '.join(missing)}; "
                                   + _how_to_obtain(name, directory))
    train_x, train_y = _read_split(directory, train_files, label_key, num_classes)
    test_x, test_y = _read_split(directory, test_files, label_key, num_classes)
    return {"train_images": torch.from_numpy(train_x), "train_labels": torch.from_numpy(train_y),
            "test_images": torch.from_numpy(test_x), "test_labels": torch.from_numpy(test_y)}
