"""Continual-learning streams: any of our labelled data modules as a sequence of tasks, trained in one ``fit``."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from lit_tricks.core.checks import check_number
from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.data.loader import ResumableDataLoader
from lit_tricks.data.si_blurry import SiBlurrySplit, si_blurry_classes, si_blurry_split

Scenario = Literal["class", "task", "domain", "si_blurry"]


def split_classes(num_classes: int, num_tasks: int, class_order: list[int] | None = None) -> Tensor:
    """``[C]`` task of each class: ``num_tasks`` consecutive groups of ``class_order`` (default 0, 1, ...)."""
    if num_tasks < 1 or num_classes % num_tasks:
        raise ValueError(f"num_tasks must divide the {num_classes} classes into equal groups, got {num_tasks}.")
    order = torch.arange(num_classes) if class_order is None else torch.as_tensor(class_order)
    if sorted(order.tolist()) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {order.tolist()}.")
    task_of_class = torch.empty(num_classes, dtype=torch.long)
    task_of_class[order] = torch.arange(num_classes) // (num_classes // num_tasks)
    return task_of_class


def task_stream(tasks: Tensor, epochs_per_task: int, blur: float, generator: torch.Generator) -> Tensor:
    r"""The order in which samples are trained on: task by task, each task's samples ``epochs_per_task`` times
    in fresh random orders. With ``blur`` :math:`b > 0` each position :math:`j` is jittered by
    :math:`b L\,(2u - 1)` (:math:`L` the mean task length, :math:`u \sim U(0, 1)`) before sorting, so near
    each boundary the two tasks mix with a linear ramp over :math:`2bL` samples (fuzzy boundaries)."""
    per_task = []
    for k in range(int(tasks.max()) + 1):
        members = (tasks == k).nonzero().flatten()
        per_task += [members[torch.randperm(len(members), generator=generator)] for _ in range(epochs_per_task)]
    stream = torch.cat(per_task)
    if blur > 0:
        length = len(stream) / (int(tasks.max()) + 1)
        jitter = blur * length * (2 * torch.rand(len(stream), generator=generator, dtype=torch.float64) - 1)
        stream = stream[(torch.arange(len(stream)) + jitter).argsort()]
    return stream


class ContinualDataModule(pl.LightningDataModule):
    """A task sequence over a labelled data module, trained in a single ``fit`` (one epoch = the whole stream).

    Scenarios (van de Ven et al.'s three): ``"class"``-incremental (task :math:`k` holds a group of classes,
    labels unchanged, e.g. Split-Digits 5x2), ``"task"``-incremental (the same split; batches carry ``task``
    so a multi-head model or :class:`~lit_tricks.ContinualEvaluation` can restrict predictions to the task's
    classes, see :meth:`task_classes`), and ``"domain"``-incremental (the same split with labels taken within
    the group, ``y mod C/T``, so every task shares one output space). Boundaries are sharp, or fuzzy with
    ``blur``. ``"si_blurry"`` is the online class-incremental Si-Blurry stream (Moon et al., ICCV 2023;
    :func:`~lit_tricks.data.si_blurry.si_blurry_split`): random disjoint and blurry class groups per task, tasks
    of random size, ``blurry_percent`` % of blurry-class samples leaking across tasks, one pass; ``task`` is then
    the stream's task of each training sample (each evaluation sample's: its class's home task), and
    :attr:`si_blurry` holds the split. Every batch carries ``task`` (``[N]``, per sample); :meth:`task_eval_sets`
    gives each task's evaluation set for :class:`~lit_tricks.ContinualEvaluation`. Under DDP rank r of W trains on
    stream positions r, r + W, r + 2W, ..., so the task order holds; mid-epoch checkpoints resume exactly.

    Args:
        dataset: the labelled data module to split (e.g. ``DigitsDataModule(val_fraction=0)``).
        scenario: ``"class"``, ``"task"``, ``"domain"`` or ``"si_blurry"``.
        num_tasks: number of tasks; must divide the number of classes (except under ``"si_blurry"``).
        epochs_per_task: passes over each task's training samples before the next task starts (1 under
            ``"si_blurry"``, which is online).
        blur: 0 for sharp boundaries; ``b > 0`` mixes neighbouring tasks over ``2b`` of a task's length.
        class_order: the classes in task order (default ``0, 1, ...``).
        batch_size: training batch size (``None``: the wrapped data module's).
        seed: seed of the stream order (and of the Si-Blurry split: the authors' ``rnd_seed``).
        disjoint_percent: Si-Blurry's :math:`N`, percent of classes that are disjoint (the authors' 50).
        blurry_percent: Si-Blurry's :math:`M`, percent of blurry-class samples that leak across tasks (their 10).

    Example::

        >>> from lit_tricks.data import DigitsDataModule
        >>> stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
        >>> stream.setup()
        >>> [sorted(set(s.targets.tolist())) for s in stream.task_eval_sets()][:2]
        [[0, 1], [2, 3]]
    """

    def __init__(
        self,
        dataset: ArrayDataModule,
        scenario: Scenario = "class",
        num_tasks: int = 5,
        epochs_per_task: int = 1,
        blur: float = 0.0,
        class_order: list[int] | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        disjoint_percent: int = 50,
        blurry_percent: int = 10,
    ) -> None:
        super().__init__()
        if scenario not in ("class", "task", "domain", "si_blurry"):
            raise ValueError(f"scenario must be 'class', 'task', 'domain' or 'si_blurry', got {scenario!r}.")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1, got {epochs_per_task}.")
        if not 0.0 <= blur <= 1.0:
            raise ValueError(f"blur must be in [0, 1] (0: sharp boundaries), got {blur}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        check_number("disjoint_percent", disjoint_percent, at_least=0, at_most=100, integer=True)
        check_number("blurry_percent", blurry_percent, at_least=0, at_most=100, integer=True)
        if scenario == "si_blurry":
            self.task_of_class = self._si_blurry_homes(dataset.num_classes, num_tasks, epochs_per_task, blur,
                                                       class_order, disjoint_percent, seed)  # fmt: skip
        else:
            self.task_of_class = split_classes(dataset.num_classes, num_tasks, class_order)
        self.disjoint_percent, self.blurry_percent = disjoint_percent, blurry_percent
        self.si_blurry: SiBlurrySplit | None = None
        self.dataset, self.scenario, self.num_tasks = dataset, scenario, num_tasks
        self.epochs_per_task, self.blur, self.seed = epochs_per_task, blur, seed
        self.batch_size = batch_size or dataset.batch_size
        group = dataset.num_classes // num_tasks
        self.num_classes = group if scenario == "domain" else dataset.num_classes
        self.train_set: ArrayDataset | None = None

    @staticmethod
    def _si_blurry_homes(num_classes: int, num_tasks: int, epochs_per_task: int, blur: float,
                         class_order: list[int] | None, disjoint_percent: int, seed: int) -> Tensor:  # fmt: skip
        """``[C]`` the home task of each class in the Si-Blurry split (the classes' part of it, drawn again)."""
        check_number("num_tasks", num_tasks, at_least=1, at_most=num_classes, integer=True)
        if epochs_per_task != 1 or blur != 0 or class_order is not None:
            raise ValueError(
                "scenario='si_blurry' is online with its own random class split and task boundaries: leave "
                f"epochs_per_task=1, blur=0 and class_order=None (got {epochs_per_task}, {blur}, {class_order})."
            )
        generator = torch.Generator().manual_seed(seed)
        disjoint, blurry = si_blurry_classes(num_classes, num_tasks, disjoint_percent, generator)
        homes = torch.empty(num_classes, dtype=torch.long)
        for k in range(num_tasks):
            homes[disjoint[k] + blurry[k]] = k
        return homes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.dataset.setup(stage)
        train = self.dataset.train_set
        if self.scenario == "si_blurry":
            self.si_blurry = si_blurry_split(train.targets, self.dataset.num_classes, self.num_tasks,
                                             self.disjoint_percent, self.blurry_percent, self.seed)  # fmt: skip
            self.train_set = self._with_tasks(train, self.si_blurry.stream, self.si_blurry.stream_task)
        else:
            tasks = self.task_of_class[train.targets]
            stream = task_stream(tasks, self.epochs_per_task, self.blur, torch.Generator().manual_seed(self.seed))
            self.train_set = self._with_tasks(train, stream)
        self.val_set = None if self.dataset.val_set is None else self._with_tasks(self.dataset.val_set)
        self.test_set = self._with_tasks(self.dataset.test_set)

    def _with_tasks(self, data: ArrayDataset, rows: Tensor | None = None, tasks: Tensor | None = None) -> ArrayDataset:
        """``data`` (at ``rows``) with a ``task`` per sample (``tasks``, else its class's) and the scenario's labels."""
        data = data if rows is None else data.subset(rows)
        tasks = self.task_of_class[data.targets] if tasks is None else tasks
        targets = self._labels(data.targets)
        extras = {name: self._labels(t) if name == "clean_targets" else t for name, t in data.extras.items()}
        return ArrayDataset(data.inputs, targets, task=tasks, **extras)

    def _labels(self, targets: Tensor) -> Tensor:
        if self.scenario != "domain":
            return targets
        group = self.dataset.num_classes // self.num_tasks
        position = torch.empty_like(self.task_of_class)  # rank of each class within its task's group
        for k in range(self.num_tasks):
            members = (self.task_of_class == k).nonzero().flatten()
            position[members] = torch.arange(group)
        return position[targets]

    def task_classes(self) -> list[list[int]]:
        """The labels each task's samples carry (for masking the output space in task-incremental learning)."""
        labels = self._labels(torch.arange(self.dataset.num_classes))
        return [sorted(set(labels[self.task_of_class == k].tolist())) for k in range(self.num_tasks)]

    def task_eval_sets(self, split: Literal["test", "val"] = "test") -> list[ArrayDataset]:
        """One evaluation set per task, from the test split (as in the stability-gap paper) or validation."""
        data = self.test_set if split == "test" else self.val_set
        if data is None:
            raise ValueError(f"The data module has no {split} split (val_fraction=0?).")
        tasks = data.extras["task"]
        return [data.subset((tasks == k).nonzero().flatten()) for k in range(self.num_tasks)]

    def train_dataloader(self) -> DataLoader:
        # Already in training order: no shuffling. An unshuffled DistributedSampler (one replica without DDP) keeps
        # the order under DDP too (rank r takes stream positions r, r + W, ...), where Lightning would otherwise
        # replace a sequential sampler by a shuffling one; its epoch lets the loader resume mid-epoch.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=False)
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, self.dataset.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.dataset.eval_batch_size)

    def _loader(self, data: ArrayDataset, batch_size: int) -> DataLoader:
        # a private generator: a loader's base seed must not be drawn from (and advance) the global RNG
        return DataLoader(data, batch_size=batch_size, generator=torch.Generator().manual_seed(self.seed))
