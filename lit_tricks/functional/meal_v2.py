"""MEAL V2's discriminator loss on the final outputs, and a gradient-reversal op for its adversarial variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_bce(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    r"""MEAL V2's discriminator loss (Shen & Savvides 2020), per sample: the discriminator's two logits
    :math:`D(\cdot) \in \mathbb R^2` label the student's outputs ``(1, 0)`` and the teacher's ``(0, 1)``,

    .. math:: \ell_i = \tfrac14 \sum_{k=1}^{2} \Big[\mathrm{BCE}\big(D(s_i)_k, \delta_{k1}\big)
              + \mathrm{BCE}\big(D(t_i)_k, \delta_{k2}\big)\Big],
              \qquad \mathrm{BCE}(z, y) = -y \log\sigma(z) - (1 - y)\log(1 - \sigma(z)),

    so that the batch mean of :math:`\ell_i` equals the authors' ``BCEWithLogitsLoss`` mean over the
    :math:`2N \times 2` scores of the concatenated batch ``[student; teacher]``.

    Args:
        student_scores: :math:`D(s_i)`, ``[N, 2]``.
        teacher_scores: :math:`D(t_i)`, ``[N, 2]``.

    Returns:
        ``[N]``.
    """
    if student_scores.shape != teacher_scores.shape or student_scores.ndim != 2 or student_scores.shape[1] != 2:
        raise ValueError(
            "student_scores and teacher_scores must both have shape [N, 2] (the discriminator's two logits), got "
            f"{tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}."
        )
    student_label = student_scores.new_tensor([1.0, 0.0]).expand_as(student_scores)
    teacher_label = teacher_scores.new_tensor([0.0, 1.0]).expand_as(teacher_scores)
    student_term = F.binary_cross_entropy_with_logits(student_scores, student_label, reduction="none").sum(dim=1)
    teacher_term = F.binary_cross_entropy_with_logits(teacher_scores, teacher_label, reduction="none").sum(dim=1)
    return (student_term + teacher_term) / 4.0


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def reverse_grad(x: Tensor) -> Tensor:
    r"""The identity whose gradient is negated (Ganin & Lempitsky 2015): a loss of ``f(reverse_grad(x))`` is
    minimised by the parameters of ``f`` and maximised by those that produce ``x``, in one backward pass."""
    return _ReverseGrad.apply(x)
