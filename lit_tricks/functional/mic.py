"""Masked image consistency (MIC; Hoyer et al., CVPR 2023): block masks and the quality-weighted pseudo-label loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Weighting = Literal["confidence", "threshold_fraction", "none"]


def block_mask(inputs: Tensor, block_size: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    r"""A keep-mask of random blocks for ``inputs`` (images ``[N, C, H, W]``, signals ``[N, L]`` or ``[N, C, L]``).

    As the authors' ``BlockMaskGenerator``: one uniform number per block on a grid of
    ``round(H / b) x round(W / b)`` blocks (``round(L / b)`` segments for signals), a block kept (1) when its
    number exceeds ``ratio`` (so a fraction ``ratio`` of blocks is masked on average), and the grid enlarged to
    the input's size by nearest-neighbour interpolation; one mask per sample, shared by its channels. The
    numbers are drawn on the CPU from ``generator`` and the mask is moved to the inputs' device.

    Returns:
        ``[N, 1, H, W]``, ``[N, 1, L]`` or ``[N, L]`` of 0/1 in the inputs' dtype, broadcastable to ``inputs``.
    """
    if inputs.ndim not in (2, 3, 4):
        raise ValueError(
            f"MIC masks images [N, C, H, W] or signals [N, L] / [N, C, L]; got inputs of shape {tuple(inputs.shape)}."
        )
    spatial = tuple(inputs.shape[2:]) if inputs.ndim == 4 else (inputs.shape[-1],)
    grid = tuple(round(side / block_size) for side in spatial)
    if min(grid) < 1:
        raise ValueError(
            f"block_size={block_size} leaves no block on inputs of size {spatial}: use block_size <= "
            f"{2 * min(spatial) - 1} (e.g. 1/8 of the side, as 64 px blocks on the paper's 512 px crops)."
        )
    numbers = torch.rand((inputs.shape[0], 1, *grid), generator=generator)
    mask = F.interpolate((numbers > ratio).float(), size=spatial, mode="nearest")
    mask = mask.to(inputs.device, inputs.dtype)
    return mask[:, 0] if inputs.ndim == 2 else mask


def mic_pseudo_labels(
    teacher_logits: Tensor, weighting: Weighting = "confidence", threshold: float = 0.968
) -> tuple[Tensor, Tensor]:
    r"""The teacher's pseudo-labels :math:`\hat y_i = \arg\max_c p_{ic}` and their quality weights ``[N]``.

    ``"confidence"``: :math:`q_i = \max_c p_{ic}` (the authors' classification code, ``pseudo_label_weight='prob'``).
    ``"threshold_fraction"``: :math:`q_i = \frac1N \sum_j [\max_c p_{jc} \ge \tau]` for every sample, the fraction
    of the batch above the threshold :math:`\tau` (the authors' segmentation rule, with the batch's samples in
    place of its pixels). ``"none"``: :math:`q_i = 1` (their classification default).
    """
    confidence, labels = teacher_logits.detach().float().softmax(dim=-1).max(dim=-1)
    if weighting == "confidence":
        return labels, confidence
    if weighting == "threshold_fraction":
        return labels, (confidence >= threshold).float().mean().expand_as(confidence)
    if weighting == "none":
        return labels, torch.ones_like(confidence)
    raise ValueError(f"weighting must be 'confidence', 'threshold_fraction' or 'none', got {weighting!r}.")


def mic_loss(student_logits: Tensor, pseudo_labels: Tensor, quality: Tensor) -> Tensor:
    r"""Per-sample :math:`q_i\,\mathrm{CE}(z^{\mathrm{masked}}_i, \hat y_i)`; its batch mean is the MIC term."""
    return quality * F.cross_entropy(student_logits.float(), pseudo_labels, reduction="none")
