"""The native GG/GN loop over several processes (:mod:`.distributed`): task-parallel training,
sharded evaluation. The results equal one process's: the same masks (a task's mask depends on
its id and data only), banked in the same order, evaluated by the same functions."""

from __future__ import annotations

import logging
import time

import torch

from .._faults import maybe_crash
from ..bank import LIKELIHOOD_PREFIX, mask_key, norm_key
from ..evaluation import evaluate_given_task
from ..model import SupermaskModel
from ..training import fit_active_task, fit_task_likelihood
from .evaluate import evaluate_task, matrix_points, sampled_tasks
from .results import CurvePoint, Summary, TaskRow
from .run import Run
from .runstate import LoopState, TrainingState, resume_inside_task

__all__ = ["evaluate_parallel", "run_labeled_parallel"]

log = logging.getLogger(__name__)


def _row_shapes(model: SupermaskModel) -> dict[str, torch.Tensor]:
    """Empty tensors shaped like one task's bank rows (what a rank sends per task)."""
    like = {mask_key(i): torch.zeros(1, layer.bank.shape[1], dtype=torch.uint8)
            for i, layer in enumerate(model.masked_layers)}
    for j, bn in enumerate(model.norm_layers):
        if bn.keeps_stats:
            like[norm_key(j)] = torch.zeros(1, 2, bn.num_features)
    return like


def run_labeled_parallel(run: Run, loop: LoopState, ranks: list[TrainingState] = ()) -> None:
    """GG/GN: in each round of ``world`` tasks, rank ``r`` learns the round's task ``r``; the
    masks are gathered and banked in order on every rank; rank 0 checkpoints after each round
    and, with ``train.checkpoint_every``, every that many steps inside a full round (every
    rank's task in training; ``ranks``: those states of the checkpoint resumed from, used when
    it was taken by as many processes, else the round starts again: the same result)."""
    cfg, model, results, dist = run.cfg, run.model, run.results, run.dist
    T = cfg.benchmark.num_tasks
    like = _row_shapes(model)
    if ranks and (loop.world != dist.world or loop.active_task != loop.next_task):
        log.info("the checkpoint stopped inside a round of %s processes; this run has %d: the round starts again",
                 loop.world, dist.world)
        ranks = []
    for start in range(loop.next_task, T, dist.world):
        maybe_crash("parallel_round")  # fault injection for the tests (inactive unless asked)
        task = start + dist.rank
        rows, stats, loss, train_s = None, None, None, 0.0
        if task < T:
            t0 = time.perf_counter()
            resume = None
            if ranks:  # the round stopped inside its tasks: this rank's goes on where it was
                resume, ranks = resume_inside_task(run.out, model, task, ranks[dist.rank]), []
            else:
                model.add_task(task)
            # inside a full round only: every rank reaches each checkpoint at the same step
            every = cfg.train.checkpoint_every if start + dist.world <= T else None

            def save(progress, start: int = start) -> None:
                states = dist.gather(TrainingState.capture(model, progress).to_tensors())
                run.checkpoint(LoopState(start, active_task=start, world=dist.world), ranks=states)
                maybe_crash("inside_task_checkpoint")  # fault injection for the tests (inactive unless asked)

            try:
                report = fit_active_task(model, run.train_batches(task), run.train, max_steps=run.train.iterations,
                                         progress=cfg.progress and dist.is_main,
                                         resume=resume, checkpoint_every=every, on_checkpoint=save if every else None)
            except BaseException:
                model.abandon_task()
                raise
            fit_task_likelihood(model, task, report.calibration)  # under the mask in training
            _, rows = model.export_task()
            stats = {k: v for k, v in rows.items() if k.startswith(LIKELIHOOD_PREFIX)}
            rows = {k: v for k, v in rows.items() if k in like}
            loss, train_s = report.loss, time.perf_counter() - t0
        t0 = time.perf_counter()
        gathered = [g for g in dist.gather_task_rows(rows, like) if g is not None]
        results.communication_seconds = (results.communication_seconds or 0.0) + time.perf_counter() - t0
        results.communication_bytes_per_task = 1 + sum(v.numel() * v.element_size() for v in like.values())
        state = {k: torch.cat([g[k] for g in gathered]) for k in like}
        # likelihood statistics differ in shape from task to task: sent as objects, in rank order
        round_stats = [g for g in dist.gather(stats) if g is not None]
        if round_stats and all(round_stats):
            state.update({k: torch.cat([g[k] for g in round_stats]) for k in round_stats[0]})
        model.import_tasks(state)
        if cfg.benchmark.labels == "global":  # class-incremental: every task answers among its own classes
            for t in range(start, min(start + dist.world, T)):
                model.set_task_classes(t, run.stream.task_classes(t))
        t0 = time.perf_counter()
        acc = None
        if task < T:
            acc, _ = evaluate_given_task(model, run.test_batches(task), task)
        info = dist.gather(None if task >= T else (task, acc, loss, train_s, time.perf_counter() - t0))
        done = sorted(i for i in info if i is not None)
        results.train_seconds += max(i[3] for i in done)  # wall time of the round's training
        results.eval_seconds += max(i[4] for i in done)
        for t, acc_t, loss_t, train_t, eval_t in done:
            run.record_task(t, loss_t, acc_t, None, train_t, eval_t)
        next_task = min(start + dist.world, T)
        run.checkpoint(LoopState(next_task))
        log.info("tasks %d-%d learned on %d processes", start, next_task - 1, dist.world)


def _sharded_rows(run: Run, pairs: list[tuple[int, int, bool]]) -> dict[tuple[int, int], TaskRow]:
    """Rows of ``(tasks learned n, task, with the task inferred)`` triples (n = the whole bank:
    the final evaluation; smaller n: the bank's first n masks), each evaluated by one rank,
    gathered on all."""
    mine = {}
    for n, task, inferred in run.dist.shard(pairs):
        mine[(n, task)] = evaluate_task(run.cfg, run.model, run.stream, task, None, run.model.candidates(num_banked=n),
                                        inferred=inferred).to_dict()
    out = {}
    for part in run.dist.gather(mine):
        out.update({key: TaskRow.from_dict(row) for key, row in part.items()})
    return out


def evaluate_parallel(run: Run) -> None:
    """The accuracy-vs-tasks points (from bank prefixes) and the final evaluation, sharded over
    the ranks by (point, task); the same rows as one process computes."""
    cfg, results = run.cfg, run.results
    T = cfg.benchmark.num_tasks
    points = sorted(n for n in matrix_points(cfg) if n <= T and n not in {p.num_tasks_learned for p in results.curve})
    inferred_tasks = set(sampled_tasks(T, cfg.eval.sample_tasks)) if not cfg.scenario.task_given_at_test else set()
    pairs = [(n, t, True) for n in points if n < T for t in sampled_tasks(n, cfg.eval.sample_tasks)]
    pairs += [(T, t, t in inferred_tasks) for t in range(T)]
    rows = _sharded_rows(run, pairs)
    inferred = not cfg.scenario.task_given_at_test
    for n in points:
        tasks = sampled_tasks(n, cfg.eval.sample_tasks)
        point_rows = [TaskRow.from_dict(rows[(n, t)].to_dict()) for t in tasks]
        results.curve.append(CurvePoint(n, tasks, Summary.of(point_rows, inferred=inferred), 0.0, point_rows,
                                        inferred=inferred))
    results.curve.sort(key=lambda p: p.num_tasks_learned)
    when_learned = {r.task_id: r.acc_given_task for r in results.tasks}
    final = [rows[(T, t)] for t in range(T)]
    for row in final:
        row.acc_given_task_when_learned = when_learned.get(row.task_id)
    results.tasks = final
    if inferred:
        results.record_confusion(final, len(inferred_tasks))
    results.summarise()
