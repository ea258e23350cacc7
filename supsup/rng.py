"""Local random generators derived from (seed, purpose, task id).

Every random draw in supsup goes through a generator made here, never the global RNG, so a
run reproduces bit for bit and task ``t``'s draws do not depend on what ran before it.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, purpose: str, task_id: int | None = None) -> int:
    """A 63-bit seed that depends only on ``(seed, purpose, task_id)``."""
    text = f"supsup/{seed}/{purpose}/{'' if task_id is None else task_id}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, purpose: str, task_id: int | None = None,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded by :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, purpose, task_id))
    return gen
