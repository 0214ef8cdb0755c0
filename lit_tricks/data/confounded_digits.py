"""A small domain-shift benchmark for knowledge-prior bottlenecks (KnoBo): scikit-learn digits, a binary task
("round" digits 0, 3, 6, 8 against "angular" 1, 4, 7), and a spurious marker (a bright left edge, like a
hospital's scanner tag) that goes with the round class in training and flips at test time.

A separate *corpus* split (every digit, marker independent of everything) carries class-level concept labels
from a table of six stroke concepts, the stand-in for the reports a language model annotates; the knowledge
prior is read off the same table (+1 every digit of the class shows the concept, -1 none does, 0 mixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import Tensor

CONCEPTS = ("closed loop", "vertical stroke", "horizontal top bar", "curved bottom", "diagonal stroke", "crossing")
# per digit 0-9: which of the six concepts it shows
_TABLE = torch.tensor(
    [
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 1],
        [0, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 1, 0],
        [1, 0, 0, 1, 0, 1],
        [1, 1, 0, 0, 0, 0],
    ]
)
CLASS_DIGITS = ((0, 3, 6, 8), (1, 4, 7))
_MARKER = [0, 8, 16, 24, 32, 40, 48, 56]  # the left pixel column, blank in almost every digit


@dataclass
class ConfoundedDigits:
    """Features are the 64 pixels scaled to [0, 1]; ``*_y`` are task labels (0 round, 1 angular)."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor  # the training distribution (in-domain)
    val_y: Tensor
    test_x: Tensor  # the marker flipped (out-of-domain)
    test_y: Tensor
    corpus_x: Tensor
    corpus_concepts: Tensor  # [N, K] 0/1 concept labels of the corpus images
    prior: Tensor  # [2, K] in {-1, 0, 1}
    concept_names: tuple[str, ...] = CONCEPTS


def _mark(x: Tensor, on: Tensor) -> Tensor:
    x = x.clone()
    x[on.nonzero().flatten()[:, None], torch.tensor(_MARKER)] = 1.0
    return x


def confounded_digits(seed: int = 0, correlation: float = 0.95, train_fraction: float = 0.5) -> ConfoundedDigits:
    """Split digits (seeded) into a corpus half and a task half; in the task half, the round class carries the
    marker with probability ``correlation`` and the angular one with ``1 - correlation`` in train and validation,
    the reverse in test.

    Example::

        >>> data = confounded_digits(0)
        >>> data.prior.tolist()
        [[0.0, -1.0, -1.0, 1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, -1.0, 0.0, 0.0]]
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}.")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    images, digits = load_digits(return_X_y=True)
    x, digits = torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(digits)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    corpus, task = order[: len(x) // 2], order[len(x) // 2 :]
    corpus_x = _mark(x[corpus], torch.rand(len(corpus), generator=g) < 0.5)
    label = torch.full_like(digits, -1)
    for y, members in enumerate(CLASS_DIGITS):
        label[torch.isin(digits, torch.tensor(members))] = y
    task = task[label[task] >= 0]
    task = task[torch.randperm(len(task), generator=g)]
    n_train = int(train_fraction * len(task))
    n_val = (len(task) - n_train) // 2
    parts = {"train": task[:n_train], "val": task[n_train : n_train + n_val], "test": task[n_train + n_val :]}
    out = {}
    for name, idx in parts.items():
        y = label[idx]
        p_marker = torch.where(y == 0, correlation, 1 - correlation)
        if name == "test":
            p_marker = 1 - p_marker
        out[f"{name}_x"] = _mark(x[idx], torch.rand(len(idx), generator=g) < p_marker)
        out[f"{name}_y"] = y
    shows = torch.stack([_TABLE[list(members)].float().mean(0) for members in CLASS_DIGITS])
    prior = torch.where(shows == 1, 1.0, torch.where(shows == 0, -1.0, 0.0))
    return ConfoundedDigits(**out, corpus_x=corpus_x, corpus_concepts=_TABLE[digits[corpus]], prior=prior)
