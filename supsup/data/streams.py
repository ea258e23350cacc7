"""Fast task streams over image datasets held in memory (MNIST, CIFAR), registered by name.

A dataset is held once as uint8 tensors on the target device. A task's transform is vectorised:
a permutation is one column gather per batch; a rotation, costly per batch, is applied to a
whole split at once the first time the task is read and kept as uint8 for the most recent
tasks (47 MB for a training split). A batch is then a row gather and the normalisation. Shuffling uses a local generator seeded by (seed, task id), so batches
reproduce bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..registry import Registry
from ..rng import make_generator
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist

__all__ = ["STREAMS", "TaskStream", "PermutedMNIST", "RotatedMNIST", "SplitMNIST", "create_stream",
           "avalanche_permutations"]

STREAMS: Registry = Registry("benchmark")

Batch = tuple[torch.Tensor, torch.Tensor]


class TaskStream:
    """A sequence of ``num_tasks`` classification tasks over one image set.

    Inputs come out as float ``(B, *input_shape)`` normalised with the dataset's per-channel
    ``mean`` / ``std`` (MNIST: ``(B, 1, 28, 28)``); labels as int64 ``(B,)`` in
    ``[0, num_classes)``. Training batches may be augmented (:meth:`augment`, from a generator
    seeded by (seed, "augment", task id)).
    """

    name = "stream"
    num_classes = 10
    #: classes of the whole dataset (labels ``global`` number them all)
    total_classes = 10
    #: the most tasks the stream can make (None: no limit)
    max_tasks: int | None = None
    #: whether ``labels="global"`` (class-incremental) is offered
    supports_global_labels = False
    input_shape: tuple[int, ...] = (1, 28, 28)
    mean: tuple[float, ...] = (MNIST_MEAN,)
    std: tuple[float, ...] = (MNIST_STD,)

    #: transform whole splits once and keep them (worth it when the transform is costly)
    cache_transformed = False
    #: transformed splits kept (a task's train and test split, and the previous task's)
    cache_size = 4

    @classmethod
    def load_data(cls, root=None, *, progress: bool = True) -> dict[str, torch.Tensor]:
        """The dataset the stream draws from, as uint8 image and int64 label tensors (MNIST
        here, provisioned if needed)."""
        return load_mnist(root, progress=progress)

    def __init__(self, data: dict[str, torch.Tensor], *, num_tasks: int, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.num_tasks = num_tasks
        self.seed = seed
        self.device = torch.device(device)
        self._images = {"train": data["train_images"].to(self.device), "test": data["test_images"].to(self.device)}
        self._labels = {"train": data["train_labels"].to(self.device), "test": data["test_labels"].to(self.device)}
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        #: training images per task held out as its "test" split (:meth:`hold_out`); 0: none
        self.validation = 0
        self._holdout: dict[int, torch.Tensor] = {}

    def hold_out(self, images: int) -> TaskStream:
        """Validation instead of test data: ``images`` of each task's training samples, drawn by
        a generator seeded by (seed, "validation", task id), are taken out of its training split
        and become its ``test`` split; the real test set is not read. For choosing
        hyperparameters (``supsup tune``) without looking at the test set. Returns ``self``."""
        if images < 1:
            raise ValueError(f"hold_out needs at least 1 image per task, got {images}")
        self.validation, self._holdout = images, {}
        return self

    def _held_out_order(self, task_id: int) -> torch.Tensor:
        order = self._holdout.get(task_id)
        if order is None:
            n = self._num_raw(task_id, "train")
            if self.validation >= n:
                raise ValueError(f"cannot hold out {self.validation} images of task {task_id}: it has {n} "
                                 "training images")
            order = torch.randperm(n, generator=make_generator(self.seed, "validation", task_id)).to(self.device)
            self._holdout[task_id] = order
        return order

    def _resolve(self, task_id: int, split: str, positions: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(split, positions) in the underlying data of positions in ``split`` as the stream
        shows it (with :meth:`hold_out`, "test" and "train" are parts of the training split)."""
        if not self.validation:
            return split, positions
        order = self._held_out_order(task_id)
        part = order[: self.validation] if split == "test" else order[self.validation:]
        return "train", part.index_select(0, positions)

    # -- what subclasses define
    def _indices(self, task_id: int, split: str) -> torch.Tensor | None:
        """Indices of the task's samples in ``split`` (None: all)."""
        return None

    def _transform(self, task_id: int, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W)`` or ``(B, C, H, W)`` -> uint8 ``(B, C, H, W)``, the task's transform
        applied (to a batch, or to a whole split when ``cache_transformed``)."""
        return images.unsqueeze(1) if images.dim() == 3 else images

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training augmentation of a uint8 batch ``(B, C, H, W)`` (none by default)."""
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float, scaled to [0, 1] and normalised per channel."""
        # the float32 operations of torchvision's ToTensor + Normalize, so values equal
        # Avalanche's bitwise (one channel: Python scalars, as MNIST always was)
        x = images.float().div_(255.0)
        if len(self.mean) == 1:
            return x.sub_(self.mean[0]).div_(self.std[0])
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def _targets(self, task_id: int, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def task_classes(self, task_id: int) -> list[int]:
        """The labels task ``task_id``'s samples carry."""
        return list(range(self.num_classes))

    # -- shared
    def _check(self, task_id: int) -> None:
        if not 0 <= task_id < self.num_tasks:
            raise IndexError(f"task {task_id} out of range: the stream has {self.num_tasks} tasks")

    def _num_raw(self, task_id: int, split: str) -> int:
        idx = self._indices(task_id, split)
        return self._labels[split].numel() if idx is None else idx.numel()

    def num_samples(self, task_id: int, split: str) -> int:
        if self.validation:
            n = self._held_out_order(task_id).numel()
            return self.validation if split == "test" else n - self.validation
        return self._num_raw(task_id, split)

    def task_images(self, task_id: int, split: str) -> torch.Tensor:
        """The task's samples of ``split``, transformed: uint8 ``(N, 1, 28, 28)`` (cached when
        ``cache_transformed``)."""
        self._check(task_id)
        if not self.cache_transformed:
            idx = self._indices(task_id, split)
            return self._transform(task_id, self._images[split] if idx is None else self._images[split][idx])
        key = (task_id, split)
        images = self._cache.pop(key, None)
        if images is None:
            idx = self._indices(task_id, split)
            images = self._transform(task_id, self._images[split] if idx is None else self._images[split][idx])
            while len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))  # least recently used
        self._cache[key] = images  # (re)inserted last: most recently used
        return images

    def raw_batch(self, task_id: int, split: str, positions: torch.Tensor) -> Batch:
        """The samples at ``positions`` (within the task's subset) of ``split``, transformed:
        uint8 ``(B, *input_shape)``, int64 labels ``(B,)``."""
        # index_select, not advanced indexing (8x faster for a batch on CPU)
        self._check(task_id)
        split, positions = self._resolve(task_id, split, positions)
        idx = self._indices(task_id, split)
        rows = positions if idx is None else idx.index_select(0, positions)
        if self.cache_transformed:
            x = self.task_images(task_id, split).index_select(0, positions)
        else:
            x = self._transform(task_id, self._images[split].index_select(0, rows))
        return x, self._targets(task_id, self._labels[split].index_select(0, rows))

    def batch(self, task_id: int, split: str, positions: torch.Tensor) -> Batch:
        """:meth:`raw_batch`, normalised: float ``(B, *input_shape)``, int64 labels ``(B,)``."""
        x, y = self.raw_batch(task_id, split, positions)
        return self.normalize(x), y

    def train_batches(self, task_id: int, iterations: int, batch_size: int,
                      generator: torch.Generator | None = None) -> Iterator[Batch]:
        """``iterations`` batches, reshuffling every epoch (the last partial batch is dropped).

        The default generator is derived from (seed, "train_order", task_id).
        """
        self._check(task_id)
        n = self.num_samples(task_id, "train")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the task's {n} training samples")
        gen = generator if generator is not None else make_generator(self.seed, "train_order", task_id)
        aug = make_generator(self.seed, "augment", task_id)
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        for _ in range(iterations):
            if pos + batch_size > order.numel():
                order = torch.randperm(n, generator=gen).to(self.device)
                pos = 0
            x, y = self.augmented_batch(task_id, order[pos: pos + batch_size], aug)
            yield self.normalize(x), y
            pos += batch_size

    def augmented_batch(self, task_id: int, positions: torch.Tensor, generator: torch.Generator) -> Batch:
        """A uint8 training batch with :meth:`augment` applied (``generator`` drives it); a
        stream that augments while decoding (SplitImageNet) overrides this instead."""
        x, y = self.raw_batch(task_id, "train", positions)
        return self.augment(x, generator), y

    def test_batches(self, task_id: int, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
        """The task's test set in order, in batches of ``batch_size`` (the last may be smaller)."""
        self._check(task_id)
        n = self.num_samples(task_id, "test")
        starts = range(0, n, batch_size)
        if max_batches is not None:
            starts = starts[:max_batches]
        for s in starts:
            yield self.batch(task_id, "test", torch.arange(s, min(n, s + batch_size), device=self.device))


def avalanche_permutations(seed: int, num_tasks: int, num_pixels: int = 784) -> list[torch.Tensor]:
    """The permutations Avalanche's ``PermutedMNIST(seed=seed)`` uses, drawn in order."""
    rs = np.random.RandomState(seed)
    return [torch.from_numpy(rs.permutation(num_pixels)).long() for _ in range(num_tasks)]


@STREAMS.register("permuted_mnist")
class PermutedMNIST(TaskStream):
    """Task ``t`` permutes the 784 pixels with a fixed random permutation (paper Sec. 4.2).

    ``permutation_source="torch"`` draws task ``t``'s permutation from a generator seeded by
    (seed, t), independent of the other tasks; ``"avalanche"`` reproduces Avalanche's
    ``PermutedMNIST`` exactly (``np.random.RandomState(seed).permutation(784)`` in order).
    """

    name = "permuted_mnist"

    def __init__(self, data, *, num_tasks: int, seed: int = 0, device="cpu", permutation_source: str = "torch"):
        super().__init__(data, num_tasks=num_tasks, seed=seed, device=device)
        if permutation_source == "torch":
            perms = [torch.randperm(784, generator=make_generator(seed, "permutation", t)) for t in range(num_tasks)]
        elif permutation_source == "avalanche":
            perms = avalanche_permutations(seed, num_tasks)
        else:
            raise ValueError(f"unknown permutation_source {permutation_source!r}; known: torch, avalanche")
        self.permutations = [p.to(self.device) for p in perms]

    def _transform(self, task_id, images):
        flat = images.reshape(images.shape[0], -1).index_select(1, self.permutations[task_id])
        return flat.view(-1, 1, 28, 28)


@STREAMS.register("rotated_mnist")
class RotatedMNIST(TaskStream):
    """Task ``t`` rotates every image by ``angles[t]`` degrees (nearest, zero fill, as
    torchvision's ``rotate``). Default angles: evenly spaced over 360 degrees."""

    name = "rotated_mnist"
    cache_transformed = True

    def __init__(self, data, *, num_tasks: int, seed: int = 0, device="cpu", angles: Sequence[float] | None = None):
        super().__init__(data, num_tasks=num_tasks, seed=seed, device=device)
        if angles is None:
            angles = [360.0 * t / num_tasks for t in range(num_tasks)]
        if len(angles) < num_tasks:
            raise ValueError(f"need {num_tasks} angles, got {len(angles)}")
        self.angles = [float(a) for a in angles[:num_tasks]]

    def _transform(self, task_id, images):
        from torchvision.transforms.v2.functional import rotate

        x = images.unsqueeze(1)
        if self.angles[task_id] % 360 == 0:
            return x
        # batched, in chunks: rotate builds float images and a sampling grid (12 bytes per
        # pixel), which for a whole 60000-image split would add about 0.6 GB at once
        return torch.cat([rotate(c, self.angles[task_id]) for c in x.split(8192)])


@STREAMS.register("split_mnist")
class SplitMNIST(TaskStream):
    """Task ``t`` holds digits ``2t`` and ``2t + 1``, relabelled 0 and 1 (``labels="task"``), or
    keeping their digit (``labels="global"``: class-incremental, every test digit classified
    among all 10)."""

    name = "split_mnist"
    num_classes = 2
    max_tasks = 5
    supports_global_labels = True

    def __init__(self, data, *, num_tasks: int = 5, seed: int = 0, device="cpu", labels: str = "task"):
        if not 1 <= num_tasks <= 5:
            raise ValueError(f"split_mnist has 1 to 5 tasks, got {num_tasks}")
        if labels not in ("task", "global"):
            raise ValueError(f"labels must be 'task' or 'global', got {labels!r}")
        self.labels = labels
        if labels == "global":
            self.num_classes = 10
        super().__init__(data, num_tasks=num_tasks, seed=seed, device=device)
        self._subsets = {
            split: [torch.nonzero((self._labels[split] // 2) == t).flatten() for t in range(num_tasks)]
            for split in ("train", "test")
        }

    def _indices(self, task_id, split):
        return self._subsets[split][task_id]

    def _targets(self, task_id, labels):
        return labels if self.labels == "global" else labels - 2 * task_id

    def task_classes(self, task_id: int) -> list[int]:
        return [2 * task_id, 2 * task_id + 1] if self.labels == "global" else [0, 1]


def create_stream(name: str, data: dict[str, torch.Tensor], *, num_tasks: int, seed: int = 0,
                  device: torch.device | str = "cpu", **kwargs) -> TaskStream:
    """Build a registered stream over ``data`` (its class's :meth:`TaskStream.load_data`);
    ``kwargs`` are stream-specific (angles, permutation_source)."""
    cls = STREAMS.get(name)
    return cls(data, num_tasks=num_tasks, seed=seed, device=device, **kwargs)
