"""Teacher-to-student distillation losses: DHKD's binary KL losses on logits and TGeo-KD's geometry features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.core.checks import check_number


def _clamped_logit(logits: Tensor, eps: float) -> Tensor:
    r"""Clamp logits to :math:`[\mathrm{logit}(\epsilon), \mathrm{logit}(1-\epsilon)]`: the same as clamping the
    sigmoid to :math:`[\epsilon, 1-\epsilon]` (and zero gradient outside), but exact in float32, where
    :math:`1 - 10^{-8}` rounds to 1 and the authors' clamp lets :math:`\log(1 - \sigma)` reach :math:`-\infty`."""
    check_number("eps", eps, above=0.0, below=0.5)
    bound = math.log((1.0 - eps) / eps)
    return logits.float().clamp(-bound, bound)


def _bernoulli_kl(target_logit: Tensor, logit: Tensor) -> Tensor:
    r"""Element-wise :math:`\mathrm{KL}(\mathrm{Bern}(\sigma(a))\,\|\,\mathrm{Bern}(\sigma(b)))`, in log space."""
    q = torch.sigmoid(target_logit)
    log_q, log_not_q = F.logsigmoid(target_logit), F.logsigmoid(-target_logit)
    return q * (log_q - F.logsigmoid(logit)) + (1.0 - q) * (log_not_q - F.logsigmoid(-logit))


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0, eps: float = 1e-8) -> Tensor:
    r"""DHKD's BinaryKL (Yang et al. 2024), per sample: every class is a binary problem on its own logit,

    .. math:: \ell_i = T^2 \sum_k \mathrm{KL}\big(\mathrm{Bern}(\sigma(z^t_{ik}/T))\,\big\|\,
              \mathrm{Bern}(\sigma(z^s_{ik}/T))\big),

    with :math:`\sigma` the logistic sigmoid and both probabilities clamped to :math:`[\epsilon, 1-\epsilon]`
    (as the authors' ``BinaryKL.py``, computed in log space so it stays finite). Unlike the softmax KL it sees
    each logit's own scale. Returns ``[N]``.
    """
    check_number("temperature", temperature, above=0.0)
    student = _clamped_logit(student_logits / temperature, eps)
    teacher = _clamped_logit(teacher_logits / temperature, eps)
    return _bernoulli_kl(teacher, student).sum(dim=-1) * temperature**2


def binary_kl_norm(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0, eps: float = 1e-8
) -> Tensor:
    r"""DHKD's stabilised BinaryKL-Norm (the loss of ``--distill dhkd`` in the authors' code), per sample:

    .. math:: d_{ik} = \mathrm{clamp}\big(\sigma((z^s_{ik} - z^t_{ik})/T), \epsilon, 1-\epsilon\big), \qquad
              \ell_i = T^2 \sum_k \mathrm{KL}\big(\mathrm{Bern}(\tfrac12)\,\|\,\mathrm{Bern}(d_{ik})\big)
                     = T^2 \sum_k \big(-\log 2 - \tfrac12 \log(d_{ik}(1 - d_{ik}))\big).

    It is 0 exactly when every student logit equals the teacher's and grows like :math:`T|z^s-z^t|/2` away
    from it (up to the clamp, past which the gradient is 0, as in the authors' code), so it matches logits,
    not only probabilities, with bounded gradients. Computed in log space, so it stays finite. Returns ``[N]``.
    """
    check_number("temperature", temperature, above=0.0)
    x = _clamped_logit((student_logits.float() - teacher_logits.float()) / temperature, eps)
    return (-math.log(2.0) - 0.5 * (F.logsigmoid(x) + F.logsigmoid(-x))).sum(dim=-1) * temperature**2


def tgeo_relations(student_probs: Tensor, teacher_probs: Tensor, target_probs: Tensor, class_mean: Tensor) -> Tensor:
    r"""TGeo-KD's input to the fusion-ratio network (Hu et al., ICLR 2024): the vertices and squared edges
    of the student/teacher/ground-truth triangle plus the teacher's class mean :math:`\bar T`,

    .. math:: x_i = \big[S_i, T_i, G_i, \bar T_i, (\bar T_i - S_i)^2, (G_i - S_i)^2, (T_i - S_i)^2,
              (T_i - G_i)^2, (\bar T_i - G_i)^2\big] \in \mathbb R^{9C},

    squares taken per class, in the order of the authors' ``state_design`` (option 3). All inputs are
    probabilities ``[N, C]``; ``class_mean`` is :math:`\bar T` already picked for each sample's class.
    """
    shapes = {tuple(t.shape) for t in (student_probs, teacher_probs, target_probs, class_mean)}
    if len(shapes) != 1 or student_probs.ndim != 2:
        raise ValueError(f"tgeo_relations needs four [N, C] tensors of one shape, got shapes {sorted(shapes)}.")
    s, t, g, m = student_probs, teacher_probs, target_probs, class_mean
    return torch.cat([s, t, g, m, (m - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (m - g) ** 2], dim=-1)


def teacher_class_mean(target_probs: Tensor, class_sums: Tensor, class_counts: Tensor) -> Tensor:
    r""":math:`\bar T_i = \sum_c g_{ic}\,\mu_c` with :math:`\mu_c` = ``class_sums[c] / class_counts[c]`` the
    teacher's mean probability vector over samples of class :math:`c` (a class not yet seen counts as
    uniform). For one-hot targets :math:`g_i` this picks the mean of sample :math:`i`'s class. ``[N, C]``."""
    num_classes = class_sums.shape[0]
    seen = class_counts > 0
    means = torch.where(
        seen[:, None], class_sums / class_counts.clamp_min(1e-12)[:, None], torch.full_like(class_sums, 1 / num_classes)
    )
    return target_probs @ means


def fused_kd_loss(alpha: Tensor, kd: Tensor, ce: Tensor) -> Tensor:
    r"""TGeo-KD's per-sample objective :math:`\alpha_i\,\ell^{KD}_i + (1 - \alpha_i)\,\ell^{CE}_i`. ``[N]``."""
    return alpha * kd + (1.0 - alpha) * ce
