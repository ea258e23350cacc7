"""The candidate set of task inference: which packed masks ``sum_i alpha_i M_i`` runs over.

A :class:`Candidates` is built once per evaluation (or NN check) by
:meth:`SupermaskModel.candidates <supsup.model.SupermaskModel.candidates>`, which owns the bank
and the scores a future task would start from, and is passed down unchanged: inference reads
it and never goes back to the model to make candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Candidates"]


@dataclass(frozen=True)
class Candidates:
    """The ``k`` masks task inference chooses among, packed at 1 bit per weight.

    Attributes:
        blocks: per masked layer, row blocks ``(k_j, packed_nbytes(P_l))`` whose concatenation
            is the candidate set (candidate ``i`` is row ``i`` of it). The first block is the
            bank or a prefix of it, read in place; the second, if any, the rows made for this
            set (the mask in training, untrained masks of future task ids).
        tasks: the task id of each candidate, ``(k,)``; None for an untrained mask (it has no
            task yet, and no BatchNorm or likelihood statistics).
        banked: the leading candidates that are bank rows ``0..banked-1``: each runs with its
            task's banked BatchNorm statistics when scored alone.
        whole_bank: the first block is the whole bank, whose cached mask count then gives the
            uniform superposition in O(P) (:meth:`SupermaskLayer.mask_count`).
    """

    blocks: tuple[tuple[torch.Tensor, ...], ...]
    tasks: tuple[int | None, ...]
    banked: int = 0
    whole_bank: bool = False

    def __post_init__(self):
        counts = {sum(r.shape[0] for r in rows) for rows in self.blocks}
        if len(counts) != 1 or counts != {len(self.tasks)}:
            raise ValueError(f"every masked layer needs one row per candidate ({len(self.tasks)}), got "
                             f"{sorted(counts)}")
        if not 0 <= self.banked <= len(self.tasks):
            raise ValueError(f"banked must be in 0..{len(self.tasks)}, got {self.banked}")

    @classmethod
    def of_rows(cls, rows: list[torch.Tensor]) -> Candidates:
        """Arbitrary packed masks, ``(k, packed_nbytes(P_l))`` per layer, that are no banked task
        (the float-stack oracle, a benchmark's own masks)."""
        return cls(tuple((r,) for r in rows), (None,) * (rows[0].shape[0] if rows else 0))

    def __len__(self) -> int:
        return len(self.tasks)

    def rows(self) -> list[torch.Tensor]:
        """Every candidate's packed rows per layer, concatenated (a copy when there are extra rows)."""
        return [blocks[0] if len(blocks) == 1 else torch.cat(blocks) for blocks in self.blocks]

    def row(self, layer: int, index: int) -> torch.Tensor:
        """Candidate ``index``'s packed row of masked layer ``layer``."""
        i = index
        for r in self.blocks[layer]:
            if i < r.shape[0]:
                return r[i]
            i -= r.shape[0]
        raise IndexError(f"candidate {index} is beyond the {len(self)} candidates")
