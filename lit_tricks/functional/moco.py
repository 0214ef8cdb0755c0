"""MoCo's contrastive loss against a queue of negative keys, and the queue's in-place update."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float, extra: Tensor | None = None) -> Tensor:
    r"""The InfoNCE logits ``[N, 1 + K (+ S)]`` of MoCo (He et al., CVPR 2020): column 0 is the positive,

    .. math:: \ell_i = \frac{1}{\tau}\left[q_i^\top k_i,\; q_i^\top n_1, \dots, q_i^\top n_K
       \;(, q_i^\top h_{i1}, \dots, q_i^\top h_{iS})\right]

    with ``q``, ``k`` the L2-normalised queries and keys ``[N, D]``, ``queue`` the negatives :math:`n_j`
    ``[K, D]`` shared by every query, and ``extra`` optional per-query negatives :math:`h_{is}` ``[N, S, D]``
    (MoCHi's synthetic ones). The loss is the cross-entropy with target 0 (:func:`moco_loss`).

    Example::

        >>> q = k = torch.tensor([[1.0, 0.0]])
        >>> moco_logits(q, k, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), 0.5)
        tensor([[ 2.,  0., -2.]])
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    parts = [positive, q @ queue.T]
    if extra is not None:
        parts.append(torch.einsum("nd,nsd->ns", q, extra))
    return torch.cat(parts, dim=1) / temperature


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float, extra: Tensor | None = None) -> Tensor:
    r""":math:`\mathcal L = -\frac1N \sum_i \log \frac{\exp(q_i^\top k_i / \tau)}{\sum_j \exp(\ell_{ij})}`, the mean
    cross-entropy of :func:`moco_logits` with the positive (column 0) as the target."""
    logits = moco_logits(q, k, queue, temperature, extra)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@torch.no_grad()
def enqueue_(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    r"""Write ``keys`` ``[B, D]`` into the ring buffer ``queue`` ``[K, D]`` at rows ``pointer, pointer + 1, ...``
    (mod K), replacing the oldest keys, and advance the one-element long tensor ``pointer`` by B (mod K), in place
    and on the device (no host synchronisation). Needs :math:`B \le K`; unlike the authors' code, B need not divide K.

    Example::

        >>> queue, pointer = torch.zeros(3, 1), torch.tensor([2])
        >>> enqueue_(queue, pointer, torch.tensor([[1.0], [2.0]]))
        >>> queue.flatten().tolist(), pointer.item()
        ([2.0, 0.0, 1.0], 1)
    """
    size = len(queue)
    if len(keys) > size:
        raise ValueError(f"{len(keys)} keys do not fit a queue of {size}; make the queue at least the global batch.")
    rows = (pointer + torch.arange(len(keys), device=queue.device)) % size
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    pointer.add_(len(keys)).remainder_(size)
