"""Distillation from a trained teacher (or an ensemble of them) into the student being trained."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.distill.base import LOSSES, TeacherLoss, build_loss, check_loss_name
from lit_tricks.distill.teachers import Teacher, TeacherSpec


class Distill(Trick):
    r"""Knowledge distillation from a frozen teacher: each sample's loss becomes

    .. math:: \ell_i = w_{\mathrm{hard}}\,\mathrm{CE}(z^s_i, y_i) + w\,r(e)\,\ell^{\mathrm{KD}}_i,
              \qquad r(e) = \min(1, e / E_{\mathrm{warm}}),

    with :math:`\ell^{\mathrm{KD}}_i` the chosen :class:`~lit_tricks.distill.TeacherLoss` (``"kd"``: Hinton
    et al. 2015, :math:`T^2\,\mathrm{KL}(\sigma(z^t_i/T)\,\|\,\sigma(z^s_i/T))`; ``"nd"``: KD++ with the ND
    feature term, :class:`~lit_tricks.distill.NDLoss`; ``"dhkd"``, ``"tgeo"``), :math:`e` the epoch and
    :math:`E_{\mathrm{warm}}` = ``warmup_epochs`` (:math:`r = 1` when 0). The loss stays per sample, so
    reweighting tricks and ELR see the distilled per-sample values.

    The teacher is a module, a Lightning checkpoint path, or a list of them (an ensemble, whose soft label is
    the mean of the teachers' softmax). **MEAL V2** (Shen & Savvides 2020) is a list of teachers with
    ``temperature=1.0`` and ``hard_weight=0.0``. Teachers are frozen, in eval mode, moved to the student's device,
    run under no-grad (``autocast=True``: under ``torch.autocast``), and are not part of the student: not in its
    parameters nor in its checkpoint, which keeps only the teacher paths (a resume fails clearly when a file is
    gone). The loss module is attached to the student as ``module.distill_loss``, so its learnable parts
    (e.g. ND's projection) are trained by the student's optimizer and saved with it.

    Distill works in ``after_loss`` on the batch the earlier tricks produced, so the teacher sees the inputs
    the student saw (mixed ones under Mixup/CutMix); ``order = -5`` puts it before the tricks that reweight
    per-sample losses (order 0). Under DDP each rank runs its teacher on its own shard, with no communication.
    The teacher's outputs are computed once per step: other parts read them with :meth:`teacher_outputs`.
    It logs ``tricks/Distill/<loss>`` (the batch mean of the term), ``tricks/Distill/teacher_acc`` and
    ``tricks/Distill/agreement`` (student and teacher argmax agree) when Lightning writes logs.

    Args:
        teacher: a module, a checkpoint path (``<run>/checkpoints/x.ckpt`` of ``python -m lit_tricks fit``),
            or a list of them; or a :class:`~lit_tricks.distill.Teacher`.
        loss: a name in ``lit_tricks.distill.LOSSES`` (built with ``temperature``) or a ``TeacherLoss``.
        temperature: :math:`T` of a loss given by name; None: that loss's own default, the authors' value
            (kd and nd 4, dhkd 2, tgeo 1.5, meal_v2 1). Give a loss instance its temperature itself.
        weight: :math:`w`.
        hard_weight: :math:`w_{\mathrm{hard}}`, the weight of the module's own per-sample loss.
        warmup_epochs: :math:`E_{\mathrm{warm}}`, epochs of linear ramp-up of :math:`w` (0: none).
        autocast: run the teacher under ``torch.autocast`` on the student's device.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.distill import Distill
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> teacher = MLP(64, 10, hidden=(64,))
        >>> trainer = L.Trainer(max_steps=2, callbacks=[Distill(teacher)], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule())
        >>> any(p.requires_grad for p in teacher.parameters())
        False
    """

    order = -5
    tunable = ("weight", "hard_weight")  # PBT may change these mid-run (lit_tricks.tune)

    def __init__(
        self,
        teacher: TeacherSpec | Teacher,
        loss: str | TeacherLoss = "kd",
        temperature: float | None = None,
        weight: float = 1.0,
        hard_weight: float = 1.0,
        warmup_epochs: int = 0,
        autocast: bool = False,
    ) -> None:
        if temperature is not None:
            check_number("temperature", temperature, above=0.0, hint="Hinton's KD commonly uses 4; MEAL V2 uses 1.")
        check_number("weight", weight, at_least=0.0)
        check_number("hard_weight", hard_weight, at_least=0.0, hint="MEAL V2 uses 0 (no hard labels).")
        check_number("warmup_epochs", warmup_epochs, at_least=0, integer=True)
        if isinstance(loss, str):
            check_loss_name(loss)
            self.loss_name = loss
            self.loss = build_loss(loss, temperature)
        elif isinstance(loss, TeacherLoss):
            if temperature is not None:
                raise ValueError(
                    f"temperature={temperature} and a loss instance: give the temperature to the loss "
                    f"({type(loss).__name__}(temperature=...)) and leave Distill's temperature unset."
                )
            self.loss_name = type(loss).__name__.removesuffix("Loss").lower()
            self.loss = loss
        else:
            raise TypeError(
                f"loss must be one of {sorted(LOSSES)} or a lit_tricks.distill.TeacherLoss, got {type(loss).__name__}."
            )
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, autocast=autocast)
        self.temperature = getattr(self.loss, "temperature", temperature)
        self.weight, self.hard_weight = weight, hard_weight
        self.warmup_epochs = warmup_epochs
        self.needs_features = self.loss.needs_features
        self._cache: tuple[Tensor, int, tuple[Tensor, Tensor | None]] | None = None

    @staticmethod
    def of(trainer: pl.Trainer) -> Distill:
        """The trainer's ``Distill``, with a clear error when there is none."""
        found = [cb for cb in trainer.callbacks if isinstance(cb, Distill)]
        if not found:
            raise ValueError("This needs a teacher: add lit_tricks.Distill(teacher=...) to Trainer(callbacks=[...]).")
        return found[0]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        declared = self.teacher.num_classes
        if declared is not None and declared != pl_module.num_classes:
            raise ValueError(
                f"The teacher predicts {declared} classes but the student has num_classes={pl_module.num_classes}: "
                "distil from a teacher trained on the same classes."
            )
        # a submodule of the student in every stage, so that the student's checkpoints load with the loss's state
        pl_module.distill_loss = self.loss
        if stage == "fit":
            self.teacher.to(trainer.strategy.root_device)
        self.loss.setup(trainer, pl_module, self.teacher)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher.to(pl_module.device)
        self._cache = None

    def teacher_outputs(self, inputs: Tensor | TrickBatch) -> tuple[Tensor, Tensor | None]:
        """The teacher's ``(logits, features or None)`` for ``inputs`` (or a batch's inputs), features when the
        loss reads them. Computed once for the same, unmodified tensor: every part that asks in one step shares
        one teacher forward."""
        inputs = inputs.inputs if isinstance(inputs, TrickBatch) else inputs
        if self._cache is not None and self._cache[0] is inputs and self._cache[1] == inputs._version:
            return self._cache[2]
        outputs = self.teacher(inputs, features=self.loss.needs_teacher_features)
        self._cache = (inputs, inputs._version, outputs)  # holding the tensor keeps its identity unique
        return outputs

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        teacher_logits, teacher_features = self.teacher_outputs(batch)
        if teacher_logits.shape != out.logits.shape:
            raise ValueError(
                f"The teacher's logits have shape {tuple(teacher_logits.shape)} but the student's "
                f"{tuple(out.logits.shape)}: distil from a teacher trained on the same classes."
            )
        term = self.loss(out, teacher_logits, teacher_features, batch.targets)
        ramp = min(1.0, trainer.current_epoch / self.warmup_epochs) if self.warmup_epochs else 1.0
        hard = 0.0 if self.loss.replaces_hard_loss else self.hard_weight
        out.per_sample_loss = hard * out.per_sample_loss + (self.weight * ramp) * term
        if logging_due(trainer):
            teacher_pred = teacher_logits.argmax(dim=-1)
            module.log(self.tag(self.loss_name), term.detach().mean())
            module.log(self.tag("teacher_acc"), (teacher_pred == batch.hard_targets).float().mean())
            module.log(self.tag("agreement"), (teacher_pred == out.logits.detach().argmax(dim=-1)).float().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.teacher.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("teacher_paths", [])
        if saved != self.teacher.paths:
            gone = [path for path in saved if path is not None and not os.path.isfile(path)]
            rank_zero_warn(
                f"Resuming with the teacher {self.teacher.paths}, but the checkpoint was trained with {saved}"
                + (f" ({gone} no longer exist)." if gone else ".")
            )
