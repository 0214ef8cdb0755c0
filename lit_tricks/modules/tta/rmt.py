"""RMT: robust mean teacher for continual test-time adaptation."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional.ema import ema_update_
from lit_tricks.functional.tta import default_augment, prototype_contrastive_loss, symmetric_cross_entropy
from lit_tricks.modules.tta.base import TTAModule, use_batch_statistics


class RMT(TTAModule):
    r"""Robust mean teacher (Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation",
    CVPR 2023), source-free: the whole student adapts (BatchNorm on test-batch statistics), an EMA teacher
    :math:`\theta_t \leftarrow m\,\theta_t + (1-m)\,\theta_s` (``momentum`` 0.999) follows it, and

    .. math:: \mathcal L = \tfrac12\,\mathrm{SCE}(s(x), t(x)) + \tfrac12\,\mathrm{SCE}(s(\tilde x), t(x))
              + \lambda_\text{cont}\,\mathcal L_\text{SupCon}

    with the symmetric cross-entropy (:math:`\alpha = 0.5`, :func:`symmetric_cross_entropy`), :math:`\tilde x` an
    augmented view, and, when source class ``prototypes`` are given, the contrastive loss pulling the projected
    features of :math:`x`, :math:`\tilde x` and :math:`x`'s nearest prototype (by cosine similarity; the raw class
    mean goes through the projector, like the raw features) together (temperature 0.1). The
    prediction is the sum of student and teacher logits. The authors' repository replays labelled source data
    by default; here that term and the source warm-up are left out (source-free, as their maintainers advise
    for source-free use). Reset restores student, teacher, projector and optimizer.

    Args:
        model: the source model; with ``prototypes`` it needs ``forward_features`` and ``forward_head``.
        lr: Adam learning rate (the authors' CIFAR configs: 1e-3).
        momentum: teacher EMA momentum :math:`m`.
        prototypes: ``[C, D]`` source class means of ``forward_features`` (``None``: no contrastive term).
        lambda_cont: weight of the contrastive term.
        temperature: SupCon temperature.
        augment: ``x -> x~`` (default :func:`default_augment`).
        steps, episodic, reset_every, domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.999, prototypes: Tensor | None = None,
        lambda_cont: float = 1.0, temperature: float = 0.1, augment=None, steps: int = 1, episodic: bool = False,
        reset_every: int = 0, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        check_number("momentum", momentum, above=0.0, below=1.0)
        if prototypes is not None:
            if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                raise ValueError("RMT's contrastive term needs model.forward_features and model.forward_head.")
            width = getattr(model, "num_features", prototypes.shape[-1])
            finite = bool(torch.isfinite(prototypes).all())
            if prototypes.ndim != 2 or prototypes.shape[1] != width or not finite:
                raise ValueError(
                    f"prototypes must be finite source class means [C, {width}] of model.forward_features, got "
                    f"shape {tuple(prototypes.shape)}{'' if finite else ' with NaN rows'}: "
                    "compute them with lit_tricks.functional.tta.class_prototypes(features, labels, num_classes)."
                )
        self._source_prototypes = prototypes  # registered in build_models, before the state is snapshot
        super().__init__(model, lr, steps, episodic, reset_every, domain_names, source_checkpoint)
        self.momentum, self.lambda_cont, self.temperature = momentum, lambda_cont, temperature
        self.augment = augment or default_augment

    def build_models(self) -> None:
        self.teacher = copy.deepcopy(self.model)
        self.projector = None
        if self._source_prototypes is not None:
            d = self._source_prototypes.shape[1]
            self.projector = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128))
            weight = next(self.model.parameters())
            # the raw class means (as the authors' code), in the model's dtype and on its device
            self.register_buffer("prototypes", self._source_prototypes.to(weight.device, weight.dtype))

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(True)
        use_batch_statistics(self.model)
        self.teacher.eval().requires_grad_(False)
        use_batch_statistics(self.teacher)

    def collect_params(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        return params + (list(self.projector.parameters()) if self.projector is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        """The prediction: student plus teacher logits."""
        return self.model(x) + self.teacher(x)

    def _contrastive(self, f_x: Tensor, f_aug: Tensor) -> Tensor:
        """SupCon over the views (nearest prototype, f(x), f(x~)), all three raw features through the projector;
        the nearest prototype by cosine similarity."""
        nearest = (F.normalize(f_x.detach(), dim=1) @ F.normalize(self.prototypes, dim=1).T).argmax(dim=1)
        views = torch.stack([self.prototypes[nearest], f_x, f_aug], dim=1)  # [B, 3, D]
        return prototype_contrastive_loss(self.projector(views), self.temperature)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        x_aug = self.augment(x)
        with torch.no_grad():
            teacher = self.teacher(x)
        if self.projector is not None:
            f_x, f_aug = self.model.forward_features(x), self.model.forward_features(x_aug)
            student, student_aug = self.model.forward_head(f_x), self.model.forward_head(f_aug)
        else:
            student, student_aug = self.model(x), self.model(x_aug)
        loss = 0.5 * symmetric_cross_entropy(student, teacher).mean()
        loss = loss + 0.5 * symmetric_cross_entropy(student_aug, teacher).mean()
        if self.projector is not None and self.lambda_cont:
            loss = loss + self.lambda_cont * self._contrastive(f_x, f_aug)
        loss.backward()
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad()
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), self.momentum)
        return student + teacher
