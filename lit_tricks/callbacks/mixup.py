"""Mixup and CutMix: train on convex combinations (or cut-and-paste) of pairs of samples and of their labels."""

from __future__ import annotations

import math
from collections.abc import MutableMapping, MutableSequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.losses import to_probabilities
from lit_tricks.functional.mixing import (
    cutmix_,
    cutmix_box,
    cutmix_masks,
    mixed_one_hot,
    mixup_,
    paste_box_,
    sample_mixing,
    smooth_labels,
)


class Mixup(Trick):
    r"""Mixup (Zhang et al., ICLR 2018), optionally switching with CutMix (Yun et al., ICCV 2019) as timm does.

    Each training batch is paired with a random permutation :math:`\pi` of itself and

    .. math:: \tilde x_i = \lambda_i x_i + (1 - \lambda_i)\, x_{\pi(i)}, \qquad
              \tilde y_i = \lambda_i y_i + (1 - \lambda_i)\, y_{\pi(i)}, \qquad
              \lambda_i \sim \mathrm{Beta}(\alpha, \alpha),

    with one :math:`\lambda` per batch (``mode="batch"``) or one per sample (``mode="elem"``, vectorised).
    With ``cutmix_alpha > 0`` a batch is instead cut-mixed with probability ``switch_prob``: a box (images
    ``[N, C, H, W]``) or a segment (signals ``[N, L]`` / ``[N, C, L]``) of side about
    :math:`S\sqrt[d]{1-\lambda}` is pasted from the partner and :math:`\lambda` is corrected to the pasted
    area. The box is the official code's and timm's ``rand_bbox`` (half-side ``int(S * sqrt(1 - lam)) // 2``,
    uniform centre, clipped; see :func:`~lit_tricks.functional.cutmix_masks`).

    ``stop_at`` gives early-stopped mixup ("The Benefits of Mixup for Feature Learning"): no mixing after
    that fraction of the training steps. Labels become probabilities (optionally smoothed by
    ``label_smoothing``), which the soft-target cross-entropy of :class:`~lit_tricks.TrickModule` (and
    ``F.cross_entropy``) accept. Inputs are mixed in place on their device. All randomness comes from a
    private generator whose state is checkpointed, so a resumed run mixes exactly as an uninterrupted one.

    With a :class:`~lit_tricks.TrickModule` it runs in ``before_forward``; with a plain ``LightningModule``
    it mutates dict or list batches in ``on_train_batch_start`` (tuples cannot be changed: a clear error
    says so) and needs ``num_classes``.

    Args:
        alpha: Mixup's :math:`\alpha` (0 turns Mixup off, leaving CutMix only).
        cutmix_alpha: CutMix's :math:`\alpha` (0: no CutMix).
        switch_prob: probability of CutMix instead of Mixup when both alphas are positive.
        mode: ``"batch"`` (one :math:`\lambda` per batch) or ``"elem"`` (one per sample).
        prob: probability of mixing a batch at all.
        label_smoothing: :math:`\epsilon` of :math:`(1-\epsilon) y + \epsilon / C`, applied to the
            mixed targets (the same as smoothing before mixing: both are linear).
        stop_at: fraction of the training steps after which mixing stops (``None``: never).
        num_classes: number of classes; needed only with a plain ``LightningModule``.
        seed: seed of the private generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, Mixup
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[Mixup(alpha=0.4)], logger=False, log_every_n_steps=10,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> 0.0 <= float(trainer.callback_metrics["tricks/Mixup/lam"]) <= 1.0
        True
    """

    tunable = ("alpha", "cutmix_alpha", "switch_prob", "prob", "label_smoothing")  # PBT may change these mid-run

    works_without_trick_module = True

    def __init__(
        self,
        alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        mode: Literal["batch", "elem"] = "batch",
        prob: float = 1.0,
        label_smoothing: float = 0.0,
        stop_at: float | None = None,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        check_number("alpha", alpha, at_least=0.0, hint="E.g. Mixup(alpha=0.2).")
        check_number("cutmix_alpha", cutmix_alpha, at_least=0.0, hint="E.g. CutMix(alpha=1.0).")
        if alpha == cutmix_alpha == 0:
            raise ValueError("alpha and cutmix_alpha are both 0: e.g. Mixup(alpha=0.2) or CutMix(alpha=1.0).")
        check_number("switch_prob", switch_prob, at_least=0.0, at_most=1.0)
        check_number("prob", prob, at_least=0.0, at_most=1.0)
        if mode not in ("batch", "elem"):
            raise ValueError(f"mode must be 'batch' (one lambda per batch) or 'elem' (one per sample), got {mode!r}.")
        check_number("label_smoothing", label_smoothing, at_least=0.0, below=1.0)
        if stop_at is not None:
            check_number("stop_at", stop_at, above=0.0, at_most=1.0, hint="It is a fraction of the training steps.")
        if num_classes is not None:
            check_number("num_classes", num_classes, at_least=2, integer=True)
        check_number("seed", seed, integer=True)
        self.alpha, self.cutmix_alpha, self.switch_prob = alpha, cutmix_alpha, switch_prob
        self.mode, self.prob, self.label_smoothing = mode, prob, label_smoothing
        self.stop_at, self.num_classes = stop_at, num_classes
        self._rng = np.random.default_rng(seed)
        self._stop_step: int | None = None
        self._checked = False  # a plain module's first batch is checked against num_classes

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._checked = False
        if isinstance(pl_module, TrickModule):
            self.num_classes = pl_module.num_classes
        elif self.num_classes is None:
            raise ValueError(
                f"{type(self).__name__} on a plain LightningModule turns class ids into probabilities, so it needs "
                f"{type(self).__name__}(num_classes=...); or use a lit_tricks.TrickModule."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_at is not None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    f"{type(self).__name__}(stop_at={self.stop_at}) stops at a fraction of the run, but this run has "
                    "no step budget (max_epochs=-1 or only max_time): set max_steps or max_epochs, or stop_at=None."
                )
            self._stop_step = int(self.stop_at * total)

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        batch.targets = self._apply(trainer, module, batch.inputs, batch.targets)
        return batch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(pl_module, TrickModule):
            return  # the module calls before_forward
        if not isinstance(batch, (MutableMapping, MutableSequence)):
            raise TypeError(
                f"{type(self).__name__} on a plain LightningModule changes the batch in place, but the batch is a "
                f"{type(batch).__name__}: return a dict with 'inputs'/'targets' or a list [inputs, targets] "
                "(e.g. wrap the dataset in lit_tricks.data.IndexedDataset), or use a lit_tricks.TrickModule."
            )
        key = "targets" if isinstance(batch, MutableMapping) else 1
        inputs = batch["inputs"] if key == "targets" else batch[0]
        if not self._checked:
            TrickBatch(inputs, batch[key]).check(self.num_classes)  # a clear error, not one_hot's
            self._checked = True
        batch[key] = self._apply(trainer, pl_module, inputs, batch[key])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state_dict["rng"]

    # ------------------------------------------------------------------ internals
    def _apply(self, trainer: pl.Trainer, module: pl.LightningModule, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mix ``inputs`` in place; return the (mixed, smoothed) probability targets. Smoothing is linear, so
        smoothing the mixed targets equals mixing the smoothed ones."""
        stopped = self._stop_step is not None and trainer.global_step >= self._stop_step
        if stopped or self._rng.random() >= self.prob:
            probs = to_probabilities(targets, self.num_classes)
            return smooth_labels(probs, self.label_smoothing) if self.label_smoothing else probs
        use_cutmix = self.cutmix_alpha > 0 and (self.alpha == 0 or self._rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.alpha
        if not (use_cutmix or inputs.is_floating_point()):
            raise TypeError(
                f"Mixup blends inputs, but they are {inputs.dtype}: convert them to floating point in the dataset "
                "or a transform (e.g. images as x.float() / 255)."
            )
        per_sample = self.mode == "elem"
        perm, lam = sample_mixing(self._rng, len(inputs), alpha, per_sample, inputs.device)
        if not per_sample:
            lam = float(lam)  # one weight for the batch: mixing by a number needs no tensor on the device
        spatial = tuple(inputs.shape[2:] if inputs.ndim == 4 else inputs.shape[-1:])
        with torch.no_grad():
            if use_cutmix and not per_sample:  # one box: paste by slicing, on the host's numbers
                box, lam = cutmix_box(spatial, lam, self._rng)
                paste_box_(inputs, perm, box)
            elif use_cutmix:
                mask, lam = cutmix_masks(spatial, lam, self._rng, inputs.device)
                cutmix_(inputs, perm, mask)
            else:
                mixup_(inputs, perm, lam)
        if logging_due(trainer):
            module.log(self.tag("lam"), lam.mean() if per_sample else lam)
            module.log(self.tag("cutmix"), float(use_cutmix))
        if targets.ndim == 2:
            probs = mixup_(targets.float(), perm, lam)
        else:
            probs = mixed_one_hot(targets, perm, lam, self.num_classes)
        return smooth_labels(probs, self.label_smoothing) if self.label_smoothing else probs


class CutMix(Mixup):
    r"""CutMix (Yun et al., ICCV 2019): paste a box (images) or a segment (1-D signals) of the partner sample,
    with :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` corrected to the pasted area; labels mixed by
    :math:`\lambda`. ``Mixup(alpha=..., cutmix_alpha=..., switch_prob=...)`` switches between the two.

    Args:
        alpha: CutMix's :math:`\alpha` (1.0 in the paper).
        mode, prob, label_smoothing, stop_at, num_classes, seed: as in :class:`Mixup`.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        mode: Literal["batch", "elem"] = "batch",
        prob: float = 1.0,
        label_smoothing: float = 0.0,
        stop_at: float | None = None,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        check_number("alpha", alpha, above=0.0, hint="E.g. CutMix(alpha=1.0).")
        super().__init__(0.0, alpha, 0.5, mode, prob, label_smoothing, stop_at, num_classes, seed)
