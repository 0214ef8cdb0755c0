"""Energy-based concept bottleneck models (Xu et al., ICLR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional import ecbm as ef
from lit_tricks.modules.concept_bottleneck.base import ConceptModule, unpack_concept_batch

Relaxation = Literal["soft", "hard"]


class EnergyState(NamedTuple):
    """What :meth:`ECBM.concept_logits` leaves for :meth:`ECBM.task_logits`: the projected inputs and the
    minimised free logits."""

    h_xy: Tensor  # [N, H]
    h_xc: Tensor  # [N, H]
    concepts: Tensor  # [N, k, 2] free concept logits (value 0, value 1)
    classes: Tensor  # [N, M] free class logits


class ECBM(ConceptModule):
    r"""Energy-based concept bottleneck model ("Energy-Based Concept Bottleneck Models: Unifying Prediction, Concept
    Intervention, and Probabilistic Interpretations", Xu et al., ICLR 2024).

    From features :math:`z = F(x)` three energy networks score candidates (lower = more compatible), each a gated
    pair energy :math:`E(h, u) = w^\top \mathrm{ReLU}(h + h \odot \hat u) + b` with :math:`\hat u = u / \lVert u
    \rVert`:

    - class energy :math:`E_{xy}(x, m)`: :math:`h = \mathrm{drop}(W_{xy} z)`, :math:`u` = class embedding :math:`u_m`;
    - concept energy :math:`E_{xc}(x, c_k)`: :math:`h = \mathrm{drop}(W_{xc} z)`, :math:`u` = embedding
      :math:`v_{k, c_k}` of the concept's value, one head :math:`(w_k, b_k)` per concept;
    - global energy :math:`E_{cy}(c, m)`: :math:`h = P[v_{1, c_1}, \dots, v_{k, c_k}]` (the concatenated,
      unnormalised value embeddings projected), :math:`u = u_m`.

    Training minimises :math:`\lambda_{xy} \mathcal L_{xy} + \lambda_{xc} \mathcal L_{xc} + \lambda_{cy}
    \mathcal L_{cy}`, Boltzmann negative log-likelihoods (:func:`~lit_tricks.functional.ecbm.ecbm_loss`); the
    global energy sees the true concepts with a few flipped (:func:`~lit_tricks.functional.ecbm.flip_concepts`).
    Prediction minimises :math:`\lambda'_{xy} E_{xy} + \lambda'_{xc} \sum_k E_{xc,k} + \lambda'_{cy} E_{cy}` over
    free logits for the concepts (``[N, k, 2]``) and classes (``[N, M]``), from zero, by Adam; the energies take
    the softmaxed logits as mixtures of the embeddings. It stops when the mean class energy has not fallen by
    more than ``min_improvement`` for ``patience`` steps (or after ``max_steps``); the prediction is the argmax.
    An intervention clamps the known concepts to their true values and minimises again with
    ``intervention_weights`` (class logits restarted at zero, concepts from the first solution); the global
    energy then re-decides the class from the corrected concepts. With ``relaxation="soft"`` its gradient also
    reaches the unknown concepts (the paper's propagation); with the authors' intervention weights, which drop the
    input's energies, that made the unknown concepts worse on a toy with a duplicated concept (see the card), so
    the default is the authors' ``"hard"``.

    The free logits are found by gradient descent during validation, test and :meth:`intervene`; this runs under
    ``torch.inference_mode(False)``, so the default ``Trainer(inference_mode=True)`` works. Network weights get no
    gradient from it.

    Args:
        feature_extractor: ``x -> [N, feature_dim]`` (the authors: an ImageNet ResNet-101, 2048-d).
        n_concepts, n_tasks: numbers of binary concepts and of classes.
        feature_dim: the extractor's output size.
        hidden_dim: :math:`H`, the embeddings' size (the authors: 512).
        train_weights: :math:`(\lambda_{xy}, \lambda_{xc}, \lambda_{cy})` of the training loss (the authors' CUB:
            (3, 1, 1)).
        inference_weights: the same for prediction (the authors' CUB: (1, 1, 0.01)).
        intervention_weights: the same after an intervention (the authors' code: (0, 0, 3), the class decided by
            the concepts alone).
        lr_concepts, lr_classes: Adam's learning rates for the free logits (the authors: 0.1, 0.1).
        patience, min_improvement: the stopping rule (the authors: 10 steps, 1.0).
        max_steps: a cap on the steps of one minimisation (the authors' loop has none).
        concept_flip, sample_flip: the global energy's augmentation, fraction of concepts flipped in a fraction
            of samples (the authors: 0.2, 0.2).
        dropout: on the projected features (the authors: 0.2).
        relaxation: how the global energy reads relaxed concepts: ``"hard"`` picks the embedding of
            :math:`p > 0.5`, as the authors' code (no gradient reaches the concepts through :math:`E_{cy}`);
            ``"soft"`` mixes the value embeddings by probability (gradients propagate between concepts).
        concept_groups, optimizer: as :class:`ConceptBottleneckModel` (``None``: Adam, lr 1e-2; the authors use
            SGD, lr 0.01, momentum 0.9, weight decay 4e-5).

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks.data import ConceptToyDataModule
        >>> model = ECBM(nn.Sequential(nn.Linear(2, 32), nn.ReLU()), n_concepts=2, n_tasks=2, feature_dim=32,
        ...              hidden_dim=16)
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, ConceptToyDataModule("xor", num_samples=300, batch_size=100))
        >>> "val/acc_intervened" in trainer.callback_metrics
        True
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        n_concepts: int,
        n_tasks: int,
        feature_dim: int,
        hidden_dim: int = 512,
        train_weights: Sequence[float] = (3.0, 1.0, 1.0),
        inference_weights: Sequence[float] = (1.0, 1.0, 0.01),
        intervention_weights: Sequence[float] = (0.0, 0.0, 3.0),
        lr_concepts: float = 0.1,
        lr_classes: float = 0.1,
        patience: int = 10,
        min_improvement: float = 1.0,
        max_steps: int = 1000,
        concept_flip: float = 0.2,
        sample_flip: float = 0.2,
        dropout: float = 0.2,
        relaxation: Relaxation = "hard",
        concept_groups: Sequence[Sequence[int]] | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(n_concepts, float(train_weights[1]), None, None, concept_groups, optimizer)
        for name, value in (("n_tasks", n_tasks), ("feature_dim", feature_dim), ("hidden_dim", hidden_dim)):
            check_number(name, value, at_least=2 if name == "n_tasks" else 1, integer=True)
        for name, weights in (
            ("train_weights", train_weights),
            ("inference_weights", inference_weights),
            ("intervention_weights", intervention_weights),
        ):
            if len(weights) != 3 or min(weights) < 0:
                raise ValueError(f"{name} needs three weights >= 0 (lambda_xy, lambda_xc, lambda_cy), got {weights}.")
        check_number("lr_concepts", lr_concepts, above=0.0)
        check_number("lr_classes", lr_classes, above=0.0)
        check_number("patience", patience, at_least=1, integer=True)
        check_number("min_improvement", min_improvement, at_least=0.0)
        check_number("max_steps", max_steps, at_least=1, integer=True)
        check_number("concept_flip", concept_flip, at_least=0.0, at_most=1.0)
        check_number("sample_flip", sample_flip, at_least=0.0, at_most=1.0)
        check_number("dropout", dropout, at_least=0.0, below=1.0)
        if relaxation not in ("soft", "hard"):
            raise ValueError(f"relaxation must be 'soft' or 'hard', got {relaxation!r}.")
        self.save_hyperparameters(ignore=["feature_extractor", "optimizer"])
        self.feature_extractor, self.n_tasks, self.relaxation = feature_extractor, n_tasks, relaxation
        self.train_weights, self.inference_weights = tuple(train_weights), tuple(inference_weights)
        self.intervention_weights = tuple(intervention_weights)
        self.lr_concepts, self.lr_classes, self.max_steps = lr_concepts, lr_classes, max_steps
        self.patience, self.min_improvement = patience, min_improvement
        self.concept_flip, self.sample_flip = concept_flip, sample_flip
        self.class_embedding = nn.Parameter(torch.randn(n_tasks, hidden_dim))  # u_m
        self.concept_embedding = nn.Parameter(torch.randn(n_concepts, 2, hidden_dim))  # v_{k, value}
        self.xy_proj, self.xc_proj = nn.Linear(feature_dim, hidden_dim), nn.Linear(feature_dim, hidden_dim)
        self.xy_head, self.cy_head = nn.Linear(hidden_dim, 1), nn.Linear(hidden_dim, 1)
        self.xc_heads = nn.Linear(hidden_dim, n_concepts)  # row k = concept k's head (w_k, b_k)
        self.concept_proj = nn.Linear(n_concepts * hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    # the three energies -------------------------------------------------
    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The projected inputs ``(h_xy, h_xc)``, each ``[N, H]``."""
        z = self.feature_extractor(x)
        return self.dropout(self.xy_proj(z)), self.dropout(self.xc_proj(z))

    def _class_code(self, class_probs: Tensor | None) -> Tensor:
        """Normalised class embeddings: all ``[1, M, H]``, or the ``class_probs``-mixture ``[N, H]``."""
        u = self.class_embedding[None] if class_probs is None else class_probs @ self.class_embedding
        return F.normalize(u, dim=-1)

    def class_energy(self, h_xy: Tensor, class_probs: Tensor | None = None) -> Tensor:
        """:math:`E_{xy}`: ``[N, M]`` for every class, or ``[N]`` for class mixtures ``class_probs`` ``[N, M]``."""
        h = h_xy if class_probs is not None else h_xy[:, None]
        return ef.gated_energy(h, self._class_code(class_probs), self.xy_head.weight[0], self.xy_head.bias[0])

    def concept_energy(self, h_xc: Tensor, concept_probs: Tensor | None = None) -> Tensor:
        """:math:`E_{xc}`: ``[N, k, 2]`` for both values of every concept, or ``[N, k]`` for the mixtures
        ``concept_probs`` ``[N, k, 2]`` of the two value embeddings."""
        w, b = self.xc_heads.weight, self.xc_heads.bias
        if concept_probs is None:
            v = F.normalize(self.concept_embedding, dim=-1)
            return ef.gated_energy(h_xc[:, None, None], v, w[:, None], b[:, None])
        v = F.normalize(torch.einsum("nkv,kvh->nkh", concept_probs, self.concept_embedding), dim=-1)
        return ef.gated_energy(h_xc[:, None], v, w, b)

    def global_energy(self, concept_weights: Tensor, class_probs: Tensor | None = None) -> Tensor:
        """:math:`E_{cy}` of concept vectors given as weights on the two value embeddings ``[N, k, 2]`` (one-hot
        for binary concepts): ``[N, M]`` for every class, or ``[N]`` for class mixtures ``[N, M]``."""
        h = self.concept_proj(torch.einsum("nkv,kvh->nkh", concept_weights, self.concept_embedding).flatten(1))
        h = h if class_probs is not None else h[:, None]
        return ef.gated_energy(h, self._class_code(class_probs), self.cy_head.weight[0], self.cy_head.bias[0])

    # training -----------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, c, y = unpack_concept_batch(batch)
        if c.shape[1] != self.n_concepts:
            raise ValueError(f"The batch has {c.shape[1]} concepts but n_concepts={self.n_concepts}.")
        h_xy, h_xc = self.features(x)
        flipped = ef.flip_concepts(c, self.concept_flip, self.sample_flip)
        e_cy = self.global_energy(F.one_hot(flipped.long(), 2).to(h_xy.dtype))
        e_xy, e_xc = self.class_energy(h_xy), self.concept_energy(h_xc)
        loss, l_xy, l_xc, l_cy = ef.ecbm_loss(e_xy, e_xc, e_cy, y, c, self.train_weights)
        self.log_dict({"train/loss": loss, "train/class_loss": l_xy, "train/concept_loss": l_xc,
                       "train/global_loss": l_cy})  # fmt: skip
        return loss

    # inference ----------------------------------------------------------
    def minimise(
        self,
        state: EnergyState,
        weights: Sequence[float],
        mask: Tensor | None = None,
        true: Tensor | None = None,
    ) -> EnergyState:
        """Minimise the weighted energy over the free logits of ``state`` (from their current values), with the
        concepts where ``mask`` ``[N, k]`` is True clamped to ``true`` (logits :math:`\\pm 5`, as the authors)."""
        with torch.inference_mode(False), torch.enable_grad():
            h_xy, h_xc = state.h_xy.clone().detach(), state.h_xc.clone().detach()
            concepts = state.concepts.clone().detach().requires_grad_(True)
            classes = state.classes.clone().detach().requires_grad_(True)
            clamp = None
            if mask is not None:
                clamp = (mask.clone()[..., None], (F.one_hot(true.clone().long(), 2).to(h_xy.dtype) - 0.5) * 10)
            adam = torch.optim.Adam([{"params": [concepts], "lr": self.lr_concepts},
                                     {"params": [classes], "lr": self.lr_classes}])  # fmt: skip
            best, waited = None, 0
            for _ in range(self.max_steps):
                c_logits = concepts if clamp is None else torch.where(clamp[0], clamp[1], concepts)
                p_c, p_y = c_logits.softmax(-1), classes.softmax(-1)
                e_xy = self.class_energy(h_xy, p_y)
                read = p_c if self.relaxation == "soft" else F.one_hot((p_c[..., 1] > 0.5).long(), 2).to(p_c.dtype)
                energy = ef.inference_energy(
                    e_xy, self.concept_energy(h_xc, p_c), self.global_energy(read, p_y), weights
                )
                score = -e_xy.mean().item()  # the authors' stopping rule watches the class energy only
                concepts.grad, classes.grad = torch.autograd.grad(energy, [concepts, classes])
                adam.step()
                if best is None or score > best + self.min_improvement:
                    best, waited = score, 0
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
            concepts = concepts.detach() if clamp is None else torch.where(clamp[0], clamp[1], concepts.detach())
        return EnergyState(state.h_xy, state.h_xc, concepts, classes.detach())

    def concept_logits(self, x: Tensor) -> tuple[Tensor, EnergyState]:
        """Predict by energy minimisation: concept logits ``[N, k]`` (:math:`\\log p_1 - \\log p_0` of the relaxed
        concepts) and the minimised state."""
        h_xy, h_xc = self.features(x)
        zeros = h_xy.new_zeros
        state = self.minimise(
            EnergyState(h_xy, h_xc, zeros(len(x), self.n_concepts, 2), zeros(len(x), self.n_tasks)),
            self.inference_weights,
        )
        return state.concepts[..., 1] - state.concepts[..., 0], state

    def task_logits(
        self, c_logits: Tensor, state: EnergyState, mask: Tensor | None = None, true: Tensor | None = None
    ) -> Tensor:
        """The minimised class logits ``[N, M]``; with ``mask``/``true`` the logits after intervening (samples
        with no intervened concept keep their prediction)."""
        if mask is None:
            return state.classes
        restarted = state._replace(classes=torch.zeros_like(state.classes))
        after = self.minimise(restarted, self.intervention_weights, mask, true)
        return torch.where(mask.any(dim=1, keepdim=True), after.classes, state.classes)

    # interpretations ----------------------------------------------------
    @torch.no_grad()
    def concept_interpretations(self, prior: Tensor | None = None) -> dict[str, Tensor]:
        r"""The conditional probabilities the global energy implies, by exact enumeration of the :math:`2^k`
        concept vectors (:math:`k \le 20`), with :math:`p(c, y) = \mathrm{softmax}_y(-E_{cy}(c, \cdot))_y\, p(c)`
        and :math:`p(c)` = ``prior`` ``[2^k]`` (uniform if None; :func:`~lit_tricks.functional.ecbm.state_prior`
        of the training concepts gives the empirical one):

        - ``"concept_given_class"`` ``[M, k]``: :math:`p(c_k = 1 \mid y)`;
        - ``"concept_given_concept"`` ``[k, k]``: :math:`p(c_k = 1 \mid c_{k'} = 1)` (row :math:`k`);
        - ``"joint"`` ``[2^k, M]``: :math:`p(c, y)` over :func:`~lit_tricks.functional.ecbm.concept_states`.
        """
        states = ef.concept_states(self.n_concepts).to(self.device)
        energy = self.global_energy(F.one_hot(states.long(), 2).to(self.class_embedding.dtype))
        joint = ef.concept_class_joint(energy, None if prior is None else prior.to(self.device))
        return {
            "concept_given_class": ef.concept_given_class(joint, states),
            "concept_given_concept": ef.concept_given_concept(joint, states),
            "joint": joint,
        }
