r"""Hard mini-batches ("Can we learn better with hard samples?", Sahayam, Zakkam and Jayaraman, arXiv 2304.03486).

The training set is cut once into :math:`b` fixed mini-batches. Round 0 trains all of them, in order, and records
each batch's mean loss :math:`\hat\ell_j` as it is trained. Every later round :math:`r \ge 1` trains only the

.. math:: S_r = \operatorname{top}_{\lfloor \delta b \rfloor} \{\hat\ell_j\}_{j=1}^b

batches of highest last loss (at least one), in ascending batch order, and updates their :math:`\hat\ell_j`. The
paper keeps the baseline's budget of :math:`E \cdot b` iterations (``max_steps``), so a smaller :math:`\delta` means
more, shorter rounds; :math:`\delta = 1` is plain training with a fixed batch order. A batch that was never trained
(a first round cut short) ranks as the hardest (:math:`\hat\ell_j = +\infty`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_tricks.core.checks import check_number
from lit_tricks.functional.loss_ranking import highest_losses, kept_count


def fixed_batches(num_samples: int, batch_size: int, seed: int = 0) -> Tensor:
    """``[b, batch_size]`` sample indices of the ``b = num_samples // batch_size`` fixed mini-batches: consecutive
    slices of one seeded permutation (the reference shuffles nothing, ``shuffle=False``, over data stored in random
    order; the remainder is dropped, ``drop_last=True``).

    Example::

        >>> fixed_batches(7, 3).shape
        torch.Size([2, 3])
    """
    check_number("batch_size", batch_size, at_least=1, integer=True)
    check_number("num_samples", num_samples, at_least=batch_size, integer=True, hint="Use a smaller batch size.")
    num_batches = num_samples // batch_size
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[: num_batches * batch_size].view(num_batches, batch_size)


def hard_batch_round(last_losses: Tensor, delta: float, round_: int) -> Tensor:
    r"""The batch ids trained in round ``round_`` (ascending): all :math:`b` in round 0, else the
    :math:`\max(1, \lfloor \delta b \rfloor)` of highest ``last_losses`` ``[b]`` (ties: the lower id first).

    Example::

        >>> losses = torch.tensor([0.5, 2.0, 0.1, 1.0])
        >>> hard_batch_round(losses, 0.5, 0).tolist(), hard_batch_round(losses, 0.5, 1).tolist()
        ([0, 1, 2, 3], [1, 3])
    """
    check_number("round_", round_, at_least=0, integer=True)
    count = kept_count(last_losses.numel(), delta, "delta")
    if round_ == 0:
        return torch.arange(last_losses.numel(), device=last_losses.device)
    return highest_losses(last_losses, count)
