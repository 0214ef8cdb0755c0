"""The batch and the step output as tricks see them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Keys of a dict batch that :class:`TrickBatch` maps onto its fields; every other key goes to ``extras``.
BATCH_KEYS = ("inputs", "targets", "index", "weight")


@dataclass
class TrickBatch:
    """A training batch in the form every :class:`~lit_tricks.Trick` reads and writes.

    Args:
        inputs: model inputs, batch first.
        targets: class ids ``[N]`` (integer) or class probabilities ``[N, C]`` (float).
        index: dataset indices ``[N]`` (from :class:`~lit_tricks.data.IndexedDataset` or our data modules);
            tricks with per-sample memories need it.
        weight: per-sample loss weights ``[N]``; ``None`` means all ones.
        extras: every other key of a dict batch (``clean_targets``, ``task``, ...).
    """

    inputs: Tensor
    targets: Tensor
    index: Tensor | None = None
    weight: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: Any) -> TrickBatch:
        """Build from a dict with ``inputs``/``targets`` (``index``, ``weight`` optional) or an
        ``(inputs, targets)`` / ``(inputs, targets, index)`` list or tuple."""
        if isinstance(batch, TrickBatch):
            return batch
        if isinstance(batch, Mapping):
            missing = [key for key in ("inputs", "targets") if key not in batch]
            if missing:
                raise ValueError(
                    f"A dict batch needs the keys 'inputs' and 'targets'; missing {missing} "
                    f"(found {sorted(batch)}). Rename your dataset's keys or return (inputs, targets[, index])."
                )
            extras = {key: value for key, value in batch.items() if key not in BATCH_KEYS}
            return cls(batch["inputs"], batch["targets"], batch.get("index"), batch.get("weight"), extras)
        if isinstance(batch, Sequence) and len(batch) in (2, 3):
            return cls(*batch)
        raise TypeError(
            f"Cannot read a batch of type {type(batch).__name__}: return a dict with 'inputs' and 'targets' "
            "(and 'index'), or a list/tuple (inputs, targets) or (inputs, targets, index)."
        )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def select(self, rows: Tensor) -> TrickBatch:
        """The samples at ``rows`` (indices into the batch): every per-sample field and extra is sliced."""
        n = len(self)

        def take(value: Any) -> Any:
            return value[rows] if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n else value

        extras = {key: take(value) for key, value in self.extras.items()}
        return TrickBatch(take(self.inputs), take(self.targets), take(self.index), take(self.weight), extras)

    @property
    def hard_targets(self) -> Tensor:
        """Class ids ``[N]``: the targets themselves, or the argmax of probability targets."""
        return self.targets if self.targets.ndim == 1 else self.targets.argmax(dim=-1)

    def check(self, num_classes: int) -> None:
        """Raise a clear ``ValueError`` when the targets do not fit ``num_classes``.

        Costs a host-device synchronisation, so :class:`~lit_tricks.TrickModule` calls it on the first
        batch of each stage only.
        """
        n = len(self)
        targets = self.targets
        if targets.shape[0] != n:
            raise ValueError(f"targets have {targets.shape[0]} rows but inputs have {n}.")
        if targets.ndim == 1:
            if targets.is_floating_point():
                raise ValueError(
                    "targets are a 1-D float tensor: pass class ids as an integer tensor (e.g. `y.long()`), "
                    "or class probabilities as an [N, C] float tensor."
                )
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"targets hold class ids in [{low}, {high}] but num_classes={num_classes}: "
                    f"set num_classes to at least {high + 1} or fix the labels."
                )
        elif targets.ndim == 2:
            if targets.shape[1] != num_classes:
                raise ValueError(
                    f"probability targets have {targets.shape[1]} columns but num_classes={num_classes}: "
                    "make them agree."
                )
            sums = targets.sum(dim=1)
            if bool((targets < 0).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
                raise ValueError(
                    "probability targets must be non-negative and sum to 1 over classes "
                    f"(row sums range over [{float(sums.min()):.4f}, {float(sums.max()):.4f}]); "
                    "normalise them, or pass class ids."
                )
        else:
            raise ValueError(
                f"targets must be class ids [N] or probabilities [N, C], got shape {tuple(targets.shape)}."
            )
        if self.index is not None and self.index.shape != (n,):
            raise ValueError(f"index must have shape [{n}], got {tuple(self.index.shape)}.")
        if self.weight is not None and self.weight.shape != (n,):
            raise ValueError(f"weight must have shape [{n}], got {tuple(self.weight.shape)}.")


@dataclass
class StepOutput:
    """What the forward pass and the loss produced, before reduction.

    Args:
        logits: ``[N, C]`` class scores.
        features: penultimate features ``[N, D]``, present when a trick asked for them.
        per_sample_loss: ``[N]`` loss of each sample, before weighting and reduction.
        aux_losses: named extra loss terms, each a scalar already scaled by its weight; summed into the loss.
    """

    logits: Tensor
    features: Tensor | None
    per_sample_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    _softmax: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def probabilities(self) -> Tensor:
        """``softmax(logits)`` in float32 ``[N, C]``, with gradient; computed once per step however many tricks ask
        for it (``.detach()`` it to store or compare), and again if a trick has replaced ``logits``."""
        if self._softmax is None or self._softmax[0] is not self.logits:
            self._softmax = (self.logits, self.logits.float().softmax(dim=-1))
        return self._softmax[1]
