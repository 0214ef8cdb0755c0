"""Subclass-balancing contrastive learning: head classes split into tail-sized subclasses by k-means at epoch
boundaries, and a two-level contrastive loss on projected penultimate features."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number, classifier_layer
from lit_tricks.core.distributed import all_gather_rows
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.sample_table import index_range
from lit_tricks.core.trick import Trick
from lit_tricks.functional.sbcl import class_temperatures, cluster_subclasses, sbcl_loss, subclass_counts
from lit_tricks.functional.tta import default_augment


class SBCL(Trick):
    r"""SBCL ("Subclass-balancing Contrastive Learning for Long-tailed Recognition", Hou, Zhang, Wang & Zhou,
    ICCV 2023; authors' code ``JackHck/SBCL``, ``SimCLR/main.py`` and ``SimCLR/loss.py::SupConLoss_rank``).

    Supervised contrastive learning on long-tailed data is dominated by the head classes. SBCL splits each head
    class, by cosine k-means on the current representations, into :math:`k_c = \max(1, \lfloor n_c /
    \max(n_{\min}, m)\rfloor)` subclasses of about the tail size (:func:`~lit_tricks.functional.sbcl.subclass_counts`)
    and adds the bi-granularity loss :func:`~lit_tricks.functional.sbcl.sbcl_loss` on unit projections
    :math:`z = g(f(x)) / \lVert g(f(x)) \rVert` of two views of each sample:

    .. math:: \mathcal L = \frac1N \sum_i \mathrm{CE}(h(f(x_i)), y_i)
              + w\, \frac1N \sum_i \tfrac12 \sum_{v=1,2} \Big(\frac{\tau}{\tau_b}\,\mathcal L_{\mathrm{sub}}(i_v)
              + \gamma\,\mathcal L_{\mathrm{cls}}(i_v)\Big),

    :math:`\mathcal L_{\mathrm{sub}}` a SupCon term whose positives are the sample's subclass at temperature
    :math:`\tau`, :math:`\mathcal L_{\mathrm{cls}}` one whose positives are the other subclasses of its class (and
    its other view) against the other subclasses, at the class temperature :math:`\tau_{y}`
    (:func:`~lit_tricks.functional.sbcl.class_temperatures`). View 1 is the batch the module trains on (its
    features), view 2 ``augment(inputs)`` (one more forward pass per step). :math:`g` is the authors' projection
    head (Linear-ReLU-Linear to ``projection_dim``), built at ``setup`` and attached to the module as
    ``module.sbcl_projection``, so the module's optimizer trains it and its checkpoint holds it.

    For the first ``warmup_epochs`` epochs the term is SupCon on the class labels (:math:`\tau_b = \tau`,
    :math:`\gamma = 0`), as in the authors' code. Then, at the start of epoch ``warmup_epochs`` and every
    ``every_n_epochs`` epochs after, one pass over the training set (eval mode, no augmentation, the ranks take
    strided shards and gather them) gives the unit projections, which are clustered class by class with a
    seeded k-means (the same subclasses on every rank: computed from the gathered features and broadcast from
    rank 0). The subclass of each sample is looked up by dataset index (batches must carry ``index``). The
    subclass labels, centres and class temperatures are saved in checkpoints.

    It logs ``train/sbcl`` (the scaled term) every logging step and, at each clustering,
    ``tricks/SBCL/subclasses`` (their number) and ``tricks/SBCL/class_temperature_min`` / ``_max``.

    Args:
        weight: :math:`w`, the weight of the SBCL term beside the module's loss (the paper trains the
            representation with SBCL alone, then a classifier: not reproduced here).
        temperature: :math:`\tau` (authors: 0.1 on CIFAR, 0.07 on ImageNet).
        base_temperature: :math:`\tau_b` (authors: 0.07).
        class_weight: :math:`\gamma`, the weight of the class-level term (authors: 0.25 on CIFAR, 0.2 on ImageNet).
        adaptive_temperature: the class temperatures of the authors' default loss; ``False``: :math:`\tau_y = \tau`.
        min_subclass_size: :math:`m` (authors' ``--cluster``: 10 on CIFAR, 20 on ImageNet).
        warmup_epochs: epochs of SupCon on class labels before the first clustering (authors: 10).
        every_n_epochs: epochs between clusterings (authors: 10 on CIFAR, 5 on ImageNet).
        projection_dim: output width of the projection head (authors: 128).
        in_features: width of the module's ``forward_features``; ``None``: the input width of its last
            ``nn.Linear`` with ``num_classes`` outputs.
        augment: ``x -> x~`` for the second view; ``None``: :func:`~lit_tricks.functional.tta.default_augment`
            (light contrast, brightness, shift and noise, from the global RNG, which checkpoints restore).
        kmeans_iters: at most this many k-means rounds (authors: 35).
        kmeans_tol: k-means stops when the squared total centre shift is below this (authors: 1e-3).
        batch_size: batch size of the clustering pass.
        seed: seed of the k-means starts (with the epoch number).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> sbcl = SBCL(warmup_epochs=1, every_n_epochs=1)
        >>> trainer = L.Trainer(max_epochs=2, limit_train_batches=2, callbacks=[sbcl], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), DigitsDataModule(imbalance_ratio=10))
        >>> int(sbcl.subclass_counts.sum()) > 10, int(sbcl.subclasses.min()) >= 0
        (True, True)
    """

    needs_features = True
    needs_index = True
    tunable = ("weight",)  # PBT may change it mid-run (lit_tricks.tune)

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        class_weight: float = 0.25,
        adaptive_temperature: bool = True,
        min_subclass_size: int = 10,
        warmup_epochs: int = 10,
        every_n_epochs: int = 10,
        projection_dim: int = 128,
        in_features: int | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
        kmeans_iters: int = 35,
        kmeans_tol: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        check_number("weight", weight, at_least=0.0)
        check_number("temperature", temperature, above=0.0, hint="The authors use 0.1 (CIFAR) or 0.07 (ImageNet).")
        check_number("base_temperature", base_temperature, above=0.0, hint="The authors use 0.07.")
        check_number("class_weight", class_weight, at_least=0.0, hint="The authors use 0.25 (CIFAR) or 0.2.")
        if not isinstance(adaptive_temperature, bool):
            raise TypeError(f"adaptive_temperature must be True or False, got {adaptive_temperature!r}.")
        check_number("min_subclass_size", min_subclass_size, at_least=1, integer=True, hint="The authors use 10.")
        check_number("warmup_epochs", warmup_epochs, at_least=0, integer=True)
        check_number("every_n_epochs", every_n_epochs, at_least=1, integer=True)
        check_number("projection_dim", projection_dim, at_least=1, integer=True)
        if in_features is not None:
            check_number("in_features", in_features, at_least=1, integer=True)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable x -> x~ (or None), got {type(augment).__name__}.")
        check_number("kmeans_iters", kmeans_iters, at_least=1, integer=True)
        check_number("kmeans_tol", kmeans_tol, at_least=0.0)
        check_number("batch_size", batch_size, at_least=1, integer=True)
        check_number("seed", seed, at_least=0, integer=True)
        self.weight, self.temperature, self.base_temperature = weight, temperature, base_temperature
        self.class_weight, self.adaptive_temperature = class_weight, adaptive_temperature
        self.min_subclass_size = min_subclass_size
        self.warmup_epochs, self.every_n_epochs = warmup_epochs, every_n_epochs
        self.projection_dim, self.in_features = projection_dim, in_features
        self.augment = augment or default_augment
        self.kmeans_iters, self.kmeans_tol, self.batch_size, self.seed = kmeans_iters, kmeans_tol, batch_size, seed
        self.projection: nn.Module | None = None
        self.subclasses: Tensor | None = None  # [num_samples] global subclass id by dataset index, -1 if unseen
        self.centres: Tensor | None = None  # [K, projection_dim]
        self.class_temperatures: Tensor | None = None  # [C]
        self.subclass_counts: Tensor | None = None  # [C]
        self.clustered_epoch = -1  # the epoch whose start last clustered

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.projection is None:
            classifier = classifier_layer(pl_module, pl_module.num_classes)
            width = self.in_features or (classifier[1].in_features if classifier else None)
            if width is None:
                raise ValueError(
                    f"SBCL could not find the classifier of {type(pl_module).__name__} (an nn.Linear with "
                    f"{pl_module.num_classes} outputs) to read the feature width from: pass in_features=<width of "
                    "forward_features' features>."
                )
            self.projection = nn.Sequential(
                nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, self.projection_dim)
            ).to(next(pl_module.parameters()).device)
        # a submodule in every stage, so that the optimizer trains it and the module's checkpoints load with it
        pl_module.sbcl_projection = self.projection

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.subclasses is not None:
            rows = self._num_rows(trainer, pl_module)
            if len(self.subclasses) != rows:
                raise ValueError(
                    f"The SBCL subclass labels in the checkpoint cover {len(self.subclasses)} sample indices but the "
                    f"training set has {rows}: resume with the same training set."
                )
            device = pl_module.device
            self.subclasses, self.class_temperatures = self.subclasses.to(device), self.class_temperatures.to(device)
            self.centres = self.centres.to(device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.every_n_epochs == 0
        if due:  # not called again when a run resumes mid-epoch: the restored labels stay (the harness checks it)
            self.cluster(trainer, pl_module)
            self.clustered_epoch = epoch

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        z1 = self.project(out.features)
        _, features2 = module.forward_features(self.augment(batch.inputs))
        z2 = self.project(features2)
        labels = batch.hard_targets
        if self.clustered_epoch < 0:  # warm-up: SupCon on the class labels
            loss = sbcl_loss(
                z1, z2, labels, labels, self.temperature, base_temperature=self.temperature, class_weight=0
            )
        else:
            subclasses = self.subclasses[batch.index.to(self.subclasses.device)].to(labels.device)
            loss = sbcl_loss(
                z1,
                z2,
                labels,
                subclasses,
                self.temperature,
                self.class_temperatures,
                self.base_temperature,
                self.class_weight,
            )
        out.aux_losses["sbcl"] = self.weight * loss.mean()
        return out

    # ------------------------------------------------------------------ clustering
    def project(self, features: Tensor) -> Tensor:
        """The unit projections :math:`z` of penultimate ``features``."""
        return F.normalize(self.projection(features.flatten(1)), dim=1)

    def cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Cluster every class of the training set into subclasses now (all ranks call it together)."""
        dataset = trainer.train_dataloader.dataset
        n, rank, world = len(dataset), trainer.global_rank, trainer.world_size
        shard = torch.arange(rank, math.ceil(n / world) * world, world) % n  # strided, padded to equal lengths
        loader = DataLoader(Subset(dataset, shard.tolist()), self.batch_size, generator=torch.Generator())
        parts = [self._embed(trainer, pl_module, batch) for batch in loader]
        (z, labels, index), _ = all_gather_rows(pl_module, *(torch.cat(p) for p in zip(*parts, strict=True)))
        rows = self._num_rows(trainer, pl_module)
        position = torch.full((rows,), -1, dtype=torch.long, device=index.device)
        position[index] = torch.arange(len(index), device=index.device)  # a padded repeat keeps one copy
        seen = (position >= 0).nonzero().flatten()
        z, labels = z[position[seen]], labels[position[seen]]
        counts = subclass_counts(torch.bincount(labels, minlength=pl_module.num_classes).cpu(), self.min_subclass_size)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + trainer.current_epoch)
        ids, centres = cluster_subclasses(z, labels, counts, self.kmeans_iters, self.kmeans_tol, generator)
        if self.adaptive_temperature:
            temperatures = class_temperatures(z, labels, counts, self.temperature)
        else:
            temperatures = torch.full((len(counts),), float(self.temperature), device=z.device)
        # identical inputs give identical results on every rank; the broadcast makes sure of it
        ids, centres, temperatures = trainer.strategy.broadcast((ids, centres, temperatures), src=0)
        device = pl_module.device
        self.subclasses = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.subclasses[seen.to(device)] = ids.to(device)
        self.centres, self.class_temperatures = centres.to(device), temperatures.to(device)
        self.subclass_counts = counts
        pl_module.log(self.tag("subclasses"), float(counts.sum()))
        pl_module.log(self.tag("class_temperature_min"), float(temperatures.min()))
        pl_module.log(self.tag("class_temperature_max"), float(temperatures.max()))

    def _embed(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        tb = TrickBatch.from_batch(batch)
        if tb.index is None:
            raise ValueError(
                "SBCL keeps per-sample subclass labels and needs dataset indices, but the training set's items carry "
                "no 'index': use a lit_tricks data module, wrap your dataset in lit_tricks.data.IndexedDataset, or "
                "return (inputs, targets, index)."
            )
        inputs = trainer.precision_plugin.convert_input(tb.inputs.to(module.device))
        with eval_mode(module), torch.no_grad():
            _, features = module.forward_features(inputs)
            z = self.project(features).float()
        return z, tb.hard_targets.to(module.device), tb.index.to(module.device)

    @staticmethod
    def _num_rows(trainer: pl.Trainer, module: pl.LightningModule) -> int:
        rows = index_range(trainer.train_dataloader.dataset)
        if trainer.world_size > 1:  # rank-local shards: the widest range
            rows = int(module.all_gather(torch.tensor(rows, device=module.device)).max())
        return rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.subclasses is None:
            return {"clustered_epoch": self.clustered_epoch}
        return {
            "clustered_epoch": self.clustered_epoch,
            "subclasses": self.subclasses,
            "centres": self.centres,
            "class_temperatures": self.class_temperatures,
            "subclass_counts": self.subclass_counts,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clustered_epoch = state_dict.get("clustered_epoch", -1)
        self.subclasses = state_dict.get("subclasses")
        self.centres = state_dict.get("centres")
        self.class_temperatures = state_dict.get("class_temperatures")
        self.subclass_counts = state_dict.get("subclass_counts")
