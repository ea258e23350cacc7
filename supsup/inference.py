"""Task inference by superposition (paper Sec. 3.3, Algorithms 1 and 2).

With coefficients ``alpha`` over ``k`` candidate masks, the network runs with
``W_eff = W * sum_i alpha_i M_i``; the task is found from ``d obj / d alpha``:

* ``one_shot``: ``argmin_i d obj / d alpha_i`` at ``alpha = 1/k``;
* ``binary``: keep the best ``1/log_base`` of the candidates (most negative gradient), reset
  alpha uniform over the survivors, repeat until one remains.

Fast path (:func:`alpha_gradients`): ``d obj / d alpha_i = sum_l <G_l * W_l, M_{i,l}>`` with
``G_l = d obj / d W_eff,l`` (eq. 4). ``G_l`` comes from one batched backward pass for ``G``
inferences at once, and the products with every mask from one chunked pass over the *packed*
bank (:func:`supsup.masks.bank_matmul`). Memory: O(G * P) floats plus the packed bank; the
``k x P`` float stack of the original code is never built. :func:`alpha_gradients_reference`
is the plain float-stack implementation, kept as the test oracle and benchmark reference.

Candidates are a :class:`~supsup.candidates.Candidates`, built once by the caller with
:meth:`SupermaskModel.candidates` (default: the bank's masks; it may add the mask in training
and untrained masks of future task ids, for NN detection and evaluation while a task trains).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import masks as M
from .candidates import Candidates
from .likelihood import layer_features
from .model import SupermaskModel
from .objectives import OBJECTIVES, exact_score
from .registry import Registry

__all__ = ["INFERENCE_METHODS", "REFINEMENTS", "InferenceError", "alpha_gradients", "alpha_gradients_reference",
           "binary_keep", "Candidates", "default_method", "default_objective", "exact_objectives", "float_stacks", "infer_task",
           "infer_tasks", "likelihood_candidates", "likelihood_scores", "num_inference_steps", "rank_among", "rank_tasks",
           "TaskRanking"]

#: by name: ``fn(model, x, candidates, *, objective, num_classes, log_base, keep) -> (order, steps)``:
#: ``order`` ``(G, k)`` ranks every candidate of each group, best first; the first ``keep`` are the
#: method's own shortlist (binary search stops there); ``steps`` counts gradient evaluations
INFERENCE_METHODS: Registry = Registry("inference method")


class InferenceError(ValueError):
    """Bad input to task inference (e.g. non-finite images, no candidate masks)."""


def binary_keep(count: int, log_base: float) -> int:
    """Candidates binary search keeps out of ``count`` > 1: the best ``ceil(count / log_base)``,
    but at least one fewer than before (with ``log_base`` < 2, ``ceil(2 / log_base)`` is 2
    and the search would never end) and at least one."""
    return max(1, min(count - 1, math.ceil(count / log_base)))


def num_inference_steps(k: int, log_base: float) -> int:
    """Steps binary search takes to reduce ``k`` candidates to one: ``ceil(log2 k)`` for the
    default ``log_base`` 2, never more than ``k - 1``."""
    if not log_base > 1:
        raise ValueError(f"log_base must be > 1, got {log_base}")
    steps = 0
    while k > 1:
        k = binary_keep(k, log_base)
        steps += 1
    return steps


def _resolve(model: SupermaskModel, candidates: Candidates | None, packed: list[torch.Tensor] | None = None,
             extra: list[torch.Tensor] | None = None) -> Candidates:
    """The candidate set a public entry point was given: ``candidates``, default the bank; the
    ``packed`` / ``extra`` row lists of earlier versions are still taken, with a warning."""
    if packed is None and extra is None:
        return model.candidates() if candidates is None else candidates
    if candidates is not None:
        raise TypeError("pass candidates= or the deprecated packed=/extra=, not both")
    warnings.warn("packed= and extra= are deprecated and will be removed in 0.4: pass "
                  "candidates=model.candidates(...) (the bank, a prefix of it, the mask in training, untrained "
                  "masks) or Candidates.of_rows(rows)", FutureWarning, stacklevel=3)
    bank = [layer.bank_rows for layer in model.masked_layers]
    base = bank if packed is None else packed
    n = base[0].shape[0]
    in_place = n <= bank[0].shape[0] and (n == 0 or base[0].data_ptr() == bank[0].data_ptr())
    more = 0 if extra is None else extra[0].shape[0]
    if extra is not None and (len(extra) != len(base) or any(e.shape[0] != more for e in extra)):
        raise InferenceError("extra candidates need the same number of rows for every masked layer")
    blocks = tuple((b,) if extra is None else (b, e) for b, e in zip(base, extra or base))
    tasks = (tuple(range(n)) if in_place else (None,) * n) + (None,) * more
    return Candidates(blocks, tasks, banked=n if in_place else 0, whole_bank=in_place and n == bank[0].shape[0])


def _check_inputs(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise InferenceError(f"task inference got {bad} non-finite input values (NaN or inf)")


def _layer_io_grads(model: SupermaskModel, x: torch.Tensor, objective: str,
                    num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each masked layer's input and the objective's gradient w.r.t. its output, shaped
    ``(G, n, ...)``, for inputs ``x`` ``(G, n, ...)`` in the model's current (superposed) mode."""
    G, n = x.shape[:2]
    layers = model.masked_layers
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, out):
            inputs[i] = args[0]
            outputs[i] = out
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():  # Avalanche evaluates under no_grad; alpha needs gradients
            xin = x.reshape(G * n, *x.shape[2:]).detach().requires_grad_(True)
            logits = model(xin)
            obj = OBJECTIVES.get(objective)(logits.view(G, n, -1), num_classes).sum()
            douts = torch.autograd.grad(obj, [outputs[i] for i in range(len(layers))])
    finally:
        for h in handles:
            h.remove()
    out = []
    for i in range(len(layers)):
        xi, gi = inputs[i].detach(), douts[i]
        out.append((xi.reshape(G, n, *xi.shape[1:]), gi.reshape(G, n, *gi.shape[1:])))
    return out


def _superposed_coefs(model: SupermaskModel, candidates: Candidates, alphas: torch.Tensor,
                      bank_in_place: bool) -> list[torch.Tensor]:
    """``sum_i alphas[:, i] M_i`` per layer, ``(A, *W.shape)`` for alphas ``(A, k)``. Uniform
    coefficients over a candidate set that starts with the bank cost O(P): the bank's part is
    the cached mask count (:meth:`SupermaskLayer.mask_count`)."""
    out = []
    uniform = alphas.shape[0] == 1 and bool((alphas == alphas[0, 0]).all())
    for layer, rows in zip(model.masked_layers, candidates.blocks):
        total = None
        start = 0
        for j, r in enumerate(rows):
            a = alphas[:, start: start + r.shape[0]]
            start += r.shape[0]
            if r.shape[0] == 0:
                continue
            if j == 0 and bank_in_place and uniform:
                part = (layer.mask_count() * a[0, 0]).unsqueeze(0)
            else:
                part = M.bank_weighted_sum(r, a, layer.num_weights).view(-1, *layer.weight.shape)
            total = part if total is None else total + part
        out.append(total)
    return out


def alpha_gradients(model: SupermaskModel, x: torch.Tensor, alphas: torch.Tensor, *, objective: str,
                    num_classes: int, candidates: Candidates | None = None,
                    packed: list[torch.Tensor] | None = None, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``d obj_g / d alpha`` for ``G`` independent inferences.

    Args:
        x: ``(G, n, ...)``: ``n`` images per inference.
        alphas: ``(G, k)`` coefficients (rows may differ, e.g. during binary search).
        candidates: the ``k`` candidate masks (default: the bank's, read in place;
            :meth:`SupermaskModel.candidates`).
        packed, extra: deprecated (earlier versions' row lists; :class:`Candidates` instead).

    Returns:
        ``(G, k)`` gradients.
    """
    return _alpha_gradients(model, x, alphas, _resolve(model, candidates, packed, extra), objective, num_classes)


def _alpha_gradients(model: SupermaskModel, x: torch.Tensor, alphas: torch.Tensor, candidates: Candidates,
                     objective: str, num_classes: int) -> torch.Tensor:
    """:func:`alpha_gradients` over a given candidate set."""
    _check_inputs(x)
    layers = model.masked_layers
    G, k = alphas.shape
    n_cand = len(candidates)
    if n_cand != k:
        raise InferenceError(f"alphas cover {k} masks, the candidates hold {n_cand}")
    if k == 0:
        raise InferenceError("no candidate masks: learn a task first")
    alphas = alphas.to(device=x.device, dtype=x.dtype)
    try:
        if bool((alphas == alphas[:1]).all()):  # the same superposition for every group
            coefs = _superposed_coefs(model, candidates, alphas[:1], bank_in_place=candidates.whole_bank)
            # BatchNorm: each inference normalises with its own images' statistics
            model.superpose_fixed([c[0] for c in coefs], groups=G)
            io = _layer_io_grads(model, x, objective, num_classes)
        else:
            # Different alphas per group (binary search): one forward per group, with the
            # superposed masks computed for a few groups at a time to bound memory (G_sub x P).
            per_group = []
            for g0 in range(0, G, 8):
                sub = alphas[g0: g0 + 8]
                coefs = _superposed_coefs(model, candidates, sub, bank_in_place=False)
                for j in range(sub.shape[0]):
                    model.superpose_fixed([c[j] for c in coefs])
                    per_group.append(_layer_io_grads(model, x[g0 + j: g0 + j + 1], objective, num_classes))
                del coefs
            io = [(torch.cat([pg[i][0] for pg in per_group]), torch.cat([pg[i][1] for pg in per_group]))
                  for i in range(len(layers))]
    finally:
        model.restore_mode()
    out = x.new_zeros(k, G)
    for rows, layer, (xi, gi) in zip(candidates.blocks, layers, io):
        start = 0
        for r in rows:
            if r.shape[0]:
                out[start: start + r.shape[0]] += layer.alpha_grads(r, xi, gi)
            start += r.shape[0]
    return out.t()


def float_stacks(model: SupermaskModel, candidates: Candidates) -> list[torch.Tensor]:
    """Every candidate mask unpacked to floats, ``(k, *W.shape)`` per layer: the state the
    original implementation keeps (``k x P`` fp32). Reference and test oracle only."""
    rows = candidates.rows()
    return [M.unpack_bits(r, layer.num_weights).to(layer.weight.dtype).view(-1, *layer.weight.shape)
            for r, layer in zip(rows, model.masked_layers)]


def alpha_gradients_reference(model: SupermaskModel, x: torch.Tensor, alphas: torch.Tensor, *,
                              objective: str, num_classes: int, candidates: Candidates | None = None,
                              stacks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Float-stack oracle for :func:`alpha_gradients` (the original implementation's method):
    with a float ``(k, *W.shape)`` stack of masks per layer (:func:`float_stacks`),
    ``W_eff = W * sum_i alpha_i M_i``, autograd to alpha. Inputs ``(G, n, ...)``, alphas
    ``(G, k)``; returns ``(G, k)``."""
    _check_inputs(x)
    layers = model.masked_layers
    stacks = stacks if stacks is not None else float_stacks(model, _resolve(model, candidates))
    out = []
    try:
        for g in range(alphas.shape[0]):
            a = alphas[g].detach().clone().to(x.dtype).requires_grad_(True)
            with torch.enable_grad():
                coefs = [(a.view(-1, *([1] * layer.weight.dim())) * s).sum(0) for s, layer in zip(stacks, layers)]
                model.superpose_fixed(coefs)
                logits = model(x[g])
                obj = OBJECTIVES.get(objective)(logits.unsqueeze(0), num_classes).sum()
                out.append(torch.autograd.grad(obj, a)[0])
    finally:
        model.restore_mode()
    return torch.stack(out)


def _one_shot(model: SupermaskModel, x: torch.Tensor, candidates: Candidates, *, objective: str, num_classes: int,
              log_base: float, keep: int = 1) -> tuple[torch.Tensor, int]:
    """Paper Alg. 1: ``argmin_i d obj / d alpha_i`` at ``alpha = 1/k`` (one gradient). Returns every
    candidate per group, best (most negative gradient) first."""
    k = len(candidates)
    alphas = torch.full((x.shape[0], k), 1.0 / k, dtype=x.dtype, device=x.device)
    grads = _alpha_gradients(model, x, alphas, candidates, objective, num_classes)
    return grads.argsort(dim=1, stable=True), 1  # stable: the first is argmin's (lowest index on a tie)


def _binary(model: SupermaskModel, x: torch.Tensor, candidates: Candidates, *, objective: str, num_classes: int,
            log_base: float, keep: int = 1) -> tuple[torch.Tensor, int]:
    """Paper Alg. 2: keep the best ``1/log_base`` of the candidates (most negative gradient),
    put alpha uniform over the survivors, repeat until one is left (or ``keep``). Returns every
    candidate per group: the survivors by the last gradient, then the candidates of each step
    back, later eliminations first, each step's by its gradient."""
    G, k = x.shape[0], len(candidates)
    alive = torch.ones(G, k, dtype=torch.bool, device=x.device)
    count, steps = k, 0  # every group starts from k and follows the same rule: one count for all
    order = torch.arange(k, device=x.device).expand(G, k)
    eliminated: list[torch.Tensor] = []
    while count > keep:
        alphas = alive.to(x.dtype) / count
        grads = _alpha_gradients(model, x, alphas, candidates, objective, num_classes)
        steps += 1
        grads = grads.masked_fill(~alive, math.inf)
        before, count = count, max(keep, binary_keep(count, log_base))
        order = grads.argsort(dim=1, stable=True)
        eliminated.append(order[:, count:before])
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(k, device=x.device).expand(G, k))
        alive = ranks < count
    return torch.cat([order[:, :count], *reversed(eliminated)], dim=1), steps


def likelihood_candidates(model: SupermaskModel, candidates: Candidates) -> list[int | None]:
    """The task of each candidate that likelihood inference can score: every banked task (each
    must have statistics), the task in training if it has statistics; None for a candidate
    without them (an untrained mask, a mask that is no task), which is never chosen."""
    banked = candidates.tasks[: candidates.banked]
    missing = [t for t in banked if model.task_likelihood(t) is None]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise InferenceError(f"{len(missing)} banked tasks have no likelihood statistics (tasks {shown}): fit them "
                             "with model.fit_likelihood(task, x, y) on the task's images, or `supsup calibrate DIR`")
    out = list(banked) + [t if t is not None and model.task_likelihood(t) is not None else None
                          for t in candidates.tasks[candidates.banked:]]
    if all(t is None for t in out):
        raise InferenceError("likelihood inference scores tasks with statistics; none of these candidates is one")
    return out


@torch.no_grad()
def likelihood_scores(model: SupermaskModel, x: torch.Tensor, tasks: list[int | None], *,
                      chunk: int = 2048) -> torch.Tensor:
    """``S_t(x)`` (:mod:`supsup.likelihood`) of every image ``x`` ``(N, ...)`` under each task of
    ``tasks`` (its own mask, BatchNorm and likelihood statistics): ``(N, len(tasks))``, +inf for
    a None entry. Each task's masked weights are formed once for all ``N`` images."""
    _check_inputs(x)
    out = torch.full((x.shape[0], len(tasks)), math.inf, dtype=torch.float32, device=x.device)
    layers = model.feature_layers
    for j, t in enumerate(tasks):
        if t is None:
            continue
        stats = model.task_likelihood(t).to(x.device)
        with model.use_task(t):
            for start in range(0, x.shape[0], chunk):
                feats = layer_features(model, layers, x[start: start + chunk])
                out[start: start + chunk, j] = stats.nll(feats)
    return out


def _likelihood(model: SupermaskModel, x: torch.Tensor, candidates: Candidates, *, objective: str, num_classes: int,
                log_base: float, keep: int = 1) -> tuple[torch.Tensor, int]:
    """Beyond the paper: each candidate scored by the likelihood of the images' features under
    its own mask and banked statistics (:mod:`supsup.likelihood`), a group's images adding
    their scores; every candidate, lowest score first. No gradient: ``steps`` is 0."""
    G, n = x.shape[:2]
    tasks = likelihood_candidates(model, candidates)
    scores = likelihood_scores(model, x.reshape(G * n, *x.shape[2:]), tasks).view(G, n, -1).sum(1)
    return scores.argsort(dim=1, stable=True), 0


INFERENCE_METHODS.register("one_shot")(_one_shot)
INFERENCE_METHODS.register("binary")(_binary)
INFERENCE_METHODS.register("likelihood")(_likelihood)

REFINEMENTS = ("none", "exact")  #: after the gradient's ranking: none (the paper) or exact (infer_tasks)


def _candidate_masks(model: SupermaskModel, candidates: Candidates, index: int) -> list[torch.Tensor]:
    """Candidate ``index``'s mask per layer, as floats shaped like the weight."""
    return [M.unpack_bits(candidates.row(i, index), layer.num_weights).view_as(layer.weight).to(layer.weight.dtype)
            for i, layer in enumerate(model.masked_layers)]


@torch.no_grad()
def exact_objectives(model: SupermaskModel, x: torch.Tensor, shortlist: torch.Tensor, candidates: Candidates, *,
                     objective: str, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
    """The exact score (:func:`supsup.objectives.exact_score`) of the logits / ``temperature`` of
    each group ``x[g]`` ``(n, ...)`` under each of its candidates alone (``shortlist`` ``(G, r)``):
    ``(G, r)``. One forward per candidate over the groups that have it; the bank read in place."""
    banked = candidates.banked
    score = exact_score(objective)
    G, n = x.shape[:2]
    out = torch.full(shortlist.shape, math.inf, dtype=x.dtype, device=x.device)
    try:
        for cand in shortlist.unique().tolist():
            where = (shortlist == cand).nonzero()
            groups = where[:, 0]
            model.superpose_fixed(_candidate_masks(model, candidates, int(cand)), groups=len(groups),  # a banked mask
                                  norm_task=int(cand) if cand < banked else None)  # runs with its own BN stats
            logits = model(x[groups].reshape(len(groups) * n, *x.shape[2:]))
            out[groups, where[:, 1]] = score(logits.view(len(groups), n, -1) / temperature, num_classes)
    finally:
        model.restore_mode()
    return out


@dataclass(frozen=True)
class TaskRanking:
    """Where task inference puts every candidate, per group.

    Attributes:
        order: ``(G, k)`` candidate indices, best first: ``order[:, 0]`` is the inferred task.
        shortlist: how many of the first candidates the final decision compared (``k`` unless
            a refinement scored a shortlist): the true task's rank below it means it was found
            but lost, at or above it that the shortlist missed it.
        steps: gradient evaluations used.
    """

    order: torch.Tensor
    shortlist: int
    steps: int

    @property
    def tasks(self) -> torch.Tensor:
        """``(G,)``: the inferred candidate of each group."""
        return self.order[:, 0]

    def rank_of(self, candidate: int) -> torch.Tensor:
        """``(G,)``: where ``candidate`` stands in each group's order (0: chosen)."""
        return (self.order == candidate).int().argmax(dim=1)


def rank_tasks(model: SupermaskModel, x: torch.Tensor, *, method: str = "one_shot", objective: str = "g",
               num_classes: int | None = None, log_base: float = 2.0, refine: str = "none",
               refine_candidates: int = 5, refine_temperature: float = 1.0, candidates: Candidates | None = None,
               packed: list[torch.Tensor] | None = None, extra: list[torch.Tensor] | None = None) -> TaskRanking:
    """Rank every candidate mask for each of ``G`` groups of images (:func:`infer_tasks` is its
    first column).

    Args:
        x: ``(G, n, ...)``.
        method: a registered method (:data:`INFERENCE_METHODS`): ``one_shot``, ``binary`` (the
            paper's gradients) or ``likelihood`` (every mask scored by its banked feature
            statistics, :mod:`supsup.likelihood`).
        objective: ``g`` or ``entropy`` (:data:`supsup.objectives.OBJECTIVES`; gradient methods).
        num_classes: real classes (default: the model's ``num_classes``).
        refine: ``none`` or ``exact`` (beyond the paper: the method shortlists
            ``refine_candidates`` masks, one-shot's best or binary search stopped there, and the
            objective evaluated exactly under each of them alone reorders them;
            :func:`exact_objectives`, at ``refine_temperature``: above 1, confident images count
            too, where at 1 a batch's mean entropy follows its few uncertain ones).
        candidates: the candidate masks (default: the bank's finished tasks;
            :meth:`SupermaskModel.candidates`). ``packed``, ``extra``: deprecated.
    """
    return rank_among(model, x, _resolve(model, candidates, packed, extra), method=method, objective=objective,
                      num_classes=num_classes, log_base=log_base, refine=refine, refine_candidates=refine_candidates,
                      refine_temperature=refine_temperature)


def rank_among(model: SupermaskModel, x: torch.Tensor, candidates: Candidates, *, method: str = "one_shot",
               objective: str = "g", num_classes: int | None = None, log_base: float = 2.0, refine: str = "none",
               refine_candidates: int = 5, refine_temperature: float = 1.0) -> TaskRanking:
    """:func:`rank_tasks` among a candidate set the caller built once
    (:meth:`SupermaskModel.candidates`) and passes to every ranking of an evaluation."""
    k = len(candidates)
    G = x.shape[0]
    if k == 0:
        raise InferenceError("no candidate masks: learn a task first")
    if method not in INFERENCE_METHODS:
        raise ValueError(f"unknown inference method {method!r}; known: {', '.join(INFERENCE_METHODS.names())}")
    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refine {refine!r}; known: {', '.join(REFINEMENTS)}")
    if k == 1:
        return TaskRanking(torch.zeros(G, 1, dtype=torch.long, device=x.device), 1, 0)
    num_classes = model.num_classes if num_classes is None else num_classes
    keep = min(k, refine_candidates) if refine == "exact" else 1
    order, steps = INFERENCE_METHODS.get(method)(model, x, candidates, objective=objective, num_classes=num_classes,
                                                 log_base=log_base, keep=keep)
    if keep == 1:
        return TaskRanking(order, k, steps)
    shortlist = order[:, :keep]
    exact = exact_objectives(model, x, shortlist, candidates, objective=objective, num_classes=num_classes,
                             temperature=refine_temperature)
    reordered = shortlist.gather(1, exact.argsort(dim=1, stable=True))
    return TaskRanking(torch.cat([reordered, order[:, keep:]], dim=1), keep, steps)


def infer_tasks(model: SupermaskModel, x: torch.Tensor, *, method: str = "one_shot", objective: str = "g",
                num_classes: int | None = None, log_base: float = 2.0, refine: str = "none",
                refine_candidates: int = 5, refine_temperature: float = 1.0, candidates: Candidates | None = None,
                packed: list[torch.Tensor] | None = None, extra: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Infer the task of each of ``G`` groups of images ``x`` ``(G, n, ...)`` (arguments as for
    :func:`rank_tasks`).

    Returns:
        ``(tasks, steps)``: ``(G,)`` int64 indices into the candidates, and the number of gradient
        evaluations used (one_shot 1; binary :func:`num_inference_steps`, ``ceil(log2 k)`` at base 2;
        likelihood 0).
    """
    ranking = rank_among(model, x, _resolve(model, candidates, packed, extra), method=method, objective=objective,
                         num_classes=num_classes, log_base=log_base, refine=refine, refine_candidates=refine_candidates,
                         refine_temperature=refine_temperature)
    return ranking.tasks, ranking.steps


def default_objective(model: SupermaskModel) -> str:
    """``g`` when the model has superfluous outputs (paper Sec. 3.5: more robust with many
    tasks), else ``entropy``."""
    return "g" if model.num_outputs > model.num_classes else "entropy"


def default_method(model: SupermaskModel) -> str:
    """``likelihood`` when every banked task has likelihood statistics, else the paper's
    ``one_shot``."""
    have = all(model.task_likelihood(t) is not None for t in range(model.num_banked_tasks))
    return "likelihood" if have and model.num_banked_tasks else "one_shot"


def infer_task(model: SupermaskModel, x: torch.Tensor, *, method: str | None = None, objective: str | None = None,
               num_images: int | None = None, log_base: float = 2.0, refine: str = "none",
               refine_candidates: int = 5, refine_temperature: float = 1.0) -> int:
    """The task of one batch of images, among the model's banked tasks.

    Args:
        x: ``(B, ...)`` images of one task.
        method: ``likelihood`` (each mask scored by its banked feature statistics),
            ``one_shot`` (one gradient) or ``binary`` (halve the candidates each step);
            default :func:`default_method`.
        objective: ``g`` or ``entropy`` for the gradient methods; default :func:`default_objective`.
        num_images: infer from the first ``num_images`` images only (default: all ``B``).
        refine: ``exact``: the gradient's ``refine_candidates`` best masks are scored by the
            objective itself, of the logits divided by ``refine_temperature``, and the best of
            them is the task (:func:`infer_tasks`); what BatchNorm backbones need.

    Returns:
        The task id (an index into the bank).
    """
    n = x.shape[0] if num_images is None else min(num_images, x.shape[0])
    tasks, _ = infer_tasks(model, x[:n].unsqueeze(0), method=default_method(model) if method is None else method,
                           objective=default_objective(model) if objective is None else objective,
                           log_base=log_base, refine=refine, refine_candidates=refine_candidates,
                           refine_temperature=refine_temperature)
    return int(tasks[0])
