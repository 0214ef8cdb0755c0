"""MVP: mask and visual prompt tuning of a frozen ViT for online class-incremental learning (Si-Blurry)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.frozen import HoldsFrozen
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import logging_due
from lit_tricks.functional.mvp import (
    compensation_scores,
    focal_weights,
    ignore_scores,
    instance_logit_mask,
    masked_logits,
    prompt_contrastive_loss,
    select_prompts,
)

_VIT_PARTS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")


class MVP(HoldsFrozen, TrickModule):
    r"""Mask and Visual Prompt tuning (Moon, Park, Kim & Park, "Online Class Incremental Learning on
    Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023), as in the authors' code
    (KHU-AGI/Si-Blurry, ``models/mvp.py`` and ``methods/mvp.py``).

    The ViT ``backbone`` is frozen. Its CLS token after all blocks but the last (``query_last_layer=False``) is the
    query that picks one of ``pool_size`` keys (:func:`~lit_tricks.functional.mvp.select_prompts`, the distance
    scaled by the key's use count when ``contrastive``). Then the ViT runs again with prompt tokens appended for one
    block at a time and dropped after it (prompt tuning): ``g_prompt_length`` shared tokens at each block of
    ``g_prompt_layers``, ``e_prompt_length`` tokens of the selected key at each block of ``e_prompt_layers``. A new
    linear head reads the normalised CLS token; its logits are multiplied by the key's learned class mask
    :math:`2\sigma(\mu_s)` (``use_mask``) and the classes not seen yet are set to :math:`-\infty`. The loss is

    .. math:: \mathcal L = \mathrm{CE}\big(h(f / c)\odot 2\sigma(\mu_s),\,y\big)\cdot w + \mathcal L_{\text{CVPT}},
        \qquad w = (1-\alpha) + \alpha\,\iota^\gamma,

    with the compensation score :math:`c` (``feature_scaling``), the ignore score :math:`\iota` (``focal``) and
    :math:`\mathcal L_{\text{CVPT}}` (``contrastive``; else the mean query-key distance) of
    :mod:`lit_tricks.functional.mvp`. ``focal="batch"`` is the authors' code: their cross-entropy is reduced to
    the batch mean before the weights multiply it, so :math:`\mathcal L_{CE} = \overline{\mathrm{CE}}\cdot\bar w`;
    ``focal="sample"`` weights each sample's cross-entropy, :math:`\overline{w\,\mathrm{CE}}`.

    Trained: the head, the keys, the masks and the prompts, with Adam (lr 5e-3, no weight decay), ``online_iter``
    updates per incoming batch (the authors' 3). The keys' use counts and the seen classes are buffers (in the
    checkpoint, identical on every rank); the backbone is not a submodule (not in the state dict, moved with the
    module). ``TrickModule`` tricks cannot shape this training step (it has its own): ``setup`` refuses them.

    Args:
        backbone: a ViT with ``patch_embed`` (a convolution), ``cls_token``, ``pos_embed``, ``blocks`` and ``norm``
            (:class:`~lit_tricks.nets.vit.ViT`), or a module holding one as ``backbone`` (a trained ``Classifier``),
            or the path of a Lightning checkpoint of such a lit_tricks fit (rebuilt by
            :func:`~lit_tricks.distill.teachers.load_teacher`).
        num_classes: number of classes ``C``.
        pool_size: number of keys, each with its prompts and class mask (the authors' ``task_num``, 10).
        g_prompt_layers: blocks that get the shared prompts (authors: 0, 1).
        g_prompt_length: shared prompt tokens per block (authors: 5).
        e_prompt_layers: blocks that get the selected key's prompts (authors: 2, 3, 4).
        e_prompt_length: key prompt tokens per block (authors: 20).
        use_mask: instance-wise logit masking.
        contrastive: the contrastive prompt loss and count-scaled key selection (else the mean distance, L2P's).
        feature_scaling: adaptive feature scaling (the authors' ``use_afs``).
        focal: gradient-similarity focal loss (``use_gsf``): ``"batch"`` (the code), ``"sample"`` or ``None``.
        alpha: :math:`\alpha` of the focal weights (authors: 0.5).
        gamma: :math:`\gamma` of the focal weights (authors: 2).
        margin: added to the compensation score (authors: 0.5).
        query_last_layer: the query passes the last block too (authors' scripts: no).
        mask_unseen_in_training: the training logits of classes not seen yet are ``-inf`` too (the authors' code);
            ``False``: only the evaluation masks them, so training also pushes their logits down.
        online_iter: optimizer steps per incoming batch (authors: 3).
        optimizer: ``params -> Optimizer`` (default Adam, lr 5e-3, no weight decay).
        seed: seed of the keys', prompts' and head's initialisation.
        ece_bins: bins of the evaluation calibration error.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import ContinualEvaluation
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> from lit_tricks.nets.vit import ViT
        >>> model = MVP(ViT(dim=32, depth=5), num_classes=10, e_prompt_length=4)
        >>> evaluation = ContinualEvaluation(every_n_steps=50, eval_period=200)
        >>> trainer = L.Trainer(max_steps=15, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> stream = ContinualDataModule(DigitsDataModule(as_image=True, val_fraction=0.0), scenario="si_blurry")
        >>> trainer.fit(model, stream)
        >>> int(model.key_counts.sum()), 0.0 <= evaluation.summary()["a_last"] <= 1.0
        (960, True)
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        num_classes: int,
        pool_size: int = 10,
        g_prompt_layers: Sequence[int] = (0, 1),
        g_prompt_length: int = 5,
        e_prompt_layers: Sequence[int] = (2, 3, 4),
        e_prompt_length: int = 20,
        use_mask: bool = True,
        contrastive: bool = True,
        feature_scaling: bool = True,
        focal: Literal["batch", "sample"] | None = "batch",
        alpha: float = 0.5,
        gamma: float = 2.0,
        margin: float = 0.5,
        query_last_layer: bool = False,
        mask_unseen_in_training: bool = True,
        online_iter: int = 3,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
        ece_bins: int = 15,
    ) -> None:
        super().__init__(num_classes=num_classes, ece_bins=ece_bins)
        path = None
        if isinstance(backbone, (str, os.PathLike)):
            from lit_tricks.distill.teachers import load_teacher

            path, backbone = os.fspath(backbone), load_teacher(backbone)
        vit = self._find_vit(backbone)
        depth = len(vit.blocks)
        check_number("pool_size", pool_size, at_least=1, integer=True)
        check_number("g_prompt_length", g_prompt_length, at_least=1, integer=True)
        check_number("e_prompt_length", e_prompt_length, at_least=1, integer=True)
        for name, layers in (("g_prompt_layers", g_prompt_layers), ("e_prompt_layers", e_prompt_layers)):
            layers = list(layers)
            if any(not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < depth for n in layers):
                raise ValueError(
                    f"{name}={layers} must list blocks of the backbone, which has {depth} (0-{depth - 1}): e.g. "
                    f"{name}=({', '.join(str(n) for n in range(min(2, depth)))},)."
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name}={layers} names a block twice: list each block once.")
        for name, flag in (("use_mask", use_mask), ("contrastive", contrastive), ("feature_scaling", feature_scaling),
                           ("query_last_layer", query_last_layer),
                           ("mask_unseen_in_training", mask_unseen_in_training)):  # fmt: skip
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if focal not in ("batch", "sample", None):
            raise ValueError(f"focal must be 'batch' (the authors' code), 'sample' or None, got {focal!r}.")
        check_number("alpha", alpha, at_least=0.0, at_most=1.0, hint="The authors': 0.5.")
        check_number("gamma", gamma, at_least=0.0, hint="The authors': 2.")
        check_number("margin", margin, above=0.0, hint="It keeps the compensation score positive; the authors': 0.5.")
        check_number("online_iter", online_iter, at_least=1, integer=True, hint="The authors': 3.")
        # a checkpoint path is kept, so load_from_checkpoint rebuilds the backbone; a module must be passed again
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        if path is not None:
            self.hparams["backbone"] = path
        self.hold_frozen("backbone", vit)
        self.g_prompt_layers, self.e_prompt_layers = tuple(g_prompt_layers), tuple(e_prompt_layers)
        self.g_prompt_length, self.e_prompt_length = g_prompt_length, e_prompt_length
        self.use_mask, self.contrastive, self.feature_scaling = use_mask, contrastive, feature_scaling
        self.focal, self.mask_unseen_in_training = focal, mask_unseen_in_training
        self.alpha, self.gamma, self.margin, self.online_iter = alpha, gamma, margin, online_iter
        self.query_depth = depth if query_last_layer else depth - 1
        self.optimizer_factory = optimizer
        self.automatic_optimization = False
        dim = vit.cls_token.shape[-1]
        generator = torch.Generator().manual_seed(seed)
        # the authors' initialisation: standard normal keys and prompts, masks at -1 (2 sigmoid(-1) = 0.54)
        self.keys = nn.Parameter(torch.randn(pool_size, dim, generator=generator))
        self.g_prompts = nn.Parameter(torch.randn(len(g_prompt_layers) * g_prompt_length, dim, generator=generator))
        self.e_prompts = nn.Parameter(
            torch.randn(pool_size, len(e_prompt_layers) * e_prompt_length, dim, generator=generator)
        )
        self.mask_logits = nn.Parameter(torch.full((pool_size, num_classes), -1.0)) if use_mask else None
        self.head = nn.Linear(dim, num_classes)  # timm's ViT head initialisation
        nn.init.trunc_normal_(self.head.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("key_counts", torch.zeros(pool_size))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @staticmethod
    def _find_vit(backbone: nn.Module) -> nn.Module:
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a ViT nn.Module, got {type(backbone).__name__}.")
        for candidate in (backbone, getattr(backbone, "backbone", None)):
            if isinstance(candidate, nn.Module) and all(hasattr(candidate, part) for part in _VIT_PARTS):
                return candidate
        raise TypeError(
            f"backbone must be a ViT with {', '.join(_VIT_PARTS)} (lit_tricks.nets.vit.ViT), or a module holding one "
            f"as .backbone; {type(backbone).__name__} has neither."
        )

    # ------------------------------------------------------------------ the prompted ViT
    def _tokens(self, inputs: Tensor) -> Tensor:
        vit = self.backbone
        patches = vit.patch_embed(inputs).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != vit.pos_embed.shape[1]:
            raise ValueError(
                f"The backbone makes {patches.shape[1]} patches of inputs {tuple(inputs.shape[1:])} but has "
                f"{vit.pos_embed.shape[1] - 1} positions: feed images of its size (DigitsDataModule(as_image=True))."
            )
        return torch.cat([vit.cls_token.expand(len(inputs), -1, -1), patches], dim=1) + vit.pos_embed

    def prompt_features(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(features [B, D], selected keys [B], query-key distances [B, P])`` of the prompted ViT."""
        with torch.no_grad():
            tokens = self._tokens(inputs)
            query = tokens
            for block in self.backbone.blocks[: self.query_depth]:
                query = block(query)
        selected, distance = select_prompts(query[:, 0], self.keys, self.key_counts if self.contrastive else None)
        g_prompts = self.g_prompts.expand(len(inputs), -1, -1)
        e_prompts = self.e_prompts[selected]
        x, length = tokens, tokens.shape[1]
        for n, block in enumerate(self.backbone.blocks):
            extra = [x]
            if n in self.g_prompt_layers:
                start = self.g_prompt_layers.index(n) * self.g_prompt_length
                extra.append(g_prompts[:, start : start + self.g_prompt_length])
            if n in self.e_prompt_layers:
                start = self.e_prompt_layers.index(n) * self.e_prompt_length
                extra.append(e_prompts[:, start : start + self.e_prompt_length])
            x = block(torch.cat(extra, dim=1))[:, :length]
        return self.backbone.norm(x)[:, 0], selected, distance

    def _mask(self, selected: Tensor) -> Tensor | None:
        return instance_logit_mask(self.mask_logits, selected) if self.use_mask else None

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits ``[N, C]``: the masked head's, ``-inf`` for classes not seen in training yet."""
        features, selected, _ = self.prompt_features(inputs)
        return masked_logits(self.head(features), self._mask(selected), self.seen)

    # ------------------------------------------------------------------ training
    def mvp_loss(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one update and its terms; counts the keys chosen (summed over ranks)."""
        features, selected, distance = self.prompt_features(inputs)
        if self.contrastive:
            prompt_loss = prompt_contrastive_loss(self.keys, selected, distance, self.key_counts)
        else:
            prompt_loss = distance.gather(1, selected.unsqueeze(1)).mean()
        chosen = torch.bincount(selected, minlength=len(self.key_counts)).to(self.key_counts)
        if self._trainer is not None and self._trainer.world_size > 1:
            chosen = self._trainer.strategy.reduce(chosen, reduce_op="sum")
        self.key_counts += chosen
        mask = self._mask(selected)
        seen = self.seen if self.mask_unseen_in_training else torch.ones_like(self.seen)
        with torch.no_grad():
            detached = features.detach()
            fixed_mask = None if mask is None else mask.detach()
            probs = masked_logits(self.head(detached), fixed_mask, seen).softmax(dim=1)
            ignore = ignore_scores(detached, probs, fixed_mask, targets)
            compensation = compensation_scores(self.head.weight, detached, targets, self.margin)
        head_input = features / compensation.unsqueeze(1) if self.feature_scaling else features
        logits = masked_logits(self.head(head_input), mask, seen)
        ce = F.cross_entropy(logits, targets, reduction="none")
        if self.focal == "batch":
            ce_loss = ce.mean() * focal_weights(ignore, self.alpha, self.gamma).mean()
        elif self.focal == "sample":
            ce_loss = (ce * focal_weights(ignore, self.alpha, self.gamma)).mean()
        else:
            ce_loss = ce.mean()
        accuracy = (logits.argmax(1) == targets).float().mean()
        terms = {"ce_loss": ce_loss, "prompt_loss": prompt_loss, "ignore_score": ignore.mean(),
                 "compensation_score": compensation.mean(), "acc": accuracy}  # fmt: skip
        return ce_loss + prompt_loss, terms

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.tricks:
            raise ValueError(
                f"MVP has its own training step, so tricks cannot shape it; remove "
                f"{[type(t).__name__ for t in self.tricks]} from the callbacks (ContinualEvaluation is fine)."
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tb = TrickBatch.from_batch(batch)
        self._check_first_batch(tb, "train")
        targets = tb.hard_targets
        present = torch.zeros_like(self.seen).index_fill_(0, targets, True)
        if self._trainer is not None and self._trainer.world_size > 1:
            present = self.all_gather(present).any(dim=0)
        self.seen |= present  # the batch's classes count as seen before the update, as in the authors' code
        optimizer = self.optimizers()
        for _ in range(self.online_iter):
            loss, terms = self.mvp_loss(tb.inputs, targets)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(tb))
        if self._trainer is not None and logging_due(self._trainer):
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=len(tb))
        return loss.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        factory = self.optimizer_factory or (lambda ps: torch.optim.Adam(ps, lr=5e-3, weight_decay=0.0))
        return factory(params)
