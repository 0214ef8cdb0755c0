r"""Label distributionally robust losses (Zhu, Ying & Yang, ICML 2023): LDR-KL and its adaptive variant ALDR-KL.

LDR-KL is the worst case, over label distributions :math:`q` kept near uniform by a KL penalty of weight
:math:`\lambda`, of the expected margin violation :math:`\delta_k + z_k - z_y`; the maximum has the closed form

.. math:: \ell(z, y) = \lambda \log \frac1C \sum_{k=1}^{C} \exp\!\Big(\frac{\delta_k + z_k - z_y}{\lambda}\Big),
          \qquad \delta_k = c\,[k \ne y],

which tends to the top-1 hinge (Crammer-Singer) as :math:`\lambda \to 0` and to the mean violation as
:math:`\lambda \to \infty`. ALDR-KL gives each sample its own :math:`\lambda_i`, set from how far the model's
tempered prediction is from uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Added to the ALDR-KL probabilities before renormalising, so that :math:`\log p` is finite (the authors' value).
PROBABILITY_FLOOR = 1e-5
#: Smallest denominator of the logit normalisation (ours: all-zero logits would otherwise give 0/0).
NORM_FLOOR = 1e-12


def ldr_logits(logits: Tensor, softplus: bool = True, normalise: bool = True) -> Tensor:
    r"""The scores the LDR losses compare: optionally :math:`z \leftarrow \mathrm{softplus}(z)`, then optionally
    :math:`z \leftarrow z / (\lVert z \rVert_1 / C)` per row (for positive scores, division by their mean)."""
    z = logits.float()
    if softplus:
        z = F.softplus(z)
    if normalise:
        z = z / (z.abs().mean(dim=-1, keepdim=True)).clamp_min(NORM_FLOOR)
    return z


def _label_distribution(targets: Tensor, num_classes: int) -> Tensor:
    if targets.ndim == 1:
        if targets.is_floating_point():
            raise ValueError("LDR losses need integer class ids [N] (e.g. `y.long()`) or probabilities [N, C].")
        return F.one_hot(targets, num_classes).float()
    return targets.float()


def ldr_kl_loss(z: Tensor, targets: Tensor, lam: float | Tensor, margin: float = 0.1) -> Tensor:
    r"""Per-sample LDR-KL :math:`\lambda\big(\mathrm{LSE}_k(d_k/\lambda) - \log C\big)`, with
    :math:`d_k = c\,(1 - t_k) + z_k - \langle t, z \rangle`.

    Args:
        z: ``[N, C]`` scores (see :func:`ldr_logits`).
        targets: class ids ``[N]`` (:math:`t` one-hot: the formula above) or probabilities ``[N, C]`` (:math:`t`
            put in the same formula; our extension, exact for one-hot rows).
        lam: :math:`\lambda > 0`, a number or a per-sample ``[N]`` tensor (ALDR-KL's :math:`\lambda_i`).
        margin: :math:`c`, added to every class but the label.

    Returns:
        ``[N]`` losses. The log-sum-exp is computed stably (shifted by its maximum), as in the authors' code.
    """
    t = _label_distribution(targets, z.shape[-1])
    lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
    if lam.ndim == 1:
        lam = lam[:, None]
    d = margin * (1.0 - t) + z - (t * z).sum(dim=-1, keepdim=True)
    return (lam * (torch.logsumexp(d / lam, dim=-1, keepdim=True) - math.log(z.shape[-1]))).squeeze(-1)


def aldr_lambdas(z: Tensor, previous: Tensor, lam0: float, alpha: float) -> Tensor:
    r"""ALDR-KL's new per-sample :math:`\lambda_i` (no gradient) from the scores ``z`` and the current ``previous``:

    .. math:: p_i = \mathrm{normalise}\big(\mathrm{softmax}(z_i / \lambda_i^{\rm old}) + 10^{-5}\big),\quad
              \mathrm{KL}_i = \sum_k p_{ik} \log(C p_{ik}),\quad
              \lambda_i = \lambda_0 - \frac{\lambda_0\,\mathrm{KL}_i}{\alpha \log C}.

    :math:`\mathrm{KL}_i < \log C`, so :math:`\lambda_i > \lambda_0 (1 - 1/\alpha) > 0` for :math:`\alpha > 1`.
    """
    num_classes = z.shape[-1]
    with torch.no_grad():
        p = (z / previous[:, None]).softmax(dim=-1) + PROBABILITY_FLOOR
        p = p / p.sum(dim=-1, keepdim=True)
        kl = (p * torch.log(num_classes * p)).sum(dim=-1)
        return lam0 - lam0 * kl / (alpha * math.log(num_classes))


def aldr_penalty(lambdas: Tensor, lam0: float, alpha: float, num_classes: int) -> Tensor:
    r"""The constant ALDR-KL adds per sample, :math:`-\frac{\alpha \log C}{2 \lambda_0} (\lambda_i - \lambda_0)^2`
    (no gradient: :math:`\lambda_i` is detached), so the loss equals the objective's value at :math:`\lambda_i`."""
    return -0.5 * alpha * math.log(num_classes) / lam0 * (lambdas.detach() - lam0) ** 2


def aldr_kl_loss(z: Tensor, targets: Tensor, lambdas: Tensor, lam0: float, alpha: float, margin: float = 0.1) -> Tensor:
    r"""Per-sample ALDR-KL: :func:`ldr_kl_loss` at the per-sample ``lambdas`` plus :func:`aldr_penalty`."""
    return ldr_kl_loss(z, targets, lambdas, margin) + aldr_penalty(lambdas, lam0, alpha, z.shape[-1])
