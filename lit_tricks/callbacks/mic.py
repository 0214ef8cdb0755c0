"""Masked image consistency: predict the EMA teacher's pseudo-labels from a block-masked input."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.mic import Weighting, block_mask, mic_loss, mic_pseudo_labels


class MIC(Trick):
    r"""Masked Image Consistency (Hoyer, Dai, Wang, Van Gool, "MIC: Masked Image Consistency for
    Context-Enhanced Domain Adaptation", CVPR 2023), following the authors' code (``lhoyer/MIC``).

    The student sees the batch with random blocks withheld, :math:`x^M = m \odot x`, and learns the pseudo-labels
    :math:`\hat y_i = \arg\max_c p^{\mathrm{EMA}}_{ic}` that the trainer's :class:`~lit_tricks.EMATeacher`
    predicts on the full input, weighted by their quality :math:`q_i`:

    .. math:: \mathcal L_{\mathrm{MIC}} = \lambda\,\frac1N \sum_i q_i\,\mathrm{CE}\big(f(x^M_i), \hat y_i\big),
              \qquad m_{\mathrm{block}} = [u > r],\; u \sim U(0, 1)\ \text{per block},

    added to the loss as ``train/mic``. The mask has one number per ``block_size`` block (segments for 1-D
    signals), so a fraction ``ratio`` of the blocks is withheld on average
    (:func:`~lit_tricks.functional.mic.block_mask`).
    The quality :math:`q_i` is, by ``weighting``: ``"confidence"``, the teacher's top probability (the authors'
    classification code with ``pseudo_label_weight='prob'``; the per-sample analogue of the paper's weight);
    ``"threshold_fraction"``, the fraction of the batch's samples whose top probability reaches ``threshold``,
    the same for every sample (the paper's segmentation weight, the fraction of pixels above 0.968, with samples
    for pixels); ``"none"``, 1 (the classification code's default).

    Cost: one teacher forward (eval mode, no grad; shared with any other teacher consumer on the same inputs) and
    one more student forward and backward on the masked batch: about 2x a plain step. The masked forward updates
    BatchNorm statistics too, as in the authors' code. The term is a batch mean, so per-sample weights (e.g.
    reweighting) do not act on it. MIC reads ``batch.inputs`` after every ``before_forward``: with Mixup the
    teacher and the masked student see the mixed inputs. The masks come from a private generator whose state is
    checkpointed, so a resumed run masks exactly as an uninterrupted one. Needs an ``EMATeacher`` among the
    callbacks (a clear error at setup otherwise).

    Args:
        block_size: side of a mask block in input units (pixels, time steps). ``None``: 1/8 of the input's
            shortest side, rounded, at least 1 (the paper's 64 px blocks on 512 px crops).
        ratio: :math:`r`, the fraction of blocks masked (the paper: 0.7).
        weighting: ``"confidence"``, ``"threshold_fraction"`` or ``"none"`` (above).
        threshold: the confidence threshold of ``"threshold_fraction"`` (the paper: 0.968).
        weight: :math:`\lambda` (the paper: 1).
        seed: seed of the private mask generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, EMATeacher
        >>> from lit_tricks.callbacks.mic import MIC
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import CNN2D
        >>> trainer = L.Trainer(max_steps=2, callbacks=[EMATeacher(decay=0.99), MIC(block_size=2)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     limit_val_batches=0, log_every_n_steps=1)
        >>> trainer.fit(Classifier(CNN2D(10, width=8), num_classes=10), DigitsDataModule(as_image=True))
        >>> "train/mic" in trainer.callback_metrics
        True
    """

    def __init__(
        self,
        block_size: int | None = None,
        ratio: float = 0.7,
        weighting: Weighting = "confidence",
        threshold: float = 0.968,
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        if block_size is not None:
            check_number("block_size", block_size, at_least=1, integer=True, hint="E.g. 1/8 of the input's side.")
        check_number("ratio", ratio, at_least=0.0, below=1.0, hint="The paper masks 0.7 of the blocks.")
        if weighting not in ("confidence", "threshold_fraction", "none"):
            raise ValueError(f"weighting must be 'confidence', 'threshold_fraction' or 'none', got {weighting!r}.")
        check_number("threshold", threshold, at_least=0.0, at_most=1.0, hint="The paper uses 0.968.")
        check_number("weight", weight, at_least=0.0)
        check_number("seed", seed, integer=True)
        self.block_size, self.ratio, self.weighting = block_size, ratio, weighting
        self.threshold, self.weight = threshold, weight
        self._rng = torch.Generator().manual_seed(seed)
        self._teacher: EMATeacher | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        try:
            self._teacher = EMATeacher.of(trainer)
        except ValueError as error:
            raise ValueError(f"MIC matches the pseudo-labels of an EMA teacher. {error}") from error

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        inputs = batch.inputs
        labels, quality = mic_pseudo_labels(self._teacher.teacher(inputs), self.weighting, self.threshold)
        spatial = inputs.shape[2:] if inputs.ndim == 4 else inputs.shape[-1:]
        block = self.block_size or max(1, round(min(spatial) / 8))
        mask = block_mask(inputs, block, self.ratio, self._rng)
        out.aux_losses["mic"] = self.weight * mic_loss(module(inputs * mask), labels, quality).mean()
        if logging_due(trainer):
            module.log(self.tag("quality"), quality.mean())
            module.log(self.tag("pseudo_label_acc"), (labels == batch.hard_targets).float().mean())
            module.log(self.tag("masked_fraction"), 1.0 - mask.float().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng.set_state(state_dict["rng"])
