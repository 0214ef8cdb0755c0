"""MoCo-v2 self-supervised learning (a momentum key encoder and a queue of negative keys), optionally with MoCHi's
synthetic hard negatives, and an online linear probe evaluated at validation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.functional.ema import ema_update_
from lit_tricks.functional.mochi import mochi_negatives
from lit_tricks.functional.moco import enqueue_, moco_loss
from lit_tricks.modules.two_views import TwoViewModule, ViewMaker


class MoCo(TwoViewModule):
    r"""**MoCo-v2** ("Improved Baselines with Momentum Contrastive Learning", Chen, Fan, Girshick & He, 2020, on
    "Momentum Contrast for Unsupervised Visual Representation Learning", He et al., CVPR 2020), optionally with
    **MoCHi** ("Hard Negative Mixing for Contrastive Learning", Kalantidis et al., NeurIPS 2020).

    Each step makes two views of the batch with ``augment``. The query :math:`q = g(f(x_q))` comes from the backbone
    :math:`f` and the head :math:`g` (v2: Linear-ReLU-Linear to ``dim``; v1, ``mlp=False``: one Linear), the key
    :math:`k` from a momentum copy of both, updated before each key forward with the shared EMA
    (:func:`~lit_tricks.functional.ema.ema_update_`), :math:`\theta_k \leftarrow m \theta_k + (1 - m) \theta_q`;
    both are L2-normalised. The loss is InfoNCE against the queue :math:`\{n_j\}` of the last ``queue_size`` keys
    (:func:`~lit_tricks.functional.moco.moco_loss`),

    .. math:: \mathcal L = -\log \frac{\exp(q^\top k / \tau)}{\exp(q^\top k / \tau) + \sum_j \exp(q^\top n_j / \tau)},

    after which the batch's keys replace the oldest ones (:func:`~lit_tricks.functional.moco.enqueue_`). Under DDP
    the keys of every process are gathered before the enqueue (as the authors' ``concat_all_gather``), so the queue
    and the momentum encoder stay identical on every process. The authors' shuffling BN is not built (see
    ``docs/moco.md``).

    With ``mochi=N`` each query also meets ``mochi_s1 + mochi_s2`` synthetic negatives mixed from its N hardest
    queue keys (pairs of keys, and the query with a key at weight below 1/2;
    :func:`~lit_tricks.functional.mochi.mochi_negatives`) from step ``mochi_start`` on; they are not enqueued.

    The online linear probe (``num_classes``) reads the detached representation of the query view; it, the views
    and the checkpointed generators come from :class:`~lit_tricks.modules.two_views.TwoViewModule`.

    Args:
        backbone: the encoder; its output ``[N, feature_dim]`` is the representation (with our ``lit_tricks.nets``,
            set ``num_classes`` to the representation's size).
        feature_dim: the size of the representation.
        dim: the size of the contrastive embedding (the authors: 128).
        mlp: the v2 head, Linear(feature_dim, feature_dim)-ReLU-Linear(feature_dim, dim); ``False`` for v1's Linear.
        queue_size: K, the number of negative keys (the authors: 65536); at least the global batch.
        momentum: m of the key encoder's EMA (the authors: 0.999).
        temperature: :math:`\tau` (v2: 0.2; v1: 0.07).
        mochi: N, the number of hardest queue keys MoCHi mixes from, or ``None`` for plain MoCo.
        mochi_s1: the negatives mixed from pairs of hard keys (the paper's s).
        mochi_s2: the negatives mixed from the query and a hard key (the paper's s').
        mochi_start: the first optimizer step that mixes.
        augment: the view maker ``(inputs, generator) -> view``, called twice per step with the module's
            generator (which MoCHi also draws from); default :func:`~lit_tricks.functional.tta.default_augment`.
        num_classes: the probe's classes, or ``None`` for no probe.
        probe_lr: the probe's learning rate (its own parameter group, without weight decay).
        optimizer: a callable ``params -> Optimizer`` for the query encoder, head and probe; default Adam, lr 1e-3,
            weight decay 1e-6 (the authors: SGD, lr 0.03, momentum 0.9, weight decay 1e-4, cosine schedule).
        seed: the seed of the view (and mixing) generator and of the initial random queue.

    Example::

        >>> import lightning as L
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> model = MoCo(MLP(64, 32, hidden=(64,)), 32, dim=32, queue_size=512, momentum=0.99, mochi=32,
        ...              mochi_s1=32, mochi_s2=8, num_classes=10)
        >>> trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule(batch_size=64))
        >>> bool(trainer.callback_metrics["val/probe_acc"] > 0.3)  # chance: 0.1
        True
    """

    _RNG_KEY = "lit_tricks_moco_rng"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        dim: int = 128,
        mlp: bool = True,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        mochi: int | None = None,
        mochi_s1: int = 1024,
        mochi_s2: int = 128,
        mochi_start: int = 0,
        augment: ViewMaker | None = None,
        num_classes: int | None = None,
        probe_lr: float = 1e-2,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, feature_dim, augment, num_classes, probe_lr, optimizer, seed)
        check_number("dim", dim, at_least=1, integer=True, hint="The authors use 128.")
        if not isinstance(mlp, bool):
            raise TypeError(f"mlp must be a bool (True: the v2 MLP head), got {type(mlp).__name__}.")
        check_number("queue_size", queue_size, at_least=1, integer=True, hint="At least the global batch size.")
        check_number("momentum", momentum, at_least=0.0, at_most=1.0, hint="The authors use 0.999.")
        check_number("temperature", temperature, above=0.0, hint="MoCo-v2 uses 0.2.")
        if mochi is not None:
            check_number("mochi", mochi, at_least=2, at_most=queue_size, integer=True, hint="At most queue_size.")
            check_number("mochi_s1", mochi_s1, at_least=0, integer=True)
            check_number("mochi_s2", mochi_s2, at_least=0, integer=True)
            if mochi_s1 + mochi_s2 == 0:
                raise ValueError("mochi_s1 + mochi_s2 must be positive with mochi on; or set mochi=None.")
        check_number("mochi_start", mochi_start, at_least=0, integer=True)
        self.save_hyperparameters(ignore=["backbone", "augment", "optimizer"])
        if mlp:
            self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, dim))
        else:
            self.head = nn.Linear(feature_dim, dim)
        self.key_encoder = copy.deepcopy(nn.Sequential(self.backbone, self.head)).requires_grad_(False)
        queue = torch.randn(queue_size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_pointer", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tb = TrickBatch.from_batch(batch)
        x, n, h = tb.inputs, len(tb.inputs), self.hparams
        world = self.trainer.world_size
        if n * world > h.queue_size:
            raise ValueError(f"queue_size ({h.queue_size}) must be at least the global batch ({n * world}).")
        view_q, view_k = self.views(x)
        feat_q = self(view_q)
        q = F.normalize(self.head(feat_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = F.normalize(self.key_encoder(view_k), dim=1)
        extra = None
        if h.mochi is not None and self.global_step >= h.mochi_start:
            extra = mochi_negatives(q.detach(), self.queue, h.mochi, h.mochi_s1, h.mochi_s2, self._views)
        loss = moco_loss(q, k, self.queue.clone(), h.temperature, extra)
        enqueue_(self.queue, self.queue_pointer, k if world == 1 else self.all_gather(k).flatten(0, 1))
        return self.finish_step(loss, {"train/infonce_loss": loss.detach()}, feat_q, tb.hard_targets)

    @torch.no_grad()
    def momentum_update(self) -> None:
        r""":math:`\theta_k \leftarrow m \theta_k + (1 - m) \theta_q` over the backbone's and head's parameters."""
        query = [*self.backbone.parameters(), *self.head.parameters()]
        ema_update_(list(self.key_encoder.parameters()), query, self.hparams.momentum)
