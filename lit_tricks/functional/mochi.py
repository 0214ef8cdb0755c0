"""MoCHi: synthetic hard negatives mixed from a query's hardest queue keys (and from the query itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def hardest_negatives(q: Tensor, queue: Tensor, num_hard: int) -> Tensor:
    r"""The ``num_hard`` keys of ``queue`` ``[K, D]`` most similar to each query (:math:`q^\top n`, largest first):
    :math:`\tilde Q^N_i`, ``[N, num_hard, D]``."""
    return queue[(q @ queue.T).topk(num_hard, dim=1).indices]


@torch.no_grad()
def mochi_negatives(
    q: Tensor, queue: Tensor, num_hard: int, s1: int, s2: int, generator: torch.Generator, beta_max: float = 0.5
) -> Tensor:
    r"""MoCHi's synthetic negatives ``[N, s1 + s2, D]`` (Kalantidis et al., "Hard Negative Mixing for Contrastive
    Learning", NeurIPS 2020), detached and not meant for the queue. From the ``num_hard`` hardest keys
    :math:`\tilde Q^N_i` of each L2-normalised query :math:`q_i` (:func:`hardest_negatives`):

    .. math:: h_{is} = \frac{\tilde h_{is}}{\lVert \tilde h_{is} \rVert}, \quad
       \tilde h_{is} = \alpha_{is} n_a + (1 - \alpha_{is}) n_b, \quad s = 1..s_1

    with :math:`a \ne b` drawn from :math:`\tilde Q^N_i` and :math:`\alpha \sim U(0, 1)`, then, harder still,

    .. math:: h'_{is} = \frac{\tilde h'_{is}}{\lVert \tilde h'_{is} \rVert}, \quad
       \tilde h'_{is} = \beta_{is} q_i + (1 - \beta_{is}) n_c, \quad s = 1..s_2

    with :math:`n_c` drawn from :math:`\tilde Q^N_i` and :math:`\beta \sim U(0, \beta_{max})`, :math:`\beta_{max} =
    0.5` so the query never dominates. Draws, in this order, from ``generator`` (on the CPU): a, b - a - 1 (mod N),
    alpha, c, beta.

    Example::

        >>> queue = torch.eye(3)
        >>> q = torch.tensor([[0.8, 0.6, 0.0]])
        >>> h = mochi_negatives(q, queue, 2, 3, 1, torch.Generator().manual_seed(0))
        >>> h.shape, bool(h[0, :, 2].abs().max() == 0)  # mixed from the two hardest keys e1, e2 (and q)
        (torch.Size([1, 4, 3]), True)
    """
    n, device = len(q), q.device
    hard = hardest_negatives(q, queue, num_hard)
    rows = torch.arange(n, device=device).view(-1, 1)
    first = torch.randint(num_hard, (n, s1), generator=generator)
    second = (first + torch.randint(1, max(num_hard, 2), (n, s1), generator=generator)) % num_hard
    alpha = torch.rand(n, s1, 1, generator=generator).to(device, q.dtype)
    first, second = first.to(device), second.to(device)
    mixed = F.normalize(hard[rows, first].lerp(hard[rows, second], 1.0 - alpha), dim=-1)
    picked = torch.randint(num_hard, (n, s2), generator=generator).to(device)
    beta = (beta_max * torch.rand(n, s2, 1, generator=generator)).to(device, q.dtype)
    with_query = F.normalize(hard[rows, picked].lerp(q.unsqueeze(1).expand(-1, s2, -1), beta), dim=-1)
    return torch.cat([mixed, with_query], dim=1)
