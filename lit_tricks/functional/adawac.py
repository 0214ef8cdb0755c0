r"""AdaWAC (Dong, Xie & Ward, ICML 2023): adaptively weighted data-augmentation consistency regularisation.

Every training sample :math:`i` has a pair of weights :math:`\beta_i = (\beta_{i,0}, \beta_{i,1})` on the simplex
that splits its loss between the supervised term and the consistency of two augmented views:

.. math:: \min_\theta \max_{\beta_i \in \Delta_2}\ \frac1N \sum_i
          \beta_{i,0}\,\ell^{\rm CE}_i(\theta) + \beta_{i,1}\,\ell^{\rm AC}_i(\theta),

solved by online mirror descent: each time sample :math:`i` is seen, :math:`\beta_i` takes one exponentiated-gradient
ascent step (:func:`adawac_weights`), then :math:`\theta` one descent step on the objective (:func:`adawac_objective`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def adawac_consistency(a: Tensor, b: Tensor) -> Tensor:
    r"""Per-sample consistency :math:`\ell^{\rm AC}_i = \frac1D \lVert a_i - b_i \rVert_2^2`, the mean squared
    difference over every dimension but the first (the authors' ``MSELoss`` averaged per sample). Gradients flow
    into both views.

    Example::

        >>> adawac_consistency(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([2.5000])
    """
    if a.shape != b.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return (a - b).square().flatten(1).mean(dim=1)


def adawac_weights(weights: Tensor, supervised: Tensor, consistency: Tensor, step_size: float) -> Tensor:
    r"""One mirror-descent (exponentiated-gradient ascent) step of the per-sample weights on the simplex:

    .. math:: \beta_{i,0} \leftarrow \frac{\beta_{i,0}\, e^{\eta\,\ell^{\rm CE}_i}}
              {\beta_{i,0}\, e^{\eta\,\ell^{\rm CE}_i} + \beta_{i,1}\, e^{\eta\,\ell^{\rm AC}_i}},
              \qquad \beta_{i,1} = 1 - \beta_{i,0},

    computed as ``softmax(log(weights) + step_size * [supervised, consistency])``, which cannot overflow (the
    authors multiply :math:`\beta_{i,0}` by :math:`e^{\eta(\ell^{\rm CE}_i - \ell^{\rm AC}_i)}` and renormalise:
    the same numbers). The losses are detached: the weights are not trained by backpropagation.

    Args:
        weights: :math:`\beta` ``[N, 2]``, rows on the simplex (the supervised weight first).
        supervised: :math:`\ell^{\rm CE}` ``[N]``.
        consistency: :math:`\ell^{\rm AC}` ``[N]``.
        step_size: :math:`\eta`, the weights' learning rate.

    Example::

        >>> adawac_weights(torch.tensor([[0.5, 0.5]]), torch.tensor([1.0]), torch.tensor([0.0]), 1.0)
        tensor([[0.7311, 0.2689]])
    """
    losses = torch.stack([supervised.detach(), consistency.detach()], dim=1).float()
    return (weights.float().log() + step_size * losses).softmax(dim=1)


def adawac_objective(supervised: Tensor, consistency: Tensor, weights: Tensor) -> Tensor:
    r"""Per-sample objective :math:`\beta_{i,0}\,\ell^{\rm CE}_i + \beta_{i,1}\,\ell^{\rm AC}_i` ``[N]``; the weights
    ``[N, 2]`` are constants here (detached).

    Example::

        >>> adawac_objective(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([[0.75, 0.25]]))
        tensor([2.5000])
    """
    weights = weights.detach()
    return weights[:, 0] * supervised + weights[:, 1] * consistency
