"""The cached data path for Avalanche streams: each sample an experience needs is transformed
once, kept as a tensor and batched from there (Avalanche's loaders transform every sample
again on every epoch and every evaluation).

* :class:`CachedExperience` / :class:`ExperienceCache`: an experience's split, transformed on
  first read and kept;
* :class:`CachedBatches`: minibatches from it, in the order of the native streams
  (:meth:`supsup.data.streams.TaskStream.train_batches`) or in test order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

__all__ = ["CachedBatches", "CachedData", "CachedExperience", "ExperienceCache", "dataset_tensors"]


@dataclass(frozen=True)
class CachedData:
    """Samples as tensors: ``x`` ``(N, *sample_shape)``, ``y`` ``(N,)`` int64 class labels,
    ``t`` ``(N,)`` int64 task labels (0 when the dataset has none)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return self.y.numel()


def dataset_tensors(dataset, *, batch_size: int = 4096, device: torch.device | str = "cpu") -> CachedData:
    """Run an Avalanche dataset once, in its current transform group, and stack its samples
    (``(x, y[, ..., t])`` each)."""
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    xs, ys, ts = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None))
    for batch in loader:
        y = torch.as_tensor(batch[1]).long()
        xs.append(torch.as_tensor(batch[0]))
        ys.append(y)
        ts.append(torch.as_tensor(batch[-1]).long() if len(batch) >= 3 else torch.zeros_like(y))
    return CachedData(torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ts).to(device))


class CachedExperience:
    """One experience's dataset in one split's transforms (``train`` or ``eval``), each
    sample transformed the first time it is read and kept as a tensor from then on.

    Memory: the rows read so far, ``prod(sample_shape)`` floats each (a whole MNIST
    experience: 188 MB train, 31 MB test).
    """

    def __init__(self, dataset, split: str, *, device: torch.device | str = "cpu", batch_size: int = 4096):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.dataset = dataset
        self.view = dataset.train() if split == "train" else dataset.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        n = len(self.view)
        self.x: torch.Tensor | None = None  # allocated (not written) at the first read
        self.y = torch.empty(n, dtype=torch.long, device=self.device)
        self.t = torch.empty(n, dtype=torch.long, device=self.device)
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.seconds = 0.0  # time spent transforming samples

    def __len__(self) -> int:
        return self.filled.numel()

    def fill(self, rows: torch.Tensor) -> None:
        """Transform the samples at ``rows`` not read before, in one pass."""
        rows = rows.detach().cpu().long()
        missing = torch.unique(rows[~self.filled[rows]])
        if missing.numel() == 0:
            return
        t0 = time.perf_counter()
        data = dataset_tensors(self.view.subset(missing.tolist()), batch_size=self.batch_size, device=self.device)
        if self.x is None:
            self.x = torch.empty((len(self), *data.x.shape[1:]), dtype=data.x.dtype, device=self.device)
        dev_rows = missing.to(self.device)
        self.x[dev_rows], self.y[dev_rows], self.t[dev_rows] = data.x, data.y, data.t
        self.filled[missing] = True
        self.seconds += time.perf_counter() - t0

    def tensors(self, rows: torch.Tensor) -> CachedData:
        """The samples at ``rows`` ``(B,)``, transformed if not yet cached."""
        self.fill(rows)
        rows = rows.to(self.device)
        return CachedData(self.x[rows], self.y[rows], self.t[rows])


class ExperienceCache:
    """:class:`CachedExperience` per (experience dataset, split).

    Entries are keyed by the experience's dataset object (kept alive by the entry, so its id
    cannot be reused): Avalanche streams hand out the same dataset object every time an
    experience is accessed. :meth:`release` drops an entry (e.g. a training set once its
    experience is learned).
    """

    def __init__(self, *, device: torch.device | str = "cpu", batch_size: int = 4096):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._entries: dict[tuple[int, str], CachedExperience] = {}
        self._released_seconds = 0.0

    @property
    def seconds(self) -> float:
        """Total time spent transforming samples (the one-off cost of the cache)."""
        return self._released_seconds + sum(e.seconds for e in self._entries.values())

    def get(self, dataset, split: str) -> CachedExperience:
        key = (id(dataset), split)
        entry = self._entries.get(key)
        if entry is None or entry.dataset is not dataset:
            entry = CachedExperience(dataset, split, device=self.device, batch_size=self.batch_size)
            self._entries[key] = entry
        return entry

    def release(self, dataset, split: str) -> None:
        entry = self._entries.pop((id(dataset), split), None)
        if entry is not None:
            self._released_seconds += entry.seconds

    def clear(self) -> None:
        for dataset, split in [(e.dataset, s) for (_, s), e in list(self._entries.items())]:
            self.release(dataset, split)


class CachedBatches:
    """Minibatches ``[x, y, t]`` from a :class:`CachedExperience`, shaped as Avalanche's
    loaders yield them. Every sample the batches need is transformed up front, once.

    Build with :meth:`training` (exactly ``num_batches`` batches of ``batch_size``, reshuffled
    every epoch by a seeded generator, an epoch's last partial batch dropped: the order of
    :meth:`supsup.data.streams.TaskStream.train_batches`), :meth:`evaluation` (in order, at
    most ``max_batches`` batches, the last possibly smaller) or :meth:`at` (given positions).
    """

    def __init__(self, source: CachedExperience, *, batch_size: int, num_batches: int | None,
                 generator: torch.Generator | None, max_batches: int | None = None,
                 positions: list[torch.Tensor] | None = None):
        self.source = source
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.generator = generator
        self.max_batches = max_batches
        self.positions = positions

    @classmethod
    def training(cls, source: CachedExperience, *, batch_size: int, num_batches: int,
                 generator: torch.Generator) -> CachedBatches:
        if batch_size > len(source):
            raise ValueError(f"batch_size {batch_size} exceeds the experience's {len(source)} training samples")
        return cls(source, batch_size=batch_size, num_batches=num_batches, generator=generator)

    @classmethod
    def evaluation(cls, source: CachedExperience, *, batch_size: int, max_batches: int | None = None) -> CachedBatches:
        return cls(source, batch_size=batch_size, num_batches=None, generator=None, max_batches=max_batches)

    @classmethod
    def at(cls, source: CachedExperience, positions: list[torch.Tensor]) -> CachedBatches:
        """One batch per tensor of ``positions`` (rows of the experience), in that order."""
        return cls(source, batch_size=0, num_batches=None, generator=None, positions=list(positions))

    def __len__(self) -> int:
        if self.positions is not None:
            return len(self.positions)
        if self.generator is not None:
            return self.num_batches
        n = -(-len(self.source) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def _index_batches(self) -> list[torch.Tensor]:
        if self.positions is not None:
            return self.positions
        n, bs = len(self.source), self.batch_size
        if self.generator is None:
            return [torch.arange(i * bs, min(n, (i + 1) * bs)) for i in range(len(self))]
        out = []
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        for _ in range(self.num_batches):
            if pos + bs > order.numel():
                order = torch.randperm(n, generator=self.generator)
                pos = 0
            out.append(order[pos: pos + bs])
            pos += bs
        return out

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        batches = self._index_batches()
        if batches:
            self.source.fill(torch.cat(batches))
        for rows in batches:
            d = self.source.tensors(rows)
            yield [d.x, d.y, d.t]
