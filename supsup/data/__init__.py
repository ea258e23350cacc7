"""Datasets and task streams: MNIST provisioning (:mod:`.mnist`), CIFAR files (:mod:`.cifar`),
the in-memory streams (:mod:`.streams`: PermutedMNIST, RotatedMNIST, SplitMNIST) and the
class-split streams (:mod:`.splits`: SplitCIFAR-10/100, SplitImageNet), all registered in
:data:`STREAMS`."""

from . import splits, streams  # noqa: F401  (each registers its streams)
from .errors import DataUnavailableError
from .streams import STREAMS, TaskStream, create_stream

__all__ = ["STREAMS", "DataUnavailableError", "TaskStream", "create_stream"]
