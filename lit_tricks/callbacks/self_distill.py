"""Self-distillation: soft targets from the model's own past predictions (PS-KD) or from its EMA teacher."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.callbacks.mixup import Mixup
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.sample_table import SampleTable, TableDevice, check_table_options
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.distillation import distillation_kl, pskd_alpha, pskd_targets, sigmoid_rampup
from lit_tricks.functional.losses import to_probabilities


class SelfDistill(Trick):
    r"""Distil the model into itself, with the soft targets from one of two teachers.

    ``teacher="past_predictions"`` is **PS-KD** ("Self-Knowledge Distillation with Progressive Refinement of
    Targets", Kim et al., ICCV 2021). The target of sample :math:`i` in epoch :math:`t` (0-based) is

    .. math:: \tilde y_i = (1 - \alpha_t)\,y_i + \alpha_t\, p_{t-1}(x_i),
              \qquad \alpha_t = \alpha_T \frac{t + 1}{T},

    trained with soft-target cross-entropy, where :math:`y_i` is the one-hot label (or the given probability
    target, e.g. smoothed labels), :math:`p_{t-1}(x_i)` the softmax the model gave sample :math:`i` when it
    last saw it (in the previous epoch) and :math:`T` the number of epochs; epoch 0 uses :math:`y_i`. The
    predictions live in a table indexed by dataset index (so batches must carry ``index``), filled from all
    ranks under DDP and saved in checkpoints; it costs no extra forward pass and :math:`N \times C` numbers
    of memory (``table_dtype="float16"`` halves it; ``table_device="cpu"`` keeps it in host memory). A
    prediction that is not finite is never stored (``tricks/SelfDistill/nonfinite`` counts them).

    ``teacher="ema"`` is **mean-teacher distillation**: the loss gains

    .. math:: w(s)\; T^2\,\mathrm{KL}\big(\sigma(z^{\mathrm{EMA}}_i/T)\,\|\,\sigma(z_i/T)\big),
              \qquad w(s) = w \exp\!\big(-5 (1 - \min(s/S, 1))^2\big),

    with :math:`z^{\mathrm{EMA}}` the outputs of the trainer's :class:`~lit_tricks.EMATeacher` (one extra
    forward pass in eval mode, no grad), :math:`s` the optimizer step and :math:`S` = ``rampup_steps``. The
    teacher may see another augmented view of the batch, ``batch[view_key]``.

    With Mixup/CutMix: SelfDistill runs first (``order = -10``), so the PS-KD targets of each sample are
    built before the mixing trick mixes inputs and targets with one permutation; the table then stores the
    predictions for the mixed inputs, and the EMA teacher sees the mixed inputs the student sees. Mixup mixes
    ``inputs`` only, so ``view_key`` together with Mixup/CutMix is refused at setup.

    Args:
        teacher: ``"past_predictions"`` (PS-KD) or ``"ema"``.
        alpha_T: PS-KD's final weight of the past predictions :math:`\alpha_T` (0.8 in the paper).
        total_epochs: PS-KD's :math:`T`; default ``Trainer(max_epochs=...)``.
        table_dtype: ``"float32"`` or ``"float16"`` storage of the PS-KD table.
        table_device: ``"module"`` (the model's device) or ``"cpu"`` (host memory) for the PS-KD table.
        num_samples: rows of the PS-KD table (``None``: the index range of the training set).
        temperature: EMA distillation temperature :math:`T`.
        weight: EMA distillation weight :math:`w`.
        rampup_steps: optimizer steps :math:`S` of the sigmoid ramp-up of :math:`w` (0: no ramp-up).
        view_key: batch key of the view the EMA teacher sees (default: the student's inputs).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, SelfDistill
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> pskd = SelfDistill(teacher="past_predictions", alpha_T=0.8)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[pskd], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> bool(pskd.table.seen.all())
        True
    """

    tunable = ("alpha_T", "temperature", "weight")  # PBT may change these mid-run (lit_tricks.tune)

    order = -10

    def __init__(
        self,
        teacher: Literal["past_predictions", "ema"] = "past_predictions",
        alpha_T: float = 0.8,
        total_epochs: int | None = None,
        table_dtype: Literal["float32", "float16"] = "float32",
        temperature: float = 4.0,
        weight: float = 1.0,
        rampup_steps: int = 0,
        view_key: str | None = None,
        table_device: TableDevice = "module",
        num_samples: int | None = None,
    ) -> None:
        if teacher not in ("past_predictions", "ema"):
            raise ValueError(f"teacher must be 'past_predictions' (PS-KD) or 'ema', got {teacher!r}.")
        check_number("alpha_T", alpha_T, at_least=0.0, at_most=1.0)
        if total_epochs is not None:
            check_number("total_epochs", total_epochs, at_least=1, integer=True)
        check_table_options(table_dtype, table_device, num_samples)
        check_number("temperature", temperature, above=0.0)
        check_number("weight", weight, at_least=0.0)
        check_number("rampup_steps", rampup_steps, at_least=0, integer=True)
        self.teacher, self.alpha_T, self.total_epochs = teacher, alpha_T, total_epochs
        self.table = SampleTable(getattr(torch, table_dtype), table_device, num_samples)  # each sample's last softmax
        self.temperature, self.weight, self.rampup_steps, self.view_key = temperature, weight, rampup_steps, view_key
        self.needs_index = teacher == "past_predictions"
        self._alpha = 0.0

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.teacher == "ema":
            EMATeacher.of(trainer)  # a clear error now if there is none
            mixing = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, Mixup)]
            if mixing and self.view_key is not None:
                raise ValueError(
                    f"SelfDistill(view_key={self.view_key!r}) with {mixing[0]}: {mixing[0]} mixes batch['inputs'] "
                    f"but not batch[{self.view_key!r}], so the teacher would see other samples than the student. "
                    f"Drop view_key (the teacher then sees the mixed inputs) or drop {mixing[0]}; mixing every "
                    "view with one permutation is a feature of the mixing trick, not of SelfDistill."
                )
        elif self.total_epochs is None and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError(
                "PS-KD's alpha schedule needs the number of epochs: set Trainer(max_epochs=...) or "
                "SelfDistill(total_epochs=...)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher != "past_predictions":
            return
        self.table.allocate(trainer, pl_module, owner="SelfDistill (PS-KD)")

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        if self.teacher != "past_predictions":
            return batch
        epoch = trainer.current_epoch
        self._alpha = 0.0 if epoch == 0 else pskd_alpha(epoch, self.total_epochs or trainer.max_epochs, self.alpha_T)
        if self._alpha == 0.0:
            return batch  # the targets as given: (1 - 0) y + 0 p, exactly
        targets = batch.targets  # class ids, or probabilities that PS-KD blends as they are
        given = to_probabilities(targets, module.num_classes)
        past = self.table.read(batch.index, default=given)  # a sample not seen before keeps its label
        batch.targets = pskd_targets(given, past, self._alpha)
        return batch

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        log_now = logging_due(trainer)
        if self.teacher == "past_predictions":
            self.table.write(module, batch.index, out.probabilities().detach())
            if log_now:
                module.log(self.tag("alpha"), self._alpha)
                module.log(self.tag("nonfinite"), self.table.nonfinite.float())
            return out
        inputs = batch.inputs if self.view_key is None else batch.extras[self.view_key]
        teacher_logits = EMATeacher.of(trainer).teacher(inputs)
        weight = self.weight * sigmoid_rampup(trainer.global_step, self.rampup_steps)
        out.aux_losses["distill"] = weight * distillation_kl(out.logits, teacher_logits, self.temperature).mean()
        if log_now:
            module.log(self.tag("weight"), weight)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.table.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table.load_state_dict(state_dict)
