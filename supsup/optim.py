"""Optimizers for the active task's scores.

:class:`FusedRMSprop` is ``torch.optim.RMSprop`` (same hyper-parameters, same state, so its
``state_dict`` loads into either) whose step, for CPU float32 tensors without momentum or
centering, runs as one compiled pass per tensor (:func:`supsup._kernels.rmsprop_step`) instead
of torch's five elementwise passes. Every other case goes through torch's own step.

:data:`OPTIMIZERS` maps the names a config may use (``train.optimizer``) to factories
``fn(params, *, lr, momentum, weight_decay) -> torch.optim.Optimizer``.
"""

from __future__ import annotations

import torch

from .masks import bit_kernels_available, kernel_threads
from .registry import Registry

__all__ = ["OPTIMIZERS", "FusedRMSprop"]

OPTIMIZERS: Registry = Registry("optimizer")


class FusedRMSprop(torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with a one-pass step on the CPU (paper setting: lr 1e-4, no
    momentum). Results equal torch's up to float rounding."""

    def _fusable(self, group: dict, p: torch.Tensor) -> bool:
        return (group["momentum"] == 0 and not group["centered"] and not group["maximize"]
                and not group.get("differentiable", False) and p.device.type == "cpu"
                and p.dtype == torch.float32 and p.grad is not None and not p.grad.is_sparse
                and p.is_contiguous() and p.grad.is_contiguous())

    @torch.no_grad()
    def step(self, closure=None):
        if not bit_kernels_available():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from ._kernels import rmsprop_step

        rest: dict[int, list[torch.Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self._fusable(group, p):
                    rest.setdefault(gi, []).append(p)
                    continue
                state = self.state[p]
                if len(state) == 0:  # the same state torch's RMSprop creates
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                with kernel_threads():
                    rmsprop_step(p.detach().view(-1).numpy(), p.grad.detach().view(-1).numpy(),
                                 state["square_avg"].view(-1).numpy(), lr=group["lr"], alpha=group["alpha"],
                                 eps=group["eps"], weight_decay=group["weight_decay"])
        if rest:  # anything the kernel does not cover: torch's own step, on those tensors only
            saved = [group["params"] for group in self.param_groups]
            try:
                for gi, group in enumerate(self.param_groups):
                    group["params"] = rest.get(gi, [])
                super().step()
            finally:
                for group, params in zip(self.param_groups, saved):
                    group["params"] = params
        return loss


def _rmsprop(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    # torch's RMSprop, with a one-pass compiled step on the CPU (memory-bound otherwise)
    return FusedRMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)  # Adam has no momentum knob


def _sgd(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS.register("rmsprop")(_rmsprop)  # the paper's (lr 1e-4, no decay)
OPTIMIZERS.register("adam")(_adam)
OPTIMIZERS.register("sgd")(_sgd)
