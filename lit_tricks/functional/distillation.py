"""Self-distillation: PS-KD targets and schedule, the temperature-scaled KD divergence, ramp-ups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pskd_alpha(epoch: int, total_epochs: int, alpha_T: float = 0.8) -> float:
    r"""PS-KD's weight of the past predictions in epoch ``epoch`` (0-based):
    :math:`\alpha_t = \alpha_T \cdot (t + 1) / T` (Kim et al. 2021, as in the authors' code), held at
    :math:`\alpha_T` for epochs past :math:`T` so the targets stay a distribution."""
    return min(alpha_T, max(0.0, alpha_T * (epoch + 1) / total_epochs))


def pskd_targets(onehot: Tensor, past: Tensor, alpha: float) -> Tensor:
    r"""PS-KD's soft targets :math:`(1 - \alpha_t)\,\mathrm{onehot}(y) + \alpha_t\, p_{t-1}(x)`, as one ``lerp``."""
    return torch.lerp(onehot, past, alpha)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Per-sample :math:`T^2\,\mathrm{KL}\big(\sigma(z_t/T)\,\|\,\sigma(z_s/T)\big)` (Hinton et al. 2015);
    the :math:`T^2` keeps gradient magnitudes comparable across temperatures. Returns ``[N]``."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(dim=-1) * temperature**2


def sigmoid_rampup(step: int, length: int) -> float:
    r"""The mean teacher's ramp-up :math:`\exp(-5(1 - \min(s/L, 1))^2)`; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0), length) / length
    return math.exp(-5.0 * phase * phase)
