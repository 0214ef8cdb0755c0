"""A test stream of corrupted domains for test-time adaptation, with the standard protocols."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.corruptions import CORRUPTIONS, corrupt, corrupt_signals
from lit_tricks.data.indexed import ArrayDataset

Protocol = Literal["continual", "reset", "gradual", "mixed"]
GRADUAL = (1, 2, 3, 4, 5, 4, 3, 2, 1)


class CorruptionStreamDataModule(pl.LightningDataModule):
    """The test split of ``dataset`` under a sequence of corruption domains, as one test (and predict) stream.

    Protocols (as in the rivals' benchmark): ``"continual"`` every corruption at ``severity`` in sequence, no
    reset; ``"reset"`` the same with ``batch["reset"]`` true at each domain's first batch (the TTA modules reset
    there); ``"gradual"`` each corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1; ``"mixed"`` all domains'
    samples shuffled together. Batches are dicts ``{"inputs", "targets", "domain", "reset"}``; the domains'
    names are :attr:`domain_names`. ``fit`` uses the wrapped data set's clean training split (to train the source
    model). Images must lie in [0, 1] (digits: ``DigitsDataModule(as_image=True)``); 1-D signals (MNIST-1D) are
    corrupted in [0, 1] after scaling by the training split's range.

    Args:
        dataset: the labelled data module.
        corruptions: names from :data:`~lit_tricks.data.corruptions.CORRUPTIONS` (default: all).
        severity: 1-5 (the benchmark: 5).
        protocol: ``"continual"``, ``"reset"``, ``"gradual"`` or ``"mixed"``.
        batch_size: test batch size.
        seed: seed of the corruption noise and the within-domain order.
    """

    def __init__(
        self,
        dataset: ArrayDataModule,
        corruptions: Sequence[str] | None = None,
        severity: int = 5,
        protocol: Protocol = "continual",
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        corruptions = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
        unknown = [name for name in corruptions if name not in CORRUPTIONS]
        if unknown or not corruptions:
            raise ValueError(f"Unknown or no corruptions {unknown}; choose from {', '.join(CORRUPTIONS)}.")
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {severity}.")
        if protocol not in ("continual", "reset", "gradual", "mixed"):
            raise ValueError(f"protocol must be 'continual', 'reset', 'gradual' or 'mixed', got {protocol!r}.")
        self.dataset, self.corruptions, self.severity, self.protocol = dataset, corruptions, severity, protocol
        self.batch_size, self.seed = batch_size, seed
        self.stream: ArrayDataset | None = None

    @property
    def domains(self) -> list[tuple[str, int]]:
        """``(corruption, severity)`` of each domain, in stream order."""
        if self.protocol == "gradual":
            return [(name, s) for name in self.corruptions for s in GRADUAL]
        return [(name, self.severity) for name in self.corruptions]

    @property
    def domain_names(self) -> list[str]:
        return [f"{name}_{severity}" for name, severity in self.domains]

    def setup(self, stage: str | None = None) -> None:
        self.dataset.setup(stage)
        if self.stream is not None:
            return
        train, test = self.dataset.train_set, self.dataset.test_set
        low, high = float(train.inputs.min()), float(train.inputs.max())
        generator = torch.Generator().manual_seed(self.seed)
        parts, reset = [], []
        for d, (name, severity) in enumerate(self.domains):
            order = torch.randperm(len(test), generator=generator)
            x = test.inputs[order]
            if x.ndim == 4:
                x = corrupt(x, name, severity, generator)
            else:
                x = corrupt_signals(x, name, severity, low, high, generator)
            domain = torch.full((len(x),), d)
            first = torch.zeros(len(x), dtype=torch.bool)
            first[0] = self.protocol == "reset"  # the batch holding a domain's first sample resets
            parts.append((x, test.targets[order], domain))
            reset.append(first)
        inputs, targets, domain = (torch.cat(items) for items in zip(*parts, strict=True))
        reset_flags = torch.cat(reset)
        if self.protocol == "mixed":
            shuffle = torch.randperm(len(inputs), generator=generator)
            inputs, targets, domain, reset_flags = (
                inputs[shuffle],
                targets[shuffle],
                domain[shuffle],
                reset_flags[shuffle],
            )
        self.stream = ArrayDataset(inputs, targets, domain=domain, reset=reset_flags)

    def train_dataloader(self) -> DataLoader:
        return self.dataset.train_dataloader()

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.stream, batch_size=self.batch_size, generator=torch.Generator())

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
