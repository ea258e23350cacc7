"""Task-inference objectives over logits, evaluated per group of images.

Both take ``logits`` of shape ``(G, n, C_out)`` (``G`` independent inferences of ``n`` images)
and return ``(G,)``; the task is found by following the gradient of the objective with respect
to the superposition coefficients alpha (paper Sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Registry

__all__ = ["OBJECTIVES", "entropy", "exact_score", "superfluous_g", "superfluous_lse"]

OBJECTIVES: Registry[Callable[[torch.Tensor, int], torch.Tensor]] = Registry("objective")


def entropy(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """H: mean over the group's images of the entropy of ``softmax(logits)`` (all outputs)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def superfluous_g(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """G: ``logsumexp`` of the outputs with the real-class logits detached, so only the
    superfluous neurons (outputs ``num_classes:``) drive the gradient (paper Sec. 3.5)."""
    if logits.shape[-1] <= num_classes:
        raise ValueError(f"objective 'g' needs superfluous neurons: {logits.shape[-1]} outputs for {num_classes} classes")
    z = torch.cat([logits[..., :num_classes].detach(), logits[..., num_classes:]], dim=-1)
    return torch.logsumexp(z, dim=-1).mean(-1)


def superfluous_lse(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``logsumexp`` of the superfluous outputs alone: what G's gradient drives down, as a value
    to compare masks by. G's own value is dominated by the real-class logits, which are largest
    under the right mask, so it cannot rank masks by value (only by its gradient)."""
    if logits.shape[-1] <= num_classes:
        raise ValueError(f"objective 'g' needs superfluous neurons: {logits.shape[-1]} outputs for {num_classes} classes")
    return torch.logsumexp(logits[..., num_classes:], dim=-1).mean(-1)


def exact_score(objective: str):
    """The function whose value ranks masks for ``objective`` (lower: the mask fits the data):
    H itself, and for G the superfluous outputs' ``logsumexp``."""
    return superfluous_lse if objective == "g" else OBJECTIVES.get(objective)


# Registered after definition (not as decorators) so that mutation testing, which skips
# decorated functions, reaches them too.
OBJECTIVES.register("entropy")(entropy)
OBJECTIVES.register("g")(superfluous_g)
