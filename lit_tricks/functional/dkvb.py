r"""Discrete key-value bottleneck (Träuble, Goyal, Rahaman, Mozer, Kawaguchi, Bengio & Schölkopf, ICML 2023).

An input's frozen features are projected into :math:`C` codebooks, :math:`z_c = P_c\,\phi(x)`. Each codebook
holds :math:`K` keys :math:`k_{c,j}` and as many learnable values :math:`v_{c,j}`; the output is the mean of the
values of the ``top_k`` nearest keys (squared Euclidean distance) over all codebooks,

.. math:: y(x) = \frac{1}{C\,k} \sum_{c=1}^{C} \sum_{j \in \mathrm{top}_k(c)} v_{c,j},
          \qquad \mathrm{top}_k(c) = \operatorname{arg\,top\text{-}k}_j\, -\lVert z_c - k_{c,j}\rVert^2 .

Only the retrieved values get gradients, so learning one class changes few values. The keys are fitted without
labels by EMA k-means (the VQ-VAE codebook update) and then frozen:

.. math:: n_{c,j} \leftarrow \gamma n_{c,j} + (1-\gamma)\,|A_{c,j}|,\quad
          s_{c,j} \leftarrow \gamma s_{c,j} + (1-\gamma)\sum_{i \in A_{c,j}} z_{i,c},\quad
          k_{c,j} = s_{c,j} / \tilde n_{c,j},

with :math:`A_{c,j}` the batch's samples whose nearest key is :math:`j` and :math:`\tilde n` the Laplace-smoothed
counts :math:`\tilde n_{c,j} = \frac{n_{c,j} + \epsilon}{N_c + K\epsilon} N_c`, :math:`N_c = \sum_j n_{c,j}`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nearest_keys(z: Tensor, keys: Tensor, top_k: int = 1) -> Tensor:
    """``[B, C, top_k]`` the indices of the ``top_k`` nearest keys of each codebook (nearest first) for projected
    features ``z [B, C, D]`` and keys ``[C, K, D]``.

    Example::

        >>> keys = torch.tensor([[[0.0], [1.0], [3.0]]])           # one codebook, keys 0, 1, 3 in 1-D
        >>> nearest_keys(torch.tensor([[[0.9]], [[2.5]]]), keys, 2).tolist()
        [[[1, 0]], [[2, 1]]]
    """
    if z.ndim != 3 or keys.ndim != 3 or z.shape[1:] != (keys.shape[0], keys.shape[2]):
        raise ValueError(
            f"nearest_keys needs z [B, C, D] and keys [C, K, D], got {tuple(z.shape)} and {tuple(keys.shape)}."
        )
    if not 1 <= top_k <= keys.shape[1]:
        raise ValueError(f"top_k must be in [1, {keys.shape[1]}] (the keys per codebook), got {top_k}.")
    distance = torch.cdist(z.transpose(0, 1), keys)  # [C, B, K]
    return distance.topk(top_k, dim=-1, largest=False).indices.permute(1, 0, 2)


def retrieve(values: Tensor, indices: Tensor) -> Tensor:
    """``[B, V]`` the mean over codebooks and retrieved keys of ``values [C, K, V]`` at ``indices [B, C, k]``.

    Example::

        >>> values = torch.tensor([[[1.0], [2.0], [4.0]], [[10.0], [20.0], [40.0]]])   # 2 codebooks, 3 keys, V = 1
        >>> retrieve(values, torch.tensor([[[0, 2], [1, 1]]])).tolist()              # (1 + 4 + 20 + 20) / 4
        [[11.25]]
    """
    codebook = torch.arange(values.shape[0], device=values.device).view(1, -1, 1)
    return values[codebook, indices].mean(dim=(1, 2))


def ema_kmeans_step(
    z: Tensor, keys: Tensor, counts: Tensor, sums: Tensor, decay: float, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA k-means update (VQ-VAE) of every codebook from a batch ``z [B, C, D]``; returns the new
    ``(keys [C, K, D], counts [C, K], sums [C, K, D])``.

    Example::

        >>> z = torch.tensor([[[0.0]], [[0.2]], [[4.0]]])             # 3 points in one 1-D codebook
        >>> keys, counts, sums = torch.tensor([[[0.0], [5.0]]]), torch.ones(1, 2), torch.tensor([[[0.0], [5.0]]])
        >>> new_keys, new_counts, _ = ema_kmeans_step(z, keys, counts, sums, decay=0.5)
        >>> new_counts.tolist(), [round(k, 4) for k in new_keys.flatten().tolist()]
        ([[1.5, 1.0]], [0.0667, 4.5])
    """
    assigned = nearest_keys(z, keys)[..., 0]  # [B, C]
    one_hot = torch.nn.functional.one_hot(assigned, keys.shape[1]).to(z.dtype)  # [B, C, K]
    counts = decay * counts + (1 - decay) * one_hot.sum(0)
    sums = decay * sums + (1 - decay) * torch.einsum("bck,bcd->ckd", one_hot, z)
    total = counts.sum(-1, keepdim=True)
    smoothed = (counts + eps) / (total + keys.shape[1] * eps) * total
    return sums / smoothed.unsqueeze(-1), counts, sums
