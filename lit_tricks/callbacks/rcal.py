"""RCAL: representation calibration for noisy labels on long-tailed data."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number, named_submodule
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import Trick
from lit_tricks.functional.rcal import (
    calibrate_tail,
    class_statistics,
    gaussian_factors,
    lof_inliers,
    representation_distance,
    sample_features,
)


class RCAL(Trick):
    r"""RCAL ("When Noisy Labels Meet Long Tail Dilemmas: A Representation Calibration Method", Zhang, Zhao, Yao,
    Yuan & Huang, ICCV 2023), on the penultimate features of a :class:`~lit_tricks.TrickModule`.

    Start from an encoder pre-trained without labels (the paper: MoCo / SimCLR-style contrastive learning; load
    its weights into the model before ``fit``: this trick does not pre-train). Then, at the start of epoch
    ``warmup_epochs`` (and every ``every_n_epochs`` after it, if set), one pass over the training set
    (:func:`~lit_tricks.functional.rcal`):

    * drops each class's Local Outlier Factor outliers (``lof_neighbors``; 0 keeps every sample),
    * estimates each class's Gaussian :math:`\hat\mu_k, \hat\Sigma_k` from the rest,
    * calibrates every tail class (fewer kept samples than ``head_ratio`` times the largest class's) with its ``q``
      nearest head classes: :math:`\tilde\mu_k = (\hat\mu_k + \sum_{j\in C_k^q}\hat\mu_j)/(q+1)`,
      :math:`\tilde\Sigma_k = (\hat\Sigma_k + \sum_{j\in C_k^q}\hat\Sigma_j)/(q+1) + \alpha`.

    Every training step afterwards adds (as ``out.aux_losses``)

    .. math:: \texttt{sampled\_weight}\cdot\frac1M\sum_{m=1}^M \mathrm{CE}\big(h(\tilde z_m), k_m\big)
              + \texttt{reg\_weight}\cdot\frac1N\sum_{i=1}^N \lVert z_i - z^{\rm c}_i\rVert_2^2,

    where the :math:`M` sampled features :math:`\tilde z_m \sim \mathcal N(\tilde\mu_{k_m}, \tilde\Sigma_{k_m})`
    come equally from every class with a distribution (``ceil(num_sampled / classes)`` each), :math:`h` is the
    classifier head (only it learns from the sampled features), :math:`z_i` are the batch's features and
    :math:`z^{\rm c}_i` those a frozen copy of the encoder, taken when training starts, gives the same inputs (the
    individual representation calibration; the paper also trains with mixup: stack :class:`~lit_tricks.Mixup`).

    The statistics pass runs in eval mode with a sequential loader (no global random draw); under DDP each rank
    passes a strided shard, the features and labels are all-gathered and every rank computes the same statistics.
    The samples come from a private generator seeded by ``(seed, global step, rank)``, so a resumed run draws the
    same ones. The calibrated means and covariance factors, the frozen encoder and the epoch of the last pass are
    saved in checkpoints. Logged at each pass: ``tricks/RCAL/outlier_fraction``, ``tricks/RCAL/tail_classes``.

    Args:
        q: number of head classes each tail class borrows statistics from.
        alpha: added to every entry of a tail class's calibrated covariance (spread of its sampled features).
        head_ratio: a class is a head class when it has at least ``head_ratio`` times the largest class count.
        lof_neighbors: neighbours of the Local Outlier Factor (scikit-learn's default 20); 0: no outlier removal.
        num_sampled: features sampled per step, spread equally over the classes (rounded up to a multiple of their
            number); ``None``: the batch size.
        sampled_weight: weight of the cross-entropy on the sampled features.
        reg_weight: weight of the distance to the frozen encoder's features; 0: no frozen copy is kept.
        warmup_epochs: the first pass runs at the start of this epoch (0: from the pre-trained encoder, as the
            paper); no sampled loss before it.
        every_n_epochs: recompute the statistics every this many epochs after the first pass; 0: never.
        head: dotted name of the submodule mapping features to logits; ``None``: ``backbone.forward_head`` (our
            nets, timm models) or the module's ``forward_head``.
        encoder: dotted name of the submodule whose ``forward_features`` the regulariser's frozen copy runs;
            ``None``: ``backbone``.
        batch_size: batch size of the statistics pass.
        seed: seed of the private generator of the sampled features.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.rcal import RCAL
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> rcal = RCAL(q=2)
        >>> trainer = L.Trainer(max_steps=5, callbacks=[rcal], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), DigitsDataModule(imbalance_ratio=10))
        >>> rcal.means.shape, trainer.callback_metrics["tricks/RCAL/tail_classes"].item()
        (torch.Size([10, 32]), 5.0)
    """

    needs_features = True

    def __init__(
        self,
        q: int = 2,
        alpha: float = 0.0,
        head_ratio: float = 0.3,
        lof_neighbors: int = 20,
        num_sampled: int | None = None,
        sampled_weight: float = 1.0,
        reg_weight: float = 1.0,
        warmup_epochs: int = 0,
        every_n_epochs: int = 0,
        head: str | None = None,
        encoder: str | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        check_number("q", q, at_least=0, integer=True, hint="0 leaves the tail classes uncalibrated.")
        check_number("alpha", alpha, at_least=0.0)
        check_number("head_ratio", head_ratio, above=0.0, at_most=1.0, hint="1 makes only the largest class a head.")
        check_number("lof_neighbors", lof_neighbors, at_least=0, integer=True, hint="0 turns outlier removal off.")
        if num_sampled is not None:
            check_number("num_sampled", num_sampled, at_least=1, integer=True, hint="None samples a batch's worth.")
        check_number("sampled_weight", sampled_weight, at_least=0.0)
        check_number("reg_weight", reg_weight, at_least=0.0, hint="0 turns the representation regulariser off.")
        check_number("warmup_epochs", warmup_epochs, at_least=0, integer=True)
        check_number("every_n_epochs", every_n_epochs, at_least=0, integer=True, hint="0 computes them once.")
        check_number("batch_size", batch_size, at_least=1, integer=True)
        check_number("seed", seed, integer=True)
        for name, value in (("head", head), ("encoder", encoder)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be None or the dotted name of a submodule, got {type(value).__name__}.")
        self.q, self.alpha, self.head_ratio, self.lof_neighbors = q, float(alpha), float(head_ratio), lof_neighbors
        self.num_sampled, self.sampled_weight, self.reg_weight = num_sampled, float(sampled_weight), float(reg_weight)
        self.warmup_epochs, self.every_n_epochs = warmup_epochs, every_n_epochs
        self.batch_size, self.seed = batch_size, seed
        self.head_name, self.encoder_name = head, encoder
        self.means: Tensor | None = None  # [C, D] calibrated means
        self.factors: Tensor | None = None  # [C, D, D], factors @ factors.T = calibrated covariances
        self.valid: Tensor | None = None  # [C] classes with a distribution
        self.computed_epoch = -1  # epoch whose start ran the last pass
        self._pool: tuple[Tensor, Tensor, Tensor] | None = None  # the valid classes' ids, means and factors
        self._head: Callable[[Tensor], Tensor] | None = None
        self._encoder: nn.Module | None = None
        self._encoder_state: dict[str, Tensor] | None = None  # from a checkpoint, until the copy exists

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._head = self._find_head(pl_module)
        if self.reg_weight > 0:
            self._encoder_source(pl_module)  # fails early with a clear message

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reg_weight > 0 and self._encoder is None:
            encoder = copy.deepcopy(self._encoder_source(pl_module)).eval().requires_grad_(False)
            if self._encoder_state is not None:
                encoder.load_state_dict(self._encoder_state)
                self._encoder_state = None
            self._encoder = encoder
        if self.means is not None:  # loaded from a checkpoint, on the CPU
            self.means, self.factors = self.means.to(pl_module.device), self.factors.to(pl_module.device)
            self.valid = self.valid.to(pl_module.device)
            self._pool = self._sampling_pool()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = epoch == self.warmup_epochs or (
            self.every_n_epochs > 0
            and epoch > self.warmup_epochs
            and (epoch - self.warmup_epochs) % self.every_n_epochs == 0
        )
        if due and self.computed_epoch != epoch:  # a run resumed mid-epoch keeps the statistics it had
            outlier_fraction, tail_classes = self.compute(trainer, pl_module)
            self.computed_epoch = epoch
            pl_module.log(self.tag("outlier_fraction"), outlier_fraction)
            pl_module.log(self.tag("tail_classes"), float(tail_classes))

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        if self.reg_weight > 0:
            with torch.no_grad():  # the copy stays in eval mode: it is not a submodule the trainer switches
                anchors = self._encoder.forward_features(batch.inputs)
            distance = representation_distance(out.features.float(), anchors.float())
            out.aux_losses["rcal_reg"] = self.reg_weight * distance.mean()
        if self.means is not None and self.sampled_weight > 0:
            generator = torch.Generator().manual_seed(
                self.seed + 1_000_003 * (trainer.global_step * trainer.world_size + trainer.global_rank)
            )
            classes, means, factors = self._pool
            per_class = max(1, math.ceil((self.num_sampled or len(batch)) / len(classes)))
            sampled, rows = sample_features(means, factors, per_class, generator)
            logits = self._head(sampled.to(out.features.dtype))
            out.aux_losses["rcal_sampled"] = self.sampled_weight * F.cross_entropy(logits.float(), classes[rows])
        return out

    # ------------------------------------------------------------------ the statistics pass
    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, int]:
        """Pass over the training set; store the calibrated means and covariance factors; return the fraction of
        samples dropped as outliers and the number of tail classes."""
        features, labels = self._training_features(trainer, pl_module)
        num_classes = pl_module.num_classes
        keep = (
            lof_inliers(features, labels, num_classes, self.lof_neighbors)
            if self.lof_neighbors > 0
            else torch.ones_like(labels, dtype=torch.bool)
        )
        means, covariances, counts = class_statistics(features[keep], labels[keep], num_classes)
        means, covariances, valid = calibrate_tail(means, covariances, counts, self.q, self.alpha, self.head_ratio)
        self.means = means.float()
        self.factors = gaussian_factors(covariances).float()
        self.valid = valid
        self._pool = self._sampling_pool()
        tail = valid & (counts < self.head_ratio * counts.max())
        return 1.0 - keep.float().mean().item(), int(tail.sum())

    def _training_features(self, trainer: pl.Trainer, module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """Penultimate features and integer labels of the whole training set, identical on every rank."""
        dataset = trainer.train_dataloader.dataset
        n, rank, world = len(dataset), trainer.global_rank, trainer.world_size
        # a strided shard per rank, padded by repetition so that every rank gathers the same length
        shard = torch.arange(rank, math.ceil(n / world) * world, world) % n
        loader = DataLoader(Subset(dataset, shard.tolist()), self.batch_size, generator=torch.Generator())
        features, labels = [], []
        with eval_mode(module):
            for batch in loader:
                tb = TrickBatch.from_batch(batch)
                inputs = trainer.precision_plugin.convert_input(tb.inputs.to(module.device))
                features.append(module.forward_features(inputs)[1].float())
                labels.append(tb.hard_targets.to(module.device))
        features, labels, shard = torch.cat(features), torch.cat(labels), shard.to(module.device)
        if world > 1:
            shard = module.all_gather(shard).flatten()
            features = module.all_gather(features).flatten(0, 1)
            labels = module.all_gather(labels).flatten()
        rows = torch.empty(n, dtype=torch.long, device=shard.device)
        rows[shard] = torch.arange(len(shard), device=shard.device)  # training-set order; padded repeats collapse
        return features[rows], labels[rows]

    def _sampling_pool(self) -> tuple[Tensor, Tensor, Tensor]:
        """The ids, means and covariance factors of the classes with a distribution (gathered once per pass)."""
        classes = self.valid.nonzero().flatten()
        return classes, self.means[classes], self.factors[classes]

    # ------------------------------------------------------------------ model parts
    def _find_head(self, module: pl.LightningModule) -> Callable[[Tensor], Tensor]:
        if self.head_name is not None:
            return named_submodule(module, self.head_name, "the layer that maps features to logits")
        for owner in (getattr(module, "backbone", None), module):
            if owner is not None and callable(getattr(owner, "forward_head", None)):
                return owner.forward_head
        raise ValueError(
            f"RCAL feeds sampled features to the classifier head, but {type(module).__name__} has no "
            "backbone.forward_head or forward_head: set head to the dotted name of the layer that maps features to "
            "logits (e.g. head='backbone.head')."
        )

    def _encoder_source(self, module: pl.LightningModule) -> nn.Module:
        name = self.encoder_name or "backbone"
        encoder = named_submodule(module, name, "the network whose forward_features gives the penultimate features")
        if not callable(getattr(encoder, "forward_features", None)):
            raise ValueError(
                f"RCAL's regulariser runs a frozen copy of {name!r}.forward_features, which {type(encoder).__name__} "
                "lacks: set encoder to a submodule that has it, or reg_weight=0."
            )
        return encoder

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"computed_epoch": self.computed_epoch}
        if self.means is not None:
            state.update(means=self.means.cpu(), factors=self.factors.cpu(), valid=self.valid.cpu())
        encoder = self._encoder.state_dict() if self._encoder is not None else self._encoder_state
        if encoder is not None:
            state["encoder"] = {  # a layer's extra state (e.g. a generator's) may be a dict: copied as it is
                key: value.detach().cpu().clone() if isinstance(value, Tensor) else copy.deepcopy(value)
                for key, value in encoder.items()
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.computed_epoch = state_dict["computed_epoch"]
        if "means" in state_dict:
            self.means, self.factors, self.valid = state_dict["means"], state_dict["factors"], state_dict["valid"]
        self._encoder_state = state_dict.get("encoder")
        self._encoder = None  # rebuilt from the saved weights when training starts
