"""Continual-learning metrics from an accuracy matrix.

``R`` holds, for each evaluation point, the accuracy on every task: row ``r`` was measured
after learning ``n_r`` tasks (``num_tasks_learned[r]``), entry ``R[r][j]`` is the test accuracy
on task ``j`` then (None when task ``j`` was not evaluated: not learned yet by a method that
cannot answer it, or not in the evaluated sample). With a row after every task this is the
usual ``R[i][j]`` (accuracy on task ``j`` after learning task ``i``, Lopez-Paz & Ranzato 2017);
with rows only at some points (long streams), each metric uses the rows it has.

* average accuracy (ACC): the mean of the last row over the learned tasks (Lopez-Paz & Ranzato,
  2017, "Gradient Episodic Memory for Continual Learning");
* backward transfer (BWT): ``1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])``, how much learning
  later tasks changed earlier ones (same paper; negative is forgetting), over the tasks whose
  accuracy right after learning them (``R[j][j]``, a row with ``n = j + 1``) is known;
* forgetting: the mean over tasks ``j < T-1`` of ``max_{l<T-1} R[l][j] - R[T-1][j]``, the best
  accuracy a task ever had minus its final one (Chaudhry et al., 2018, "Riemannian Walk for
  Incremental Learning");
* forward transfer (FWT): ``1/(T-1) sum_{j>0} (R[j-1][j] - b_j)`` with ``b_j`` the accuracy on
  task ``j`` before any training (Lopez-Paz & Ranzato, 2017); only for methods that answer
  tasks they have not learned (SupSup has no mask for them).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "summarise_matrix"]

Row = Sequence[float | None]


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def average_accuracy(rows: Sequence[Row], learned: Sequence[int]) -> float | None:
    """ACC: mean of the last row over its ``learned[-1]`` learned tasks."""
    if not rows:
        return None
    return _mean(rows[-1][: learned[-1]])


def _row_after(rows: Sequence[Row], learned: Sequence[int], n: int) -> Row | None:
    for row, m in zip(rows, learned):
        if m == n:
            return row
    return None


def backward_transfer(rows: Sequence[Row], learned: Sequence[int]) -> float | None:
    """BWT over the tasks (except the last learned) whose just-learned accuracy is known."""
    if not rows:
        return None
    final, T = rows[-1], learned[-1]
    diffs = []
    for j in range(T - 1):
        diag = _row_after(rows, learned, j + 1)
        if diag is not None and diag[j] is not None and final[j] is not None:
            diffs.append(final[j] - diag[j])
    return _mean(diffs)


def forgetting(rows: Sequence[Row], learned: Sequence[int]) -> float | None:
    """Average forgetting over tasks ``j < T-1`` evaluated in an earlier row and the last."""
    if len(rows) < 2:
        return None
    final, T = rows[-1], learned[-1]
    out = []
    for j in range(T - 1):
        earlier = [row[j] for row, m in zip(rows[:-1], learned[:-1]) if m > j and row[j] is not None]
        if earlier and final[j] is not None:
            out.append(max(earlier) - final[j])
    return _mean(out)


def forward_transfer(rows: Sequence[Row], learned: Sequence[int], before: Row | None) -> float | None:
    """FWT, when the accuracy on every task before training (``before``) and on each task
    just before learning it (a row with ``n = j``) are known."""
    if before is None or not rows:
        return None
    diffs = []
    for j in range(1, learned[-1]):
        prev = _row_after(rows, learned, j)
        if prev is not None and prev[j] is not None and before[j] is not None:
            diffs.append(prev[j] - before[j])
    return _mean(diffs)


def summarise_matrix(rows: Sequence[Row], learned: Sequence[int], before: Row | None = None) -> dict:
    """``{"average_accuracy", "bwt", "forgetting", "fwt"}`` of one matrix."""
    return {"average_accuracy": average_accuracy(rows, learned), "bwt": backward_transfer(rows, learned),
            "forgetting": forgetting(rows, learned), "fwt": forward_transfer(rows, learned, before)}
