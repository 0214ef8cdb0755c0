"""Deep metric learning: an embedding LightningModule with a pair loss, Recall@K evaluation and Metrix mixing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.core.trick import logging_due
from lit_tricks.functional.metric_losses import contrastive_loss, multi_similarity_loss
from lit_tricks.functional.metrix import (
    metrix_pairs,
    mix_pairs,
    mixed_contrastive_loss,
    mixed_multi_similarity_loss,
    pair_labels,
)
from lit_tricks.functional.mixing import sample_mixing
from lit_tricks.metrics.retrieval import RecallAtK

_RNG_KEY = "lit_tricks_metrix_rng"


class MetricLearner(RestoresRNG, pl.LightningModule):
    r"""Learns L2-normalised embeddings :math:`f(x)/\lVert f(x)\rVert` with a pair loss, evaluated by Recall@K on
    classes it did not train on; optionally with **Metrix** ("It Takes Two to Tango: Mixup for Deep Metric
    Learning", Venkataramanan et al., ICLR 2022).

    The loss is ``"contrastive"`` (:func:`~lit_tricks.functional.metric_losses.contrastive_loss`, margins
    ``pos_margin``/``neg_margin``) or ``"multi_similarity"``
    (:func:`~lit_tricks.functional.metric_losses.multi_similarity_loss`, ``ms_alpha``, ``ms_beta``, ``ms_base``,
    ``ms_epsilon``), over the pairs of each batch (of each process under DDP).

    Metrix (``metrix="input" | "feature" | "embedding"``) mixes, for each anchor :math:`a` and each negative
    :math:`n` (``metrix_top_k``: only the hardest), a positive :math:`p` of :math:`a` (or :math:`a` itself when the
    batch has none) with :math:`n`, :math:`\tilde x = \lambda x_p + (1-\lambda) x_n`, at the inputs, at the
    backbone's features (``forward_features``, then ``forward_head``) or at the embeddings (re-normalised), with
    one :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` per step. The mixed sample is positive to :math:`a` by
    its generalised label :math:`y = \lambda` (:func:`~lit_tricks.functional.metrix.pair_labels`), and

    .. math:: \mathcal L = \mathcal L(X) + w\, \tilde{\mathcal L}(X, \tilde X)

    with :math:`\tilde{\mathcal L}` the same loss on the (anchor, mixed) pairs, each positive term weighted by
    :math:`y` and each negative one by :math:`1-y` (:func:`~lit_tricks.functional.metrix.mixed_contrastive_loss`,
    :func:`~lit_tricks.functional.metrix.mixed_multi_similarity_loss`). Pairs and :math:`\lambda` come from a
    private generator seeded by ``seed``, saved in the checkpoint.

    Validation and test log ``{stage}/recall@K`` (:class:`~lit_tricks.metrics.retrieval.RecallAtK`: every sample of
    the split is a query against all the others, gathered over processes). ``predict_step`` returns embeddings.

    Args:
        backbone: maps inputs to raw embeddings ``[N, embedding_dim]``; with ``forward_features``/``forward_head``
            (our ``lit_tricks.nets``) for ``metrix="feature"``.
        embedding_dim: the size of the embeddings, checked on the first batch.
        loss: ``"contrastive"`` or ``"multi_similarity"``.
        pos_margin, neg_margin: the contrastive margins (the Metrix code: 0 and 0.5).
        ms_alpha, ms_beta, ms_base, ms_epsilon: the multi-similarity scales, offset and mining margin (2, 50, 0.5,
            0.1, as pytorch-metric-learning, which the Metrix code calls).
        metrix: where to mix, or ``None`` for the baseline.
        metrix_weight: :math:`w` (the authors' 0.4).
        metrix_alpha: :math:`\alpha` of the Beta distribution (the authors' 2.0).
        metrix_top_k: mix each anchor with its ``k`` hardest negatives only (``None``: all; the authors' input
            mixing uses 1, which bounds the extra forward pass to ``N`` samples).
        recall_ks: the K of Recall@K.
        optimizer: a callable ``params -> Optimizer``; default Adam, lr 1e-3.
        seed: the seed of the Metrix generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks.data.unseen_classes import UnseenClassesDataModule
        >>> from lit_tricks.nets import MLP
        >>> model = MetricLearner(MLP(64, 32, hidden=(64,)), embedding_dim=32, metrix="embedding")
        >>> trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, UnseenClassesDataModule(train_classes=5))
        >>> bool(trainer.callback_metrics["val/recall@1"] > 0.8)
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        loss: Literal["contrastive", "multi_similarity"] = "contrastive",
        pos_margin: float = 0.0,
        neg_margin: float = 0.5,
        ms_alpha: float = 2.0,
        ms_beta: float = 50.0,
        ms_base: float = 0.5,
        ms_epsilon: float = 0.1,
        metrix: Literal["input", "feature", "embedding"] | None = None,
        metrix_weight: float = 0.4,
        metrix_alpha: float = 2.0,
        metrix_top_k: int | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}.")
        check_number("embedding_dim", embedding_dim, at_least=1, integer=True)
        if loss not in ("contrastive", "multi_similarity"):
            raise ValueError(f"loss must be 'contrastive' or 'multi_similarity', got {loss!r}.")
        check_number("pos_margin", pos_margin, at_least=0.0)
        check_number("neg_margin", neg_margin, above=pos_margin, hint="neg_margin must be above pos_margin.")
        check_number("ms_alpha", ms_alpha, above=0.0)
        check_number("ms_beta", ms_beta, above=0.0)
        check_number("ms_base", ms_base, at_least=-1.0, at_most=1.0)
        check_number("ms_epsilon", ms_epsilon, at_least=0.0)
        if metrix not in (None, "input", "feature", "embedding"):
            raise ValueError(f"metrix must be 'input', 'feature', 'embedding' or None, got {metrix!r}.")
        if metrix == "feature" and not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
            raise ValueError(
                f"metrix='feature' mixes the backbone's features, but {type(backbone).__name__} has no "
                "forward_features/forward_head: use a lit_tricks.nets network, or metrix='input' or 'embedding'."
            )
        check_number("metrix_weight", metrix_weight, at_least=0.0)
        check_number("metrix_alpha", metrix_alpha, above=0.0)
        if metrix_top_k is not None:
            check_number("metrix_top_k", metrix_top_k, at_least=1, integer=True, hint="Or None for every negative.")
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        self.backbone, self.optimizer = backbone, optimizer
        self.val_recall = RecallAtK(recall_ks)
        self.test_recall = RecallAtK(recall_ks)
        self._rng = np.random.default_rng(seed)
        self._checked = False

    # ------------------------------------------------------------------ embeddings
    def forward(self, inputs: Tensor) -> Tensor:
        """L2-normalised embeddings ``[N, embedding_dim]``."""
        return self._normalise(self.backbone(inputs))

    def _normalise(self, raw: Tensor) -> Tensor:
        if not self._checked:
            if raw.ndim != 2 or raw.shape[1] != self.hparams.embedding_dim:
                raise ValueError(
                    f"The backbone gives outputs of shape {tuple(raw.shape)}, but embedding_dim="
                    f"{self.hparams.embedding_dim}: make the backbone's last layer output embedding_dim features."
                )
            self._checked = True
        return F.normalize(raw, dim=1)

    def metric_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The clean loss of a batch of normalised embeddings."""
        h = self.hparams
        if h.loss == "contrastive":
            return contrastive_loss(embeddings, labels, h.pos_margin, h.neg_margin)
        return multi_similarity_loss(embeddings, labels, h.ms_alpha, h.ms_beta, h.ms_base, h.ms_epsilon)

    def metrix_loss(self, inputs: Tensor, features: Tensor | None, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The mixed loss :math:`\\tilde{\\mathcal L}` of one batch (draws the pairs and :math:`\\lambda`)."""
        h = self.hparams
        sim = (embeddings @ embeddings.T).detach() if h.metrix_top_k is not None else None
        anchor, first, second = metrix_pairs(labels, self._rng, sim, h.metrix_top_k)
        _, lam = sample_mixing(self._rng, 1, h.metrix_alpha, False, embeddings.device)
        if len(anchor) == 0:  # a batch of one class: nothing to mix
            return embeddings.sum() * 0.0
        if h.metrix == "input":
            mixed = self(mix_pairs(inputs[first], inputs[second], lam))
        elif h.metrix == "feature":
            mixed = self._normalise(self.backbone.forward_head(mix_pairs(features[first], features[second], lam)))
        else:
            mixed = F.normalize(mix_pairs(embeddings[first], embeddings[second], lam), dim=1)
        targets = pair_labels(labels[anchor], labels[first], labels[second], lam.to(embeddings.device))
        if h.loss == "contrastive":
            return mixed_contrastive_loss(embeddings[anchor], mixed, targets, h.pos_margin, h.neg_margin)
        sim_mixed = (embeddings[anchor] * mixed).sum(dim=1)
        return mixed_multi_similarity_loss(anchor, sim_mixed, targets, len(labels), h.ms_alpha, h.ms_beta, h.ms_base)

    # ------------------------------------------------------------------ lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tb = TrickBatch.from_batch(batch)
        labels = tb.hard_targets
        h = self.hparams
        if h.metrix == "feature":
            features = self.backbone.forward_features(tb.inputs)
            embeddings = self._normalise(self.backbone.forward_head(features))
        else:
            features, embeddings = None, self(tb.inputs)
        clean = self.metric_loss(embeddings, labels)
        loss = clean
        terms = {}
        if h.metrix is not None:
            mixed = self.metrix_loss(tb.inputs, features, embeddings, labels)
            loss = clean + h.metrix_weight * mixed
            terms = {"train/clean_loss": clean.detach(), "train/metrix_loss": mixed.detach()}
        n = len(labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if terms and logging_due(self.trainer):
            self.log_dict(terms, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_recall, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_recall, "test")

    def _evaluate(self, batch: Any, metric: RecallAtK, stage: str) -> None:
        tb = TrickBatch.from_batch(batch)
        metric.update(self(tb.inputs).float(), tb.hard_targets)

    def on_validation_epoch_end(self) -> None:
        self._log_recall(self.val_recall, "val")

    def on_test_epoch_end(self) -> None:
        self._log_recall(self.test_recall, "test")

    def _log_recall(self, metric: RecallAtK, stage: str) -> None:
        if metric.update_count == 0:
            return
        self.log_dict({f"{stage}/{name}": value.float() for name, value in metric.compute().items()}, sync_dist=False)
        metric.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Normalised embeddings ``[N, D]``; the batch may be a dict, a sequence or a bare input tensor."""
        inputs = batch["inputs"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list | tuple) else batch
        return self(inputs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return self.optimizer(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_RNG_KEY] = self._rng.bit_generator.state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if _RNG_KEY in checkpoint:
            self._rng.bit_generator.state = checkpoint[_RNG_KEY]
