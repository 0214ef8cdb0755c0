"""Barlow Twins self-supervised learning, optionally with the MixBT mixed-sample regulariser, and an online linear
probe evaluated at validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.functional.barlow_twins import barlow_twins_loss, mixbt_loss, standardise
from lit_tricks.functional.mixing import sample_mixing
from lit_tricks.modules.two_views import TwoViewModule, ViewMaker


class BarlowTwins(TwoViewModule):
    r"""**Barlow Twins** ("Barlow Twins: Self-Supervised Learning via Redundancy Reduction", Zbontar et al., ICML
    2021), optionally with **MixBT** ("Guarding Barlow Twins Against Overfitting with Mixed Samples", Bandara et
    al., 2023).

    Each step makes two views :math:`X_A, X_B` of the batch with ``augment``, embeds them with the backbone and a
    projector (Linear-BatchNorm-ReLU blocks, a last Linear without bias, sizes ``projector_dims``) and minimises

    .. math:: \mathcal L_{BT} = \sum_i (1 - C_{ii})^2 + \lambda \sum_{i \ne j} C_{ij}^2,
       \qquad C = \tfrac1N \hat Z_A^\top \hat Z_B

    with :math:`\hat Z` the embeddings standardised over the batch (``lambd`` is :math:`\lambda`;
    :func:`~lit_tricks.functional.barlow_twins.barlow_twins_loss`). With ``mixbt=w`` it also embeds
    :math:`X_M = \lambda_m X_A + (1-\lambda_m) X_B[\pi]`, :math:`\lambda_m \sim \mathrm{Beta}(\alpha, \alpha)`
    (``mixbt_alpha``) and :math:`\pi` a permutation, both drawn per step
    (:func:`~lit_tricks.functional.mixing.sample_mixing`), and adds

    .. math:: \mathcal L_{mix} = w \lambda \left(\lVert C^{MA} - C^{MA}_{gt}\rVert_F^2
       + \lVert C^{MB} - C^{MB}_{gt}\rVert_F^2\right)

    (:func:`~lit_tricks.functional.barlow_twins.mixbt_loss`), the cross-correlations of the mixed embeddings with
    each view against the same mixture of the views' own cross-correlations. Under DDP the embeddings are gathered
    (with their gradients) so :math:`C` is over the global batch, as the authors' all-reduced one.

    The online linear probe (``num_classes``): a linear layer trained with cross-entropy on the detached
    representations of view A in the same step (it does not shape the encoder), evaluated on the clean validation
    inputs as ``val/probe_acc`` (and ``test/probe_acc``); it, the views and the checkpointed generators come from
    :class:`~lit_tricks.modules.two_views.TwoViewModule`.

    Args:
        backbone: the encoder; its output ``[N, feature_dim]`` is the representation (with our ``lit_tricks.nets``,
            set ``num_classes`` to the representation's size: every parameter then trains, which DDP requires).
        feature_dim: the size of the representation.
        projector_dims: the projector's layer sizes; the last is :math:`D` (the authors: 8192-8192-8192 on
            ImageNet, 512-1024 on CIFAR).
        lambd: :math:`\lambda`, the weight of the off-diagonal terms (Barlow Twins: 0.0051; MixBT's CIFAR runs:
            1/128 with :math:`D` = 1024).
        mixbt: :math:`w`, the MixBT weight relative to ``lambd`` (the authors: 4 on CIFAR, 2 on STL-10), or ``None``
            for plain Barlow Twins.
        mixbt_alpha: :math:`\alpha` of the Beta distribution (the authors: 1, a uniform :math:`\lambda_m`).
        augment: the view maker ``(inputs, generator) -> view``, called twice per step with the module's
            generator; default :func:`~lit_tricks.functional.tta.default_augment`.
        num_classes: the probe's classes, or ``None`` for no probe.
        probe_lr: the probe's learning rate (its own parameter group, without weight decay).
        optimizer: a callable ``params -> Optimizer``; default Adam, lr 1e-3, weight decay 1e-6 (the MixBT CIFAR
            code).
        seed: the seed of the view and mixing generators, saved in the checkpoint.

    Example::

        >>> import lightning as L
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> model = BarlowTwins(MLP(64, 32, hidden=(64,)), 32, projector_dims=(64, 64), mixbt=4.0, num_classes=10)
        >>> trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule(batch_size=64))
        >>> bool(trainer.callback_metrics["val/probe_acc"] > 0.3)  # chance: 0.1
        True
    """

    _RNG_KEY = "lit_tricks_barlow_twins_rng"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projector_dims: Sequence[int] = (128, 128),
        lambd: float = 0.0051,
        mixbt: float | None = None,
        mixbt_alpha: float = 1.0,
        augment: ViewMaker | None = None,
        num_classes: int | None = None,
        probe_lr: float = 1e-2,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, feature_dim, augment, num_classes, probe_lr, optimizer, seed)
        projector_dims = list(projector_dims)
        if not projector_dims:
            raise ValueError("projector_dims must name at least one layer size, e.g. (128, 128).")
        for size in projector_dims:
            check_number("projector_dims", size, at_least=1, integer=True, hint="Every layer size is positive.")
        check_number("lambd", lambd, at_least=0.0, hint="Barlow Twins uses 0.0051.")
        if mixbt is not None:
            check_number("mixbt", mixbt, at_least=0.0, hint="The MixBT weight (4.0 on CIFAR), or None to turn it off.")
        check_number("mixbt_alpha", mixbt_alpha, above=0.0)
        self.save_hyperparameters(ignore=["backbone", "augment", "optimizer"])
        sizes = [feature_dim, *projector_dims]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers += [nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ representations
    def _gather(self, z: Tensor) -> Tensor:
        """The embeddings of every process, with gradients, so the cross-correlation is over the global batch."""
        if self.trainer.world_size == 1:
            return z
        return self.all_gather(z, sync_grads=True).flatten(0, 1)

    # ------------------------------------------------------------------ lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tb = TrickBatch.from_batch(batch)
        x, n, h = tb.inputs, len(tb.inputs), self.hparams
        if n < 2:
            raise ValueError(f"BarlowTwins standardises over the batch and needs at least 2 samples, got {n}.")
        view_a, view_b = self.views(x)
        feat_a = self(view_a)
        z_a, z_b = self._gather(self.projector(feat_a)), self._gather(self.projector(self(view_b)))
        loss_bt = barlow_twins_loss(z_a, z_b, h.lambd)
        loss, terms = loss_bt, {"train/bt_loss": loss_bt.detach()}
        if h.mixbt is not None:
            perm, lam = sample_mixing(self._rng, n, h.mixbt_alpha, False, x.device)
            lam = lam.to(x.device, x.dtype, non_blocking=True)
            z_m = self._gather(self.projector(self(view_a.lerp(view_b[perm], 1.0 - lam))))
            hat_a, hat_b = standardise(z_a), standardise(z_b)
            loss_mix = h.mixbt * h.lambd * mixbt_loss(z_m, hat_a, hat_b, hat_b[self._global_perm(perm, n)], lam)
            loss = loss_bt + loss_mix
            terms |= {"train/mixbt_loss": loss_mix.detach(), "train/mixbt_lam": lam.squeeze()}
        return self.finish_step(loss, terms, feat_a, tb.hard_targets)

    def _global_perm(self, perm: Tensor, n: int) -> Tensor:
        """Each process's partners, as indices into the gathered batch (process ``r`` holds rows ``r n .. (r+1) n``)."""
        if self.trainer.world_size == 1:
            return perm
        offsets = torch.arange(self.trainer.world_size, device=perm.device).view(-1, 1) * n
        return (self.all_gather(perm).view(-1, n) + offsets).flatten()

    def generator_states(self) -> dict[str, Any]:
        return super().generator_states() | {"mixing": self._rng.bit_generator.state}

    def load_generator_states(self, states: dict[str, Any]) -> None:
        super().load_generator_states(states)
        self._rng.bit_generator.state = states["mixing"]
