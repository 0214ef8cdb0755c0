"""Dynamic loss-based sample reweighting: weight each sample by how its loss compares within the global batch."""

from __future__ import annotations

import lightning.pytorch as pl

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.distributed import all_gather_rows
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.reweighting import Strategy, reweighting_weights


class SampleReweighting(Trick):
    r"""Loss-based sample reweighting ("Dynamic Loss-Based Sample Reweighting for Improved Large Language Model
    Pretraining", Sow et al., ICLR 2025).

    The per-sample losses of the **global** batch (all-gathered under DDP, where the ranks' batches may
    differ in size) are mapped onto
    :math:`[-\delta, \delta]`, scored by a strategy :math:`f`, and turned into weights

    .. math:: w_i = N\,\frac{\exp(f_i / r)}{\sum_j \exp(f_j / r)}, \qquad
              \mathcal L = \frac1N \sum_i w_i\,\ell_i,

    with mean weight 1 (so a uniform :math:`f` gives the plain mean). Strategies: ``linupper``
    :math:`\min(x + \delta, \delta)` (down-weights the easiest samples), ``quadratic``
    :math:`1 - x^2/\delta^2` (favours medium losses), ``extremes`` :math:`|x|`. During the first
    ``warmup_steps`` optimizer steps the weights are uniform (``tricks/SampleReweighting/warmup_remaining``
    counts the steps left). Weights multiply any weights already on the batch.

    Args:
        strategy: ``"linupper"``, ``"quadratic"`` or ``"extremes"``.
        temperature: :math:`r`; larger is closer to uniform (the authors' configs use 0.4 and 1.0).
        delta: :math:`\delta` of the normalisation (1 in the paper).
        warmup_steps: optimizer steps with uniform weights first (the authors' code: 1000).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, SampleReweighting
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[SampleReweighting("linupper")], log_every_n_steps=10,
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> float(trainer.callback_metrics["tricks/SampleReweighting/weight_max"]) >= 1.0
        True
    """

    tunable = ("temperature", "delta")  # PBT may change these mid-run (lit_tricks.tune)

    def __init__(
        self, strategy: Strategy = "linupper", temperature: float = 1.0, delta: float = 1.0, warmup_steps: int = 0
    ) -> None:
        if strategy not in ("linupper", "quadratic", "extremes"):
            raise ValueError(f"strategy must be 'linupper', 'quadratic' or 'extremes', got {strategy!r}.")
        check_number("temperature", temperature, above=0.0)
        check_number("delta", delta, above=0.0)
        check_number("warmup_steps", warmup_steps, at_least=0, integer=True)
        self.strategy, self.temperature, self.delta, self.warmup_steps = strategy, temperature, delta, warmup_steps

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        log_now = logging_due(trainer)
        if self.warmup_steps and log_now:
            module.log(self.tag("warmup_remaining"), float(max(self.warmup_steps - trainer.global_step, 0)))
        if trainer.global_step < self.warmup_steps:
            return out
        losses = out.per_sample_loss.detach()
        (everything,), sizes = all_gather_rows(module, losses)  # the global batch, rank 0's samples first
        weights = reweighting_weights(everything, self.strategy, self.temperature, self.delta)
        start = sum(sizes[: trainer.global_rank])
        weights = weights[start : start + len(losses)]  # this rank's slice
        batch.weight = weights if batch.weight is None else batch.weight * weights
        if log_now:
            module.log(self.tag("weight_max"), weights.max())
            module.log(self.tag("weight_min"), weights.min())
        return out
