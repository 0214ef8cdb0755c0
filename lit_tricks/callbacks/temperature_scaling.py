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
from lit_tricks.core.checks import check_number, named_submodule
from lit_tricks.core.trick import log_tag
from lit_tricks.functional.temperature_scaling import fit_temperature, scale_logits


class TemperatureScaling(Callback):
    r"""Post-hoc temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), the
    baseline whose limits under class overlap "On the Limitations of Temperature Scaling for Distributions with
    Overlaps" (Chidambaram & Ge, ICLR 2024) proves.

    During ``fit``, at the end of every validation epoch it reads the logits of the module's own validation
    forward (a forward hook on ``logits_module``; no extra pass) on the first validation dataloader, gathers them
    from every process and fits
    :math:`T^\star = \arg\min_{T>0} \mathrm{NLL}(\mathrm{softmax}(z/T), y)`
    (:func:`~lit_tricks.functional.temperature_scaling.fit_temperature`, L-BFGS on :math:`\log T`); so the
    temperature at the end of ``fit`` is the one of the final weights (when the last epoch validates, the default),
    and every checkpoint, saved after its validation, holds the :math:`T^\star` of its own weights (``ckpt_path=``
    restores it). The ``fit``'s own validation metrics stay uncalibrated. In ``validate``, ``test`` and ``predict``
    a forward hook divides that network's output logits by :math:`T^\star`, so ``val/nll``, ``test/ece`` and the
    predicted probabilities are the calibrated ones; accuracy is unchanged.

    It logs, at each fit, ``tricks/TemperatureScaling/temperature`` and the validation ``nll_before``,
    ``nll_after``, ``ece_before``, ``ece_after`` (top-label ECE with ``ece_bins`` bins); the last values are also in
    :attr:`fit_summary`.

    Args:
        max_iter: L-BFGS iterations (Guo et al.'s code: 50).
        ece_bins: bins of the logged expected calibration error (the module's ``val/ece`` uses 15).
        logits_module: dotted name of the submodule whose output are the module's logits (``backbone`` for a
            :class:`~lit_tricks.Classifier`); the hooks sit on it rather than on the LightningModule, whose
            ``forward`` Lightning redirects to the step methods under DDP.

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

    def __init__(self, max_iter: int = 50, ece_bins: int = 15, logits_module: str = "backbone") -> None:
        check_number("max_iter", max_iter, at_least=1, integer=True, hint="Guo et al. use 50.")
        check_number("ece_bins", ece_bins, at_least=1, integer=True)
        if not isinstance(logits_module, str) or not logits_module:
            raise TypeError(f"logits_module must be a dotted submodule name such as 'backbone', got {logits_module!r}.")
        self.max_iter, self.ece_bins, self.logits_module = max_iter, ece_bins, logits_module
        self.temperature: float | None = None
        self.fit_summary: dict[str, float] = {}
        self._hook: torch.utils.hooks.RemovableHandle | None = None  # applies T in validate / test / predict
        self._capture_hook: torch.utils.hooks.RemovableHandle | None = None  # reads the logits in fit's validation
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._captured: Tensor | None = None
        self._net: nn.Module | None = None
        self._classes: int | None = None

    # ------------------------------------------------------------------ fitting
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._net = named_submodule(pl_module, self.logits_module, "the network whose output are the logits")
        self._classes: int | None = getattr(pl_module, "num_classes", None)
        if stage == "fit" and trainer.limit_val_batches == 0:
            raise ValueError(
                "TemperatureScaling fits the temperature on the validation set, but limit_val_batches=0 turns "
                "validation off: let the run validate (and give the data module a val_dataloader)."
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logits, self._targets, self._captured = [], [], None
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._capture_hook = self._net.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[1] != (self._classes or output.shape[1]):
            raise ValueError(
                f"TemperatureScaling needs [N, C] logits (C = num_classes) from {self.logits_module!r}, got "
                f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}: set logits_module to the network "
                "that outputs the logits."
            )
        self._captured = output.detach().float()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._capture_hook is not None and dataloader_idx == 0 and self._captured is not None:
            self._logits.append(self._captured)
            self._targets.append(TrickBatch.from_batch(batch).hard_targets)
        self._captured = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture_hook is None:
            return
        self._capture_hook.remove()
        self._capture_hook = None
        logits, targets = torch.cat(self._logits), torch.cat(self._targets)
        self._logits, self._targets = [], []
        if trainer.world_size > 1:  # each rank holds its share (equal sizes under the distributed sampler)
            logits = pl_module.all_gather(logits).flatten(0, 1)
            targets = pl_module.all_gather(targets).flatten(0, 1)
        temperature = fit_temperature(logits, targets, max_iter=self.max_iter)

        def summary(z: Tensor) -> tuple[float, float]:
            nll = F.cross_entropy(z.double(), targets).item()
            ece = multiclass_calibration_error(z.softmax(1), targets, z.shape[1], n_bins=self.ece_bins).item()
            return nll, ece

        (nll_before, ece_before), (nll_after, ece_after) = summary(logits), summary(scale_logits(logits, temperature))
        self.temperature = temperature
        self.fit_summary = {
            "temperature": temperature, "nll_before": nll_before, "nll_after": nll_after,
            "ece_before": ece_before, "ece_after": ece_after,
        }  # fmt: skip
        for name, value in self.fit_summary.items():  # the same on every rank
            pl_module.log(log_tag(self, name), value, sync_dist=False)

    # ------------------------------------------------------------------ applying
    def _apply(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return scale_logits(output, self.temperature)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.temperature is not None and trainer.state.fn != TrainerFn.FITTING:
            self._end()
            self._hook = self._net.register_forward_hook(self._apply)

    def _end(self, *args: Any, **kwargs: Any) -> None:
        for name in ("_hook", "_capture_hook"):
            if getattr(self, name) is not None:
                getattr(self, name).remove()
                setattr(self, name, None)

    on_validation_start = on_test_start = on_predict_start = _start
    on_validation_end = on_test_end = on_predict_end = teardown = _end

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = state_dict["temperature"]
