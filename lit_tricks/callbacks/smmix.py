"""SMMix: self-motivated image mixing for vision transformers, guided by the model's own attention."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from lit_tricks.callbacks.mixup import Mixup
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.losses import to_probabilities
from lit_tricks.functional.mixing import mixup_, smooth_labels
from lit_tricks.functional.smmix import consistency_loss, fine_grained_loss, smmix_images
from lit_tricks.nets.vit import ViT


class SMMix(Trick):
    r"""SMMix (Chen et al., "SMMix: Self-Motivated Image Mixing for Vision Transformers", ICCV 2023).

    Each batch is paired with its reverse (:math:`\pi(i) = B - 1 - i`, as the authors' code) and, with
    probability ``switch_prob``, mixed by the model itself: one forward of the unmixed images in eval mode without
    gradients gives their logits :math:`z` and last-block attention :math:`a \in \mathbb R^{P}` over the patches;
    a side :math:`k` is drawn uniformly from ``int(s * min_side_ratio) .. int(s * max_side_ratio)`` (``s`` the patch
    grid's side); image ``i``'s ``k x k`` window of least attention receives partner :math:`\pi(i)`'s window of
    most attention (:func:`~lit_tricks.functional.smmix.smmix_images`). With :math:`\lambda = 1 - k^2/P` and
    smoothed labels :math:`\tilde y` the loss is

    .. math:: \mathcal L = \mathrm{CE}\big(\hat z_i, \lambda \tilde y_i + (1-\lambda)\tilde y_{\pi(i)}\big)
              + w_f \mathcal L_{fine} + w_c \mathcal L_{con},

    :math:`\mathcal L_{fine}` classifying the mean output token of each region as its source image
    (:func:`~lit_tricks.functional.smmix.fine_grained_loss`, through the ViT's ``token_head`` as in the authors'
    code when it was built with ``ViT(token_head=True)``, else through its CLS head) and :math:`\mathcal L_{con}`
    the KL divergence from :math:`\mathrm{softmax}(\lambda z_i + (1-\lambda) z_{\pi(i)})` to the mixed prediction
    (:func:`~lit_tricks.functional.smmix.consistency_loss`). Otherwise the batch gets plain Mixup with
    :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` and the same pairing, and only the cross-entropy.

    Needs a :class:`~lit_tricks.TrickModule` whose network contains a :class:`~lit_tricks.nets.vit.ViT` (its
    attention and tokens are read), images ``[B, C, H, W]``; it replaces Mixup/CutMix (not stacked with them).
    All randomness comes from a private generator whose state is checkpointed.

    Args:
        mixup_alpha: :math:`\alpha` of the Mixup batches.
        switch_prob: probability of an SMMix batch instead of a Mixup batch.
        min_side_ratio, max_side_ratio: bounds of the window side over the grid side (the smallest side is 1).
        label_smoothing: :math:`\epsilon` of :math:`\tilde y = (1-\epsilon) y + \epsilon / C`.
        fine_weight: :math:`w_f`.
        consistency_weight: :math:`w_c`.
        attention: ``"patches"`` (attention each patch receives from the patches, averaged over heads and queries:
            the authors' code) or ``"cls"`` (the CLS token's attention to the patches).
        seed: seed of the private generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets.vit import ViT
        >>> trainer = L.Trainer(max_steps=4, callbacks=[SMMix(switch_prob=1.0)], logger=False, log_every_n_steps=1,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(ViT(dim=16, depth=1), num_classes=10), DigitsDataModule(as_image=True))
        >>> float(trainer.callback_metrics["tricks/SMMix/smmix"])
        1.0
    """

    tunable = ("mixup_alpha", "switch_prob", "label_smoothing", "fine_weight", "consistency_weight")

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        switch_prob: float = 0.5,
        min_side_ratio: float = 0.25,
        max_side_ratio: float = 0.75,
        label_smoothing: float = 0.1,
        fine_weight: float = 1.0,
        consistency_weight: float = 1.0,
        attention: Literal["patches", "cls"] = "patches",
        seed: int = 0,
    ) -> None:
        check_number("switch_prob", switch_prob, at_least=0.0, at_most=1.0)
        check_number("mixup_alpha", mixup_alpha, at_least=0.0, hint="E.g. SMMix(mixup_alpha=0.8).")
        if mixup_alpha == 0 and switch_prob < 1:
            raise ValueError("mixup_alpha=0 leaves the Mixup batches undefined: set mixup_alpha > 0 or switch_prob=1.")
        check_number("min_side_ratio", min_side_ratio, above=0.0, below=1.0)
        check_number("max_side_ratio", max_side_ratio, above=0.0, below=1.0, hint="The window must leave some patches.")
        if min_side_ratio > max_side_ratio:
            raise ValueError(f"min_side_ratio={min_side_ratio} exceeds max_side_ratio={max_side_ratio}: swap them.")
        check_number("label_smoothing", label_smoothing, at_least=0.0, below=1.0)
        check_number("fine_weight", fine_weight, at_least=0.0)
        check_number("consistency_weight", consistency_weight, at_least=0.0)
        if attention not in ("patches", "cls"):
            raise ValueError(f"attention must be 'patches' (the authors' code) or 'cls', got {attention!r}.")
        check_number("seed", seed, integer=True)
        self.mixup_alpha, self.switch_prob = mixup_alpha, switch_prob
        self.min_side_ratio, self.max_side_ratio = min_side_ratio, max_side_ratio
        self.label_smoothing, self.fine_weight, self.consistency_weight = (
            label_smoothing,
            fine_weight,
            consistency_weight,
        )
        self.attention = attention
        self._rng = np.random.default_rng(seed)
        self._vit: ViT | None = None
        self._sides: list[int] = []
        self._pending: dict[str, Any] | None = None  # what after_loss needs from an SMMix batch

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        others = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, Mixup)]
        if others:
            raise ValueError(f"SMMix mixes the batches itself: remove {', '.join(others)} from the callbacks.")
        vits = [m for m in pl_module.modules() if isinstance(m, ViT)]
        if not vits:
            raise TypeError(
                "SMMix reads a vision transformer's attention and tokens, but the module contains no "
                "lit_tricks.nets.vit.ViT: use e.g. Classifier(ViT(image_size=8, patch_size=2), num_classes=10)."
            )
        self._vit = vits[0]
        side = min(self._vit.grid_size)
        self._sides = list(range(max(1, int(side * self.min_side_ratio)), int(side * self.max_side_ratio) + 1))
        if not self._sides:
            raise ValueError(
                f"max_side_ratio={self.max_side_ratio} of a {side}-patch side leaves no window: raise max_side_ratio "
                "or use smaller patches."
            )

    def before_forward(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch) -> TrickBatch:
        inputs = batch.inputs
        if inputs.ndim != 4 or not inputs.is_floating_point():
            raise TypeError(
                f"SMMix mixes float images [B, C, H, W], got {inputs.dtype} of shape {tuple(inputs.shape)}."
            )
        perm = torch.arange(len(inputs) - 1, -1, -1, device=inputs.device)
        probs = to_probabilities(batch.targets, module.num_classes)
        if self.label_smoothing:
            probs = smooth_labels(probs, self.label_smoothing)
        use_smmix = self._rng.random() < self.switch_prob
        if use_smmix:
            k = self._sides[int(self._rng.integers(len(self._sides)))]
            with torch.no_grad(), eval_mode(module):
                unmixed_logits = module(inputs).float()
                scores = self._vit.patch_attention() if self.attention == "patches" else self._vit.cls_attention()
            batch.inputs, source_mask, lam = smmix_images(inputs, scores, self._vit.grid_size, k, perm)
            self._pending = {"mask": source_mask, "probs": probs, "perm": perm, "lam": lam, "logits": unmixed_logits}
            self._vit.keep_tokens = True
        else:
            lam = float(self._rng.beta(self.mixup_alpha, self.mixup_alpha))
            with torch.no_grad():
                mixup_(inputs, perm, lam)
        batch.targets = mixup_(probs.clone(), perm, lam)
        if logging_due(trainer):
            module.log(self.tag("lam"), lam)
            module.log(self.tag("smmix"), float(use_smmix))
        return batch

    def after_loss(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch, out: StepOutput) -> StepOutput:
        if self._pending is None:
            return out
        pending, self._pending = self._pending, None
        tokens, self._vit.tokens, self._vit.keep_tokens = self._vit.tokens, None, False
        if tokens is None:
            raise RuntimeError("SMMix found no ViT tokens from the training forward: the ViT must run in the forward.")
        probs, perm = pending["probs"], pending["perm"]
        if self.fine_weight:
            head = self._vit.token_head or self._vit.forward_head
            fine = fine_grained_loss(tokens[:, 1:], pending["mask"], head, probs, probs[perm])
            out.aux_losses["smmix_fine"] = self.fine_weight * fine
        if self.consistency_weight:
            con = consistency_loss(out.logits.float(), pending["logits"], perm, pending["lam"])
            out.aux_losses["smmix_consistency"] = self.consistency_weight * con
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state_dict["rng"]
