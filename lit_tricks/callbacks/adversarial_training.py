"""PGD adversarial training, with the deferred class reweighting of imbalanced adversarial training on top."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.pgd import class_balanced_weights, pgd_attack


class AdversarialTraining(Trick):
    r"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018), with the class reweighting studied for imbalanced data by Wang et al. ("Imbalanced Adversarial
    Training with Reweighting", ICDM 2022) as an option.

    Every training batch's inputs are replaced by PGD adversarial examples
    (:func:`~lit_tricks.functional.pgd.pgd_attack`): ``steps`` signed-gradient steps of size ``step_size`` on the
    module's own per-sample loss, projected on the L-infinity ball of radius ``eps`` (and on
    ``[clamp_min, clamp_max]``), from a uniform random start drawn with a private generator saved in checkpoints.
    The attack runs the model in evaluation mode (batch-norm statistics and dropout untouched), takes gradients
    with respect to the inputs only, and gives every layer back its train/eval flag; the training step then
    minimises

    .. math:: \frac1N \sum_i w_{y_i}\,\ell\big(f(x_i^{\mathrm{adv}}), y_i\big),

    with :math:`w \equiv 1`, or, with ``reweight_beta`` set, from epoch ``reweight_from_epoch`` on, the
    class-balanced weights :math:`w_c \propto (1-\beta)/(1-\beta^{n_c})` of the training class counts
    :math:`n_c` (:func:`~lit_tricks.functional.pgd.class_balanced_weights`, mean 1 over the training samples;
    :math:`\beta = 1`: inverse frequency). The weights multiply any weights already on the batch.

    Wang et al.'s SRAT adds a feature-separability term to this reweighted loss; it is **not** built here (the
    authors' code could not be found to check its form).

    Costs ``steps`` extra forward and backward passes per training step (PGD-10: about 11 times plain training).
    Runs after the tricks that change inputs (``order = 5``; Mixup is 0), so the attack sees the inputs the model
    is trained on.

    Args:
        eps: L-infinity radius, in input units (Madry et al. on CIFAR-10 in [0, 1]: 8/255; standardised inputs
            need it divided by their standard deviation).
        step_size: PGD step; ``None``: ``eps / 4`` (2/255 at 8/255, the usual setting).
        steps: PGD iterations (10 in training, the usual setting).
        random_start: start from a uniform draw in the ball (Madry et al.).
        clamp_min, clamp_max: the valid input range (``0, 1`` for images in [0, 1]); ``None``: unbounded.
        reweight_beta: :math:`\beta \in [0, 1]` of the class weights, or ``None`` (no reweighting). DRW's 0.9999
            is practically inverse frequency for classes of fewer than ~1000 samples.
        reweight_from_epoch: first epoch of the reweighting (deferred re-weighting switches at epoch 160 of 200).
        class_counts: training samples per class; ``None``: the data module's ``train_class_counts`` (set by our
            data modules when ``imbalance_ratio`` is given).
        seed: seed of the private generator of the random starts.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.adversarial_training import AdversarialTraining
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trick = AdversarialTraining(eps=0.1, steps=3, clamp_min=0.0, clamp_max=1.0, reweight_beta=0.9999)
        >>> trainer = L.Trainer(max_steps=5, callbacks=[trick], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(imbalance_ratio=10))
        >>> 0.0 <= float(trainer.callback_metrics["tricks/AdversarialTraining/adv_acc"]) <= 1.0
        True
    """

    order = 5

    def __init__(
        self,
        eps: float = 8 / 255,
        step_size: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        reweight_beta: float | None = None,
        reweight_from_epoch: int = 0,
        class_counts: Sequence[int] | Tensor | None = None,
        seed: int = 0,
    ) -> None:
        check_number("eps", eps, at_least=0.0, hint="It is the L-infinity radius in input units, e.g. 8/255.")
        if step_size is not None:
            check_number("step_size", step_size, at_least=0.0, hint="None: eps / 4.")
        check_number("steps", steps, at_least=1, integer=True, hint="10 is the usual PGD-10.")
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be True or False, got {random_start!r}.")
        for name, value in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
            if value is not None:
                check_number(name, value, hint="None leaves that side of the input range open.")
        if clamp_min is not None and clamp_max is not None and clamp_min >= clamp_max:
            raise ValueError(f"clamp_min must be below clamp_max, got {clamp_min} and {clamp_max}.")
        if reweight_beta is not None:
            check_number("reweight_beta", reweight_beta, at_least=0.0, at_most=1.0, hint="None: no reweighting.")
        check_number("reweight_from_epoch", reweight_from_epoch, at_least=0, integer=True)
        check_number("seed", seed, integer=True)
        self.eps, self.steps, self.random_start = float(eps), steps, random_start
        self.step_size = self.eps / 4 if step_size is None else float(step_size)
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.reweight_beta, self.reweight_from_epoch = reweight_beta, reweight_from_epoch
        self.class_counts = None if class_counts is None else _check_counts(class_counts, "class_counts")
        self._class_weights: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.reweight_beta is None or stage != "fit":
            return
        counts = self.class_counts
        if counts is None:
            found = getattr(getattr(trainer, "datamodule", None), "train_class_counts", None)
            if found is None:
                raise ValueError(
                    "AdversarialTraining's reweight_beta needs the training class counts: pass class_counts=[...], "
                    "or use a lit_tricks data module with imbalance_ratio set (it exposes train_class_counts)."
                )
            counts = _check_counts(found, "the data module's train_class_counts")
        if len(counts) != pl_module.num_classes:
            raise ValueError(
                f"class_counts has {len(counts)} entries but the module has num_classes={pl_module.num_classes}."
            )
        self._class_weights = class_balanced_weights(counts, self.reweight_beta)

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        clean = batch.inputs
        with eval_mode(module):
            batch.inputs = pgd_attack(
                module, clean, batch.targets, self.eps, self.step_size, self.steps, self.random_start,
                self._generator, module.per_sample_loss, self.clamp_min, self.clamp_max,
            )  # fmt: skip
            if logging_due(trainer):
                self._log_attack(module, clean, batch)
        return batch

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        if self._class_weights is not None and trainer.current_epoch >= self.reweight_from_epoch:
            weights = self._class_weights.to(out.per_sample_loss.device)[batch.hard_targets]
            batch.weight = weights if batch.weight is None else batch.weight * weights
        return out

    def _log_attack(self, module: pl.LightningModule, clean: Tensor, batch: TrickBatch) -> None:
        """Log the eval-mode accuracy on the adversarial inputs, the attack's loss, and its success rate: the
        fraction of the correctly classified clean inputs it turns into errors."""
        with torch.no_grad():
            labels = batch.hard_targets
            right = module(clean).argmax(dim=-1) == labels
            logits = module(batch.inputs)
            still = logits.argmax(dim=-1) == labels
            n = len(batch)
            module.log(self.tag("adv_acc"), still.float().mean(), batch_size=n)
            module.log(self.tag("adv_loss"), module.per_sample_loss(logits, batch.targets).mean(), batch_size=n)
            flipped = (right & ~still).sum() / right.sum().clamp_min(1)
            module.log(self.tag("success_rate"), flipped.float(), batch_size=n)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])


def _check_counts(counts: Sequence[int] | Tensor, name: str) -> Tensor:
    """The class counts as an integer tensor; every class must have at least one sample."""
    counts = torch.as_tensor(counts)
    if counts.ndim != 1 or counts.numel() < 2 or counts.is_floating_point() or bool((counts < 1).any()):
        raise ValueError(
            f"{name} must be positive integer sample counts, one per class (at least 2), got {counts.tolist()}: "
            "a class without training samples cannot be reweighted."
        )
    return counts
