"""Test-time adaptation: LightningModules that adapt a trained source model while they predict a test stream."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.core.checks import check_number
from lit_tricks.functional.ema import ema_update_
from lit_tricks.functional.tta import (
    default_augment,
    filtered_entropy,
    knn_probabilities,
    prototype_contrastive_loss,
    softmax_entropy,
    symmetric_cross_entropy,
)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_TYPES = {"batch": _NORMS, "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,)}


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm normalise with the statistics of the current batch, in train *and* eval mode
    (``track_running_stats=False``, running buffers removed), so Lightning's ``model.eval()`` before testing
    cannot undo adaptation. Returns the BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    for norm in norms:
        norm.track_running_stats = False
        norm.running_mean = norm.running_var = None
    return norms


def load_source_weights(model: nn.Module, path: str) -> nn.Module:
    """Load ``model``'s weights from ``path``: a Lightning checkpoint of a module that holds ``model`` as a
    submodule (e.g. a :class:`~lit_tricks.Classifier`, whose keys start with ``backbone.``) or a plain state dict.
    Returns ``model``."""
    state = load_checkpoint(path)
    state = state.get("state_dict", state)
    keys = list(model.state_dict())
    prefixes = {key[: len(key) - len(keys[0])] for key in state if key.endswith(keys[0])}
    for prefix in prefixes:  # the prefix under which the checkpoint stores the model
        if all(prefix + k in state for k in keys):
            try:
                model.load_state_dict({k: state[prefix + k] for k in keys})
                return model
            except RuntimeError as error:
                problem = str(error).splitlines()[1].strip()
                break
    else:
        problem = f"no keys like {keys[0]!r} under any prefix"
    raise ValueError(
        f"source_checkpoint {path!r} does not hold this model's weights ({problem}): give the checkpoint of the "
        "run that trained this architecture, built with the same arguments."
    )


class TTAModule(pl.LightningModule):
    """Base of the test-time adaptation methods: wraps a trained source ``model`` (inputs -> logits) and, in
    ``test_step`` / ``predict_step``, adapts on each test batch and predicts with the adapted model.

    Each method declares what adapts (:meth:`configure_model`, :meth:`collect_params`) and its loss
    (:meth:`forward_and_adapt`); the base owns the optimizer (built at construction, since ``trainer.test``
    does not call ``configure_optimizers``), ``steps`` updates per batch, ``episodic`` resets before every
    batch, ``reset_every`` resets after that many adapted batches (RDumb's remedy for collapse on long
    streams), a reset at each batch whose ``batch["reset"]`` is true (the stream's reset-each-shift protocol),
    and :meth:`reset`, which restores every network and the optimizer exactly. The reset point is the state at
    construction, or the loaded checkpoint's state (``ckpt_path=``). The networks stay in eval mode (no
    dropout) even under ``fit``; BatchNorm layers normalise with the test batch's statistics.

    It logs the online accuracy as ``test/acc`` and, for batches with a ``domain`` key, ``test/error/<domain>``
    at the end, both summed over DDP ranks (each rank adapts its own copy on its share of the stream).
    A batch with a NaN or infinite input is not adapted on (the adapted state stays as it was; its predictions,
    from :meth:`forward`, may be non-finite and count as errors): :attr:`nonfinite_batches` counts them, and
    ``tricks/<ClassName>/nonfinite`` logs the count of the test run.
    Methods that need gradients refuse to run under Lightning's default ``inference_mode=True`` and say to set
    ``Trainer(inference_mode=False)``.

    Args:
        model: the trained source model (it is adapted in place; pass a copy to keep the original).
        lr: learning rate of the method's optimizer.
        steps: optimizer steps per test batch.
        episodic: reset to the source state before every batch.
        reset_every: reset after this many adapted batches (0: never).
        domain_names: names of the stream's domains, for logging (default: the data module's
            ``domain_names``, else ``domain<i>``).
        source_checkpoint: load ``model``'s trained weights from this file first (:func:`load_source_weights`),
            so that a YAML recipe can name an untrained architecture plus the checkpoint of its training run.
    """

    needs_grad = True

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False, reset_every: int = 0,
        domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the trained source nn.Module (inputs -> logits), got {type(model).__name__}."
            )
        if source_checkpoint is not None:
            load_source_weights(model, source_checkpoint)
        check_number("steps", steps, at_least=1 if self.needs_grad else 0, integer=True)
        check_number("lr", lr, above=0.0)
        check_number("reset_every", reset_every, at_least=0, integer=True, hint="0: never reset.")
        self.model, self.lr, self.steps, self.episodic, self.reset_every = model, lr, steps, episodic, reset_every
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.build_models()
        self.configure_model()
        self.eval()
        self.tta_optimizer = self.build_optimizer()
        self._source_state = copy.deepcopy(self.state_dict())
        self._optimizer_state = copy.deepcopy(self.tta_optimizer.state_dict()) if self.tta_optimizer else None
        self._batch_norms = any(isinstance(m, _NORMS) and not m.track_running_stats for m in self.modules())
        self._adapted_batches = 0
        self.nonfinite_batches = 0
        self._records: list[tuple[Tensor, Tensor]] = []

    # ---------------------------------------------------------------- what a method defines
    def build_models(self) -> None:
        """Create the method's extra networks (teacher, projector, ...) from ``self.model``; default: none."""

    def configure_model(self) -> None:
        """Set ``requires_grad`` and normalisation behaviour; default: batch-norm statistics of the test batch,
        everything frozen."""
        self.model.requires_grad_(False)
        use_batch_statistics(self.model)

    def collect_params(self) -> list[nn.Parameter]:
        """The parameters the method adapts (default: none)."""
        return []

    def build_optimizer(self) -> torch.optim.Optimizer | None:
        params = self.collect_params()
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999)) if params else None

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """One adaptation step on ``x``; returns the logits to predict with. Default: a plain forward."""
        return self.model(x)

    # ---------------------------------------------------------------- the machinery
    def forward(self, x: Tensor) -> Tensor:
        """The method's prediction with its current state, without adapting (default: the model's logits)."""
        return self.model(x)

    def train(self, mode: bool = True) -> TTAModule:
        """Keep every network in eval mode (no dropout; BatchNorm uses batch statistics either way)."""
        return super().train(False)

    def reset(self) -> None:
        """Restore the source model (and every extra model of the method) and the optimizer's state."""
        self.load_state_dict(self._source_state)
        if self.tta_optimizer is not None:
            self.tta_optimizer.load_state_dict(self._optimizer_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._source_state = copy.deepcopy(checkpoint["state_dict"])

    def on_test_start(self) -> None:
        self._check_run()
        self._records = []
        self.nonfinite_batches = 0
        if self.domain_names is None:  # the stream's names, when it has them
            self.domain_names = getattr(self.trainer.datamodule, "domain_names", None)

    def on_predict_start(self) -> None:
        self._check_run()
        self.nonfinite_batches = 0

    def _check_run(self) -> None:
        if self.needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients, which Lightning's default inference_mode blocks: "
                "create the Trainer with inference_mode=False."
            )
        self._check_batch_size(getattr(self.trainer.datamodule, "batch_size", None))

    def _check_batch_size(self, batch_size: int | None) -> None:
        if self._batch_norms and batch_size == 1:
            raise ValueError(
                f"{type(self).__name__} normalises with each test batch's BatchNorm statistics, which a batch_size "
                "of 1 cannot give: set the stream's batch_size >= 2 (the references use 64-200), or adapt a "
                "model with GroupNorm/LayerNorm."
            )

    def adapt(self, batch: Any) -> Tensor:
        """Reset if due, adapt ``steps`` times, and return the logits of the adapted pass. A batch with a
        non-finite input is only predicted (:meth:`forward`), not adapted on, and counted."""
        x = batch["inputs"] if isinstance(batch, Mapping) else batch[0]
        self._check_batch_size(len(x))
        finite = bool(torch.isfinite(x).all())  # one synchronisation per batch, like the reset flag's
        due = self.reset_every and self._adapted_batches and self._adapted_batches % self.reset_every == 0
        flagged = isinstance(batch, Mapping) and bool(torch.as_tensor(batch.get("reset", False)).any())
        if self.episodic or (due and finite) or flagged:
            self.reset()
        if not finite:
            self.nonfinite_batches += 1
            with torch.no_grad():
                return self(x)
        logits = None
        with torch.enable_grad():
            for _ in range(max(self.steps, 1)):
                logits = self.forward_and_adapt(x)
        self._adapted_batches += 1
        return logits.detach()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits = self.adapt(batch)
        y = batch["targets"] if isinstance(batch, Mapping) else batch[1]
        hits = ((logits.argmax(dim=-1) == y) & logits.isfinite().all(dim=-1)).float()
        self.log("test/acc", hits.mean(), batch_size=len(y), sync_dist=True)
        if isinstance(batch, Mapping) and "domain" in batch:
            self._records.append((batch["domain"], hits))

    def on_test_epoch_end(self) -> None:
        """Error per domain over the whole stream, summed over the ranks' shares."""
        records = self._records or [(torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0))]
        domain = torch.cat([d for d, _ in records])
        hits = torch.cat([h for _, h in records]).to(domain.device, torch.float64)
        size = max(len(self.domain_names or ()), int(domain.max()) + 1 if len(domain) else 0)
        size = int(self.all_gather(torch.tensor(size, device=self.device)).max())  # the same on every rank
        counts = torch.stack([torch.bincount(domain, hits, size), torch.bincount(domain, None, size).double()])
        counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        for d in counts[1].nonzero().flatten().tolist():
            name = self.domain_names[d] if self.domain_names else f"domain{d}"
            self.log(f"test/error/{name}", 1 - counts[0, d].item() / counts[1, d].item())
        skipped = torch.tensor(float(self.nonfinite_batches), device=self.device)
        self.log(f"tricks/{type(self).__name__}/nonfinite", self.trainer.strategy.reduce(skipped, reduce_op="sum"))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.adapt(batch).softmax(dim=-1)


class SourceOnly(TTAModule):
    """The unadapted source model (the rivals' "Source" / "BN-0" baseline): frozen, in eval mode with its own
    running BatchNorm statistics. It logs the same ``test/acc`` and ``test/error/<domain>`` as the methods, so
    that the baseline compares with them corruption by corruption. Arguments as :class:`TTAModule`."""

    needs_grad = False

    def __init__(
        self, model: nn.Module, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None
    ) -> None:
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


class BNAdapt(TTAModule):
    """Test-batch normalisation statistics (Schneider et al., 2020; "BN-1" in the rivals' benchmark): every
    BatchNorm normalises with the current test batch's mean and variance; nothing is trained. Arguments as
    :class:`TTAModule`."""

    needs_grad = False

    def __init__(
        self, model: nn.Module, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None
    ) -> None:
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


class Tent(TTAModule):
    r"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021): BatchNorm
    uses test-batch statistics, and only the affine parameters of the ``norm_types`` layers (default: BatchNorm
    only) are updated to minimise the mean prediction entropy :math:`\frac1N\sum_i -\sum_c p_{ic}\log p_{ic}`
    of the same forward pass, whose outputs (before the update) are the predictions. Official defaults: Adam,
    lr 1e-3, one step per batch.

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks import Tent
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> tent = Tent(net, lr=1e-3)
        >>> sorted(name for name, p in tent.named_parameters() if p.requires_grad)
        ['model.1.bias', 'model.1.weight']

    Args:
        norm_types: which normalisation layers adapt: ``"batch"`` (BatchNorm1d/2d/3d), ``"layer"``
            (LayerNorm), ``"group"`` (GroupNorm), one name or a list. The default ``"batch"`` is the paper's
            and the official code's choice; ``["batch", "layer", "group"]`` is the rivals' benchmark variant
            (mariodoebler/test-time-adaptation), for models normalised by LayerNorm or GroupNorm.
        model, lr, steps, episodic, reset_every, domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False, reset_every: int = 0,
        domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
        norm_types: str | Sequence[str] = "batch",
    ) -> None:  # fmt: skip
        names = [norm_types] if isinstance(norm_types, str) else list(norm_types or ())
        if not names or any(name not in list(_NORM_TYPES) for name in names):
            raise ValueError(
                f"norm_types must name one or more of {', '.join(map(repr, _NORM_TYPES))}, got {norm_types!r}: "
                "e.g. norm_types='batch' (the paper) or ['batch', 'layer', 'group']."
            )
        self.norm_types = names
        super().__init__(model, lr, steps, episodic, reset_every, domain_names, source_checkpoint)

    def _adapted_norms(self) -> list[nn.Module]:
        kinds = tuple(kind for name in self.norm_types for kind in _NORM_TYPES[name])
        return [m for m in self.model.modules() if isinstance(m, kinds)]

    def configure_model(self) -> None:
        super().configure_model()
        norms = self._adapted_norms()
        if not norms:
            raise ValueError(
                f"Tent adapts normalisation layers of norm_types={self.norm_types}, but the model has none: "
                "choose the kinds it has ('batch', 'layer', 'group')."
            )
        for norm in norms:
            norm.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return [p for m in self._adapted_norms() for p in (m.weight, m.bias) if p is not None]

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        loss = softmax_entropy(logits).mean()
        loss.backward()
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad()
        return logits


class AdaNPC(TTAModule):
    r"""AdaNPC (Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023):
    a k-nearest-neighbour classifier over a memory of L2-normalised source features; confident test samples
    join the memory with their predicted labels. With cosine similarities :math:`s_j` of the ``k`` nearest
    entries, :math:`p_c = \sum_j \mathrm{softmax}(s/T)_j \mathbb 1[y_j = c]`; a sample joins when
    :math:`\max_c p_c \ge \beta`. (The authors' code thresholds ``softmax(p)``, which compresses confidences;
    we threshold :math:`p` itself.) No gradients.

    Args:
        model: the source model; ``features`` maps inputs to the penultimate features.
        features: ``inputs -> [N, D]`` (default: ``model.forward_features`` if the model has it).
        source_features, source_labels: the memory's source part.
        k, temperature, beta: the authors' defaults 100, 0.1, 0.1.
        domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    needs_grad = False

    def __init__(
        self, model: nn.Module, source_features: Tensor, source_labels: Tensor, features: nn.Module | None = None,
        k: int = 100, temperature: float = 0.1, beta: float = 0.1, domain_names: Sequence[str] | None = None,
        source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        if features is None and not hasattr(model, "forward_features"):
            raise ValueError("AdaNPC needs features=... (inputs -> penultimate features) or a model.forward_features.")
        check_number("k", k, at_least=1, integer=True)
        check_number("temperature", temperature, above=0.0)
        if source_features.ndim != 2 or len(source_features) != len(source_labels) or not len(source_labels):
            raise ValueError(
                "source_features must be [N, D] with one label each in source_labels [N], got "
                f"{tuple(source_features.shape)} and {tuple(source_labels.shape)}."
            )
        self._source = source_features, source_labels  # registered in build_models, before the state is snapshot
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)
        self._features = features
        self.k, self.temperature, self.beta = k, temperature, beta
        self.num_classes = int(source_labels.max()) + 1

    def build_models(self) -> None:
        features, labels = self._source
        del self._source  # the buffers below are the memory's only copy
        self.register_buffer("memory", F.normalize(features.float(), dim=1))
        self.register_buffer("memory_labels", labels.long())

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)  # a frozen source model with its own statistics

    def features(self, x: Tensor) -> Tensor:
        return self._features(x) if self._features is not None else self.model.forward_features(x)

    def _vote(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(x)
        probs = knn_probabilities(features, self.memory, self.memory_labels, self.num_classes, self.k, self.temperature)
        return features, probs

    def forward(self, x: Tensor) -> Tensor:
        """Log of the kNN vote over the current memory (nothing joins it)."""
        return self._vote(x)[1].clamp(min=1e-8).log()

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features, probs = self._vote(x)
            confidence, label = probs.max(dim=1)
            keep = confidence >= self.beta
            self.memory = torch.cat([self.memory, F.normalize(features[keep], dim=1)])
            self.memory_labels = torch.cat([self.memory_labels, label[keep]])
        return probs.clamp(min=1e-8).log()

    def reset(self) -> None:
        source = len(self._source_state["memory"])
        self.memory, self.memory_labels = self.memory[:source].clone(), self.memory_labels[:source].clone()
        self.load_state_dict(self._source_state)


class RMT(TTAModule):
    r"""Robust mean teacher (Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation",
    CVPR 2023), source-free: the whole student adapts (BatchNorm on test-batch statistics), an EMA teacher
    :math:`\theta_t \leftarrow m\,\theta_t + (1-m)\,\theta_s` (``momentum`` 0.999) follows it, and

    .. math:: \mathcal L = \tfrac12\,\mathrm{SCE}(s(x), t(x)) + \tfrac12\,\mathrm{SCE}(s(\tilde x), t(x))
              + \lambda_\text{cont}\,\mathcal L_\text{SupCon}

    with the symmetric cross-entropy (:math:`\alpha = 0.5`, :func:`symmetric_cross_entropy`), :math:`\tilde x` an
    augmented view, and, when source class ``prototypes`` are given, the contrastive loss pulling the projected
    features of :math:`x`, :math:`\tilde x` and :math:`x`'s nearest prototype (by cosine similarity; the raw class
    mean goes through the projector, like the raw features) together (temperature 0.1). The
    prediction is the sum of student and teacher logits. The authors' repository replays labelled source data
    by default; here that term and the source warm-up are left out (source-free, as their maintainers advise
    for source-free use). Reset restores student, teacher, projector and optimizer.

    Args:
        model: the source model; with ``prototypes`` it needs ``forward_features`` and ``forward_head``.
        lr: Adam learning rate (the authors' CIFAR configs: 1e-3).
        momentum: teacher EMA momentum :math:`m`.
        prototypes: ``[C, D]`` source class means of ``forward_features`` (``None``: no contrastive term).
        lambda_cont: weight of the contrastive term.
        temperature: SupCon temperature.
        augment: ``x -> x~`` (default :func:`default_augment`).
        steps, episodic, reset_every, domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.999, prototypes: Tensor | None = None,
        lambda_cont: float = 1.0, temperature: float = 0.1, augment=None, steps: int = 1, episodic: bool = False,
        reset_every: int = 0, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        check_number("momentum", momentum, above=0.0, below=1.0)
        if prototypes is not None:
            if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                raise ValueError("RMT's contrastive term needs model.forward_features and model.forward_head.")
            width = getattr(model, "num_features", prototypes.shape[-1])
            finite = bool(torch.isfinite(prototypes).all())
            if prototypes.ndim != 2 or prototypes.shape[1] != width or not finite:
                raise ValueError(
                    f"prototypes must be finite source class means [C, {width}] of model.forward_features, got "
                    f"shape {tuple(prototypes.shape)}{'' if finite else ' with NaN rows'}: "
                    "compute them with lit_tricks.functional.tta.class_prototypes(features, labels, num_classes)."
                )
        self._source_prototypes = prototypes  # registered in build_models, before the state is snapshot
        super().__init__(model, lr, steps, episodic, reset_every, domain_names, source_checkpoint)
        self.momentum, self.lambda_cont, self.temperature = momentum, lambda_cont, temperature
        self.augment = augment or default_augment

    def build_models(self) -> None:
        self.teacher = copy.deepcopy(self.model)
        self.projector = None
        if self._source_prototypes is not None:
            d = self._source_prototypes.shape[1]
            self.projector = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128))
            weight = next(self.model.parameters())
            # the raw class means (as the authors' code), in the model's dtype and on its device
            self.register_buffer("prototypes", self._source_prototypes.to(weight.device, weight.dtype))

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(True)
        use_batch_statistics(self.model)
        self.teacher.eval().requires_grad_(False)
        use_batch_statistics(self.teacher)

    def collect_params(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        return params + (list(self.projector.parameters()) if self.projector is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        """The prediction: student plus teacher logits."""
        return self.model(x) + self.teacher(x)

    def _contrastive(self, f_x: Tensor, f_aug: Tensor) -> Tensor:
        """SupCon over the views (nearest prototype, f(x), f(x~)), all three raw features through the projector;
        the nearest prototype by cosine similarity."""
        nearest = (F.normalize(f_x.detach(), dim=1) @ F.normalize(self.prototypes, dim=1).T).argmax(dim=1)
        views = torch.stack([self.prototypes[nearest], f_x, f_aug], dim=1)  # [B, 3, D]
        return prototype_contrastive_loss(self.projector(views), self.temperature)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        x_aug = self.augment(x)
        with torch.no_grad():
            teacher = self.teacher(x)
        if self.projector is not None:
            f_x, f_aug = self.model.forward_features(x), self.model.forward_features(x_aug)
            student, student_aug = self.model.forward_head(f_x), self.model.forward_head(f_aug)
        else:
            student, student_aug = self.model(x), self.model(x_aug)
        loss = 0.5 * symmetric_cross_entropy(student, teacher).mean()
        loss = loss + 0.5 * symmetric_cross_entropy(student_aug, teacher).mean()
        if self.projector is not None and self.lambda_cont:
            loss = loss + self.lambda_cont * self._contrastive(f_x, f_aug)
        loss.backward()
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad()
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), self.momentum)
        return student + teacher


class _MetaPart(nn.Module):
    """Part ``k`` of a frozen encoder with EcoTTA's meta network beside it:
    :math:`\\tilde x_k = \\mathrm{BN}_k(\\mathrm{part}_k(\\tilde x_{k-1})) + \\mathrm{ConvBlock}_k(\\tilde x_{k-1})`.
    With ``record`` set, a forward also stores :math:`R_k = \\lVert \\tilde x_k - x_k \\rVert_1` (mean absolute
    error to the frozen part's output, inputs detached so that it trains meta network ``k`` only)."""

    def __init__(self, part: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int], name: str) -> None:
        super().__init__()
        spatial = len(out_shape) - 1
        if len(in_shape) != len(out_shape) or spatial > 2:
            raise ValueError(
                f"EcoTTA part '{name}' maps {tuple(in_shape)} to {tuple(out_shape)} (per sample): a part must keep "
                "the layout [C], [C, L] or [C, H, W]; choose parts between such layers."
            )
        c_in, c_out = in_shape[0], out_shape[0]
        if spatial == 0:
            block, norm = nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d
        else:
            stride = in_shape[1] // out_shape[1]
            conv, norm = (nn.Conv1d, nn.BatchNorm1d) if spatial == 1 else (nn.Conv2d, nn.BatchNorm2d)
            block = conv(c_in, c_out, 3, stride=max(stride, 1), padding=1, bias=False)
            size = [(s - 1) // max(stride, 1) + 1 for s in in_shape[1:]]
            if size != list(out_shape[1:]):
                raise ValueError(
                    f"EcoTTA part '{name}' maps {tuple(in_shape)} to {tuple(out_shape)}: its meta conv block "
                    "(3x3, padding 1) cannot match that size with a stride; choose parts that downsample by "
                    "an integer stride."
                )
        self.part = part
        self.conv = nn.Sequential(block, norm(c_out), nn.ReLU())
        self.meta_bn = norm(c_out)
        self.record = False
        self.regularisation: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        frozen = self.part(x)
        if self.record:
            target = frozen.detach()
            self.regularisation = (self.meta_bn(target) + self.conv(x.detach()) - target).abs().mean()
        return self.meta_bn(frozen) + self.conv(x)


class EcoTTA(TTAModule):
    r"""EcoTTA (Song et al., "EcoTTA: Memory-Efficient Continual Test-time Adaptation via Self-distilled
    Regularization", CVPR 2023): the source model stays frozen; each of K ``parts`` of its encoder gets a small
    meta network (a BatchNorm on the part's output plus a Conv-BN-ReLU block on its input, added as a residual),
    and only the meta networks adapt, with

    .. math:: \mathcal L = \mathbb 1[H(\hat y) < H_0]\,H(\hat y) + \lambda \sum_k \lVert \tilde x_k - x_k \rVert_1,
              \qquad H_0 = 0.4 \ln C,

    the entropy of reliable samples (EATA's filter) plus the self-distilled regulariser that keeps each meta
    group's output :math:`\tilde x_k` near the frozen part's :math:`x_k` (λ = 0.5; one summed loss, SGD 5e-3,
    as in the paper). Predictions come from the same (pre-update) pass. The paper's memory saving rests on
    not storing the frozen network's activations; PyTorch's autograd still saves a frozen convolution's input
    whenever a gradient passes through it, so here the saving does not materialise (BENCHMARKS.md).

    The meta networks start random, so warm them up before deployment: ``Trainer(max_epochs=10).fit(ecotta,
    source_data)`` trains them alone with cross-entropy on source data (paper: SGD 5e-2, 10 epochs on CIFAR;
    5-20% of the source set is enough). Testing without a warm-up warns.

    Example::

        >>> import torch
        >>> from lit_tricks import EcoTTA
        >>> from lit_tricks.nets import CNN2D
        >>> eco = EcoTTA(CNN2D(num_classes=10, width=8), parts=["body.0", "body.1", "body.2", "body.3"],
        ...              input_shape=[1, 8, 8])
        >>> eco.adapt({"inputs": torch.rand(16, 1, 8, 8)}).shape
        torch.Size([16, 10])

    Args:
        model: the source model.
        parts: dotted names of the encoder's K consecutive parts (the paper uses K = 4 or 5, shallow layers
            split more finely), each mapping ``[C, ...]`` to ``[C', ...]``; the stem and the head stay frozen.
        input_shape: one input's shape (no batch dimension), to size the meta networks.
        lr: SGD learning rate at test time (momentum 0.9).
        lambda_reg: λ, weight of the self-distilled regulariser.
        entropy_margin: :math:`H_0 / \ln C`.
        warmup_lr: SGD learning rate of the warm-up (momentum 0.9).
        steps, episodic, reset_every, domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, parts: Sequence[str], input_shape: Sequence[int], lr: float = 5e-3,
        lambda_reg: float = 0.5, entropy_margin: float = 0.4, warmup_lr: float = 5e-2, steps: int = 1,
        episodic: bool = False, reset_every: int = 0, domain_names: Sequence[str] | None = None,
        source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        if isinstance(parts, str) or not parts:
            raise ValueError("parts must list the encoder parts' module names, e.g. ['body.0', 'body.1', ...].")
        check_number("lambda_reg", lambda_reg, at_least=0.0)
        check_number("entropy_margin", entropy_margin, above=0.0, at_most=1.0, hint="A fraction of ln C.")
        check_number("warmup_lr", warmup_lr, above=0.0)
        self.part_names, self.input_shape = list(parts), list(input_shape)
        super().__init__(model, lr, steps, episodic, reset_every, domain_names, source_checkpoint)
        self.lambda_reg, self.entropy_margin, self.warmup_lr = lambda_reg, entropy_margin, warmup_lr

    @property
    def meta_parts(self) -> list[_MetaPart]:
        return [self.model.get_submodule(name) for name in self.part_names]

    def build_models(self) -> None:
        names = {name for name, _ in self.model.named_modules()}
        for name in self.part_names:
            if name not in names or not name:
                raise ValueError(
                    f"EcoTTA part '{name}' is not a submodule of the model; its submodules: {sorted(names)[:20]}."
                )
        shapes: dict[str, tuple] = {}

        def record(name: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                shapes.setdefault(name, (args[0].shape[1:], out.shape[1:]))

            return hook

        hooks = [self.model.get_submodule(name).register_forward_hook(record(name)) for name in self.part_names]
        device = next(self.model.parameters()).device
        with torch.no_grad():  # the base keeps every network in eval mode from here on
            self.model.eval()(torch.zeros(2, *self.input_shape, device=device))
        for hook in hooks:
            hook.remove()
        for name in self.part_names:
            if name not in shapes:
                raise ValueError(f"EcoTTA part '{name}' is not called in the model's forward.")
            parent, _, child = name.rpartition(".")
            meta = _MetaPart(self.model.get_submodule(name), *shapes[name], name=name).to(device)
            setattr(self.model.get_submodule(parent) if parent else self.model, child, meta)
        self.register_buffer("warmed_up", torch.tensor(False))

    def configure_model(self) -> None:
        super().configure_model()  # frozen; every BatchNorm (frozen and meta) on batch statistics
        for meta in self.meta_parts:
            meta.conv.requires_grad_(True)
            meta.meta_bn.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return [p for meta in self.meta_parts for p in (*meta.conv.parameters(), *meta.meta_bn.parameters())]

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.collect_params(), lr=self.lr, momentum=0.9)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        metas = self.meta_parts
        for meta in metas:
            meta.record = True
        try:
            logits = self.model(x)
        finally:
            for meta in metas:
                meta.record = False
        regularisation = sum(meta.regularisation for meta in metas)
        loss = filtered_entropy(logits, self.entropy_margin) + self.lambda_reg * regularisation
        loss.backward()
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad()
        return logits

    # ---------------------------------------------------------------- the source warm-up (Trainer.fit)
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = (batch["inputs"], batch["targets"]) if isinstance(batch, Mapping) else batch[:2]
        loss = F.cross_entropy(self.model(x), y)
        # at the logging interval (warmup/loss_step) and per epoch (warmup/loss_epoch), so that a warm-up shorter
        # than the interval (Lightning's default: 50 steps) still logs
        self.log("warmup/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.warmed_up.fill_(True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.collect_params(), lr=self.warmup_lr, momentum=0.9)

    def on_fit_end(self) -> None:
        """The warmed-up meta networks become the state that :meth:`reset` returns to."""
        self._source_state = copy.deepcopy(self.state_dict())

    def on_test_start(self) -> None:
        super().on_test_start()
        if not self.warmed_up:
            rank_zero_warn(
                "EcoTTA's meta networks were not warmed up: run Trainer(max_epochs=10).fit(ecotta, source_data) "
                "before adapting (random meta networks start far from the source model)."
            )
