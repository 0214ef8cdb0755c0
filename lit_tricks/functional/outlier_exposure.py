"""Outlier Exposure and Mixture Outlier Exposure: the loss towards the uniform distribution, MixOE's mixed inputs and
soft targets, and the out-of-distribution scores the OOD metrics rank by."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lit_tricks.functional.losses import to_probabilities
from lit_tricks.functional.mixing import cutmix_box

MixOp = Literal["mixup", "cutmix"]
Score = Literal["msp", "max_logit", "energy"]


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    r"""Outlier Exposure's loss (Hendrycks et al., ICLR 2019), per sample: the cross-entropy from the softmax to the
    uniform distribution over the :math:`C` classes,

    .. math:: \ell_{OE}(z) = -\frac{1}{C}\sum_c \log \mathrm{softmax}(z)_c = \operatorname{logsumexp}(z) - \bar z,

    as the authors' code writes it (``-(x.mean(1) - torch.logsumexp(x, dim=1))``). Its minimum, :math:`\log C`, is
    reached by equal logits.

    Example::

        >>> uniform_cross_entropy(torch.zeros(1, 4))  # log 4
        tensor([1.3863])
    """
    return torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1)


def mixoe_targets(targets: Tensor, lam: float | Tensor, num_classes: int) -> Tensor:
    r"""MixOE's soft targets (Zhang et al., WACV 2023): :math:`\lambda\, y + (1 - \lambda)\, u` with
    :math:`u = \mathbf 1 / C`, for a mixture of an in-distribution sample with label :math:`y` (class ids ``[N]`` or
    probabilities ``[N, C]``) and an outlier; :math:`\lambda` is a float or a ``[N]`` tensor. Float32.

    Example::

        >>> mixoe_targets(torch.tensor([0]), 0.7, 2)  # 0.7 * [1, 0] + 0.3 * [0.5, 0.5]
        tensor([[0.8500, 0.1500]])
    """
    probs = to_probabilities(targets, num_classes)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=probs.device).reshape(-1, 1)
    return probs * lam + (1.0 - lam) / num_classes


def mixoe_inputs(
    inputs: Tensor, outliers: Tensor, lam: float, op: MixOp, rng: np.random.Generator | None = None
) -> tuple[Tensor, float]:
    r"""MixOE's mixed inputs (a new tensor) and the :math:`\lambda` their targets use: sample :math:`i` of the
    in-distribution batch with outlier :math:`i`, one :math:`\lambda` for the batch, as the authors' code does.

    * ``"mixup"``: :math:`\tilde x = \lambda x + (1 - \lambda) x_{out}`; :math:`\lambda` is returned unchanged.
    * ``"cutmix"``: a box of the outlier (images ``[N, C, H, W]``; a segment of signals ``[N, L]`` / ``[N, C, L]``)
      is pasted into the in-distribution sample, the authors' choice ("pasting outlier patch into ID data performs
      better"); the box is ``rand_bbox`` of their code (:func:`~lit_tricks.functional.mixing.cutmix_box`, centres from
      ``rng``) and :math:`\lambda` is corrected to the kept fraction :math:`1 - \text{area}/\text{total}`.

    Example::

        >>> x, out = torch.ones(2, 3), torch.zeros(2, 3)
        >>> mixoe_inputs(x, out, 0.25, "mixup")
        (tensor([[0.2500, 0.2500, 0.2500],
                [0.2500, 0.2500, 0.2500]]), 0.25)
    """
    if outliers.shape != inputs.shape:
        raise ValueError(
            f"MixOE mixes sample i with outlier i, so outliers must have the inputs' shape {tuple(inputs.shape)}, got "
            f"{tuple(outliers.shape)}: make the outlier source return samples shaped like the training inputs."
        )
    outliers = outliers.to(device=inputs.device, dtype=inputs.dtype)
    if op == "mixup":
        return torch.lerp(inputs, outliers, 1.0 - lam), lam
    if op != "cutmix":
        raise ValueError(f"op must be 'mixup' or 'cutmix', got {op!r}.")
    if rng is None:
        raise ValueError("cutmix draws the box's centre: pass rng, a numpy Generator.")
    spatial = tuple(inputs.shape[2:] if inputs.ndim == 4 else inputs.shape[-1:])
    box, corrected = cutmix_box(spatial, lam, rng)
    mixed = inputs.clone()
    mixed[(..., *box)] = outliers[(..., *box)]
    return mixed, corrected


def ood_score(logits: Tensor, score: Score = "msp") -> Tensor:
    r"""An in-distribution score per sample (higher: more in-distribution), from logits ``[N, C]``:

    * ``"msp"``: the maximum softmax probability (Hendrycks & Gimpel, 2017), the OE and MixOE papers' score;
    * ``"max_logit"``: the largest logit;
    * ``"energy"``: the negative free energy :math:`\operatorname{logsumexp}(z)` (Liu et al., 2020; temperature 1).

    Example::

        >>> ood_score(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        tensor([0.5000, 1.0000])
    """
    logits = logits.float()
    if score == "msp":
        return logits.softmax(dim=-1).amax(dim=-1)
    if score == "max_logit":
        return logits.amax(dim=-1)
    if score == "energy":
        return torch.logsumexp(logits, dim=-1)
    raise ValueError(f"score must be 'msp', 'max_logit' or 'energy', got {score!r}.")
