"""Class-split streams of natural images: SplitCIFAR-10/100 (held in memory) and SplitImageNet
(decoded from an ImageFolder tree as batches are drawn).

Classes are dealt to tasks in the order ``np.random.RandomState(seed).permutation(classes)``
(as the paper's code does), ``classes_per_task`` each; a task's labels are the positions of
its classes, ``0 .. classes_per_task - 1``. Training batches are augmented as in the paper
(CIFAR: random crop with 4 pixels of zero padding and horizontal flip; ImageNet: random
resized crop to 224 and flip), every random draw from a generator seeded by (seed, "augment",
task id); test images are not augmented (ImageNet: resized to 256, centre crop 224).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import torch

from .cifar import CIFAR_MEAN, CIFAR_STD, load_cifar
from .errors import DataUnavailableError
from .mnist import resolve_root
from .streams import STREAMS, Batch, TaskStream

__all__ = ["SplitCIFAR10", "SplitCIFAR100", "SplitImageNet", "class_order"]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def class_order(seed: int, num_classes: int) -> np.ndarray:
    """The order in which classes are dealt to tasks (the paper's: numpy's legacy generator)."""
    return np.random.RandomState(seed).permutation(num_classes)


class _ClassSplit(TaskStream):
    """Tasks of ``classes_per_task`` classes each, over a dataset with ``total_classes``."""

    classes_per_task = 5
    total_classes = 100
    supports_global_labels = True

    def __init__(self, data, *, num_tasks: int, seed: int = 0, device="cpu", labels: str = "task"):
        if not 1 <= num_tasks <= self.max_tasks:
            raise ValueError(f"{self.name} has 1 to {self.max_tasks} tasks, got {num_tasks}")
        if labels not in ("task", "global"):
            raise ValueError(f"labels must be 'task' or 'global', got {labels!r}")
        self.labels = labels
        if labels == "global":
            self.num_classes = self.total_classes
        super().__init__(data, num_tasks=num_tasks, seed=seed, device=device)
        order = torch.from_numpy(class_order(seed, self.total_classes)).to(self.device)
        self.task_classes_of = [order[t * self.classes_per_task: (t + 1) * self.classes_per_task].tolist()
                                for t in range(num_tasks)]
        # label -> its position within its task (every class belongs to exactly one task)
        self._position = torch.empty(self.total_classes, dtype=torch.long, device=self.device)
        for classes in self.task_classes_of:
            self._position[classes] = torch.arange(len(classes), device=self.device)
        self._subsets = {split: [torch.nonzero(torch.isin(self._labels[split], torch.tensor(c, device=self.device)))
                                 .flatten() for c in self.task_classes_of] for split in ("train", "test")}

    def _indices(self, task_id, split):
        return self._subsets[split][task_id]

    def _targets(self, task_id, labels):
        return labels if self.labels == "global" else self._position[labels]

    def task_classes(self, task_id: int) -> list[int]:
        if self.labels == "global":
            return sorted(self.task_classes_of[task_id])
        return list(range(self.classes_per_task))


class _SplitCIFAR(_ClassSplit):
    input_shape = (3, 32, 32)
    mean = CIFAR_MEAN
    std = CIFAR_STD
    dataset = "cifar100"

    @classmethod
    def load_data(cls, root=None, *, progress: bool = True) -> dict[str, torch.Tensor]:
        return load_cifar(cls.dataset, root)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random 32x32 crop of the image padded by 4 zero pixels, and a horizontal flip with
        probability 1/2 (torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip)."""
        b = images.shape[0]
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        offsets = torch.randint(0, 9, (b, 2), generator=generator).tolist()
        flips = (torch.rand(b, generator=generator) < 0.5).tolist()
        out = torch.empty_like(images)
        for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
            crop = padded[i, :, dy: dy + 32, dx: dx + 32]
            out[i] = crop.flip(-1) if flip else crop
        return out


@STREAMS.register("split_cifar100")
class SplitCIFAR100(_SplitCIFAR):
    """CIFAR-100 in 20 tasks of 5 classes (the paper's SplitCIFAR-100)."""

    name = "split_cifar100"
    num_classes = classes_per_task = 5
    total_classes = 100
    max_tasks = 20
    dataset = "cifar100"


@STREAMS.register("split_cifar10")
class SplitCIFAR10(_SplitCIFAR):
    """CIFAR-10 in 5 tasks of 2 classes."""

    name = "split_cifar10"
    num_classes = classes_per_task = 2
    total_classes = 10
    max_tasks = 5
    dataset = "cifar10"


def _scan(directory: pathlib.Path, classes: list[str] | None) -> tuple[list[str], list[pathlib.Path], list[int]]:
    if not directory.is_dir():
        raise DataUnavailableError(f"imagenet not found: no directory {directory} (expected an ImageFolder tree: "
                                   "one sub-directory of images per class)")
    found = sorted(d.name for d in directory.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif found != classes:
        raise DataUnavailableError(f"{directory}: its class directories differ from the training split's")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((directory / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise DataUnavailableError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class directories")
    return classes, files, labels


@STREAMS.register("split_imagenet")
class SplitImageNet(_ClassSplit):
    """ImageNet in tasks of 10 classes (the paper's SplitImageNet: 1000 classes, 100 tasks),
    from ``ROOT/imagenet/train/<class>/*`` and ``ROOT/imagenet/val/<class>/*`` (any number of
    classes, a multiple of 10). Images are decoded when a batch is drawn."""

    name = "split_imagenet"
    num_classes = classes_per_task = 10
    total_classes = 1000
    max_tasks = 100
    input_shape = (3, 224, 224)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    @classmethod
    def load_data(cls, root=None, *, progress: bool = True) -> dict:
        base = resolve_root(root) / "imagenet"
        classes, train_files, train_labels = _scan(base / "train", None)
        _, test_files, test_labels = _scan(base / "val", classes)
        if len(classes) % cls.classes_per_task:
            raise DataUnavailableError(f"{base / 'train'}: {len(classes)} classes, not a multiple of "
                                       f"{cls.classes_per_task}")
        return {"train_images": train_files, "train_labels": torch.tensor(train_labels),
                "test_images": test_files, "test_labels": torch.tensor(test_labels), "classes": classes}

    supports_global_labels = False

    def __init__(self, data, *, num_tasks: int, seed: int = 0, device="cpu"):
        self.total_classes = len(data.get("classes", range(1000)))
        self.max_tasks = self.total_classes // self.classes_per_task
        self._files = {"train": data["train_images"], "test": data["test_images"]}
        tensors = {"train_images": torch.zeros(0), "test_images": torch.zeros(0),
                   "train_labels": data["train_labels"], "test_labels": data["test_labels"]}
        super().__init__(tensors, num_tasks=num_tasks, seed=seed, device=device)

    def _decode(self, path: os.PathLike, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        with Image.open(path) as pil:
            img = TF.pil_to_tensor(pil.convert("RGB"))
        if not train:
            return TF.center_crop(TF.resize(img, [256], antialias=True), [224, 224])
        h, w = img.shape[-2:]
        for _ in range(10):  # RandomResizedCrop(224): scale (0.08, 1), ratio (3/4, 4/3)
            area = h * w * float(torch.empty(1).uniform_(0.08, 1.0, generator=generator))
            logr = torch.empty(1).uniform_(float(np.log(3 / 4)), float(np.log(4 / 3)), generator=generator)
            ratio = float(torch.exp(logr))
            cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
                break
        else:  # the centre crop fallback of torchvision
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        img = TF.resized_crop(img, top, left, ch, cw, [224, 224], antialias=True)
        return img.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else img

    def raw_batch(self, task_id: int, split: str, positions: torch.Tensor,
                  generator: torch.Generator | None = None) -> Batch:
        self._check(task_id)
        split, positions = self._resolve(task_id, split, positions.to(self.device))
        rows = self._indices(task_id, split).index_select(0, positions)
        x = torch.stack([self._decode(self._files[split][int(r)], split == "train" and generator is not None, generator)
                         for r in rows.tolist()])
        return x.to(self.device), self._targets(task_id, self._labels[split].index_select(0, rows))

    def augmented_batch(self, task_id: int, positions: torch.Tensor, generator: torch.Generator) -> Batch:
        return self.raw_batch(task_id, "train", positions, generator)  # augmented image by image, decoding

    def num_samples(self, task_id: int, split: str) -> int:
        return self._indices(task_id, split).numel()

