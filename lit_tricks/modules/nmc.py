"""NMC: a nearest-mean classifier on a frozen feature extractor, the continual-learning baseline of Janson et al."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.frozen import HoldsFrozen
from lit_tricks.core.module import TrickModule


class NearestMeanClassifier(HoldsFrozen, TrickModule):
    r"""Nearest-mean classifier (NMC) on a frozen encoder ("A Simple Baseline that Questions the Use of
    Pretrained-Models in Continual Learning", Janson, Zhang, Aljundi & Elhoseiny, NeurIPS 2022 workshop).

    Training makes no gradient step: each batch adds its features to running per-class sums and counts
    (buffers ``class_sums [C, D]`` and ``class_counts [C]``), so the class means
    :math:`\mu_c = \frac{1}{n_c}\sum_{i: y_i = c} \phi(x_i)` grow with the stream, task-free and exemplar-free.
    A sample is classified by its nearest mean in Euclidean distance,

    .. math:: \hat y(x) = \arg\min_{c:\, n_c > 0} \lVert \phi(x) - \mu_c \rVert_2,
        \qquad \phi(x) = \frac{f(x)}{\lVert f(x) \rVert_2}\ \text{(``normalize=True``)},

    as in the authors' code: the encoder's features are L2-normalised, the means are not re-normalised. The
    logits are :math:`-\lVert \phi(x) - \mu_c \rVert_2` (``-inf`` for classes not seen yet), so validation,
    :class:`~lit_tricks.ContinualEvaluation` and ``predict`` read it like any classifier (its softmax is a ranking,
    not a calibrated probability: read ``acc``, not ``nll``/``ece``).

    The encoder :math:`f` is frozen, kept in eval mode, moved and cast with this module, and not part of its
    state dict (the checkpoint holds the sums and counts; load it with the same ``encoder``). Its features are
    ``encoder(x)`` (``[N, D]``) for a plain network, or the penultimate features (``forward_features``) of a
    lit_tricks :class:`~lit_tricks.TrickModule` or of a network with ``forward_features``/``forward_head``.
    Under DDP each step's sums are summed across ranks (one ``all_reduce``), so every rank holds the means of
    all the data seen; DDP's gradient wrapper, with nothing to reduce, is skipped. Automatic optimisation is off
    and ``configure_optimizers`` returns ``None``: Lightning then runs a no-op optimizer, which ``training_step``
    steps so that ``global_step`` counts the batches (for ``max_steps``, checkpoints and evaluation schedules).

    Args:
        encoder: the frozen feature extractor: an ``nn.Module``, or the path of a Lightning checkpoint of a
            lit_tricks fit (rebuilt as :func:`~lit_tricks.distill.teachers.load_teacher` does; ``os.PathLike`` too).
        num_classes: number of classes ``C``.
        normalize: L2-normalise the features before averaging and comparing (the authors': yes).
        ece_bins: bins of the validation calibration error.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import ContinualEvaluation
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> model = NearestMeanClassifier(torch.nn.Identity(), num_classes=10)
        >>> evaluation = ContinualEvaluation(every_n_steps=20)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5))
        >>> model.class_counts.sum().item(), evaluation.summary()["acc"] > 0.8
        (1438.0, True)
    """

    def __init__(self, encoder: nn.Module | str, num_classes: int, normalize: bool = True, ece_bins: int = 15) -> None:
        super().__init__(num_classes=num_classes, ece_bins=ece_bins)
        if isinstance(encoder, (str, os.PathLike)):
            from lit_tricks.distill.teachers import load_teacher

            path, encoder = os.fspath(encoder), load_teacher(encoder)
        elif isinstance(encoder, nn.Module):
            path = None
        else:
            raise TypeError(
                f"encoder must be an nn.Module or the path of a Lightning checkpoint, got {type(encoder).__name__}."
            )
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}.")
        # a checkpoint path is kept, so load_from_checkpoint rebuilds the encoder; a module must be passed again
        self.save_hyperparameters(
            {"num_classes": num_classes, "normalize": normalize, **({"encoder": path} if path else {})}
        )
        self.normalize = normalize
        self.hold_frozen("encoder", encoder)  # out of the state dict, the parameters and train()
        # sized [C, D] at the first batch (D is the encoder's), or by a checkpoint's
        self.register_buffer("class_sums", torch.zeros(num_classes, 0))
        self.register_buffer("class_counts", torch.zeros(num_classes))
        self.automatic_optimization = False

    # ------------------------------------------------------------------ the classifier
    def features(self, inputs: Tensor) -> Tensor:
        r"""The frozen encoder's features :math:`\phi(x)` ``[N, D]`` (L2-normalised if ``normalize``)."""
        from lit_tricks.distill.teachers import _forward_features

        with torch.no_grad():
            encoder = self.encoder
            penultimate = isinstance(encoder, TrickModule) or (
                hasattr(encoder, "forward_features") and hasattr(encoder, "forward_head")
            )
            features = _forward_features(encoder, inputs)[1] if penultimate else encoder(inputs)
        if not isinstance(features, Tensor) or features.ndim != 2:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"encoder must map a batch to features [N, D], got {shape}: end it with a flatten or a pooling "
                "layer (e.g. nn.Sequential(net, nn.Flatten()))."
            )
        features = features.float()
        return F.normalize(features, dim=1) if self.normalize else features

    def class_means(self) -> Tensor:
        """``[C, D]`` the running class means (zero rows for classes not seen yet)."""
        return self.class_sums / self.class_counts.clamp(min=1).unsqueeze(1)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits ``[N, C]``: minus the distance to each class mean, ``-inf`` for unseen classes (zeros for all
        classes before any class is seen)."""
        features = self.features(inputs)
        if self.class_sums.shape[1] == 0:  # nothing seen yet
            return features.new_zeros(len(features), self.num_classes)
        self._check_dim(features)
        logits = -torch.cdist(features, self.class_means())
        seen = self.class_counts > 0
        return torch.where(seen.any(), logits.masked_fill(~seen, -torch.inf), torch.zeros_like(logits))

    def _check_dim(self, features: Tensor) -> None:
        if features.shape[1] != self.class_sums.shape[1]:
            raise ValueError(
                f"The encoder gives {features.shape[1]} features but the class means have "
                f"{self.class_sums.shape[1]}: load a checkpoint made with the same encoder."
            )

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.tricks:
            raise ValueError(
                f"NearestMeanClassifier makes no gradient step, so tricks cannot shape it; remove "
                f"{[type(t).__name__ for t in self.tricks]} from the callbacks (ContinualEvaluation is fine)."
            )
        strategy = self._trainer.strategy if self._trainer is not None else None
        if stage == "fit" and isinstance(strategy, DDPStrategy):
            # DDP refuses a module without trainable parameters and has no gradient to reduce: Lightning skips
            # the wrapper outside fitting for this reason; the class sums are reduced in training_step instead
            strategy.configure_ddp = lambda: None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        tb = TrickBatch.from_batch(batch)
        self._check_first_batch(tb, "train")
        features = self.features(tb.inputs)
        if self.class_sums.shape[1] == 0:
            self.class_sums = features.new_zeros(self.num_classes, features.shape[1])
        self._check_dim(features)
        update = features.new_zeros(self.num_classes, features.shape[1] + 1)  # sums and counts, one reduction
        update[:, :-1].index_add_(0, tb.hard_targets, features)
        update[:, -1].index_add_(0, tb.hard_targets, torch.ones_like(features[:, 0]))
        if self._trainer is not None and self._trainer.world_size > 1:
            update = self._trainer.strategy.reduce(update, reduce_op="sum")
        self.class_sums += update[:, :-1]
        self.class_counts += update[:, -1]
        if self._trainer is not None and self._trainer.optimizers:
            self.optimizers().step()  # Lightning's no-op optimizer: counts the step in global_step

    def configure_optimizers(self) -> None:
        return None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        sums = state_dict.get(prefix + "class_sums")
        if sums is not None and sums.shape != self.class_sums.shape:  # the lazily sized buffer takes the saved size
            self.class_sums = self.class_sums.new_zeros(sums.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
