"""Task inference by likelihood: each task banks a Gaussian model of its own hidden features.

The paper infers the task from the gradient of an objective at the uniform superposition of
all masks. That gradient stops pointing at the right task once masks are trained hard, the
bank grows or one image is all there is. Scoring every mask on its own is the accurate way; this
module makes it cheap and sharp.

When a task finishes, the features its own mask computes on the task's last training images
are summarised, per class ``c`` and per feature layer ``l`` (every masked layer but the output
layer; a conv layer's channels averaged over space), by a probabilistic PCA Gaussian
(Tipping & Bishop 1999): mean ``mu``, the ``r`` leading principal directions ``V`` with their
variances ``lam``, and one variance ``s2`` for the rest, i.e. ``Sigma = V diag(lam) V^T + s2 (I -
V V^T)``. A test image ``x`` is scored under candidate task ``t`` by the negative log-likelihood
of the features ``h_{t,l}(x)`` its mask computes::

    S_t(x) = sum_l -log( (1/C_t) sum_c N(h_{t,l}(x); mu_{t,l,c}, Sigma_{t,l,c}) )

and the task is ``argmin_t S_t``; a group of ``n`` images of one task adds its images' scores
(independent draws). A mask's score does not depend on the other candidates, so one pass over
the bank scores every prefix of it (accuracy-matrix rows) at once.

Storage per task and layer: ``C (d + 1)`` fp32 values for the means and rest variances, ``C r``
fp32 variances and ``C r d`` fp16 directions; ``r`` is the largest (up to ``max_rank``) that keeps a
task's statistics within the bytes of its own packed mask (295,424 B for FC 1024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DEFAULT_LIKELIHOOD", "ClassGaussians", "LikelihoodSpec", "TaskLikelihood", "MIN_CLASS_RANK", "choose_rank",
           "class_gaussian_nll", "fit_class_gaussians", "fit_task_likelihood", "layer_features", "layer_rank", "pack_likelihoods", "stats_nbytes", "unpack_likelihoods"]

#: likelihood statistics are kept per class only when every class can keep this many directions
#: (fewer per class ranked worse than one Gaussian per task at full rank: FC 1024, 50
#: PermutedMNIST tasks, one image: 10 classes at rank 5, 0.979; one Gaussian at rank 32, 1.000)
MIN_CLASS_RANK = 16

#: bytes of one stored value: fp32 means, variances; fp16 principal directions
_F32, _F16 = 4, 2


@dataclass(frozen=True)
class LikelihoodSpec:
    """What a task banks for likelihood inference.

    Attributes:
        images: calibration images: the last ``images`` training images of each task.
        max_rank: principal directions per class and feature layer at most (fewer when the
            mask's bytes or the class's images do not allow them).
    """

    images: int = 1024
    max_rank: int = 32

    def __post_init__(self) -> None:
        if self.images < 2:
            raise ValueError(f"likelihood images must be >= 2, got {self.images}")
        if self.max_rank < 0:
            raise ValueError(f"likelihood max_rank must be >= 0, got {self.max_rank}")


#: what a model keeps unless told otherwise (frozen: safe to share)
DEFAULT_LIKELIHOOD = LikelihoodSpec()


@dataclass
class ClassGaussians:
    """One task's Gaussians over one feature layer: ``c`` classes, ``r`` directions, ``d`` features.

    Attributes:
        means: ``(c, d)`` fp32.
        basis: ``(c, r, d)`` fp16, orthonormal rows: the leading principal directions.
        eigvals: ``(c, r)`` fp32: the variance along each direction.
        noise: ``(c,)`` fp32: the variance of every other direction (``s2``).
    """

    means: torch.Tensor
    basis: torch.Tensor
    eigvals: torch.Tensor
    noise: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.means, self.basis, self.eigvals, self.noise))

    def to(self, device: torch.device | str) -> ClassGaussians:
        return ClassGaussians(*(t.to(device) for t in (self.means, self.basis, self.eigvals, self.noise)))


def layer_rank(rank: int, d: int) -> int:
    """The directions a feature layer of width ``d`` keeps for a task of rank ``rank``: fewer
    than its width (a ResNet's 20-channel stem keeps 19 while its wider layers keep ``rank``)."""
    return min(rank, d - 1)


def stats_nbytes(dims: Sequence[int], groups: int, rank: int) -> int:
    """Bytes of one task's :class:`ClassGaussians` over feature layers of ``dims``."""
    return sum(groups * (d * _F32 + layer_rank(rank, d) * (d * _F16 + _F32) + _F32) for d in dims)


def choose_rank(budget: int, dims: Sequence[int], groups: int, max_rank: int, min_group_size: int) -> int:
    """The most principal directions (<= ``max_rank``, < ``min_group_size``; each layer fewer than
    its width, :func:`layer_rank`) that keep a task's statistics within ``budget`` bytes; -1 if
    not even the means fit."""
    r = min(max_rank, min_group_size - 1)
    while r >= 0 and stats_nbytes(dims, groups, r) > budget:
        r -= 1
    return r


def fit_class_gaussians(features: torch.Tensor, labels: torch.Tensor, rank: int) -> ClassGaussians:
    """Probabilistic PCA per class (maximum likelihood, Tipping & Bishop 1999).

    Args:
        features: ``(n, d)``; computed in fp64 for the decomposition.
        labels: ``(n,)`` int; every class present gets a Gaussian (``rank`` < its samples).
        rank: principal directions kept per class (0: an isotropic Gaussian).
    """
    f = features.detach().to(torch.float64)
    classes = labels.unique(sorted=True)
    d = f.shape[1]
    means, bases, eigs, noises = [], [], [], []
    for c in classes.tolist():
        fc = f[labels == c]
        n = fc.shape[0]
        if n <= rank:
            raise ValueError(f"class {c} has {n} calibration images, rank {rank} needs more than {rank}")
        mu = fc.mean(0)
        # eigen-decomposition of the class covariance via the thin SVD of the centred data
        _, s, vh = torch.linalg.svd(fc - mu, full_matrices=False)
        lam = s.square() / n
        rest = torch.zeros(d, dtype=f.dtype)
        rest[: lam.numel()] = lam
        # the ML rest variance: the mean of the discarded eigenvalues (floored: a constant
        # feature has zero variance, and a degenerate Gaussian would give infinite scores)
        floor = 1e-6 * max(1.0, float(rest.mean()))
        s2 = (rest[rank:].sum() / (d - rank)).clamp_min(floor)
        means.append(mu)
        bases.append(vh[:rank])
        eigs.append(lam[:rank].clamp_min(s2))
        noises.append(s2)
    return ClassGaussians(means=torch.stack(means).float(), basis=torch.stack(bases).half(),
                          eigvals=torch.stack(eigs).float(), noise=torch.stack(noises).float())


def class_gaussian_nll(features: torch.Tensor, g: ClassGaussians) -> torch.Tensor:
    """``-log((1/c) sum_c N(x; mu_c, Sigma_c))`` for features ``(n, d)``: ``(n,)`` (nats).

    With ``z = x - mu_c`` and ``p = V_c z``: ``z^T Sigma_c^-1 z = |z|^2 / s2 - sum_j p_j^2 (1/s2 -
    1/lam_j)`` and ``log det Sigma_c = sum_j log lam_j + (d - r) log s2``."""
    x = features.float()
    n, d = x.shape
    c, r = g.num_classes, g.rank
    # |x - mu|^2 expanded: one (n, c) product instead of a (n, c, d) difference
    sq = (x.square().sum(1, keepdim=True) - 2 * x @ g.means.t() + g.means.square().sum(1)).clamp_min(0)
    quad = sq / g.noise
    logdet = (d - r) * g.noise.log()
    if r:
        basis = g.basis.float()  # (c, r, d)
        proj = (x @ basis.reshape(c * r, d).t()).view(n, c, r) - torch.einsum("crd,cd->cr", basis, g.means)
        shrink = 1 / g.noise.unsqueeze(1) - 1 / g.eigvals  # (c, r), >= 0
        quad = quad - (proj.square() * shrink).sum(2)
        logdet = logdet + g.eigvals.log().sum(1)
    log_p = -0.5 * (quad + logdet + d * math.log(2 * math.pi))  # (n, c)
    return -(torch.logsumexp(log_p, dim=1) - math.log(c))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every feature has been seen."""


def _pooled(out: torch.Tensor) -> torch.Tensor:
    """A layer output as one feature vector per sample: ``(B, d)``; a conv map ``(B, C, H, W)``
    averaged over space (``(B, C)``)."""
    if out.dim() == 2:
        return out
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    return out.reshape(out.shape[0], -1, out.shape[-1]).mean(1)


def layer_features(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``layers`` for inputs ``x`` in the model's current mode, pooled
    (:func:`_pooled`), fp32, ``(B, d_l)`` each; the forward pass stops as soon as every one of
    them has run (the output layer and whatever follows the last feature is not computed)."""
    outs: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, out):
            outs[i] = _pooled(out.detach()).float()
            if len(outs) == len(layers):
                raise _Stop
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(outs) != len(layers):
        raise RuntimeError(f"{len(layers) - len(outs)} feature layers did not run in the forward pass")
    return [outs[i] for i in range(len(layers))]


@dataclass
class TaskLikelihood:
    """One task's statistics: a :class:`ClassGaussians` per feature layer."""

    layers: list[ClassGaussians]

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.layers)

    def nll(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``S_t(x)`` for features ``[(n, d_l)]``: ``(n,)``."""
        return sum(class_gaussian_nll(f, g) for f, g in zip(features, self.layers))

    def to(self, device: torch.device | str) -> TaskLikelihood:
        return TaskLikelihood([g.to(device) for g in self.layers])


def fit_task_likelihood(features: Sequence[torch.Tensor], labels: torch.Tensor, budget: int,
                        spec: LikelihoodSpec) -> TaskLikelihood:
    """A task's statistics from its images' features ``[(n, d_l)]`` and labels ``(n,)``, within
    ``budget`` bytes (its mask's): a probabilistic PCA Gaussian per feature layer, one per class
    when every class can keep ``min(MIN_CLASS_RANK, spec.max_rank)`` directions or more (classes
    with a single image left out), else one for the whole task at the largest rank that fits.

    Raises:
        ValueError: even one Gaussian per layer at rank 0 exceeds ``budget``.
    """
    dims = [f.shape[1] for f in features]
    classes, counts = labels.unique(return_counts=True)
    enough = counts >= 2
    rank = -1
    if int(enough.sum()) > 1:
        rank = choose_rank(budget, dims, int(enough.sum()), spec.max_rank, int(counts[enough].min()))
    if rank >= min(MIN_CLASS_RANK, spec.max_rank):  # a Gaussian per class
        keep = torch.isin(labels, classes[enough])
    else:  # one Gaussian for the task: more directions than per class (measured: sharper)
        labels, keep = torch.zeros_like(labels), torch.ones_like(labels, dtype=torch.bool)
        rank = choose_rank(budget, dims, 1, spec.max_rank, labels.numel())
        if rank < 0:
            raise ValueError(f"the likelihood statistics ({stats_nbytes(dims, 1, 0)} bytes at least) exceed the "
                             f"mask's {budget} bytes: use a model with fewer feature units")
    return TaskLikelihood([fit_class_gaussians(f[keep], labels[keep], layer_rank(rank, f.shape[1])) for f in features])


_FIELDS = ("means", "basis", "eigvals", "noise")


def pack_likelihoods(tasks: Sequence[TaskLikelihood | None]) -> dict[str, torch.Tensor]:
    """Every task's statistics as a few flat tensors (what checkpoints and model files hold),
    on the CPU; ``{}`` when no task has any:

    * ``rank``, ``groups``: ``(k,)`` int64, each task's rank and class count (rank -1: none);
    * ``<l>.means`` ``(sum c_t, d_l)``, ``<l>.basis`` ``(sum c_t r_t, d_l)`` fp16,
      ``<l>.eigvals`` ``(sum c_t r_t,)``, ``<l>.noise`` ``(sum c_t,)``: feature layer ``l``, tasks
      in order."""
    present = [t for t in tasks if t is not None]
    if not present:
        return {}
    num_layers = len(present[0].layers)
    out = {"rank": torch.tensor([-1 if t is None else max(g.rank for g in t.layers) for t in tasks], dtype=torch.int64),
           "groups": torch.tensor([0 if t is None else t.layers[0].num_classes for t in tasks], dtype=torch.int64)}
    for li in range(num_layers):
        gs = [t.layers[li] for t in present]
        d = gs[0].means.shape[1]
        out[f"{li}.means"] = torch.cat([g.means.cpu() for g in gs])
        out[f"{li}.basis"] = torch.cat([g.basis.cpu().reshape(-1, d) for g in gs])
        out[f"{li}.eigvals"] = torch.cat([g.eigvals.cpu().reshape(-1) for g in gs])
        out[f"{li}.noise"] = torch.cat([g.noise.cpu() for g in gs])
    return out


def unpack_likelihoods(state: dict[str, torch.Tensor], num_tasks: int,
                       dims: Sequence[int]) -> list[TaskLikelihood | None]:
    """The inverse of :func:`pack_likelihoods` for ``num_tasks`` tasks over feature layers of
    ``dims``, checked strictly (``ValueError`` naming the key that does not fit)."""
    if not state:
        return [None] * num_tasks
    expected = {"rank", "groups"} | {f"{li}.{f}" for li in range(len(dims)) for f in _FIELDS}
    if set(state) != expected:
        raise ValueError(f"likelihood statistics have keys {sorted(state)}, expected {sorted(expected)}")
    rank, groups = state["rank"], state["groups"]
    for name, t in (("rank", rank), ("groups", groups)):
        if t.dtype != torch.int64 or tuple(t.shape) != (num_tasks,):
            raise ValueError(f"likelihood.{name}: expected int64 ({num_tasks},), got {t.dtype} {tuple(t.shape)}")
    if bool((rank < -1).any()) or bool(((rank >= 0) & (groups < 1)).any()):
        raise ValueError("likelihood.rank / groups: a task with statistics needs rank >= 0 and at least one class")
    have = rank >= 0
    n_groups = int(groups[have].sum())
    layers: list[list[ClassGaussians]] = [[] for _ in range(num_tasks)]
    for li, d in enumerate(dims):
        n_dirs = sum(int(groups[t]) * layer_rank(int(rank[t]), d) for t in range(num_tasks) if have[t])
        shapes = {"means": ((n_groups, d), torch.float32), "basis": ((n_dirs, d), torch.float16),
                  "eigvals": ((n_dirs,), torch.float32), "noise": ((n_groups,), torch.float32)}
        for f, (shape, dtype) in shapes.items():
            t = state[f"{li}.{f}"]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"likelihood.{li}.{f}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        g0 = r0 = 0
        for task in range(num_tasks):
            if not have[task]:
                continue
            c, r = int(groups[task]), layer_rank(int(rank[task]), d)
            layers[task].append(ClassGaussians(
                means=state[f"{li}.means"][g0: g0 + c].clone(),
                basis=state[f"{li}.basis"][r0: r0 + c * r].reshape(c, r, d).clone(),
                eigvals=state[f"{li}.eigvals"][r0: r0 + c * r].reshape(c, r).clone(),
                noise=state[f"{li}.noise"][g0: g0 + c].clone()))
            g0 += c
            r0 += c * r
    return [TaskLikelihood(ls) if have[t] else None for t, ls in enumerate(layers)]
