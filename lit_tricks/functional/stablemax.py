"""StableMax (Prieto et al., 2025): a softmax whose normaliser grows linearly, not exponentially, in the logits."""

from __future__ import annotations

import torch
from torch import Tensor


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}.")
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension, got a 0-dim tensor.")


def stablemax_s(x: Tensor) -> Tensor:
    r""":math:`s(x) = x + 1` for :math:`x \ge 0` and :math:`1 / (1 - x)` for :math:`x < 0` (positive, C^1 at 0).

    The negative branch reads ``x`` clamped at 0, so the unused branch never divides by zero and its gradient
    stays finite at ``x = 1``.
    """
    return torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x + 1)


def log_stablemax(logits: Tensor, dim: int = -1, compute_dtype: torch.dtype | None = torch.float64) -> Tensor:
    r""":math:`\log p_i = \log s(x_i) - \log \sum_j s(x_j)`, computed in ``compute_dtype`` (``None``: the input's).

    The result is returned in ``compute_dtype``; :func:`stablemax_cross_entropy` casts its loss back.
    """
    _check_logits(logits)
    s = stablemax_s(logits if compute_dtype is None else logits.to(compute_dtype))
    return s.log() - s.sum(dim=dim, keepdim=True).log()


def stablemax(logits: Tensor, dim: int = -1, compute_dtype: torch.dtype | None = torch.float64) -> Tensor:
    r"""StableMax probabilities :math:`p_i = s(x_i) / \sum_j s(x_j)` along ``dim``, in the logits' dtype.

    Args:
        logits: any shape with a class dimension ``dim``.
        dim: the class dimension.
        compute_dtype: dtype of the arithmetic (the authors' code: float64); ``None`` keeps the logits' dtype.
    """
    _check_logits(logits)
    s = stablemax_s(logits if compute_dtype is None else logits.to(compute_dtype))
    return (s / s.sum(dim=dim, keepdim=True)).to(logits.dtype)


def stablemax_cross_entropy(
    logits: Tensor, targets: Tensor, compute_dtype: torch.dtype | None = torch.float64
) -> Tensor:
    r"""Per-sample StableMax cross-entropy :math:`\ell_i = -\sum_c t_{ic} \log \mathrm{stablemax}(z_i)_c`.

    As the authors' ``stablemax_cross_entropy``: the log-probabilities are computed in float64 (``compute_dtype``);
    the per-sample losses are cast back to the logits' dtype, so they mix with the other per-sample losses.

    Args:
        logits: ``[N, C]``.
        targets: class ids ``[N]`` (integer) or probabilities ``[N, C]``.
        compute_dtype: dtype of the arithmetic; ``None`` keeps the logits' dtype.

    Returns:
        ``[N]`` losses.
    """
    _check_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}.")
    log_p = log_stablemax(logits, dim=-1, compute_dtype=compute_dtype)
    if targets.ndim == 1:
        if targets.is_floating_point() or targets.is_complex() or targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets as class ids must be an integer tensor of shape [{logits.shape[0]}], got "
                f"{targets.dtype} {tuple(targets.shape)}; pass probabilities as [N, C] instead."
            )
        loss = -log_p.gather(-1, targets[:, None].long()).squeeze(-1)
    elif targets.shape == logits.shape:
        loss = -(targets.to(log_p.dtype) * log_p).sum(dim=-1)
    else:
        raise ValueError(
            f"targets must be class ids [N] or probabilities of the logits' shape {tuple(logits.shape)}, got "
            f"{tuple(targets.shape)}."
        )
    return loss.to(logits.dtype)
