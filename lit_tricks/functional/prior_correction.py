r"""Thresholding by class priors (Buda, Maki & Mazurowski, Neural Networks 2018): correct a network trained on
imbalanced data for its training class frequencies at test time.

A network trained with cross-entropy estimates the posterior :math:`y_i(x) = p(i \mid x) = p(i)\,p(x \mid i) / p(x)`,
so its decisions lean towards the frequent classes. Dividing each output by its class prior, estimated from the
training set as :math:`p(i) = |i| / \sum_k |k|` (:math:`|i|` the number of unique training examples of class
:math:`i`), leaves :math:`p(x \mid i) / p(x)`: the decision the network would make under equal priors,

.. math:: \hat y(x) = \arg\max_i \; y_i(x) / p(i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def class_priors(class_counts: Sequence[int] | Tensor) -> Tensor:
    r"""The training class frequencies :math:`p(i) = |i| / \sum_k |k|` as a float tensor ``[C]``.

    Example::

        >>> class_priors([100, 400, 500])
        tensor([0.1000, 0.4000, 0.5000])
    """
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 1 or len(counts) < 2 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"class_counts must be integer counts [C] of at least 2 classes, got {class_counts!r}.")
    if int(counts.min()) < 1:
        raise ValueError(
            f"every class needs at least one training sample for its prior (dividing by a zero prior), got "
            f"{counts.tolist()}."
        )
    return counts.double().div(counts.sum()).float()


def prior_correction(probs: Tensor, priors: Tensor, normalize: bool = True) -> Tensor:
    r"""Divide class probabilities ``[..., C]`` by the class priors ``[C]``: :math:`y_i / p(i)`.

    With ``normalize`` (the default) each row is rescaled to sum to 1, which keeps the argmax (the paper's
    decision) and gives probabilities for NLL and calibration: :math:`\mathrm{softmax}(z - \log p)` for logits
    :math:`z`. The authors' example: counts ``[100, 400, 500]`` and outputs ``[0.2, 0.2, 0.6]`` give
    ``[2.0, 0.5, 1.2]`` unnormalised, and the decision moves from class 2 to class 0.

    Example::

        >>> y = torch.tensor([0.2, 0.2, 0.6])
        >>> prior_correction(y, class_priors([100, 400, 500]), normalize=False)
        tensor([2.0000, 0.5000, 1.2000])
    """
    priors = torch.as_tensor(priors, dtype=probs.dtype, device=probs.device)
    if priors.ndim != 1 or priors.shape[0] != probs.shape[-1]:
        raise ValueError(f"priors must be [C] with C = {probs.shape[-1]} (the last dim of probs), got {priors.shape}.")
    corrected = probs / priors
    return corrected / corrected.sum(dim=-1, keepdim=True) if normalize else corrected
