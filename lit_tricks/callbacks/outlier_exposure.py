"""Outlier Exposure: pull the classifier towards the uniform distribution on a batch of auxiliary outliers each step."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.outlier_exposure import uniform_cross_entropy

#: Where outliers come from: a map-style dataset (items are tensors, ``(inputs, ...)`` or dicts with ``inputs``),
#: a tensor ``[M, ...]`` of outliers, or a callable ``(n, generator) -> [n, ...]`` that makes ``n`` of them.
OutlierSource = Dataset | Tensor | Callable[[int, torch.Generator], Tensor]


class OutlierBatches:
    """Draws batches of outliers from a source, seeded and resumable, every rank its own share.

    A dataset or tensor is read without replacement in a permutation drawn from ``(seed, pass)``; when a pass ends
    the next begins with a new permutation. A callable gets a private ``torch.Generator``. One draw of ``n`` per rank
    takes ``n * world_size`` outliers from the one stream all ranks follow, and rank ``r`` keeps the ``r``-th slice,
    so the ranks see different outliers and keep identical state (``pass``, ``position`` or the generator's state).
    A data set with an ``inputs`` tensor (:class:`~lit_tricks.data.indexed.ArrayDataset`,
    :class:`~lit_tricks.data.open_set.NoiseDataset`) is read by one gather; any other item by item.

    Args:
        source: an :data:`OutlierSource`.
        seed: seed of the permutations (or of the callable's generator).
    """

    def __init__(self, source: OutlierSource, seed: int = 0) -> None:
        check_number("seed", seed, at_least=0, integer=True)
        if hasattr(source, "__getitem__"):  # a dataset or a tensor
            if not hasattr(source, "__len__") or len(source) == 0:
                raise ValueError("outliers must be a non-empty map-style dataset or tensor (with __len__).")
        elif not callable(source):
            raise TypeError(
                "outliers must be a map-style Dataset, a tensor [M, ...] or a callable (n, generator) -> [n, ...] "
                f"tensor, got {type(source).__name__}."
            )
        self.source, self.seed = source, seed
        self.is_callable = not hasattr(source, "__getitem__")
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self._perm: np.ndarray | None = None

    def draw(self, n: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's ``n`` outliers (on the host) of the next ``n * world_size`` of the stream."""
        if self.is_callable:
            everything = self.source(n * world_size, self.generator)
            if not isinstance(everything, Tensor) or everything.shape[:1] != (n * world_size,):
                raise ValueError(
                    f"The outlier callable must return a tensor of {n * world_size} outliers (batch first), got "
                    f"{type(everything).__name__} {tuple(getattr(everything, 'shape', ()))}."
                )
            return everything[rank * n : (rank + 1) * n]
        rows = self._next_rows(n * world_size)[rank * n : (rank + 1) * n]
        if isinstance(self.source, Tensor):
            return self.source[torch.as_tensor(rows)]
        stored = getattr(self.source, "inputs", None)  # in-memory data sets (ours): one gather, no loop
        if isinstance(stored, Tensor) and len(stored) == len(self.source):
            return stored[torch.as_tensor(rows)]
        return torch.stack([item_inputs(self.source[int(i)]) for i in rows])

    def _next_rows(self, k: int) -> np.ndarray:
        size, taken = len(self.source), []
        while k:
            if self._perm is None:
                self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(size)
            chunk = self._perm[self.position : self.position + k]
            taken.append(chunk)
            k -= len(chunk)
            self.position += len(chunk)
            if self.position == size:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return np.concatenate(taken)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._perm = state["epoch"], state["position"], None
        self.generator.set_state(state["generator"])


def item_inputs(item: Any) -> Tensor:
    """The inputs of one data-set item: the tensor itself, the first element of a tuple, or ``item["inputs"]``."""
    if isinstance(item, Mapping):
        return torch.as_tensor(item["inputs"])
    if isinstance(item, Sequence) and not isinstance(item, str):
        return torch.as_tensor(item[0])
    return torch.as_tensor(item)


class OutlierExposure(Trick):
    r"""Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019): each step, a batch of auxiliary outliers
    goes through the network and its softmax is pulled towards the uniform distribution,

    .. math:: \mathcal L = \mathbb E_{(x, y) \sim D_{in}}\, \ell_{CE}(f(x), y)
              + \beta\, \mathbb E_{x' \sim D_{out}^{OE}}\, \big[\operatorname{logsumexp} f(x') - \overline{f(x')}\big],

    the second term the cross-entropy to the uniform distribution
    (:func:`~lit_tricks.functional.outlier_exposure.uniform_cross_entropy`), logged as ``train/oe``. The authors'
    code draws twice as many outliers as in-distribution samples (``oe_batch_size`` 256 for batches of 128) and
    weights the term by :math:`\beta = 0.5`. The outliers come from ``outliers`` through a seeded
    :class:`OutlierBatches` whose position is checkpointed; under DDP each rank gets its own share. Their forward
    pass is a second call of the module (the authors' code runs one forward of the concatenated batch: the same
    gradient unless the network has batch norm, whose statistics are then taken per part).

    Args:
        outliers: the auxiliary outliers (:data:`OutlierSource`), shaped like the training inputs.
        beta: :math:`\beta`, the weight of the outlier term.
        batch_size: outliers per step and rank; ``None`` for twice the in-distribution batch, as the authors do.
        seed: seed of the outlier order.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> noise = torch.rand(500, 64)
        >>> trainer = L.Trainer(max_steps=3, callbacks=[OutlierExposure(noise)], log_every_n_steps=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> float(trainer.callback_metrics["train/oe"]) >= 0.5 * float(torch.log(torch.tensor(10.0)))
        True
    """

    tunable = ("beta",)

    def __init__(
        self, outliers: OutlierSource, beta: float = 0.5, batch_size: int | None = None, seed: int = 0
    ) -> None:
        check_number("beta", beta, at_least=0.0, hint="The OE paper uses 0.5.")
        if batch_size is not None:
            check_number("batch_size", batch_size, at_least=1, integer=True, hint="Or None: twice the batch.")
        self.beta, self.batch_size = beta, batch_size
        self.outliers = OutlierBatches(outliers, seed)
        self._checked = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._checked = False

    def draw(self, trainer: pl.Trainer, batch: TrickBatch, n: int) -> Tensor:
        """This rank's next ``n`` outliers on the inputs' device and dtype; the first draw is checked."""
        outliers = self.outliers.draw(n, trainer.global_rank, trainer.world_size)
        if not self._checked:
            if outliers.shape[1:] != batch.inputs.shape[1:]:
                raise ValueError(
                    f"{type(self).__name__}: outliers have shape {tuple(outliers.shape[1:])} per sample but the "
                    f"training inputs {tuple(batch.inputs.shape[1:])}: give outliers shaped like the inputs."
                )
            self._checked = True
        return outliers.to(device=batch.inputs.device, dtype=batch.inputs.dtype, non_blocking=True)

    def after_loss(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch, out: StepOutput) -> StepOutput:
        outliers = self.draw(trainer, batch, self.batch_size or 2 * len(batch))
        loss = uniform_cross_entropy(module(outliers)).mean()
        out.aux_losses["oe"] = self.beta * loss
        if logging_due(trainer):
            module.log(self.tag("loss"), loss.detach(), batch_size=len(batch))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"outliers": self.outliers.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.outliers.load_state_dict(state_dict["outliers"])
