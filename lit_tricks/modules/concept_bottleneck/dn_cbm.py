"""DN-CBM, Discover-then-Name concept bottlenecks (Rao et al. 2024), on precomputed image features."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.functional.dn_cbm import name_directions, probe_l1, resample_dead_neurons, sae_loss
from lit_tricks.functional.vl_embeddings import Encoder, embed
from lit_tricks.modules.concept_bottleneck.base import LinearHeadOnConcepts


def _features(batch: Any) -> Tensor:
    if isinstance(batch, Mapping):
        return batch["inputs"]
    if isinstance(batch, Sequence) and not isinstance(batch, Tensor):
        return batch[0]
    return batch


class SparseAutoencoder(nn.Module):
    r"""The code's SAE (``sparse_autoencoder.SparseAutoencoder`` with one component): a tied bias :math:`b`
    (zeros unless ``tied_bias`` is given; the code's default, the geometric median being optional), a ReLU encoder
    (Kaiming-uniform weights, bias uniform in :math:`\pm 1/\sqrt D`) and a decoder ``[D, M]`` whose columns
    (the dictionary directions) are kept at unit norm:
    :math:`f = \mathrm{ReLU}(W_e (x - b) + b_e)`, :math:`\hat x = W_d f + b`. ``forward`` returns ``(f, x_hat)``.

    Example::

        >>> sae = SparseAutoencoder(4, expansion_factor=2)
        >>> [tuple(t.shape) for t in sae(torch.zeros(3, 4))], sae.decoder.norm(dim=0).round().tolist()
        ([(3, 8), (3, 4)], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    """

    def __init__(self, input_dim: int, expansion_factor: int = 8, tied_bias: Tensor | None = None) -> None:
        super().__init__()
        check_number("input_dim", input_dim, at_least=1, integer=True)
        check_number("expansion_factor", expansion_factor, at_least=1, integer=True)
        if tied_bias is not None and tied_bias.shape != (input_dim,):
            raise ValueError(f"tied_bias must be [input_dim] = [{input_dim}], got {tuple(tied_bias.shape)}.")
        n = input_dim * expansion_factor
        self.bias = nn.Parameter(torch.zeros(input_dim) if tied_bias is None else tied_bias.detach().float().clone())
        self.encoder = nn.Linear(input_dim, n)
        nn.init.kaiming_uniform_(self.encoder.weight, nonlinearity="relu")
        nn.init.uniform_(self.encoder.bias, -1 / math.sqrt(input_dim), 1 / math.sqrt(input_dim))
        self.decoder = nn.Parameter(F.normalize(torch.randn(input_dim, n), dim=0))

    def encode(self, x: Tensor) -> Tensor:
        """Concept activations :math:`f` ``[N, M]``."""
        return F.relu(self.encoder(x - self.bias))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return f, f @ self.decoder.T + self.bias

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """The code's decoder gradient hook: drop each column's gradient component along the column itself."""
        g = self.decoder.grad
        if g is not None:
            w = F.normalize(self.decoder, dim=0)
            g.sub_(w * (g * w).sum(dim=0, keepdim=True))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put the dictionary directions back on the unit sphere (the code does it after every step)."""
        self.decoder.copy_(F.normalize(self.decoder, dim=0))


class DNCBMAutoencoder(RestoresRNG, pl.LightningModule):
    r"""Stage one of DN-CBM ("Discover-then-Name: Task-Agnostic Concept Bottlenecks via Automated Concept
    Discovery", Rao et al., ECCV 2024): discover concepts with a sparse autoencoder on frozen image features
    (batches ``{"inputs": x}``, a tuple ``(x, ...)`` or a tensor; no labels needed), minimising

    .. math:: L = \frac1N \sum_i \Big[\frac1D \lVert x_i - \hat x_i \rVert_2^2 + \lambda \lVert f(x_i) \rVert_1\Big]

    (:func:`~lit_tricks.functional.dn_cbm.sae_loss`) with Adam, decoder columns held at unit norm (gradient
    component along each column removed, renormalised after each step). Dead neurons are resampled as the
    code does: after every ``resample_every`` epochs, neurons that never fired since the last resampling get new
    encoder and decoder vectors from high-loss inputs
    (:func:`~lit_tricks.functional.dn_cbm.resample_dead_neurons`, on up to ``resample_dataset_size`` training
    inputs), encoder bias 0 and their Adam moments reset (the code's ``AdamWithReset``); as the code, not after
    epoch :math:`e` when :math:`e + ` ``resample_every`` :math:`\ge` ``max_epochs - 1`` (``skip_final_resamples``).

    Example::

        >>> model = DNCBMAutoencoder(4, expansion_factor=2)
        >>> model(torch.zeros(3, 4)).shape
        torch.Size([3, 8])

    Args:
        input_dim: feature size :math:`D`.
        expansion_factor: :math:`M / D` (the authors' released SAE: 8).
        l1_coeff: :math:`\lambda` (the released SAE: 3e-5; the argument parser's default 3e-4).
        lr: Adam's learning rate (the released SAE: 5e-4), betas (0.9, 0.999), no weight decay.
        resample_every: epochs between resamplings (the released SAE: 10; 0 switches resampling off).
        resample_dataset_size: inputs scored for resampling (the code: 819,200, i.e. all of a small set).
        tied_bias: start of :math:`b` ``[D]`` (``None``: zeros, as the code runs).
        skip_final_resamples: no resampling in the last ``resample_every + 1`` epochs (the code); ``False``
            resamples whenever due.
    """

    def __init__(
        self,
        input_dim: int,
        expansion_factor: int = 8,
        l1_coeff: float = 3e-5,
        lr: float = 5e-4,
        resample_every: int = 10,
        resample_dataset_size: int = 819_200,
        tied_bias: Tensor | None = None,
        skip_final_resamples: bool = True,
    ) -> None:
        super().__init__()
        check_number("l1_coeff", l1_coeff, at_least=0.0)
        check_number("lr", lr, above=0.0)
        check_number("resample_every", resample_every, at_least=0, integer=True)
        check_number("resample_dataset_size", resample_dataset_size, at_least=1, integer=True)
        self.sae = SparseAutoencoder(input_dim, expansion_factor, tied_bias)
        self.l1_coeff, self.lr = l1_coeff, lr
        self.resample_every, self.resample_dataset_size = resample_every, resample_dataset_size
        self.skip_final_resamples = skip_final_resamples
        n = self.sae.encoder.out_features
        self.register_buffer("fires", torch.zeros(n, dtype=torch.long))
        self.register_buffer("epochs_since_resample", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """Concept activations ``[N, M]``."""
        return self.sae.encode(x)

    def _step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x = _features(batch)
        if x.ndim != 2 or x.shape[1] != self.sae.bias.shape[0]:
            raise ValueError(f"features must be [N, input_dim] = [N, {self.sae.bias.shape[0]}], got {tuple(x.shape)}.")
        f, x_hat = self.sae(x)
        recon, sparsity = sae_loss(x, x_hat, f, self.l1_coeff)
        loss = recon + sparsity
        l0 = (f > 0).float().sum(dim=1).mean()
        metrics = {"loss": loss, "reconstruction": recon, "l1": sparsity, "l0": l0}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(x), sync_dist=stage != "train")
        return loss, f

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, f = self._step(batch, "train")
        self.fires += (f > 0).sum(dim=0)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_after_backward(self) -> None:
        self.sae.remove_parallel_gradient()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.sae.normalize_decoder()

    def on_train_epoch_start(self) -> None:
        """Resample at the start of the epoch after the due one (so an end-of-epoch checkpoint, saved after the
        validation, resumes into the same resampling)."""
        if self.current_epoch == 0 or self.resample_every == 0:
            return
        self.epochs_since_resample += 1
        done, max_epochs = self.current_epoch - 1, self.trainer.max_epochs
        late = self.skip_final_resamples and max_epochs is not None and max_epochs >= 0
        if (late and done + self.resample_every >= max_epochs - 1) or int(
            self.epochs_since_resample
        ) < self.resample_every:
            return
        fires = self.trainer.strategy.reduce(self.fires.clone(), reduce_op="sum")
        dead = (fires == 0).nonzero().flatten()
        self.log("train/dead_fraction", dead.numel() / fires.numel())
        if dead.numel():
            decoder_cols, encoder_rows = self._resample(dead, fires > 0)
            decoder_cols = self.trainer.strategy.broadcast(decoder_cols)
            encoder_rows = self.trainer.strategy.broadcast(encoder_rows)
            with torch.no_grad():
                self.sae.decoder[:, dead] = decoder_cols.T.to(self.sae.decoder)
                self.sae.encoder.weight[dead] = encoder_rows.to(self.sae.encoder.weight)
                self.sae.encoder.bias[dead] = 0.0
            self._reset_adam(dead)
        self.fires.zero_()
        self.epochs_since_resample.zero_()

    @torch.no_grad()
    def _resample(self, dead: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        inputs, losses, seen = [], [], 0
        for batch in self.trainer.train_dataloader:
            x = _features(batch).to(self.device)
            f, x_hat = self.sae(x)
            losses.append((x - x_hat).pow(2).mean(dim=1) + self.l1_coeff * f.abs().sum(dim=1))
            inputs.append(x)
            seen += len(x)
            if seen >= self.resample_dataset_size:
                break
        x, loss = torch.cat(inputs)[: self.resample_dataset_size], torch.cat(losses)[: self.resample_dataset_size]
        return resample_dead_neurons(x, loss, dead.numel(), self.sae.encoder.weight[alive])

    def _reset_adam(self, dead: Tensor) -> None:
        optimizer = self.trainer.optimizers[0]
        for param, axis in ((self.sae.encoder.weight, 0), (self.sae.encoder.bias, 0), (self.sae.decoder, 1)):
            for key in ("exp_avg", "exp_avg_sq"):
                moment = optimizer.state.get(param, {}).get(key)
                if moment is not None:
                    moment.index_fill_(axis, dead.to(moment.device), 0.0)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8)


class DNCBM(LinearHeadOnConcepts):
    r"""Stage two of DN-CBM (Rao et al., ECCV 2024): the trained SAE's encoder, frozen, turns image features into
    named concept activations :math:`f(x)` ``[N, M]`` (each neuron named after the vocabulary entry nearest its
    decoder direction, :func:`~lit_tricks.functional.dn_cbm.name_directions`), and a bias-free linear probe
    :math:`W` ``[C, M]`` classifies them, trained with Adam on

    .. math:: L = \mathrm{CE}(W f(x), y) + \lambda\, \tfrac{1}{CM} \textstyle\sum_{c,j} |W_{cj}|

    (the code's ``train_linear_probe.py``: ``nn.Linear(bias=False)``, ``CrossEntropyLoss`` + ``lambda *
    L1Loss(W, 0)``). Batches ``{"inputs": features, "targets": labels}``. Build it with :meth:`from_autoencoder`.

    Example::

        >>> sae = DNCBMAutoencoder(2, expansion_factor=1)
        >>> model = DNCBM.from_autoencoder(sae, torch.eye(2), n_classes=3, vocabulary=["cat", "dog"])
        >>> model(torch.zeros(4, 2)).shape, len(model.concept_names)
        (torch.Size([4, 3]), 2)

    Args:
        tied_bias, encoder_weight, encoder_bias: the SAE's :math:`b` ``[D]``, :math:`W_e` ``[M, D]``, :math:`b_e`.
        directions: ``[M, D]`` the decoder's dictionary directions (for naming and inspection).
        concept_index: ``[M]`` the vocabulary entry naming each neuron.
        n_classes: number of classes.
        concept_names: the names (``None``: ``"concept_<vocabulary index>"``); kept in the checkpoint.
        name_similarity: ``[M]`` each neuron's similarity to its name (``None``: NaN).
        lr: Adam's learning rate (the authors' probes: 1e-3 on ImageNet, CIFAR-10, Places365; 1e-2 CIFAR-100).
        sparsity_weight: :math:`\lambda` (the authors' probes: 1; 10 on Waterbirds; the parser's default 0).
    """

    penalty_name = "l1"

    def __init__(
        self,
        tied_bias: Tensor,
        encoder_weight: Tensor,
        encoder_bias: Tensor,
        directions: Tensor,
        concept_index: Tensor,
        n_classes: int,
        concept_names: Sequence[str] | None = None,
        name_similarity: Tensor | None = None,
        lr: float = 1e-3,
        sparsity_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_number("n_classes", n_classes, at_least=1, integer=True)
        check_number("lr", lr, above=0.0)
        check_number("sparsity_weight", sparsity_weight, at_least=0.0)
        m, d = encoder_weight.shape
        for name, value, shape in (
            ("tied_bias", tied_bias, (d,)),
            ("encoder_bias", encoder_bias, (m,)),
            ("directions", directions, (m, d)),
            ("concept_index", concept_index, (m,)),
            ("name_similarity", torch.zeros(m) if name_similarity is None else name_similarity, (m,)),
        ):
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (M={m} neurons, D={d}), got {tuple(value.shape)}.")
        if concept_names is not None and len(concept_names) != m:
            raise ValueError(f"concept_names needs one name per neuron (M={m}), got {len(concept_names)}.")
        self.register_buffer("tied_bias", tied_bias.detach().float().clone())
        self.register_buffer("encoder_weight", encoder_weight.detach().float().clone())
        self.register_buffer("encoder_bias", encoder_bias.detach().float().clone())
        self.register_buffer("directions", directions.detach().float().clone())
        self.register_buffer("concept_index", concept_index.detach().long().clone())
        similarity = torch.full((m,), float("nan")) if name_similarity is None else name_similarity
        self.register_buffer("name_similarity", similarity.detach().float().clone())
        self.concept_names = (
            list(concept_names) if concept_names is not None else [f"concept_{i}" for i in concept_index.tolist()]
        )
        self.head = nn.Linear(m, n_classes, bias=False)
        self.lr, self.sparsity_weight = lr, sparsity_weight

    @classmethod
    def from_autoencoder(
        cls,
        autoencoder: DNCBMAutoencoder | SparseAutoencoder,
        vocabulary_embeddings: Tensor | None = None,
        n_classes: int = 2,
        vocabulary: Sequence[str] | None = None,
        text_encoder: Encoder | None = None,
        normalize_vocabulary: bool = True,
        **kwargs: Any,
    ) -> DNCBM:
        """Name the SAE's neurons from a vocabulary and build the model (``kwargs`` go to ``__init__``): pass the
        vocabulary's text embeddings ``[V, D]``, or the words in ``vocabulary`` and a ``text_encoder`` (any callable
        from a list of strings to ``[V, D]``, run through :func:`~lit_tricks.functional.vl_embeddings.embed`).
        The similarity of each neuron to its name is in the buffer ``model.name_similarity``."""
        sae = autoencoder.sae if isinstance(autoencoder, DNCBMAutoencoder) else autoencoder
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"autoencoder must be a DNCBMAutoencoder or SparseAutoencoder, got {type(autoencoder)}.")
        if vocabulary_embeddings is None:
            if vocabulary is None or text_encoder is None:
                raise ValueError("pass vocabulary_embeddings, or the words in vocabulary and a text_encoder.")
            vocabulary_embeddings = embed(text_encoder, list(vocabulary))
        if vocabulary is not None and len(vocabulary) != len(vocabulary_embeddings):
            raise ValueError(
                f"vocabulary has {len(vocabulary)} words but vocabulary_embeddings {len(vocabulary_embeddings)} rows."
            )
        directions = sae.decoder.detach().T.cpu()
        index, similarity = name_directions(directions, vocabulary_embeddings.cpu(), normalize_vocabulary)
        names = None if vocabulary is None else [vocabulary[i] for i in index.tolist()]
        return cls(
            sae.bias.detach().cpu(),
            sae.encoder.weight.detach().cpu(),
            sae.encoder.bias.detach().cpu(),
            directions,
            index,
            n_classes,
            concept_names=names,
            name_similarity=similarity,
            **kwargs,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dn_cbm_concept_names"] = list(self.concept_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.concept_names = checkpoint.get("dn_cbm_concept_names", self.concept_names)

    def concepts(self, features: Tensor) -> Tensor:
        """Named concept activations :math:`f(x)` ``[N, M]``."""
        if features.ndim != 2 or features.shape[1] != self.tied_bias.shape[0]:
            raise ValueError(
                f"features {tuple(features.shape)} do not match the SAE's input size {self.tied_bias.shape[0]}: "
                "pass the same image encoder's features the autoencoder was trained on."
            )
        return F.relu((features - self.tied_bias) @ self.encoder_weight.T + self.encoder_bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.concepts(features))

    def top_concepts(self, class_index: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` concepts with the largest probe weight for ``class_index``, as ``(name, weight)``."""
        weights = self.head.weight.detach()[class_index]
        top = weights.topk(min(k, len(weights)))
        return [(self.concept_names[i], float(w)) for w, i in zip(top.values, top.indices.tolist(), strict=True)]

    def penalty(self) -> Tensor:
        return self.sparsity_weight * probe_l1(self.head.weight)
