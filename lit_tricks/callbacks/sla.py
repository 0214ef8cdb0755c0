"""Self-supervised label augmentation: learn the joint label over (class, input transform) on a 4x batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_tricks.callbacks.mic import MIC
from lit_tricks.callbacks.self_distill import SelfDistill
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number, named_submodule
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.sla import (
    NUM_TRANSFORMS,
    sla_aggregate,
    sla_joint_targets,
    sla_self_distillation,
    sla_single,
    sla_transform,
)


class SLAHead(nn.Module):
    r"""The head of an SLA model: a joint linear layer with :math:`CM` outputs (column :math:`cM + k`: class
    :math:`c` under transform :math:`k`) and, for SLA+SD, a normal :math:`C`-way layer on the same features.

    In training mode it returns the joint logits and keeps the normal head's logits in ``single_logits`` for
    :class:`SLA` to read. In eval mode it returns :math:`C` logits: the normal head's with ``self_distill``
    (SLA+SD's one-pass inference), else the joint logits at transform 0 (the paper's "single" inference);
    inside :meth:`joint_outputs` it returns the joint logits in eval mode too (for aggregated inference).
    """

    def __init__(
        self, in_features: int, num_classes: int, num_transforms: int = NUM_TRANSFORMS, self_distill: bool = False
    ) -> None:
        super().__init__()
        self.num_classes, self.num_transforms = num_classes, num_transforms
        self.joint = nn.Linear(in_features, num_classes * num_transforms)
        self.single = nn.Linear(in_features, num_classes) if self_distill else None
        self.single_logits: Tensor | None = None
        self._joint_in_eval = False

    def forward(self, features: Tensor) -> Tensor:
        if self.training:
            self.single_logits = None if self.single is None else self.single(features)
            return self.joint(features)
        if self.single is not None and not self._joint_in_eval:
            return self.single(features)
        joint = self.joint(features)
        return joint if self._joint_in_eval else sla_single(joint, self.num_transforms)

    @contextmanager
    def joint_outputs(self) -> Iterator[None]:
        """Within the block the head returns the joint logits in eval mode as well."""
        self._joint_in_eval = True
        try:
            yield
        finally:
            self._joint_in_eval = False


def sla_head(
    model: nn.Module, num_transforms: int = NUM_TRANSFORMS, self_distill: bool = False, head: str = "head"
) -> nn.Module:
    """Replace ``model``'s final ``nn.Linear`` (the submodule named ``head``, a dotted path) by a fresh
    :class:`SLAHead` with ``num_classes * num_transforms`` joint outputs, in place; return ``model``.

    :class:`SLA` calls it at setup with ``head="backbone.head"`` (a :class:`~lit_tricks.Classifier` around our
    nets), so a user's module gets the head by naming its final ``Linear``; a model already given the head
    (e.g. built with ``sla_head(CNN2D(10))`` and then wrapped) is left as it is. The state-dict keys become
    ``head.joint.*`` (and ``head.single.*`` with ``self_distill``).
    """
    target = named_submodule(model, head, "the final Linear layer")
    check_number("num_transforms", num_transforms, at_least=2, integer=True)
    if isinstance(target, SLAHead):
        if target.num_transforms != num_transforms or (target.single is not None) != self_distill:
            raise ValueError(
                f"{head!r} is already an SLAHead with num_transforms={target.num_transforms}, "
                f"self_distill={target.single is not None}; it cannot change to {num_transforms}, {self_distill}."
            )
        return model
    if not isinstance(target, nn.Linear):
        raise TypeError(
            f"SLA replaces the final nn.Linear, but {head!r} is a {type(target).__name__}: set head to the name of "
            "the Linear layer that maps features to class logits."
        )
    new = SLAHead(target.in_features, target.out_features, num_transforms, self_distill)
    parent_name, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent_name), name, new.to(target.weight.device, target.weight.dtype))
    return model


def _find_head(module: nn.Module) -> SLAHead:
    heads = [m for m in module.modules() if isinstance(m, SLAHead)]
    if len(heads) != 1:
        raise ValueError(f"Expected one SLAHead in {type(module).__name__}, found {len(heads)}: use sla_head().")
    return heads[0]


class SLA(Trick):
    r"""Self-supervised label augmentation (Lee, Hwang, Shin, "Self-supervised Label Augmentation via Input
    Transformations", ICML 2020), following the authors' code (``hankook/SLA``).

    Each training batch is expanded to every sample under :math:`M = 4` transforms :math:`t_k` (rotations by
    0/90/180/270 degrees for square images; for 1-D signals identity, reversal, half-length circular shift and
    both, a set of ours, see :func:`~lit_tricks.functional.sla.sla_transform`), and the model learns the joint
    label :math:`(y, k)` with one softmax over :math:`CM` classes:

    .. math:: \mathcal L_{\mathrm{SLA}} = \frac{1}{NM}\sum_{i,k} -\log \sigma\big(z(t_k(x_i))\big)_{yM+k}.

    With ``self_distill`` (SLA+SD) a normal :math:`C`-way head on the same features learns the label and the
    aggregated joint prediction :math:`z^{\mathrm{agg}}_{ic} = \frac1M \sum_k z(t_k(x_i))_{cM+k}` (no gradient):

    .. math:: \mathcal L = \mathcal L_{\mathrm{SLA}} + \frac1N\sum_i \Big[\mathrm{CE}(z^{s}_i, y_i)
              + T^2\,\mathrm{KL}\big(\sigma(z^{\mathrm{agg}}_i/T)\,\|\,\sigma(z^{s}_i/T)\big)\Big].

    At setup the module's final ``nn.Linear`` (``head``) becomes an :class:`SLAHead` with :math:`CM` outputs (see
    :func:`sla_head`). Evaluation (validation, test, predict, an EMA teacher) runs once per sample and gets
    :math:`C` logits: the normal head with ``self_distill``, else the joint logits at transform 0. The aggregated
    inference (the paper's SLA+AG, :math:`M` passes) is :meth:`aggregated_logits`.

    Cost: every training step runs the model on :math:`4N` rows (about 4x the time and activation memory of a
    plain step at the same ``batch_size``). The expanded batch is the one the loss sees: ``train/acc`` is the
    joint accuracy, and each row's loss is that of one (sample, transform) pair; a per-sample weight (e.g. from
    reweighting) is repeated over its sample's rows, so the weighted mean is the weighted mean over samples of
    their transform-averaged loss, and SLA+SD adds its two terms to the sample's transform-0 row (times
    :math:`M`), so they are weighted alike. SLA runs last (``order = 100``): Mixup/CutMix (whose probability
    targets become joint probabilities) and weights act on the original batch. Tricks that keep per-sample
    memories of :math:`C`-way predictions (ELR, PS-KD) or compare the student's logits with a teacher's
    (SelfDistill, MIC) would see joint logits, and are refused at setup.

    Args:
        self_distill: SLA+SD: add the normal head and its cross-entropy and distillation terms.
        temperature: :math:`T` of the distillation (the authors' default 1).
        head: dotted name of the module's final ``nn.Linear`` (``"backbone.head"`` for a
            :class:`~lit_tricks.Classifier` around ``lit_tricks.nets``).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.sla import SLA
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import CNN2D
        >>> trainer = L.Trainer(max_steps=2, callbacks=[SLA()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> model = Classifier(CNN2D(10, width=8), num_classes=10)
        >>> trainer.fit(model, DigitsDataModule(as_image=True))
        >>> model.backbone.head.joint.out_features
        40
    """

    order = 100

    def __init__(self, self_distill: bool = False, temperature: float = 1.0, head: str = "backbone.head") -> None:
        if not isinstance(self_distill, bool):
            raise TypeError(f"self_distill must be True or False, got {self_distill!r}.")
        check_number("temperature", temperature, above=0.0, hint="The authors use 1.")
        if not isinstance(head, str) or not head:
            raise TypeError(f"head must be the dotted name of the final Linear, e.g. 'backbone.head', got {head!r}.")
        self.self_distill, self.temperature, self.head = self_distill, temperature, head
        self.num_transforms = NUM_TRANSFORMS
        self._head: SLAHead | None = None
        self._targets: Tensor | None = None  # the original batch's targets, for SLA+SD's normal head

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        clashing = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, Trick) and cb is not self and (cb.needs_index or isinstance(cb, (SelfDistill, MIC)))
        ]
        if clashing:
            raise ValueError(
                f"SLA makes the training logits joint (C*M classes on a 4x batch), but {', '.join(clashing)} read "
                "C-way predictions per sample (a per-sample memory or a teacher's logits): drop one of them."
            )
        sla_head(pl_module, self.num_transforms, self.self_distill, self.head)
        self._head = pl_module.get_submodule(self.head)

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        m, n = self.num_transforms, len(batch)
        self._targets = batch.targets
        expanded = batch.select(torch.arange(n, device=batch.inputs.device).repeat_interleave(m))
        expanded.inputs = sla_transform(batch.inputs)
        expanded.targets = sla_joint_targets(batch.targets, m)
        return expanded

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        m, targets = self.num_transforms, self._targets
        n = out.logits.shape[0] // m
        aggregated = sla_aggregate(out.logits, m)
        log_now = logging_due(trainer)
        if self.self_distill:
            single, self._head.single_logits = self._head.single_logits, None
            if single is None:
                raise RuntimeError(
                    f"SLA: the head {self.head!r} was not called in training mode by this step's forward; set head= "
                    "to the final Linear the module's forward calls."
                )
            single = single[::m]  # the normal head on the untransformed rows, as the authors' single_preds[::n]
            single_ce = module.per_sample_loss(single, targets)
            distill = sla_self_distillation(single, aggregated, self.temperature)
            # the loss is a mean over n*m rows: m times the terms on each sample's transform-0 row is once per sample
            first_row = torch.zeros(m, device=single.device, dtype=single_ce.dtype)
            first_row[0] = m
            per_row = out.per_sample_loss.view(n, m) + (single_ce + distill)[:, None] * first_row
            out.per_sample_loss = per_row.flatten()
            if log_now:
                module.log(self.tag("single_ce"), single_ce.detach().mean())
                module.log(self.tag("distill_kl"), distill.detach().mean())
        if log_now:
            hard = targets if targets.ndim == 1 else targets.argmax(dim=-1)
            module.log(self.tag("aggregated_acc"), (aggregated.detach().argmax(dim=-1) == hard).float().mean())
        self._targets = None
        return out

    @staticmethod
    @torch.no_grad()
    def aggregated_logits(module: nn.Module, inputs: Tensor) -> Tensor:
        r"""The paper's aggregated inference for a module with an :class:`SLAHead`: ``[N, C]`` logits
        :math:`\frac1M\sum_k z(t_k(x))_{cM+k}` from one pass over the :math:`MN` transformed inputs (eval mode,
        no grad; every layer's train/eval flag is restored)."""
        head = _find_head(module)
        with eval_mode(module), head.joint_outputs():
            joint = module(sla_transform(inputs))
        return sla_aggregate(joint, head.num_transforms)
