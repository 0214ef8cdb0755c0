r"""Self-supervised label augmentation (SLA; Lee, Hwang, Shin, ICML 2020): joint labels over (class, transform).

Layout, as in the authors' code (``hankook/SLA``): a batch of :math:`N` samples and :math:`M` transforms becomes
:math:`NM` rows, sample-major (row :math:`iM + k` is :math:`t_k(x_i)`), and the joint label of class :math:`y`
under transform :math:`k` is :math:`yM + k`, so the joint logits ``[NM, CM]`` have column :math:`cM + k` for
class :math:`c` under transform :math:`k`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: number of transforms of :func:`sla_transform` (rotations for images, our four transforms for 1-D signals)
NUM_TRANSFORMS = 4


def sla_transform(inputs: Tensor) -> Tensor:
    r"""Every sample under the :math:`M = 4` transforms, sample-major: ``[N, ...] -> [4N, ...]``.

    Images ``[N, C, H, W]`` (square): rotations by 0, 90, 180, 270 degrees (``torch.rot90`` over ``(H, W)``,
    the paper's and the authors' choice). 1-D signals ``[N, L]`` or ``[N, C, L]``: identity, time reversal,
    circular shift by :math:`\lfloor L/2 \rfloor`, and reversal then shift: a set of ours (not the paper's),
    a group like the rotations, so every transform is distinguishable on a non-symmetric signal.
    """
    if inputs.ndim == 4:
        if inputs.shape[-1] != inputs.shape[-2]:
            raise ValueError(
                f"SLA rotates images by 90 degrees, so they must be square; got H x W = {tuple(inputs.shape[-2:])}. "
                "Crop or pad them to a square."
            )
        views = [torch.rot90(inputs, k, (2, 3)) for k in range(NUM_TRANSFORMS)]
    elif inputs.ndim in (2, 3):
        flipped, shift = inputs.flip(-1), inputs.shape[-1] // 2
        views = [inputs, flipped, inputs.roll(shift, -1), flipped.roll(shift, -1)]
    else:
        raise ValueError(
            "SLA transforms images [N, C, H, W] or signals [N, L] / [N, C, L]; "
            f"got inputs of shape {tuple(inputs.shape)}."
        )
    return torch.stack(views, dim=1).flatten(0, 1)


def sla_joint_targets(targets: Tensor, num_transforms: int) -> Tensor:
    r"""Joint targets of the expanded batch: class ids :math:`y_i` -> :math:`y_i M + k` at row :math:`iM + k`;
    probabilities ``[N, C]`` (e.g. from Mixup) -> ``[NM, CM]`` with :math:`p_{ic}` at column :math:`cM + k`."""
    m = num_transforms
    k = torch.arange(m, device=targets.device)
    if targets.ndim == 1:
        return (targets[:, None] * m + k).flatten()
    eye = torch.eye(m, device=targets.device, dtype=targets.dtype)
    return (targets[:, None, :, None] * eye[None, :, None, :]).flatten(2).flatten(0, 1)


def _blocks(joint_logits: Tensor, num_transforms: int) -> Tensor:
    """``[NM, CM] -> [N, M (transform of the input), C, M (transform of the label)]``."""
    m = num_transforms
    if joint_logits.ndim != 2 or joint_logits.shape[0] % m or joint_logits.shape[1] % m:
        raise ValueError(
            f"joint logits must be [N*M, C*M] for M={m} transforms, got shape {tuple(joint_logits.shape)}."
        )
    return joint_logits.view(joint_logits.shape[0] // m, m, joint_logits.shape[1] // m, m)


def sla_aggregate(joint_logits: Tensor, num_transforms: int) -> Tensor:
    r"""Aggregated inference: :math:`z^{\mathrm{agg}}_{ic} = \frac1M \sum_k z_{iM+k,\; cM+k}`, the mean over
    transforms of the joint logit of each class at the transform applied (``[NM, CM] -> [N, C]``)."""
    return _blocks(joint_logits, num_transforms).diagonal(dim1=1, dim2=3).mean(dim=-1)


def sla_single(joint_logits: Tensor, num_transforms: int) -> Tensor:
    r"""Single inference: the joint logits of untransformed inputs at transform 0, :math:`z_{i,\; cM}`
    (``[N, CM] -> [N, C]``; the authors' ``preds[::M, ::M]`` is this on the expanded batch's rows ``::M``)."""
    if joint_logits.ndim != 2 or joint_logits.shape[1] % num_transforms:
        raise ValueError(
            f"joint logits must be [N, C*M] for M={num_transforms}, got shape {tuple(joint_logits.shape)}."
        )
    return joint_logits[:, ::num_transforms]


def sla_self_distillation(single_logits: Tensor, aggregated_logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""SLA+SD's per-sample distillation term from the aggregated joint prediction to the normal head:
    :math:`T^2\,\mathrm{KL}\big(\sigma(z^{\mathrm{agg}}/T)\,\|\,\sigma(z^{\mathrm{single}}/T)\big)`, the
    aggregated logits without gradient (their mean over the batch is the authors' ``batchmean`` KL)."""
    log_student = F.log_softmax(single_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(aggregated_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(dim=-1) * temperature**2
