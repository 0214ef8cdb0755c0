"""Barlow Twins (Zbontar et al., ICML 2021) and the MixBT regulariser ("Guarding Barlow Twins Against Overfitting
with Mixed Samples", Bandara et al., 2023): standardised embeddings, their cross-correlation, the redundancy
reduction loss and the mixed-sample term."""

from __future__ import annotations

import torch
from torch import Tensor


def standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Each column of ``z`` ``[N, D]`` to zero mean and unit variance over the batch,
    :math:`(z - \mu) / \sqrt{\sigma^2 + \epsilon}` with the biased variance: ``BatchNorm1d(D, affine=False)`` in
    training mode, the normalisation of the Barlow Twins code (so identical views give :math:`c_{ii} \to 1`)."""
    var, mean = torch.var_mean(z, dim=0, correction=0)
    return (z - mean) * torch.rsqrt(var + eps)


def cross_correlation(za: Tensor, zb: Tensor) -> Tensor:
    r""":math:`C = Z_a^\top Z_b / N` ``[D, D]`` of two standardised batches ``[N, D]``."""
    return za.T @ zb / za.shape[0]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, eps: float = 1e-5) -> Tensor:
    r"""The Barlow Twins loss of two views' embeddings ``[N, D]`` (standardised here):

    .. math:: \mathcal L_{BT} = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \ne i} C_{ij}^2,
       \qquad C = \frac{1}{N} \hat Z_1^\top \hat Z_2

    Example::

        >>> z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> float(barlow_twins_loss(z, z, lambd=0.005, eps=0.0)) < 1e-12  # identical views, uncorrelated columns
        True
    """
    c = cross_correlation(standardise(z1, eps), standardise(z2, eps))
    on_diag = (torch.diagonal(c) - 1.0).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def mixbt_targets(za: Tensor, zb: Tensor, zb_perm: Tensor, lam: Tensor | float) -> tuple[Tensor, Tensor]:
    r"""The ground-truth cross-correlations of the mixed batch :math:`X_M = \lambda X_A + (1-\lambda) X_B[\pi]`
    with each view, assuming linear inputs give linear features (``za``, ``zb``, ``zb_perm = zb[perm]`` all
    standardised ``[N, D]``):

    .. math:: C^{MA}_{gt} = \tfrac{1}{N}\big(\lambda Z_A^\top Z_A + (1-\lambda) Z_B[\pi]^\top Z_A\big), \qquad
       C^{MB}_{gt} = \tfrac{1}{N}\big(\lambda Z_A^\top Z_B + (1-\lambda) Z_B[\pi]^\top Z_B\big)

    as the authors' README and CIFAR code (wgcban/mix-bt ``main.py``) write them."""
    n = za.shape[0]
    c_ma = (lam * za + (1.0 - lam) * zb_perm).T @ za / n
    c_mb = (lam * za + (1.0 - lam) * zb_perm).T @ zb / n
    return c_ma, c_mb


def mixbt_loss(zm: Tensor, za: Tensor, zb: Tensor, zb_perm: Tensor, lam: Tensor | float) -> Tensor:
    r"""The MixBT regulariser before its scale: with :math:`C^{MA} = \hat Z_M^\top Z_A / N` and
    :math:`C^{MB} = \hat Z_M^\top Z_B / N` (``zm`` is standardised here; the others already are),

    .. math:: \lVert C^{MA} - C^{MA}_{gt} \rVert_F^2 + \lVert C^{MB} - C^{MB}_{gt} \rVert_F^2

    (:func:`mixbt_targets`). The authors' CIFAR code scales it by ``mixup_loss_scale * lmbda``.

    Example::

        >>> za = standardise(torch.tensor([[1.0, 2.0], [2.0, 0.0], [3.0, 1.0]]))
        >>> zb = standardise(torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]))
        >>> float(mixbt_loss(za, za, zb, zb[[1, 2, 0]], 1.0)) < 1e-10  # lambda = 1: the mixed batch is view A
        True
    """
    zm = standardise(zm)
    c_ma_gt, c_mb_gt = mixbt_targets(za, zb, zb_perm, lam)
    return (cross_correlation(zm, za) - c_ma_gt).pow(2).sum() + (cross_correlation(zm, zb) - c_mb_gt).pow(2).sum()
