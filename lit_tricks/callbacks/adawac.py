"""AdaWAC: per-sample trainable weights between the supervised loss and the consistency of two augmented views."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.sample_table import SampleTable, TableDevice, check_table_options
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.adawac import adawac_consistency, adawac_objective, adawac_weights
from lit_tricks.functional.tta import default_augment

_INPUTS = "adawac_inputs"  # the batch's inputs before the first view's augmentation, kept in TrickBatch.extras


class AdaWAC(Trick):
    r"""AdaWAC ("Adaptively Weighted Data Augmentation Consistency Regularization for Robust Optimization under
    Concept Shift", Dong, Xie & Ward, ICML 2023), following the authors' ``UNETS_AW_AC`` (``gail-yxie/adawac``,
    ``models.py``), adapted from segmentation to classification.

    Each step sees two augmented views :math:`x^{(1)}_i, x^{(2)}_i` of every sample. Per sample, the supervised loss
    is the mean cross-entropy of the two views and the consistency the scaled squared distance of their features
    :math:`\phi` (the penultimate features, ``consistency_on="features"``, or the logits):

    .. math:: \ell^{\rm CE}_i = \tfrac12\big(\mathrm{CE}(x^{(1)}_i, y_i) + \mathrm{CE}(x^{(2)}_i, y_i)\big),\qquad
              \ell^{\rm AC}_i = \lambda_{\rm AC}\,\tfrac1D\lVert\phi(x^{(1)}_i) - \phi(x^{(2)}_i)\rVert_2^2 .

    Every training sample has weights :math:`\beta_i \in \Delta_2`, starting at :math:`(\frac12, \frac12)`, which take
    one mirror-descent ascent step each time the sample is seen, before the model's step (as in the authors' code),

    .. math:: \beta_i \leftarrow \frac{\beta_i \odot \exp(\eta\,[\ell^{\rm CE}_i, \ell^{\rm AC}_i])}
              {\lVert \beta_i \odot \exp(\eta\,[\ell^{\rm CE}_i, \ell^{\rm AC}_i]) \rVert_1},

    and the per-sample loss becomes :math:`\beta_{i,0}\ell^{\rm CE}_i + \beta_{i,1}\ell^{\rm AC}_i` (the weights
    detached). The weights ascend: each sample's weight moves to the larger of its two terms, so a sample the model
    already fits (small :math:`\ell^{\rm CE}`, as the paper's label-sparse slices) is trained mostly for consistency,
    and a hard or mislabelled one mostly on its label. The weights live in a table indexed by dataset index (batches
    must carry ``index``), filled from every rank under DDP and saved in checkpoints.

    The first view replaces the batch's inputs in ``before_forward`` (so tricks after this one see it); the second is
    a second forward pass in ``after_loss``. Without ``augment_first_view`` the first view is the batch as the data
    gives it (for a data pipeline that already augments).

    Args:
        step_size: :math:`\eta`, the weights' learning rate (authors' default 1; their runs 8 for UNet, 2 for
            TransUNet).
        consistency_weight: :math:`\lambda_{\rm AC}` (authors' default 1; their runs 2).
        augment: ``x -> x~``, a random, label-preserving augmentation of a batch of inputs; ``None``:
            :func:`~lit_tricks.functional.tta.default_augment` (contrast, brightness, a small shift, Gaussian noise).
        consistency_on: ``"features"`` (the module's ``forward_features``, as the authors' encoder output) or
            ``"logits"``.
        augment_first_view: augment the first view too (the authors augment both).
        table_dtype, table_device, num_samples: storage of the weights table (see ``ELR``).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.adawac import AdaWAC
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_steps=5, callbacks=[AdaWAC(step_size=1.0)], logger=False, log_every_n_steps=1,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(label_noise=0.4))
        >>> 0.0 < float(trainer.callback_metrics["tricks/AdaWAC/supervised_weight"]) < 1.0
        True
    """

    tunable = ("step_size", "consistency_weight")  # PBT may change these mid-run (lit_tricks.tune)

    needs_index = True

    def __init__(
        self,
        step_size: float = 1.0,
        consistency_weight: float = 1.0,
        augment: Callable[[Tensor], Tensor] | None = None,
        consistency_on: Literal["features", "logits"] = "features",
        augment_first_view: bool = True,
        table_dtype: Literal["float32", "float16"] = "float32",
        table_device: TableDevice = "module",
        num_samples: int | None = None,
    ) -> None:
        check_number("step_size", step_size, at_least=0.0, hint="The authors use 1 (default), 2 or 8.")
        check_number("consistency_weight", consistency_weight, at_least=0.0, hint="The authors use 1 or 2.")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable x -> x~ (or None: default_augment), got {augment!r}.")
        if consistency_on not in ("features", "logits"):
            raise ValueError(f"consistency_on must be 'features' or 'logits', got {consistency_on!r}.")
        if not isinstance(augment_first_view, bool):
            raise TypeError(f"augment_first_view must be True or False, got {augment_first_view!r}.")
        check_table_options(table_dtype, table_device, num_samples)
        self.step_size, self.consistency_weight = float(step_size), float(consistency_weight)
        self.augment = augment if augment is not None else default_augment
        self.consistency_on, self.augment_first_view = consistency_on, augment_first_view
        self.needs_features = consistency_on == "features"
        self.weights = SampleTable(getattr(torch, table_dtype), table_device, num_samples)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # two columns per sample, the supervised weight first (SampleTable sizes its rows by module.num_classes)
        two_columns = SimpleNamespace(num_classes=2, device=pl_module.device, all_gather=pl_module.all_gather)
        self.weights.allocate(trainer, two_columns, owner="AdaWAC")

    def _view(self, inputs: Tensor) -> Tensor:
        view = self.augment(inputs)
        if not isinstance(view, Tensor) or view.shape != inputs.shape:
            got = tuple(view.shape) if isinstance(view, Tensor) else type(view).__name__
            raise ValueError(f"augment must return a tensor of the inputs' shape {tuple(inputs.shape)}, got {got}.")
        return view

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        if self.augment_first_view:
            batch.extras[_INPUTS] = batch.inputs
            batch.inputs = self._view(batch.inputs)
        return batch

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        view = self._view(batch.extras.get(_INPUTS, batch.inputs))
        if self.needs_features:
            logits, features = module.forward_features(view)
            first, second = out.features, features
        else:
            logits = module(view)
            first, second = out.logits, logits
        supervised = 0.5 * (out.per_sample_loss + module.per_sample_loss(logits, batch.targets))
        consistency = self.consistency_weight * adawac_consistency(first, second)
        stored = self.weights.read(batch.index, default=0.5)
        weights = adawac_weights(stored, supervised, consistency, self.step_size)
        self.weights.write(module, batch.index, weights)
        out.per_sample_loss = adawac_objective(supervised, consistency, weights)
        if logging_due(trainer):
            n = len(batch)
            module.log(self.tag("supervised_weight"), weights[:, 0].mean(), batch_size=n)
            module.log(self.tag("supervised"), supervised.detach().mean(), batch_size=n)
            module.log(self.tag("consistency"), consistency.detach().mean(), batch_size=n)
            module.log(self.tag("nonfinite"), self.weights.nonfinite.float())
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.weights.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights.load_state_dict(state_dict)
