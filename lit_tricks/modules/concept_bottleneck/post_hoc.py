"""Post-hoc concept bottleneck models (Yuksekgonul et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.modules.concept_bottleneck.base import log_embedding_accuracy


class PostHocCBM(RestoresRNG, pl.LightningModule):
    r"""Post-hoc concept bottleneck models ("Post-hoc Concept Bottleneck Models", Yuksekgonul et al., ICLR 2023)
    on precomputed embeddings :math:`e = f(x)` of a frozen model (batches ``{"inputs": e, "targets": y}``).

    A concept bank :math:`V` ``[k, d]`` (with intercepts :math:`b`) comes from concept examples
    (:meth:`concept_bank_from_examples`: a linear-kernel SVM per concept, i.e. CAVs) or from given concept vectors
    (e.g. text embeddings). The projection is the signed margin :math:`(V e + b) / \lVert v \rVert`
    (``"margin"``, the authors' code) or :math:`\langle e, v \rangle / \lVert v \rVert^2` (``"paper"``). The
    sparse linear head :math:`g(s) = W s + b_g` minimises the authors' code's objective (``train_pcbm.py``:
    scikit-learn's ``SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=lam, l1_ratio)``, one-vs-rest):

    .. math:: \sum_{c=1}^{C} \frac1N \sum_i \mathrm{BCE}(g_c(s_i), \mathbb 1[y_i = c])
              + \lambda \big(\alpha \lVert W \rVert_1 + \tfrac{1 - \alpha}{2} \lVert W \rVert_2^2\big)

    (a sum of :math:`C` independent binary logistic regressions, intercepts unpenalised; for :math:`C = 2`
    scikit-learn fits one, here a second row solves its mirror image), trained by SGD with the
    :math:`\ell_1` part applied as scikit-learn applies it, the cumulative penalty of Tsuruoka et al. (2009): after
    each step every weight moves toward zero, never across it, by the total :math:`\ell_1` penalty
    :math:`\sum_t \eta \lambda \alpha` so far minus what it has already received, so weights reach exact zeros
    (a plain proximal step leaves most of them hovering around zero under minibatch noise). The paper writes the
    penalty as :math:`\frac{\lambda'}{C k}(\alpha\lVert W\rVert_1 + (1 - \alpha)\lVert W\rVert_2^2)` with a mean
    loss; the code's ``lam`` (what ``lam`` is here) enters unscaled (:math:`\lambda' \approx C k \lambda`).
    :meth:`hybrid` returns PCBM-h: :math:`g` frozen plus a residual linear layer on :math:`e` (``train_pcbm_h.py``),
    trained with CE + ``residual_l2`` :math:`\cdot \overline{W_r^2}`.

    Args:
        concept_bank: ``[k, d]`` concept vectors.
        n_classes: number of classes.
        intercepts: ``[k]`` (``None``: zeros, as for text embeddings).
        projection: ``"margin"`` or ``"paper"``.
        lam: :math:`\lambda`, scikit-learn's ``alpha`` (the authors: 1e-5 by default, 2e-4 on CUB).
        l1_ratio: :math:`\alpha` (the authors: 0.99).
        lr: SGD learning rate of the sparse head.
        residual_l2: PCBM-h's penalty on the residual weights (the authors: 1e-3).
    """

    def __init__(
        self,
        concept_bank: Tensor,
        n_classes: int,
        intercepts: Tensor | None = None,
        projection: Literal["margin", "paper"] = "margin",
        lam: float = 1e-5,
        l1_ratio: float = 0.99,
        lr: float = 0.1,
        residual_l2: float = 1e-3,
    ) -> None:
        super().__init__()
        if concept_bank.ndim != 2:
            raise ValueError(f"concept_bank must be [k, d], got shape {tuple(concept_bank.shape)}.")
        if projection not in ("margin", "paper"):
            raise ValueError(f"projection must be 'margin' or 'paper', got {projection!r}.")
        check_number("lam", lam, at_least=0.0)
        check_number("l1_ratio", l1_ratio, at_least=0.0, at_most=1.0)
        check_number("lr", lr, above=0.0)
        k = concept_bank.shape[0]
        self.register_buffer("bank", concept_bank.float())
        self.register_buffer("intercepts", torch.zeros(k) if intercepts is None else intercepts.float().view(k))
        self.projection, self.lam, self.l1_ratio, self.lr, self.residual_l2 = projection, lam, l1_ratio, lr, residual_l2
        self.head = nn.Linear(k, n_classes)
        self.residual: nn.Linear | None = None
        # the cumulative l1 penalty: SGD steps so far (an integer, which low precision leaves exact; the penalty
        # offered is steps * lr * lam * l1_ratio) and what each weight has received
        self.register_buffer("l1_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("l1_received", torch.zeros(n_classes, k))

    @staticmethod
    def concept_bank_from_examples(
        positives: Sequence[Tensor], negatives: Sequence[Tensor], C: float = 0.1
    ) -> tuple[Tensor, Tensor]:
        """CAVs: for each concept a linear-kernel SVM (scikit-learn ``SVC(kernel="linear", C=C)``, as the authors'
        ``concepts/concept_utils.py``) separating its positive from its negative example embeddings; returns
        ``(vectors [k, d], intercepts [k])``."""
        from sklearn.svm import SVC

        check_number("C", C, above=0.0)
        vectors, intercepts = [], []
        for pos, neg in zip(positives, negatives, strict=True):
            x = torch.cat([pos, neg]).double().numpy()
            y = [1] * len(pos) + [0] * len(neg)
            svm = SVC(C=C, kernel="linear").fit(x, y)
            vectors.append(torch.tensor(svm.coef_[0]))
            intercepts.append(float(svm.intercept_[0]))
        return torch.stack(vectors).float(), torch.tensor(intercepts)

    def project(self, embeddings: Tensor) -> Tensor:
        """Concept activations ``[N, k]``."""
        norms = self.bank.norm(dim=1)
        if self.projection == "paper":
            return embeddings @ self.bank.T / norms**2
        return (embeddings @ self.bank.T + self.intercepts) / norms

    def forward(self, embeddings: Tensor) -> Tensor:
        out = self.head(self.project(embeddings))
        return out if self.residual is None else out + self.residual(embeddings)

    def objective(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        """The sparse head's full objective (data term and both penalties) on ``(embeddings, targets)``."""
        w = self.head.weight
        l1 = self.lam * self.l1_ratio * w.abs().sum()
        return self._one_vs_rest_loss(self.head(self.project(embeddings)), targets) + self._l2(w) + l1

    def _one_vs_rest_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / len(targets)

    def _l2(self, w: Tensor) -> Tensor:
        return self.lam * (1 - self.l1_ratio) / 2 * w.pow(2).sum()

    def hybrid(self, lr: float = 1e-2) -> PostHocCBM:
        """PCBM-h: this model with its head frozen and a residual ``nn.Linear(d, C)`` on the embeddings to train
        with Adam at ``lr``; like the authors' ``train_pcbm_h.py``, the residual keeps PyTorch's default
        initialisation and lr 0.01."""
        import copy

        check_number("lr", lr, above=0.0)
        model = copy.deepcopy(self)
        model.head.requires_grad_(False)
        model.residual = nn.Linear(self.bank.shape[1], self.head.out_features)
        model.lr = lr
        return model

    def configure_optimizers(self):
        if self.residual is None:  # plain SGD, as the cumulative l1 penalty assumes
            return torch.optim.SGD(self.head.parameters(), lr=self.lr)
        return torch.optim.Adam(self.residual.parameters(), lr=self.lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        e, y = batch["inputs"], batch["targets"]
        if self.residual is None:
            loss = self._one_vs_rest_loss(self(e), y) + self._l2(self.head.weight)
        else:
            loss = F.cross_entropy(self(e), y) + self.residual_l2 * self.residual.weight.pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The SGD step, then the cumulative l1 penalty (scikit-learn's ``l1penalty``); here rather than in
        ``on_train_batch_end`` so it follows every optimiser step (also with gradient accumulation) and a checkpoint
        saved at that batch includes it."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.residual is None and self.l1_ratio > 0:
            self.l1_steps += 1
            offered = self.l1_steps.item() * self.lr * self.lam * self.l1_ratio
            with torch.no_grad():
                w = self.head.weight
                sign = w.sign()
                still_due = offered + sign * self.l1_received
                shrunk = sign * (w.abs() - still_due).clamp(min=0)
                self.l1_received += shrunk - w
                w.copy_(shrunk)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_accuracy(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._log_accuracy(batch, "test")

    def _log_accuracy(self, batch: Any, stage: str) -> None:
        log_embedding_accuracy(self, batch, stage)
        self.log(f"{stage}/sparsity", (self.head.weight == 0).float().mean())
