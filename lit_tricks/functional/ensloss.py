r"""EnsLoss (Dai, ICML 2025): a random convex, classification-calibrated loss per batch, drawn through its
derivative.

SGD sees a margin loss :math:`\phi(y f(x))` only through its derivative at each margin, so EnsLoss draws the
derivatives directly, under the conditions that make :math:`\phi` convex and calibrated (Bartlett et al.,
2006: a convex :math:`\phi` is calibrated iff :math:`\phi'(0) < 0`): every derivative is negative and they do
not decrease as the margin grows. The loss of a batch is :math:`\frac1n\sum_i \mathrm{sg}(g_i)\, s_i`, whose
gradient is :math:`g_i` at each margin :math:`s_i`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Shift that makes every derivative strictly negative (the authors' value).
DERIVATIVE_SHIFT = 1e-6


def box_cox_inverse(z: Tensor, lam: float) -> Tensor:
    r"""The inverse Box-Cox transform :math:`\exp(z)` for :math:`\lambda = 0`, else
    :math:`\max(1 + \lambda z, 0)^{1/\lambda}`. Applied to standard normal ``z`` it gives positive
    magnitudes (log-normal for :math:`\lambda = 0`)."""
    if lam == 0.0:
        return z.exp()
    return (1.0 + lam * z).clamp_min(0.0) ** (1.0 / lam)


def ensloss_derivatives(margins: Tensor, noise: Tensor, lam: float = 0.0) -> Tensor:
    r"""Random calibrated loss derivatives :math:`g_i` at the margins :math:`s_i = y_i f(x_i)`.

    Each column of ``margins`` (``[N]`` or ``[N, K]``: K separate binary problems) gets its own draw:

    1. magnitudes :math:`a_j = \min(\mathrm{BoxCox}^{-1}_\lambda(\varepsilon_j), 1)` from the standard
       normal ``noise`` (same shape as ``margins``);
    2. monotone matching: the largest magnitude goes to the smallest margin, so :math:`g_i = -a_{(r_i)}`
       does not decrease with the margin (a convex loss);
    3. superlinear tail: :math:`g_i \leftarrow g_i / s_i` where :math:`s_i > 1`;
    4. :math:`g_i \leftarrow g_i - 10^{-6}`, so :math:`g_i < 0` everywhere (calibration, :math:`\phi'(0) < 0`).

    The result has no gradient, lies in :math:`[-1 - 10^{-6}, -10^{-6}]` and is on ``margins``' device.
    """
    if noise.shape != margins.shape:
        raise ValueError(f"noise must have the shape of margins {tuple(margins.shape)}, got {tuple(noise.shape)}.")
    s = margins.detach().float()
    magnitudes = box_cox_inverse(noise.float(), lam).clamp(max=1.0)
    ascending = -magnitudes.sort(dim=0, descending=True).values  # most negative first
    ranks = s.argsort(dim=0, stable=True)
    g = torch.empty_like(s).scatter_(0, ranks, ascending.to(s.device))
    g = torch.where(s > 1.0, g / s, g)
    return g - DERIVATIVE_SHIFT


def ensloss_margins(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
    r"""The margins EnsLoss works on and their label weights, from ``[N, C]`` logits and targets.

    Class ids ``[N]``, two classes: the binary margin :math:`s_i = y_i (z_{i1} - z_{i0})`, :math:`y_i = \pm 1`
    (one score, as in the paper); more classes: one-vs-rest, :math:`s_{ik} = y_{ik} z_{ik}` with
    :math:`y_{ik} = +1` for the labelled class and :math:`-1` otherwise (``[N, C]``, each column a binary
    problem). The weights are then ``None``.

    Probability targets ``[N, C]`` (Mixup, label smoothing): the expected loss under the label distribution,
    :math:`p\,\phi(z) + (1 - p)\,\phi(-z)`, so the margins are :math:`z` stacked over :math:`-z` (``2N`` rows)
    with weights :math:`p` stacked over :math:`1 - p` (:math:`z = z_1 - z_0`, :math:`p = p_1` for two classes).
    One-hot targets give the class-id form's loss, except that the derivatives are drawn and ranked over
    the ``2N`` margins (the zero-weight ones included).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"EnsLoss needs logits of shape [N, C] with C >= 2, got {tuple(logits.shape)}.")
    z = logits.float()
    binary = z.shape[1] == 2
    if targets.ndim == 1:
        if targets.is_floating_point():
            raise ValueError("EnsLoss needs integer class ids [N] (e.g. `y.long()`) or probabilities [N, C].")
        signs = 2.0 * torch.nn.functional.one_hot(targets, z.shape[1]).to(z.dtype) - 1.0
        return (signs[:, 1] * (z[:, 1] - z[:, 0]) if binary else signs * z), None
    if targets.shape != z.shape:
        raise ValueError(
            f"probability targets must have the logits' shape {tuple(z.shape)}, got {tuple(targets.shape)}."
        )
    p = targets.float()
    if binary:
        z, p = z[:, 1] - z[:, 0], p[:, 1]
    return torch.cat([z, -z]), torch.cat([p, 1.0 - p])


def ensloss_loss(margins: Tensor, noise: Tensor, lam: float = 0.0, weights: Tensor | None = None) -> Tensor:
    r"""Per-sample EnsLoss :math:`\ell_i = \sum_k \mathrm{sg}(g_{ik})\, s_{ik}` (one term for two classes), from
    :func:`ensloss_margins`' margins and weights and standard normal ``noise`` of the margins' shape. With
    weights, row :math:`i` and row :math:`N + i` (the margin :math:`-z_i`) add up, weighted, into sample
    :math:`i`.

    Its value is a surrogate with the right gradient (:math:`\partial \ell_i / \partial s_{ik} = g_{ik}`), not
    the level of a loss; its batch mean is the authors' loss.
    """
    terms = ensloss_derivatives(margins, noise, lam) * margins
    if weights is not None:
        terms = weights * terms
        terms = terms[: len(terms) // 2] + terms[len(terms) // 2 :]
    return terms if terms.ndim == 1 else terms.sum(dim=1)
