"""A few labelled target samples per class: the seeded draw and a data module for few-shot fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_tricks.core.checks import check_number
from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.corruptions import CORRUPTIONS, corrupt, corrupt_signals
from lit_tricks.data.indexed import ArrayDataset


def few_shot_indices(targets: Tensor, shots: int, seed: int = 0, holdout: int = 1) -> tuple[Tensor, Tensor]:
    """Draw ``shots`` samples of every class for training and ``holdout`` more for validation, seeded.

    As the few-shot SFDA code (``daintlab/fewshot-SFDA``, ``dataset.py: few_shot_subset``): per class a random
    permutation of its samples, the first ``shots`` train and the last ``holdout`` validate (model selection by
    the lowest validation loss). A class with fewer than ``shots + holdout`` samples is an error.

    Example::

        >>> import torch
        >>> train, val = few_shot_indices(torch.tensor([0, 0, 0, 1, 1, 1, 1]), shots=2, seed=0)
        >>> train.tolist(), val.tolist()
        ([2, 0, 4, 3], [1, 5])

    Returns:
        ``(train_indices, val_indices)`` into ``targets``, class by class.
    """
    check_number("shots", shots, at_least=1, integer=True)
    check_number("holdout", holdout, at_least=0, integer=True, hint="0: no validation samples.")
    if targets.ndim != 1 or targets.is_floating_point():
        raise ValueError(f"targets must be class ids [N], got shape {tuple(targets.shape)} of {targets.dtype}.")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in targets.unique().tolist():
        rows = (targets == c).nonzero().flatten()
        if len(rows) < shots + holdout:
            raise ValueError(
                f"class {c} has {len(rows)} samples, fewer than shots + holdout = {shots + holdout}: "
                "lower shots (or holdout)."
            )
        rows = rows[torch.randperm(len(rows), generator=generator)]
        train.append(rows[:shots])
        val.append(rows[len(rows) - holdout :])
    return torch.cat(train), torch.cat(val)


class FewShotDataModule(ArrayDataModule):
    """``shots`` labelled samples per class of a target domain, for few-shot fine-tuning
    (:class:`~lit_tricks.modules.tta.FewShotFineTune`).

    The samples come from ``dataset``'s training split (disjoint from the test split that a
    :class:`~lit_tricks.data.CorruptionStreamDataModule` streams), under each of ``corruptions`` at ``severity``
    (the target domains; ``None``: the clean split is the target): :func:`few_shot_indices` per domain, seeded
    by ``seed + domain``. The paper samples batches of 32 with replacement from the few-shot set; here the set is
    repeated to fill ``steps_per_epoch`` batches and shuffled each epoch (seeded, resumable), so an epoch is
    about ``steps_per_epoch`` steps and validation (on the ``holdout`` samples per class) runs every epoch, as
    the code's ``--val_freq 100``. Testing uses ``dataset``'s test split under the same corruptions.

    Args:
        dataset: the labelled data module (images in [0, 1] for image corruptions).
        shots: labelled samples per class and domain (the paper: 1 or 3).
        holdout: validation samples per class and domain (the paper: 1).
        corruptions: target domains, names from :data:`~lit_tricks.data.CORRUPTIONS`, or ``None``.
        severity: 1-5.
        steps_per_epoch: batches per epoch.
        batch_size, seed, eval_batch_size: as :class:`~lit_tricks.data.ArrayDataModule` (the paper: batch 32).
    """

    def __init__(
        self, dataset: ArrayDataModule, shots: int = 3, holdout: int = 1, corruptions: Sequence[str] | None = None,
        severity: int = 5, steps_per_epoch: int = 100, batch_size: int = 32, seed: int = 0, eval_batch_size: int = 512,
    ) -> None:  # fmt: skip
        super().__init__(batch_size=batch_size, val_fraction=0.0, seed=seed, eval_batch_size=eval_batch_size)
        check_number("shots", shots, at_least=1, integer=True)
        check_number("holdout", holdout, at_least=0, integer=True, hint="0: no validation samples.")
        check_number("steps_per_epoch", steps_per_epoch, at_least=1, integer=True)
        check_number("severity", severity, at_least=1, at_most=5, integer=True)
        corruptions = list(corruptions) if corruptions is not None else []
        unknown = [name for name in corruptions if name not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"corruptions {unknown} are unknown; choose from {', '.join(CORRUPTIONS)} (or None).")
        self.dataset, self.shots, self.holdout, self.corruptions = dataset, shots, holdout, corruptions
        self.severity, self.steps_per_epoch = severity, steps_per_epoch
        self.num_classes = getattr(dataset, "num_classes", None)

    @property
    def domain_names(self) -> list[str]:
        return [f"{name}_{self.severity}" for name in self.corruptions] or ["clean"]

    def _domains(self, split: ArrayDataset, low: float, high: float) -> list[tuple[Tensor, Tensor]]:
        if not self.corruptions:
            return [(split.inputs, split.targets)]
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for name in self.corruptions:
            if split.inputs.ndim == 4:
                x = corrupt(split.inputs, name, self.severity, generator)
            else:
                x = corrupt_signals(split.inputs, name, self.severity, low, high, generator)
            out.append((x, split.targets))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.dataset.setup("fit")
        source_train, source_test = self.dataset.train_set, self.dataset.test_set
        targets = source_train.extras.get("clean_targets", source_train.targets)
        source_train = ArrayDataset(source_train.inputs, targets)
        low, high = float(source_train.inputs.min()), float(source_train.inputs.max())
        train, val = [], []
        for d, (x, y) in enumerate(self._domains(source_train, low, high)):
            train_idx, val_idx = few_shot_indices(y, self.shots, self.seed + d, self.holdout)
            train.append((x[train_idx], y[train_idx]))
            val.append((x[val_idx], y[val_idx]))
        x, y = (torch.cat(parts) for parts in zip(*train, strict=True))
        copies = math.ceil(self.steps_per_epoch * self.batch_size / len(y))
        self.train_set = ArrayDataset(x.repeat(copies, *[1] * (x.ndim - 1)), y.repeat(copies))
        self.few_shot_set = ArrayDataset(x, y)
        if self.holdout:
            self.val_set = ArrayDataset(*(torch.cat(parts) for parts in zip(*val, strict=True)))
        tests = self._domains(source_test, low, high)
        self.test_set = ArrayDataset(
            torch.cat([x for x, _ in tests]),
            torch.cat([y for _, y in tests]),
            domain=torch.cat([torch.full((len(y),), d) for d, (_, y) in enumerate(tests)]),
        )
