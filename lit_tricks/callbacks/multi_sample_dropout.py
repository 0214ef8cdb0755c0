"""Multi-sample dropout as a trick: wrap the head at setup, average the K samples' losses per sample."""

from __future__ import annotations

import lightning.pytorch as pl

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import Trick
from lit_tricks.layers.multi_sample_dropout import MultiSampleDropout, multi_sample_dropout, multi_sample_loss


class ApplyMultiSampleDropout(Trick):
    """Multi-sample dropout (Inoue, 2019): ``K`` dropout masks through the shared head, their losses averaged.

    At ``setup`` it wraps the module's ``head`` (a dotted submodule name; ``backbone.head`` for a
    :class:`~lit_tricks.Classifier` around our nets) in :class:`~lit_tricks.layers.MultiSampleDropout`. In each
    training step the forward returns the mean of the ``K`` samples' logits (``StepOutput.logits``, used for
    ``train/acc`` and by later tricks), and this trick replaces the per-sample loss by the paper's
    ``l_i = (1/K) sum_k loss(z_{k,i}, y_i)`` with the module's own ``per_sample_loss`` (so soft targets from
    Mixup or self-distillation work). It runs first (``order = -100``), so every later trick (reweighting, ELR,
    ...) sees the averaged per-sample loss; a later trick that recomputes the loss from ``out.logits`` gets the
    logit average instead. Cost: one backbone pass and ``K`` head passes (one batched call on ``K * N`` rows).
    Evaluation is one head pass without dropout.

    Args:
        p: dropout probability (the paper: 0.5).
        samples: dropout samples ``K`` (the paper: 8).
        head: dotted name of the layers after the features, called by the module's forward.
    """

    order = -100

    def __init__(self, p: float = 0.5, samples: int = 8, head: str = "backbone.head") -> None:
        check_number("p", p, at_least=0.0, below=1.0)
        check_number("samples", samples, at_least=1, integer=True)
        if not isinstance(head, str) or not head:
            raise TypeError(f"head must be the dotted name of a submodule, e.g. 'backbone.head', got {head!r}.")
        self.p, self.samples, self.head = p, samples, head
        self._layer: MultiSampleDropout | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        multi_sample_dropout(pl_module, self.p, self.samples, head=self.head)
        self._layer = pl_module.get_submodule(self.head)

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        logits, self._layer.sample_logits = self._layer.sample_logits, None
        if logits is None:
            raise RuntimeError(
                f"ApplyMultiSampleDropout: the wrapped head {self.head!r} was not called in training mode by this "
                "step's forward; set head= to the layer the module's forward calls after the features."
            )
        out.per_sample_loss = multi_sample_loss(logits, batch.targets, module.per_sample_loss)
        return out
