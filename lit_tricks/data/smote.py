"""SMOTE (Chawla et al., 2002) through imbalanced-learn: synthetic minority samples on inputs or frozen features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_tricks.core.checks import check_number

SMOTE_OPTIONS = ("k_neighbors", "sampling_strategy")


def check_smote_options(options: Mapping[str, Any]) -> None:
    """Raise a clear ``TypeError``/``ValueError`` for SMOTE options other than ``k_neighbors`` (an integer >= 1)
    and ``sampling_strategy`` (imbalanced-learn's: ``"auto"``, ``"minority"``, ``"not minority"``,
    ``"not majority"``, ``"all"``, or a dict ``{class: target count}``)."""
    unknown = sorted(set(options) - set(SMOTE_OPTIONS))
    if unknown:
        raise ValueError(f"smote options must be among {list(SMOTE_OPTIONS)}, got {unknown}.")
    if "k_neighbors" in options:
        check_number("smote k_neighbors", options["k_neighbors"], at_least=1, integer=True)
    strategy = options.get("sampling_strategy", "auto")
    if not isinstance(strategy, (str, Mapping)):
        raise TypeError(
            f"smote sampling_strategy must be a string such as 'auto' or a dict {{class: count}}, got {strategy!r}."
        )


def smote_features(
    features: Tensor,
    labels: Tensor,
    k_neighbors: int = 5,
    sampling_strategy: str | Mapping[int, int] = "auto",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""Over-sample the minority classes with SMOTE; return ``(features, labels)`` with the new samples appended.

    Each synthetic sample of class :math:`c` lies on the segment between a sample :math:`x_i` of class :math:`c`
    and one of its ``k_neighbors`` nearest neighbours :math:`x_{nn}` in class :math:`c` (Euclidean distance):

    .. math:: x_{new} = x_i + \lambda\,(x_{nn} - x_i), \qquad \lambda \sim U[0, 1).

    ``sampling_strategy="auto"`` raises every class but the largest to the largest's count. The work is done by
    ``imblearn.over_sampling.SMOTE`` (imbalanced-learn, ``pip install lit_tricks[imbalance]``), seeded with
    ``seed``. Inputs of any shape ``[N, ...]`` are flattened to ``[N, D]`` and the new samples reshaped back, so
    the function serves raw inputs and the features of a frozen extractor alike. The first ``N`` rows returned
    are ``features`` and ``labels`` themselves, unchanged; the synthetic ones follow, grouped by class.

    Example::

        >>> import pytest; imblearn = pytest.importorskip("imblearn")  # the [imbalance] extra
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> x_new, y_new = smote_features(x, y, k_neighbors=1)
        >>> y_new.bincount().tolist(), bool(((x_new[6:] >= 10) & (x_new[6:] <= 11)).all())
        ([4, 4], True)
    """
    check_smote_options({"k_neighbors": k_neighbors, "sampling_strategy": sampling_strategy})
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or len(labels) != len(features):
        raise ValueError(
            f"labels must be class ids [N] with N = len(features) = {len(features)}, got shape {tuple(labels.shape)}."
        )
    if not features.dtype.is_floating_point:
        raise TypeError(f"SMOTE interpolates between samples: features must be floating point, got {features.dtype}.")
    if len(labels.unique()) < 2:
        raise ValueError("SMOTE needs at least 2 classes in labels.")
    over_sampling, check_sampling_strategy = _imblearn()
    flat, y = features.detach().reshape(len(features), -1).cpu().numpy(), labels.cpu().numpy()
    try:
        to_add = check_sampling_strategy(_plain(sampling_strategy), y, "over-sampling")
    except ValueError as error:
        raise ValueError(f"smote sampling_strategy: {error}") from error
    counts = {int(c): int((y == c).sum()) for c, n in to_add.items() if n > 0}
    if counts and min(counts.values()) <= k_neighbors:
        worst = min(counts, key=counts.get)
        fix = f"pass k_neighbors <= {counts[worst] - 1}" if counts[worst] > 1 else "leave that class out"
        raise ValueError(
            f"SMOTE with k_neighbors={k_neighbors} needs more than {k_neighbors} samples in each class it "
            f"over-samples, but class {worst} has {counts[worst]}: {fix} (smote={{'k_neighbors': ...}})."
        )
    smote = over_sampling.SMOTE(sampling_strategy=_plain(sampling_strategy), k_neighbors=k_neighbors, random_state=seed)
    new_x, new_y = smote.fit_resample(flat, y)
    new_x = torch.as_tensor(np.asarray(new_x)[len(flat) :], dtype=features.dtype).reshape(-1, *features.shape[1:])
    new_y = torch.as_tensor(np.asarray(new_y)[len(flat) :], dtype=labels.dtype)
    return torch.cat([features, new_x.to(features.device)]), torch.cat([labels, new_y.to(labels.device)])


def _plain(strategy: str | Mapping[int, int]) -> str | dict[int, int]:
    return strategy if isinstance(strategy, str) else {int(c): int(n) for c, n in strategy.items()}


def _imblearn() -> tuple[Any, Any]:
    """imbalanced-learn's ``over_sampling`` module and ``check_sampling_strategy``, or a clear ImportError."""
    try:
        from imblearn import over_sampling
        from imblearn.utils import check_sampling_strategy
    except ImportError:
        raise ImportError(
            "SMOTE needs imbalanced-learn, an optional extra: pip install lit_tricks[imbalance] "
            "(or pip install imbalanced-learn)."
        ) from None
    return over_sampling, check_sampling_strategy
