r"""MVP: mask and visual prompt tuning for online continual learning (Moon, Park, Kim & Park, ICCV 2023).

A frozen ViT's query feature :math:`q` (the CLS token) selects one of :math:`P` keys :math:`k_p` by cosine distance
:math:`d_p = 1 - \cos(q, k_p)`, scaled by how often the key was chosen (:math:`m_p = n_p + 1`, ``counts``), so
rarely used prompts get picked; the selected key's prompts enter the ViT and its learned class mask
:math:`\sigma(\mu_p)\cdot 2` multiplies the logits (instance-wise logit masking). The contrastive visual prompt
tuning loss pushes the keys apart and pulls the selected key towards the query,

.. math:: \mathcal L_{\text{CVPT}} = -\log\Big(\frac{A}{A + B} + 10^{-6}\Big),\quad
          A = \underset{b,\,b',\,j}{\text{mean}}\ e^{(1 - \cos(k_{s_b}, k_j)) / m_{s_{b'}}},\quad
          B = \underset{b,\,b'}{\text{mean}}\ e^{d_{b', s_{b'}} / m_{s_b}},

(:math:`s_b` the key of sample :math:`b`; the mean over all pairs :math:`b, b'` is the authors' code's
broadcasting). Two scores of the head's view of each sample shape the cross-entropy: the ignore score
:math:`\iota_i = 1 - \cos(g_i, \bar g_{y_i})`, between the gradient of sample :math:`i`'s loss and of the batch's
mean loss with respect to the head's row of class :math:`y_i`, weights it by :math:`(1-\alpha) + \alpha\,\iota_i^\gamma`
(gradient-similarity focal loss); the compensation score :math:`c_i = 1 - \cos(w_{y_i}, f_i) + \text{margin}` divides
the feature before the head (adaptive feature scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def select_prompts(query: Tensor, keys: Tensor, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``(selected [B], distance [B, P])``: each query's key, the one with the least
    :math:`(1 - \cos(q, k_p))\,(n_p + 1)` (``counts`` :math:`n`; ``None``: unscaled), and the unscaled distances.

    Example::

        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> query = torch.tensor([[1.0, 0.2], [0.6, 0.4]])
        >>> select_prompts(query, keys)[0].tolist(), select_prompts(query, keys, torch.tensor([5.0, 0.0]))[0].tolist()
        ([0, 0], [0, 1])
    """
    distance = 1 - F.cosine_similarity(query.unsqueeze(1), keys.unsqueeze(0), dim=-1)
    scaled = distance if counts is None else distance * (counts + 1)
    return scaled.argmin(dim=1), distance


def prompt_contrastive_loss(keys: Tensor, selected: Tensor, distance: Tensor, counts: Tensor) -> Tensor:
    r""":math:`\mathcal L_{\text{CVPT}}` (module docstring) for ``keys [P, D]``, the ``selected`` keys ``[B]``, the
    query-key ``distance [B, P]`` of :func:`select_prompts` and the selection ``counts [P]``.

    Example::

        >>> keys, counts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
        >>> selected, distance = select_prompts(torch.tensor([[1.0, 0.0]]), keys)
        >>> round(prompt_contrastive_loss(keys, selected, distance, counts).item(), 4)   # A = (1 + e) / 2, B = 1
        0.4304
    """
    mass = counts + 1
    key_distance = 1 - F.cosine_similarity(keys.unsqueeze(1), keys.unsqueeze(0), dim=-1)  # [P, P]
    mass_selected = mass[selected]  # [B]
    own = distance.gather(1, selected.unsqueeze(1)).squeeze(1)  # [B] d_{b, s_b}
    apart = (key_distance[selected].unsqueeze(1) / mass_selected.view(1, -1, 1)).exp().mean()  # [B, B', P]
    close = (own.unsqueeze(0) / mass_selected.unsqueeze(1)).exp().mean()  # [B, B']
    return -(apart / (close + apart) + 1e-6).log()


def instance_logit_mask(mask_logits: Tensor, selected: Tensor) -> Tensor:
    r"""``[B, C]`` the selected prompts' class masks :math:`2\,\sigma(\mu_{s_b})` (``mask_logits [P, C]``), in (0, 2).

    Example::

        >>> instance_logit_mask(torch.tensor([[0.0, -1.0], [9.0, 0.0]]), torch.tensor([0])).tolist()
        [[1.0, 0.5378828644752502]]
    """
    return mask_logits[selected].sigmoid() * 2


def masked_logits(logits: Tensor, mask: Tensor | None, seen: Tensor) -> Tensor:
    """``logits * mask`` with the classes not ``seen`` (``[C]`` bool) at ``-inf``; all kept while none is seen.

    Example::

        >>> masked_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 0.5, 1.0]]),
        ...               torch.tensor([True, True, False])).tolist()
        [[2.0, 1.0, -inf]]
    """
    if mask is not None:
        logits = logits * mask
    return torch.where(seen.any(), logits.masked_fill(~seen, -torch.inf), logits)  # no host sync


def ignore_scores(features: Tensor, probs: Tensor, mask: Tensor | None, targets: Tensor) -> Tensor:
    r"""``[B]`` the ignore scores :math:`\iota_i = 1 - \cos(g_i, \bar g_{y_i})` of a linear head on ``features
    [B, D]`` whose (masked) logits gave ``probs [B, C]``: :math:`g_i = \partial\ell_i / \partial w_{y_i}
    = (p_{i y_i} - 1)\,m_{i y_i} f_i` and :math:`\bar g_c = \partial \bar\ell / \partial w_c
    = \frac1B\sum_j (p_{jc} - [c = y_j])\,m_{jc} f_j` (``mask`` :math:`m`, ``None``: ones). The authors compute
    both with one backward pass per sample through a copy of the head; this is the same in closed form.

    Example::

        >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
        >>> [round(s, 4) for s in ignore_scores(f, probs, None, torch.tensor([0, 0])).tolist()]   # 1 - cos 45 deg
        [0.2929, 0.2929]
    """
    residual = probs - F.one_hot(targets, probs.shape[1]).to(probs.dtype)  # dloss/dlogit, before the mask
    if mask is not None:
        residual = residual * mask
    sample = residual.gather(1, targets.unsqueeze(1)) * features  # [B, D]
    batch = (residual.t() @ features / len(features))[targets]  # [B, D]
    return 1 - F.cosine_similarity(sample, batch, dim=1)


def compensation_scores(head_weight: Tensor, features: Tensor, targets: Tensor, margin: float) -> Tensor:
    r"""``[B]`` :math:`c_i = 1 - \cos(w_{y_i}, f_i) + \text{margin}`, the divisor of adaptive feature scaling.

    Example::

        >>> compensation_scores(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), 0.5)
        tensor([0.5000, 1.5000])
    """
    return 1 - F.cosine_similarity(head_weight[targets], features, dim=1) + margin


def focal_weights(ignore: Tensor, alpha: float, gamma: float) -> Tensor:
    r"""``[B]`` the gradient-similarity focal weights :math:`(1 - \alpha) + \alpha\,\iota_i^\gamma`.

    Example::

        >>> focal_weights(torch.tensor([0.0, 1.0, 2.0]), alpha=0.5, gamma=2.0).tolist()
        [0.5, 1.0, 2.5]
    """
    return (1 - alpha) + alpha * ignore.pow(gamma)
