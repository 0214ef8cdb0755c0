"""Synthetic label noise: symmetric and asymmetric (class-dependent) flips at an exact rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_tricks.data.indexed import dataset_targets

NoiseKind = Literal["symmetric", "asymmetric"]


def flip_labels(
    labels: Tensor,
    rate: float,
    num_classes: int,
    kind: NoiseKind = "symmetric",
    mapping: Sequence[int] | Mapping[int, int] | None = None,
    seed: int = 0,
) -> Tensor:
    """Return a copy of ``labels`` in which a fraction ``rate`` of the samples has a wrong label.

    - ``"symmetric"``: exactly ``round(rate * N)`` samples, drawn uniformly, each get a class drawn
      uniformly from the *other* ``C - 1`` classes.
    - ``"asymmetric"``: in each class ``c``, exactly ``round(rate * N_c)`` samples get class ``mapping[c]``
      (default ``(c + 1) % C``, a pair flip); classes that map to themselves keep their labels. Patrini et
      al.'s MNIST mapping is ``{2: 7, 3: 8, 5: 6, 6: 5, 7: 1}``.

    The draw depends only on ``seed``, never on the global RNG.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}.")
    if kind not in ("symmetric", "asymmetric"):
        raise ValueError(f"label noise kind must be 'symmetric' or 'asymmetric', got {kind!r}.")
    labels = torch.as_tensor(labels).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}.")
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    if kind == "symmetric":
        chosen = torch.randperm(len(labels), generator=generator)[: round(rate * len(labels))]
        shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
        noisy[chosen] = (labels[chosen] + shift) % num_classes
        return noisy
    if mapping is None:
        mapping = [(c + 1) % num_classes for c in range(num_classes)]
    targets = dict(mapping) if isinstance(mapping, Mapping) else dict(enumerate(mapping))
    for source, target in sorted(targets.items()):
        if not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(f"mapping {source} -> {target} leaves the classes [0, {num_classes}).")
        members = (labels == source).nonzero().squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)[: round(rate * len(members))]]
        noisy[chosen] = target
    return noisy


class LabelNoise(Dataset):
    """Wrap a labelled dataset so that a fraction ``rate`` of its labels is wrong, keeping the clean ones.

    Items become dicts ``{"inputs", "targets" (noisy), "clean_targets", ...}`` (plus ``index`` and any
    other key the wrapped dataset's dict items carry). The attributes ``targets``, ``clean_targets`` and
    ``is_noisy`` hold all labels, for analysis (e.g. which samples a reweighting method down-weights).

    Args:
        dataset: items ``(inputs, targets)`` or dicts with ``inputs`` and ``targets``.
        rate: fraction of samples whose label is flipped.
        num_classes: number of classes.
        kind: ``"symmetric"`` or ``"asymmetric"``; see :func:`flip_labels`.
        mapping: class mapping of asymmetric noise.
        seed: seed of the flips.
    """

    def __init__(
        self,
        dataset: Dataset,
        rate: float,
        num_classes: int,
        kind: NoiseKind = "symmetric",
        mapping: Sequence[int] | Mapping[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.clean_targets = dataset_targets(dataset)
        self.targets = flip_labels(self.clean_targets, rate, num_classes, kind, mapping, seed)
        self.is_noisy = self.targets != self.clean_targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        item = dict(item) if isinstance(item, Mapping) else {"inputs": item[0]}
        item["targets"] = self.targets[i]
        item["clean_targets"] = self.clean_targets[i]
        return item
