"""Temperature scaling: fit one temperature on the validation NLL after training and divide the logits by it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_calibration_error

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import log_tag
from lit_tricks.functional.temperature_scaling import fit_temperature, scale_logits


class TemperatureScaling(Callback):
    r"""Post-hoc temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), the
    baseline whose limits under class overlap "On the Limitations of Temperature Scaling for Distributions with
    Overlaps" (Chidambaram & Ge, ICLR 2024) proves.

    At the end of ``fit`` it runs the module over the (first) validation dataloader, gathers the logits from every
    process and fits :math:`T^\star = \arg\min_{T>0} \mathrm{NLL}(\mathrm{softmax}(z/T), y)`
    (:func:`~lit_tricks.functional.temperature_scaling.fit_temperature`, L-BFGS on :math:`\log T`). Afterwards,
    in ``validate``, ``test`` and ``predict`` (not in a later ``fit``), a forward hook divides the module's output
    logits by :math:`T^\star`, so ``test/nll``, ``test/ece`` and the predicted probabilities are the calibrated
    ones; accuracy is unchanged. :math:`T^\star` is the callback's checkpoint state (``ckpt_path=`` restores it).

    It logs ``tricks/TemperatureScaling/temperature`` and the validation ``nll_before``, ``nll_after``,
    ``ece_before``, ``ece_after`` (top-label ECE with ``ece_bins`` bins) to the loggers; the same values are in
    :attr:`fit_summary`.

    Args:
        max_iter: L-BFGS iterations (Guo et al.'s code: 50).
        ece_bins: bins of the logged expected calibration error (the module's ``val/ece`` uses 15).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.temperature_scaling import TemperatureScaling
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> scaling = TemperatureScaling()
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[scaling], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), DigitsDataModule())
        >>> scaling.temperature > 0
        True
        >>> scaling.fit_summary["nll_after"] <= scaling.fit_summary["nll_before"]
        True
    """

    def __init__(self, max_iter: int = 50, ece_bins: int = 15) -> None:
        check_number("max_iter", max_iter, at_least=1, integer=True, hint="Guo et al. use 50.")
        check_number("ece_bins", ece_bins, at_least=1, integer=True)
        self.max_iter, self.ece_bins = max_iter, ece_bins
        self.temperature: float | None = None
        self.fit_summary: dict[str, float] = {}
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    # ------------------------------------------------------------------ fitting
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logits, targets = self._validation_logits(trainer, pl_module)
        num_classes = logits.shape[1]
        temperature = fit_temperature(logits, targets, max_iter=self.max_iter)

        def summary(z: Tensor) -> tuple[float, float]:
            nll = F.cross_entropy(z.double(), targets).item()
            ece = multiclass_calibration_error(z.softmax(1), targets, num_classes, n_bins=self.ece_bins).item()
            return nll, ece

        (nll_before, ece_before), (nll_after, ece_after) = summary(logits), summary(scale_logits(logits, temperature))
        self.temperature = temperature
        self.fit_summary = {
            "temperature": temperature, "nll_before": nll_before, "nll_after": nll_after,
            "ece_before": ece_before, "ece_after": ece_after,
        }  # fmt: skip
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({log_tag(self, k): v for k, v in self.fit_summary.items()}, step=trainer.global_step)

    @torch.no_grad()
    def _validation_logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            raise ValueError(
                "TemperatureScaling fits the temperature on the validation set, but the run has no validation "
                "dataloader: give the data module a val_dataloader (and do not set limit_val_batches=0)."
            )
        logits, targets = [], []
        with eval_mode(pl_module):
            for batch in loader:
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                tb = TrickBatch.from_batch(batch)
                logits.append(pl_module(tb.inputs).float())
                targets.append(tb.hard_targets)
        logits, targets = torch.cat(logits), torch.cat(targets)
        if trainer.world_size > 1:  # each rank holds its share (equal sizes under the distributed sampler)
            logits = pl_module.all_gather(logits).flatten(0, 1)
            targets = pl_module.all_gather(targets).flatten(0, 1)
        return logits, targets

    # ------------------------------------------------------------------ applying
    def _apply(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return scale_logits(output, self.temperature)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.temperature is not None and trainer.state.fn != TrainerFn.FITTING and self._hook is None:
            self._hook = pl_module.register_forward_hook(self._apply)

    def _end(self, *args: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    on_validation_start = on_test_start = on_predict_start = _start
    on_validation_end = on_test_end = on_predict_end = teardown = _end

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = state_dict["temperature"]
