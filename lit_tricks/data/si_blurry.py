"""Si-Blurry: the stochastic blurry task-boundary stream of online class-incremental learning (Moon et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _cuts(total: int, num_tasks: int, generator: torch.Generator) -> list[int]:
    """``num_tasks + 1`` boundaries ``0 <= b_1 <= ... <= total`` that split ``total`` items at random
    (``num_tasks - 1`` cut points drawn uniformly from ``0 .. total - 1`` and sorted)."""
    inner = torch.randint(0, total, (num_tasks - 1,), generator=generator).sort().values.tolist()
    return [0, *inner, total]


def si_blurry_classes(
    num_classes: int, num_tasks: int, disjoint_percent: int, generator: torch.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    r"""The class half of the Si-Blurry split: ``(disjoint classes per task, blurry classes per task)``.

    A random class order is cut into :math:`D = \lfloor \lfloor C N / 100\rfloor / T \rfloor T` disjoint classes
    and the :math:`C - D` others (blurry); each group is split among the :math:`T` tasks at ``T - 1`` random cut
    points, so tasks hold random numbers of classes (possibly none). Draws from ``generator`` in the order of the
    authors' ``OnlineSampler``.
    """
    order = torch.randperm(num_classes, generator=generator).tolist()
    num_disjoint = (num_classes * disjoint_percent // 100) // num_tasks * num_tasks
    num_blurry = num_classes - num_disjoint
    disjoint, blurry = order[:num_disjoint], order[num_disjoint:]
    groups = []
    for members, size in ((disjoint, num_disjoint), (blurry, num_blurry)):
        if size == 0:
            groups.append([[] for _ in range(num_tasks)])
            continue
        cut = _cuts(size, num_tasks, generator)
        groups.append([members[cut[k] : cut[k + 1]] for k in range(num_tasks)])
    return groups[0], groups[1]


@dataclass
class SiBlurrySplit:
    """A Si-Blurry stream over a training set.

    Attributes:
        disjoint_classes: per task, the disjoint classes (seen in that task only).
        blurry_classes: per task, the blurry classes it is home to (some of their samples appear in other tasks).
        task_of_class: ``[C]`` each class's home task.
        stream: ``[S]`` training-set rows in training order, task after task, each task shuffled.
        stream_task: ``[S]`` the task each stream position belongs to (non-decreasing).
    """

    disjoint_classes: list[list[int]]
    blurry_classes: list[list[int]]
    task_of_class: Tensor
    stream: Tensor
    stream_task: Tensor

    def task_sizes(self) -> list[int]:
        """The number of samples of each task."""
        return torch.bincount(self.stream_task, minlength=len(self.disjoint_classes)).tolist()


def si_blurry_split(
    targets: Tensor, num_classes: int, num_tasks: int = 5, disjoint_percent: int = 50, blurry_percent: int = 10,
    seed: int = 0,
) -> SiBlurrySplit:  # fmt: skip
    r"""The Si-Blurry stream (Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task Boundary
    via Mask and Visual Prompt Tuning", ICCV 2023), as the authors' ``OnlineSampler`` builds it (``--rnd_NM``).

    1. Classes: ``disjoint_percent`` :math:`N` % of them are disjoint, the rest blurry; both groups are split
       among the ``num_tasks`` :math:`T` tasks at random cut points (:func:`si_blurry_classes`).
    2. Samples: each sample goes to its class's home task. Of the :math:`B` samples of blurry classes,
       :math:`\lfloor B M / 100\rfloor` (``blurry_percent`` :math:`M`) are cut into :math:`T` random shares
       :math:`m_1, \dots, m_T` (random cut points again); task :math:`k` gives up the first :math:`m_k` of its
       blurry samples (in dataset order; fewer if it has fewer) to a pool, the pool is shuffled, and task
       :math:`k` receives the next :math:`m_k` of it. So blurry classes leak into earlier and later tasks in
       random amounts, and task sizes vary.
    3. Each task's samples are shuffled; the stream is task 0, task 1, ..., seen once (online).

    Every draw comes from one ``torch.Generator`` seeded with ``seed``, in the authors' order, so the stream
    equals theirs for the same seed and labels. One difference: the authors also round the number of blurry
    classes down to a multiple of :math:`T` and leave the remainder out of the stream; here every class is used.

    Args:
        targets: ``[S]`` class ids of the training set.
        num_classes: number of classes :math:`C`.
        num_tasks: :math:`T` (the authors' default 5).
        disjoint_percent: :math:`N`, percent of classes that are disjoint (default 50; 100: disjoint tasks).
        blurry_percent: :math:`M`, percent of blurry-class samples that leak (default 10).
        seed: seed of every draw (the authors' ``rnd_seed``).

    Example::

        >>> targets = torch.arange(10).repeat_interleave(20)
        >>> split = si_blurry_split(targets, num_classes=10, seed=1)
        >>> sorted(split.stream.tolist()) == list(range(200))
        True
        >>> sum(split.task_sizes())
        200
    """
    generator = torch.Generator().manual_seed(seed)
    disjoint, blurry = si_blurry_classes(num_classes, num_tasks, disjoint_percent, generator)
    task_of_class = torch.empty(num_classes, dtype=torch.long)
    is_blurry = torch.zeros(num_classes, dtype=torch.bool)
    for k in range(num_tasks):
        task_of_class[disjoint[k] + blurry[k]] = k
        is_blurry[blurry[k]] = True
    home = task_of_class[targets]
    rows = [(home == k).nonzero().flatten() for k in range(num_tasks)]
    disjoint_rows = [r[~is_blurry[targets[r]]] for r in rows]
    blurry_rows = [r[is_blurry[targets[r]]] for r in rows]
    num_leaked = sum(len(r) for r in blurry_rows) * blurry_percent // 100
    if num_leaked > 0:
        cut = _cuts(num_leaked, num_tasks, generator)
        shares = [cut[k + 1] - cut[k] for k in range(num_tasks)]
        pool = torch.cat([r[:m] for r, m in zip(blurry_rows, shares, strict=True)])
        pool = pool[torch.randperm(len(pool), generator=generator)]
        starts = torch.tensor([0, *shares]).cumsum(0).tolist()
        blurry_rows = [torch.cat([r[m:], pool[starts[k] : starts[k + 1]]]) for k, (r, m) in enumerate(zip(
            blurry_rows, shares, strict=True))]  # fmt: skip
    tasks = []
    for own, leaked in zip(disjoint_rows, blurry_rows, strict=True):
        members = torch.cat([own, leaked])
        tasks.append(members[torch.randperm(len(members), generator=generator)])
    stream_task = torch.cat([torch.full((len(t),), k) for k, t in enumerate(tasks)])
    return SiBlurrySplit(disjoint, blurry, task_of_class, torch.cat(tasks), stream_task)
