"""Several processes and machines (``torchrun``): ranks train disjoint tasks, share every
finished mask, evaluate shards of the tasks.

A task's mask depends only on (seed, task id) and that task's data (GG, GN), so tasks can be
trained anywhere. Tasks are dealt round-robin: in the round that starts at task ``s``, rank
``r`` trains task ``s + r``; at the end of the round every rank contributes its task's bank
rows (the packed mask, 1 bit per weight, and its BatchNorm statistics) to one all-gather, and
every rank banks all of them in task order, so all ranks hold the same bank. Rank 0 alone
writes files. Evaluation is sharded over tasks and gathered on every rank.

Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...), the
process group uses gloo on the CPU and NCCL when the run's device is CUDA. One process
(``WORLD_SIZE`` unset or 1) runs without any of this.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError

__all__ = ["LAUNCHER_GONE_EXIT", "Distributed", "DistributedError", "exit_with_launcher"]

log = logging.getLogger(__name__)

#: the exit status of a worker that ended because its torchrun launcher was gone
LAUNCHER_GONE_EXIT = 75


def exit_with_launcher(poll_s: float = 0.5) -> threading.Thread:
    """End this process (exit status :data:`LAUNCHER_GONE_EXIT`) as soon as its parent, the
    ``torchrun`` launcher, is gone. torchrun starts its workers in sessions of their own, so a
    launcher killed by SIGKILL would leave them running: they would finish the run and write
    into a directory that a ``--resume`` may be writing too. A daemon thread notices the change
    of parent within ``poll_s`` seconds; what the worker wrote so far is safe (checkpoints are
    replaced atomically), and the run goes on with ``--resume``."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                log.error("the torchrun launcher (pid %d) is gone: this worker stops; continue with --resume", parent)
                os._exit(LAUNCHER_GONE_EXIT)

    thread = threading.Thread(target=watch, name="supsup-launcher-watch", daemon=True)
    thread.start()
    return thread


class DistributedError(RuntimeError):
    """Another process of the run failed or cannot be reached."""


@dataclass
class Distributed:
    """The process group of a run (``world == 1``: one process, nothing to share)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = 1800.0) -> Distributed:
        """The group ``torchrun`` set up in the environment, initialised (one process: none)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index is not None and device.index != local:
            # Every rank would build its model on that one GPU while NCCL expects one GPU per rank.
            raise ConfigError("device", f"under torchrun each process uses the GPU of its LOCAL_RANK; "
                                        f"set device=cuda (no index), not {device}")
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: do not outlive it
            exit_with_launcher()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as err:  # gloo / NCCL: a peer died or the connection broke
            raise DistributedError(f"rank {self.rank} of {self.world} lost the other processes ({err})") from None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (one process: ``obj``)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._call(dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out

    def gather_task_rows(self, rows: dict[str, torch.Tensor] | None, like: dict[str, torch.Tensor]
                         ) -> list[dict[str, torch.Tensor] | None]:
        """Every rank's bank rows of one task (or None), in rank order. The rows travel as one
        flat byte tensor per rank (``like``: the shapes of one task's rows), so a task costs its
        packed mask and statistics plus one flag byte on the wire."""
        if not self.enabled:
            return [rows]
        import torch.distributed as dist

        flat = pack_task_rows(rows, like).to(self.device)
        out = [torch.empty_like(flat) for _ in range(self.world)]
        self._call(dist.all_gather, out, flat)
        return [unpack_task_rows(buf.cpu(), like) for buf in out]

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items`` (every ``world``-th, from its rank)."""
        return list(items[self.rank:: self.world])


def pack_task_rows(rows: dict[str, torch.Tensor] | None, like: dict[str, torch.Tensor]) -> torch.Tensor:
    """One task's bank rows as one flat uint8 tensor: a flag byte (1: a task follows, 0: this
    rank had none), then every field's bytes in sorted key order (``like`` gives the fields'
    shapes and dtypes; a rank without a task sends zeros of the same length)."""
    keys = sorted(like)
    flat = torch.zeros(1 + sum(like[k].numel() * like[k].element_size() for k in keys), dtype=torch.uint8)
    if rows is not None:
        flat[0] = 1
        flat[1:] = torch.cat([rows[k].contiguous().view(-1).view(torch.uint8) for k in keys])
    return flat


def unpack_task_rows(buf: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Inverse of :func:`pack_task_rows` (None for a rank without a task)."""
    if buf[0] == 0:
        return None
    entry, pos = {}, 1
    for k in sorted(like):
        size = like[k].numel() * like[k].element_size()
        # Copy the bytes out first: a field can start at any byte offset (the flag byte shifts
        # them all), and viewing bytes as float32 needs an offset divisible by 4.
        entry[k] = buf[pos: pos + size].clone().view(like[k].dtype).view(like[k].shape)
        pos += size
    return entry
