r"""Selective backprop's within-batch selection (Jiang et al., arXiv 1910.00762; the form of MosaicML Composer).

Rank the batch by loss, ascending, and give the sample of rank :math:`j` (of :math:`N`) the probability

.. math:: p_j \propto \left(\frac{j + 1/2}{N}\right)^{1/\kappa - 1},

then draw :math:`\lfloor \kappa N \rfloor` samples without replacement (:math:`\kappa` = ``keep``). Small
:math:`\kappa` concentrates the draw on the highest losses; :math:`\kappa = 1` keeps everything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_tricks.functional.loss_ranking import kept_count


def selection_probabilities(n: int, keep: float) -> Tensor:
    """``[n]`` probabilities of the samples ranked by ascending loss (sums to 1)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}.")
    percentiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    weights = percentiles ** (1.0 / keep - 1.0)
    return (weights / weights.sum()).float()


def select_by_loss(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """Indices (into the batch) of ``max(1, floor(keep * N))`` samples drawn towards the highest losses (the count
    is :func:`~lit_tricks.functional.loss_ranking.kept_count`, shared with the hard mini-batches rule).

    The draw happens on the CPU over loss *ranks*, and is mapped to samples by an ``argsort`` on the losses'
    device, so there is no host-device synchronisation.
    """
    n = losses.numel()
    probabilities = selection_probabilities(n, keep)
    ranks = torch.multinomial(probabilities, kept_count(n, keep, "keep"), replacement=False, generator=generator)
    return losses.argsort()[ranks.to(losses.device)]
