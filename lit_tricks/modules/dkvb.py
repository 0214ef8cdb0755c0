"""Discrete key-value bottleneck: a frozen encoder, label-free frozen keys, learnable values retrieved sparsely."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.frozen import HoldsFrozen
from lit_tricks.core.module import TrickModule
from lit_tricks.functional.dkvb import ema_kmeans_step, nearest_keys, retrieve


class DKVB(HoldsFrozen, TrickModule):
    r"""Discrete Key-Value Bottleneck (Träuble et al., "Discrete Key-Value Bottleneck", ICML 2023) as a classifier.

    The frozen ``encoder`` gives features :math:`\phi(x)` ``[N, E]``; fixed random projections (Xavier-normal, one
    per codebook, as in lucidrains' implementation) give :math:`z_c = P_c \phi(x)` ``[N, C, D]``; each codebook
    retrieves the values of its ``top_k`` nearest keys and the logits are their mean over codebooks and keys
    (:mod:`lit_tricks.functional.dkvb`; the values are ``[C, K, num_classes]``, the paper's non-parametric
    average-pooling decoder). Only the values are trained, with cross-entropy; the gradient reaches only the
    retrieved ones, so training on new classes leaves the values other inputs use alone.

    The keys are fitted **without labels** before training, by ``key_init_epochs`` passes of EMA k-means (decay
    ``key_decay``) over ``key_init_data`` (inputs from another distribution, as the paper's ImageNet keys for
    CIFAR) or, when ``None``, over the inputs of the data module's training set (labels unused). They start at
    random inputs' projections, then stay frozen. This happens once, at the start of the first fit, identically on
    every rank (same data, same order, a private generator); the keys are buffers, so checkpoints keep them and a
    resumed fit does not refit them.

    Args:
        encoder: the frozen feature extractor, ``inputs -> [N, E]`` (not trained, not in the checkpoint).
        num_classes: :math:`C_{\text{out}}`, the values' size.
        num_codebooks: :math:`C`.
        num_keys: :math:`K` keys per codebook.
        key_dim: :math:`D`, the projected dimension per codebook.
        top_k: keys retrieved per codebook.
        key_init_data: unlabelled inputs ``[M, ...]`` for the key fitting; ``None``: the training set's inputs.
        key_init_epochs: passes of EMA k-means over them.
        key_decay: :math:`\gamma` of the EMA (lucidrains' ``VectorQuantize`` default 0.8).
        key_batch_size: batch size of the key fitting.
        optimizer: ``params -> Optimizer`` for the values (default Adam, lr 1e-3).
        seed: seed of the projections and of the key fitting.

    Example::

        >>> import lightning as L
        >>> from lit_tricks.data import DigitsDataModule
        >>> model = DKVB(nn.Identity(), num_classes=10, num_codebooks=16, num_keys=32, key_dim=4)
        >>> trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> bool(model.keys_ready), trainer.callback_metrics["val/acc"] > 0.8
        (True, tensor(True))
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        num_codebooks: int = 64,
        num_keys: int = 256,
        key_dim: int = 8,
        top_k: int = 1,
        key_init_data: Tensor | None = None,
        key_init_epochs: int = 5,
        key_decay: float = 0.8,
        key_batch_size: int = 256,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
        ece_bins: int = 15,
    ) -> None:
        super().__init__(num_classes=num_classes, ece_bins=ece_bins)
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be an nn.Module mapping inputs to features [N, E], got {type(encoder).__name__}."
            )
        for name, value in (("num_codebooks", num_codebooks), ("num_keys", num_keys), ("key_dim", key_dim)):
            check_number(name, value, at_least=1, integer=True)
        check_number("top_k", top_k, at_least=1, at_most=num_keys, integer=True, hint="At most num_keys.")
        check_number("key_init_epochs", key_init_epochs, at_least=1, integer=True)
        check_number("key_decay", key_decay, at_least=0.0, below=1.0)
        check_number("key_batch_size", key_batch_size, at_least=1, integer=True)
        if key_init_data is not None and not isinstance(key_init_data, Tensor):
            raise TypeError(
                f"key_init_data must be a tensor of inputs [M, ...] or None, got {type(key_init_data).__name__}."
            )
        self.save_hyperparameters(ignore=["encoder", "key_init_data", "optimizer"])
        self.hold_frozen("encoder", encoder)
        self.top_k, self.key_init_data, self.optimizer_factory = top_k, key_init_data, optimizer
        self.key_init_epochs, self.key_decay, self.key_batch_size = key_init_epochs, key_decay, key_batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self.num_codebooks, self.num_keys, self.key_dim = num_codebooks, num_keys, key_dim
        self.register_buffer("projection", torch.empty(0))  # [C, E, D], sized at the first features
        self.register_buffer("keys", torch.zeros(num_codebooks, num_keys, key_dim))
        self.register_buffer("keys_ready", torch.tensor(False))
        self.values = nn.Parameter(torch.zeros(num_codebooks, num_keys, num_classes))

    # ------------------------------------------------------------------ the bottleneck
    def project(self, inputs: Tensor) -> Tensor:
        """``[N, C, D]`` the frozen features projected into every codebook."""
        with torch.no_grad():
            features = self.encoder(inputs)
            if not isinstance(features, Tensor) or features.ndim != 2:
                raise ValueError(
                    "encoder must map a batch to features [N, E]: end it with a flatten or a pooling layer."
                )
            features = features.float()
            if self.projection.numel() == 0:
                projection = torch.empty(self.num_codebooks, features.shape[1], self.key_dim)
                std = math.sqrt(2.0 / (features.shape[1] + self.key_dim))  # Xavier normal of each [E, D] map
                self.projection = projection.normal_(0.0, std, generator=self._generator).to(features.device)
            if self.projection.shape[1] != features.shape[1]:
                raise ValueError(
                    f"The encoder gives {features.shape[1]} features but the projections take "
                    f"{self.projection.shape[1]}: use the encoder this model (or its checkpoint) was made with."
                )
            return torch.einsum("ne,ced->ncd", features, self.projection)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits ``[N, num_classes]``: the mean of the retrieved values."""
        return retrieve(self.values, nearest_keys(self.project(inputs), self.keys, self.top_k))

    # ------------------------------------------------------------------ key fitting (no labels)
    def fit_keys(self, inputs: Tensor) -> None:
        """Fit the keys on unlabelled ``inputs`` by EMA k-means, then freeze them (``keys_ready``)."""
        inputs = inputs.to(self.device)
        if len(inputs) < self.num_keys:
            raise ValueError(
                f"The key fitting has {len(inputs)} inputs for num_keys={self.num_keys}: give more key_init_data "
                "or fewer keys."
            )
        first = torch.randperm(len(inputs), generator=self._generator)[: self.num_keys].to(self.device)
        keys = self.project(inputs[first]).transpose(0, 1).contiguous()  # [C, K, D]: random inputs' projections
        counts, sums = torch.ones(keys.shape[:2], device=self.device), keys.clone()
        for _ in range(self.key_init_epochs):
            order = torch.randperm(len(inputs), generator=self._generator).to(self.device)
            for rows in order.split(self.key_batch_size):
                keys, counts, sums = ema_kmeans_step(self.project(inputs[rows]), keys, counts, sums, self.key_decay)
        self.keys.copy_(keys)
        self.keys_ready.fill_(True)

    def on_fit_start(self) -> None:
        if bool(self.keys_ready):
            return
        data = self.key_init_data
        if data is None:
            train_set = getattr(self.trainer.datamodule, "train_set", None)
            inputs = getattr(train_set, "inputs", None)
            if not isinstance(inputs, Tensor):
                raise ValueError(
                    "DKVB fits its keys on key_init_data, or else on the data module's train_set.inputs, which this "
                    "data module lacks: pass key_init_data (unlabelled inputs [M, ...])."
                )
            data = inputs
        self.fit_keys(data)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        return factory([self.values])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "projection")
        if saved is not None and saved.shape != self.projection.shape:  # the lazily sized buffer takes the saved size
            self.projection = self.projection.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
