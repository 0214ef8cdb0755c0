"""Datasets whose items are dicts carrying their own dataset index."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """In-memory tensors as a dataset of dicts ``{"inputs", "targets", "index", **extras}``.

    Args:
        inputs: ``[N, ...]``.
        targets: ``[N]`` class ids (or ``[N, C]`` probabilities).
        extras: more per-sample tensors ``[N, ...]`` (e.g. ``clean_targets``), each becoming a batch key.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, **extras: Tensor) -> None:
        for name, tensor in {"targets": targets, **extras}.items():
            if len(tensor) != len(inputs):
                raise ValueError(f"{name} has {len(tensor)} rows but inputs have {len(inputs)}.")
        self.inputs, self.targets, self.extras = inputs, targets, extras

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, rows: Tensor) -> ArrayDataset:
        """A new data set of the samples at ``rows``; its indices count from 0 again."""
        extras = {name: tensor[rows] for name, tensor in self.extras.items()}
        return ArrayDataset(self.inputs[rows], self.targets[rows], **extras)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"inputs": self.inputs[i], "targets": self.targets[i], "index": i}
        item.update({name: tensor[i] for name, tensor in self.extras.items()})
        return item


class IndexedDataset(Dataset):
    """Wrap any map-style dataset so that each item also carries its index (``batch["index"]``).

    Items of the wrapped dataset may be ``(inputs, targets)`` tuples or dicts with ``inputs`` and
    ``targets``; the result is always a dict ``{"inputs", "targets", "index", ...}``, the form every
    :class:`~lit_tricks.TrickModule` reads. Tricks with per-sample memories (PS-KD, ELR, data-diet scores)
    need it.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> ds[1]["index"], int(ds[1]["targets"])
        (1, 1)
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset (with __getitem__ and __len__).")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            item = dict(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            item = {"inputs": item[0], "targets": item[1]}
        else:
            raise TypeError(
                f"IndexedDataset expects items that are (inputs, targets) or dicts, got {type(item).__name__}."
            )
        if "inputs" not in item or "targets" not in item:
            raise ValueError(f"dict items need 'inputs' and 'targets', got keys {sorted(item)}.")
        item["index"] = i
        return item


def dataset_targets(dataset: Dataset) -> Tensor:
    """All class ids of a dataset ``[N]``: its ``targets`` attribute if it has one, else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [item["targets"] if isinstance(item, Mapping) else item[1] for item in dataset]
    return torch.as_tensor(targets).long()


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """All ``(inputs, targets)`` of a data set: its tensors if it has them (an ArrayDataset), else its items
    (dicts with ``inputs``/``targets`` or ``(inputs, targets)`` pairs) read and stacked."""
    if hasattr(dataset, "inputs") and hasattr(dataset, "targets"):
        return dataset.inputs, dataset.targets
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    return (batch["inputs"], batch["targets"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
