r"""Continual-evaluation metrics (De Lange, van de Ven, Tuytelaars, "Continual evaluation for lifelong learning:
Identifying the stability gap", ICLR 2023), as defined in the authors' code (``Mattdl/ContinualEvaluation``).

Every function reads an accuracy history: ``acc`` ``[E, T]``, the accuracy on each task's evaluation set at
each of ``E`` evaluations (NaN for tasks not yet seen), and ``current`` ``[E]``, the task being learned at
each evaluation. Windows count **evaluations**, not optimizer steps. Means over tasks skip a task whose
accuracy is NaN throughout (an empty evaluation set: a Si-Blurry task can hold no class of its own).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _learned_before(current: Tensor, task: int) -> Tensor:
    """``[E]`` mask of the evaluations after ``task`` was learned (a later task is being learned)."""
    return current > task


def min_acc(acc: Tensor, current: Tensor) -> float:
    r"""min-ACC at the last evaluation: :math:`\frac{1}{k-1}\sum_{i<k} \min_{t_{|T_i|} < n \le t} A(E_i, f_n)`,
    the mean over the previous tasks of the lowest accuracy each had after it was learned. NaN while the
    first task is learned."""
    k = int(current[-1])
    if k == 0:
        return math.nan
    minima = [acc[_learned_before(current, i), i].min() for i in range(k)]
    return float(torch.stack(minima).nanmean())


def wc_acc(acc: Tensor, current: Tensor) -> float:
    r"""WC-ACC at the last evaluation: :math:`\frac1k A(E_k, f_t) + (1 - \frac1k)\,\text{min-ACC}`, with
    :math:`k` the number of tasks seen; the current task's accuracy during the first task."""
    k = int(current[-1])
    now = float(acc[-1, k])
    return now if k == 0 else now / (k + 1) + (1 - 1 / (k + 1)) * min_acc(acc, current)


def _window_extreme(values: Tensor, window: int, sign: float) -> float:
    """``max`` over pairs ``m < n`` less than ``window`` evaluations apart of ``sign * (values[m] - values[n])``."""
    best = 0.0
    for lag in range(1, min(window, len(values))):
        best = max(best, float((sign * (values[:-lag] - values[lag:])).max()))
    return best


def windowed_forgetting(acc: Tensor, window: int = 10) -> float:
    r""":math:`\mathrm{WF}^w`: per task, the largest drop :math:`A(E_i, f_m) - A(E_i, f_n)` between two evaluations
    :math:`m < n` within ``window`` consecutive evaluations, over the whole run; averaged over every task
    evaluated (the current one included, as in the authors' code)."""
    return _windowed(acc, window, sign=1.0)


def windowed_plasticity(acc: Tensor, window: int = 10) -> float:
    r""":math:`\mathrm{WP}^w`: as :func:`windowed_forgetting`, with the largest *rise*
    :math:`A(E_i, f_n) - A(E_i, f_m)`."""
    return _windowed(acc, window, sign=-1.0)


def _windowed(acc: Tensor, window: int, sign: float) -> float:
    if window < 2:
        raise ValueError(f"window must be >= 2 evaluations, got {window}.")
    per_task = []
    for i in range(acc.shape[1]):
        values = acc[:, i][~acc[:, i].isnan()]
        if len(values):
            per_task.append(_window_extreme(values, window, sign))
    return sum(per_task) / len(per_task) if per_task else math.nan  # NaN: no task evaluated yet


def learning_curve_area(acc: Tensor, current: Tensor, beta: int = 10) -> float:
    r""":math:`\mathrm{LCA}_\beta` (Chaudhry et al., 2019): the mean of the first ``beta`` accuracies of each task
    while it is learned, averaged over tasks."""
    means = []
    for i in current.unique().tolist():
        means.append(acc[current == i, i][:beta].mean())
    return float(torch.stack(means).nanmean())


def final_accuracy(acc: Tensor) -> float:
    """ACC: the mean accuracy over the tasks seen, at the last evaluation."""
    last = acc[-1]
    return float(last[~last.isnan()].mean())


def task_end_matrix(acc: Tensor, current: Tensor) -> Tensor:
    r"""``[T', T]``: row :math:`k` is the accuracy on every task at the last evaluation of task :math:`k`."""
    return torch.stack([acc[(current == k).nonzero()[-1, 0]] for k in current.unique().tolist()])


def forgetting(acc: Tensor, current: Tensor) -> float:
    r"""FORG from the task-end matrix :math:`R`: :math:`\frac{1}{T-1}\sum_{i<T} (\max_{l < T} R_{l,i} - R_{T,i})`
    (the largest task-end accuracy minus the last); NaN with one task."""
    ends = task_end_matrix(acc, current)
    if len(ends) < 2:
        return math.nan
    earlier = ends[:-1, : len(ends) - 1]
    drops = earlier.nan_to_num(-math.inf).max(dim=0).values - ends[-1, : len(ends) - 1]
    return float(drops.nanmean())


def backward_transfer(acc: Tensor, current: Tensor) -> float:
    r"""BWT: :math:`\frac{1}{T-1}\sum_{i<T} (R_{T,i} - R_{i,i})` (negative when tasks are forgotten); NaN with
    one task."""
    ends = task_end_matrix(acc, current)
    if len(ends) < 2:
        return math.nan
    k = len(ends) - 1
    return float((ends[-1, :k] - ends.diagonal()[:k]).nanmean())
