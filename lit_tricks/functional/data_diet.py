r"""Data-diet scores (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021) and pruning by score.

.. math:: \mathrm{EL2N}(x, y) = \lVert \mathrm{softmax}(f(x)) - y \rVert_2, \qquad
          \mathrm{GraNd}(x, y) = \lVert \nabla_\theta\, \mathrm{CE}(f(x), y) \rVert_2

with :math:`y` one-hot (or a probability vector); both are averaged over independent runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.functional.losses import soft_target_cross_entropy, to_probabilities


def el2n_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """EL2N ``[N]``: the L2 distance between the predicted probabilities and the (one-hot) targets."""
    probs = to_probabilities(targets, logits.shape[-1])
    return (logits.float().softmax(dim=-1) - probs).norm(dim=-1)


def grand_scores(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """GraNd ``[N]``: the L2 norm of each sample's cross-entropy gradient over all trainable parameters.

    Per-sample gradients come from ``torch.func.vmap(grad(...))``, so ``model`` runs on one sample at a time
    with its buffers frozen: call it in ``eval()`` mode (batch norm with running statistics).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return soft_target_cross_entropy(logits, y.unsqueeze(0)).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads.values()]).sum(dim=0).sqrt()


def keep_by_scores(scores: Tensor, fraction: float, offset: int = 0) -> Tensor:
    """Indices of the samples to keep, ascending: the ``round(fraction * N)`` highest scores after skipping
    the ``offset`` highest (which, under label noise, are mostly mislabelled samples). The reference code's
    offset counts from the lowest score instead (``argsort()[offset : offset + size]``): it is ``N - size - offset``.

    Example::

        >>> keep_by_scores(torch.tensor([0.1, 0.9, 0.5, 0.7]), fraction=0.5)
        tensor([1, 3])
        >>> keep_by_scores(torch.tensor([0.1, 0.9, 0.5, 0.7]), fraction=0.5, offset=1)
        tensor([2, 3])
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    n = scores.numel()
    size = max(1, round(fraction * n))
    if offset < 0 or offset + size > n:
        raise ValueError(f"offset must be in [0, {n - size}] to keep {size} of {n} samples, got {offset}.")
    hardest_first = scores.argsort(descending=True, stable=True)
    return hardest_first[offset : offset + size].sort().values


def load_scores(paths: str | Path | list[str | Path]) -> Tensor:
    """The mean of the scores saved by :class:`~lit_tricks.DataDietScores` in one or more files (one per run)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("load_scores needs at least one file.")
    runs = [load_checkpoint(path)["scores"] for path in paths]
    if len({run.shape for run in runs}) > 1:
        raise ValueError(f"The score files hold different numbers of samples: {[run.numel() for run in runs]}.")
    return torch.stack(runs).float().mean(dim=0)
