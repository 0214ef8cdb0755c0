r"""TFUP (Training-Free Unsupervised Prompts): a feature cache of confident, prototypical unlabelled target samples
whose similarity-weighted pseudo-labels are added to a vision-language model's zero-shot logits.

Notation (as the authors' code, ``wlb12345/TFUP``: ``main.py: TFUP``, ``utils.py``): :math:`\hat f` L2-normalised
image features, :math:`\hat W` L2-normalised class text embeddings ``[C, D]``, :math:`\hat K` normalised cache
keys with one-hot pseudo-labels :math:`L`, :math:`p(f) = \mathrm{softmax}(s\,\hat f\hat W^\top)` with the
sharpness :math:`s = 10`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_embeddings(features: Tensor, text: Tensor, name: str = "features") -> None:
    """Raise a ``ValueError`` unless ``features`` ``[N, D]`` and ``text`` ``[C, D]`` share the size ``D``."""
    if text.ndim != 2 or not len(text):
        raise ValueError(f"text embeddings must be [C, D] with C >= 1 classes, got shape {tuple(text.shape)}.")
    if features.ndim != 2 or features.shape[1] != text.shape[1]:
        raise ValueError(
            f"{name} {tuple(features.shape)} do not match the text embeddings {tuple(text.shape)}: the image "
            "encoder must output [N, D] with the text embeddings' D (project one into the other's space)."
        )


def cache_shots(num_samples: int, num_classes: int, proportion: float = 0.3, low: int = 9, high: int = 16) -> int:
    """The code's cache size per class: ``clip(int(num_samples * proportion / num_classes), low, high)``."""
    return min(high, max(low, int(num_samples * proportion / num_classes)))


def select_cache(features: Tensor, text: Tensor, shots: int, sharpness: float = 10.0) -> tuple[Tensor, Tensor]:
    r"""Pick the cache: for each class :math:`c`, the :math:`2k` samples of highest confidence :math:`p_c(f)`
    (instance confidence), of which the :math:`k` with the lowest summed divergence to the others,
    :math:`\sum_l \mathrm{KL}(p(f_j)\,\|\,p(f_l))` (prototype score), enter with pseudo-label :math:`c`. A sample
    can enter for several classes; with fewer than :math:`k` samples every class takes all of them.

    Example::

        >>> import torch
        >>> rows, labels = select_cache(torch.eye(3), torch.eye(3), shots=1)
        >>> rows.tolist(), labels.tolist()
        ([0, 1, 2], [0, 1, 2])

    Returns:
        ``(rows, labels)``: indices into ``features`` and their pseudo-labels, class by class.
    """
    check_embeddings(features, text)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}.")
    log_p = F.log_softmax(sharpness * F.normalize(features, dim=1) @ F.normalize(text, dim=1).T, dim=1)
    candidates = log_p.topk(min(2 * shots, len(features)), dim=0).indices.T  # [C, m] by confidence
    lp = log_p[candidates]  # [C, m, C]
    p = lp.exp()
    # sum_l KL(p_j || p_l) = m * sum_c p_jc log p_jc - sum_c p_jc sum_l log p_lc
    score = lp.shape[1] * (p * lp).sum(-1) - (p * lp.sum(1, keepdim=True)).sum(-1)
    keep = score.topk(min(shots, lp.shape[1]), dim=1, largest=False).indices
    rows = candidates.gather(1, keep)
    labels = torch.arange(len(text), device=rows.device).repeat_interleave(rows.shape[1])
    return rows.flatten(), labels


def kl_similarity(probs: Tensor, cache_probs: Tensor) -> Tensor:
    r"""The semantic-level similarity of the multi-level similarity measure: with
    :math:`d_{im} = \mathrm{KL}(p_i\,\|\,q_m)`, :math:`\mathrm{sim}_{im} = 2\,(1 - (d_{im} - \min_m d_{im}) /
    (\max_m d_{im} - \min_m d_{im}))` in [0, 2]. (The code standardises each row first, which min-max
    normalisation undoes; a row of equal divergences, which divides by zero there, gets 1.)

    Example::

        >>> import torch
        >>> kl_similarity(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3]]))
        tensor([[2.0000, 0.0000, 1.6587]])
    """
    log_p, log_q = probs.clamp_min(1e-30).log(), cache_probs.clamp_min(1e-30).log()
    divergence = (probs * log_p).sum(1, keepdim=True) - probs @ log_q.T  # [N, M]
    low, high = divergence.aminmax(dim=1, keepdim=True)
    span = high - low
    sim = 2 * (1 - (divergence - low) / span.clamp_min(torch.finfo(span.dtype).tiny))
    return torch.where(span > 0, sim, torch.ones_like(sim))


def tfup_logits(
    features: Tensor, text: Tensor, cache_keys: Tensor, cache_labels: Tensor, alpha: float = 0.3, beta: float = 1.0,
    logit_scale: float = 100.0, sharpness: float = 10.0,
) -> Tensor:  # fmt: skip
    r"""TFUP's training-free prediction:
    :math:`\mathrm{logits} = \lambda\,\hat f\hat W^\top + \alpha\,\exp\!\big(-\beta\,(1 - (\hat f\hat K^\top)
    \odot \mathrm{sim})\big)\,L`, the zero-shot logits (scale :math:`\lambda` = ``logit_scale``, CLIP's 100)
    plus the cache's affinity-weighted pseudo-labels, the cosine affinity multiplied by
    :func:`kl_similarity` of :math:`p(f)` and :math:`p(k)`. Defaults: the code's ``alpha`` 0.3, ``beta`` 1.

    Example::

        >>> import torch
        >>> text = torch.eye(2)
        >>> tfup_logits(torch.tensor([[1.0, 0.0]]), text, text, torch.tensor([0, 1]), logit_scale=1.0)
        tensor([[1.8155, 0.1104]])
    """
    check_embeddings(features, text)
    check_embeddings(cache_keys, text, name="cache_keys")
    if not len(cache_keys) or len(cache_keys) != len(cache_labels):
        raise ValueError(
            f"the cache is empty or its keys {tuple(cache_keys.shape)} and labels {tuple(cache_labels.shape)} "
            "differ in length: build it from unlabelled target samples first (select_cache)."
        )
    f, w, k = F.normalize(features, dim=1), F.normalize(text, dim=1), F.normalize(cache_keys, dim=1)
    zero_shot = logit_scale * f @ w.T
    sim = kl_similarity((sharpness * f @ w.T).softmax(1), (sharpness * k @ w.T).softmax(1))
    affinity = torch.exp(-beta * (1 - (f @ k.T) * sim))
    return zero_shot + alpha * affinity @ F.one_hot(cache_labels.long(), len(text)).to(affinity.dtype)
