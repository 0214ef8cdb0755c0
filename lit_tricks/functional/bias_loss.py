r"""Bias loss (Abrahamyan et al., "Bias Loss for Mobile Neural Networks", ICCV 2021).

Samples whose features have a low variance carry little information the network can use, so their
cross-entropy is down-weighted: :math:`\mathcal L = \frac1N \sum_i w_i\,\mathrm{CE}_i` with
:math:`w_i = \exp(\alpha \hat v_i) - \beta` and :math:`\hat v_i` the sample's normalised feature variance.
"""

from __future__ import annotations

import torch
from torch import Tensor


def feature_variance(features: Tensor) -> Tensor:
    """Per-sample variance ``[N]`` of the flattened features (unbiased, as ``torch.var``), without gradient."""
    return features.detach().float().reshape(features.shape[0], -1).var(dim=1)


def normalise_variance(variance: Tensor, low: Tensor, batch_min: Tensor, batch_max: Tensor) -> Tensor:
    r""":math:`\hat v_i = (v_i - m) / (\max_j v_j - \min_j v_j)` with :math:`m` = ``low`` (the running minimum in
    the authors' ``'global'`` mode, the batch minimum in ``'local'`` mode) and the batch's range below it. A batch
    whose variances are all equal (range 0, e.g. one sample) gives :math:`\hat v = 0` (ours; the authors divide by
    zero)."""
    span = batch_max - batch_min
    return torch.where(span > 0, (variance - low) / torch.where(span > 0, span, 1.0), 0.0)


def bias_weights(normalised: Tensor, alpha: float = 0.3, beta: float = 0.3) -> Tensor:
    r"""The per-sample weights :math:`w_i = \exp(\alpha \hat v_i) - \beta`."""
    return torch.exp(alpha * normalised) - beta
