"""Test-time adaptation: LightningModules that adapt a trained source model while they predict a test stream."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.functional.ema import ema_update_

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def softmax_entropy(logits: Tensor) -> Tensor:
    r"""Per-sample entropy :math:`-\sum_c p_c \log p_c` of ``softmax(logits)``."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm normalise with the statistics of the current batch, in train *and* eval mode
    (``track_running_stats=False``, running buffers removed), so Lightning's ``model.eval()`` before testing
    cannot undo adaptation. Returns the BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    for norm in norms:
        norm.track_running_stats = False
        norm.running_mean = norm.running_var = None
    return norms


class TTAModule(pl.LightningModule):
    """Base of the test-time adaptation methods: wraps a trained source ``model`` (inputs -> logits) and, in
    ``test_step`` / ``predict_step``, adapts on each test batch and predicts with the adapted model.

    Each method declares what adapts (:meth:`configure_model`, :meth:`collect_params`) and its loss
    (:meth:`forward_and_adapt`); the base owns the optimizer (built at ``setup``, since ``trainer.test`` does
    not call ``configure_optimizers``), ``steps`` updates per batch, ``episodic`` resets before every batch, a
    reset at each batch whose ``batch["reset"]`` is true (the stream's reset-each-shift protocol), and
    :meth:`reset`, which restores the model and the optimizer exactly. It logs the online accuracy as
    ``test/acc`` and, for batches with a ``domain`` key, ``test/error/<domain>`` at the end.

    Methods that need gradients refuse to run under Lightning's default ``inference_mode=True`` and say to set
    ``Trainer(inference_mode=False)``.

    Args:
        model: the trained source model (it is adapted in place; pass a copy to keep the original).
        lr: learning rate of the method's optimizer.
        steps: optimizer steps per test batch.
        episodic: reset to the source state before every batch.
        domain_names: names of the stream's domains, for logging (default: the data module's
            ``domain_names``, else ``domain<i>``).
    """

    needs_grad = True

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False,
        domain_names: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the trained source nn.Module (inputs -> logits), got {type(model).__name__}."
            )
        if steps < (1 if self.needs_grad else 0) or lr <= 0:
            raise ValueError(f"Need steps >= 1 and lr > 0, got steps={steps}, lr={lr}.")
        self.model, self.lr, self.steps, self.episodic = model, lr, steps, episodic
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.build_models()
        self.configure_model()
        self.tta_optimizer = self.build_optimizer()
        self._source_state = copy.deepcopy(self.state_dict())
        self._optimizer_state = copy.deepcopy(self.tta_optimizer.state_dict()) if self.tta_optimizer else None
        self._domain_hits: dict[int, list[float]] = {}

    # ---------------------------------------------------------------- what a method defines
    def build_models(self) -> None:
        """Create the method's extra networks (teacher, projector, ...) from ``self.model``; default: none."""

    def configure_model(self) -> None:
        """Set train/eval modes, ``requires_grad`` and normalisation behaviour; default: eval mode (no dropout),
        batch-norm statistics of the test batch, everything frozen."""
        self.model.eval().requires_grad_(False)
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
        return self.model(x)

    def reset(self) -> None:
        """Restore the source model (and every extra model of the method) and the optimizer's state."""
        self.load_state_dict(self._source_state)
        if self.tta_optimizer is not None:
            self.tta_optimizer.load_state_dict(self._optimizer_state)

    def on_test_start(self) -> None:
        self._check_grad_mode()
        self._domain_hits = {}
        if self.domain_names is None:  # the stream's names, when it has them
            self.domain_names = getattr(self.trainer.datamodule, "domain_names", None)

    def on_predict_start(self) -> None:
        self._check_grad_mode()

    def _check_grad_mode(self) -> None:
        if self.needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients, which Lightning's default inference_mode blocks: "
                "create the Trainer with inference_mode=False."
            )

    def adapt(self, batch: Any) -> Tensor:
        """Reset if due, adapt ``steps`` times, and return the logits of the adapted pass."""
        x = batch["inputs"] if isinstance(batch, Mapping) else batch[0]
        if self.episodic or (isinstance(batch, Mapping) and bool(torch.as_tensor(batch.get("reset", False)).any())):
            self.reset()
        logits = None
        with torch.enable_grad():
            for _ in range(max(self.steps, 1)):
                logits = self.forward_and_adapt(x)
        return logits.detach()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits = self.adapt(batch)
        y = batch["targets"] if isinstance(batch, Mapping) else batch[1]
        hits = (logits.argmax(dim=-1) == y).float()
        self.log("test/acc", hits.mean(), batch_size=len(y))
        if isinstance(batch, Mapping) and "domain" in batch:
            for d in batch["domain"].unique().tolist():
                chosen = hits[batch["domain"] == d]
                total = self._domain_hits.setdefault(d, [0.0, 0.0])
                total[0] += chosen.sum().item()
                total[1] += len(chosen)

    def on_test_epoch_end(self) -> None:
        for d, (correct, total) in sorted(self._domain_hits.items()):
            name = self.domain_names[d] if self.domain_names else f"domain{d}"
            self.log(f"test/error/{name}", 1 - correct / total)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.adapt(batch).softmax(dim=-1)

    def configure_optimizers(self):
        return self.tta_optimizer


class BNAdapt(TTAModule):
    """Test-batch normalisation statistics (Schneider et al., 2020; "BN-1" in the rivals' benchmark): every
    BatchNorm normalises with the current test batch's mean and variance; nothing is trained."""

    needs_grad = False

    def __init__(self, model: nn.Module, domain_names: Sequence[str] | None = None) -> None:
        super().__init__(model, lr=1.0, steps=0, episodic=False, domain_names=domain_names)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


class Tent(TTAModule):
    r"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021): BatchNorm
    uses test-batch statistics, and only its affine parameters are updated to minimise the mean prediction
    entropy :math:`\frac1N\sum_i -\sum_c p_{ic}\log p_{ic}` of the same forward pass, whose outputs (before
    the update) are the predictions. Official defaults: Adam, lr 1e-3, one step per batch.

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks import Tent
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> tent = Tent(net, lr=1e-3)
        >>> sorted(name for name, p in tent.named_parameters() if p.requires_grad)
        ['model.1.bias', 'model.1.weight']
    """

    def configure_model(self) -> None:
        super().configure_model()
        norms = [m for m in self.model.modules() if isinstance(m, (*_NORMS, nn.LayerNorm, nn.GroupNorm))]
        if not norms:
            raise ValueError("Tent adapts normalisation layers, but the model has none.")
        for norm in norms:
            norm.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return [p for m in self.model.modules() if isinstance(m, (*_NORMS, nn.LayerNorm, nn.GroupNorm))
                for p in (m.weight, m.bias) if p is not None]  # fmt: skip

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
    """

    needs_grad = False

    def __init__(
        self, model: nn.Module, source_features: Tensor, source_labels: Tensor, features: nn.Module | None = None,
        k: int = 100, temperature: float = 0.1, beta: float = 0.1, domain_names: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        if features is None and not hasattr(model, "forward_features"):
            raise ValueError("AdaNPC needs features=... (inputs -> penultimate features) or a model.forward_features.")
        if k < 1 or temperature <= 0:
            raise ValueError(f"Need k >= 1 and temperature > 0, got {k}, {temperature}.")
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names)
        self._features = features
        self.k, self.temperature, self.beta = k, temperature, beta
        self.num_classes = int(source_labels.max()) + 1
        self.register_buffer("memory", F.normalize(source_features.float(), dim=1))
        self.register_buffer("memory_labels", source_labels.long())
        self._source_state = copy.deepcopy(self.state_dict())

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)  # a frozen source model with its own statistics

    def features(self, x: Tensor) -> Tensor:
        return self._features(x) if self._features is not None else self.model.forward_features(x)

    def knn_probabilities(self, features: Tensor) -> Tensor:
        similarity = F.normalize(features, dim=1) @ self.memory.T
        weights, index = similarity.topk(min(self.k, len(self.memory)), dim=1)
        weights = (weights / self.temperature).softmax(dim=1)
        probs = torch.zeros(len(features), self.num_classes, device=features.device)
        return probs.scatter_add_(1, self.memory_labels[index], weights)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.features(x)
            probs = self.knn_probabilities(features)
            confidence, label = probs.max(dim=1)
            keep = confidence >= self.beta
            self.memory = torch.cat([self.memory, F.normalize(features[keep], dim=1)])
            self.memory_labels = torch.cat([self.memory_labels, label[keep]])
        return probs.clamp(min=1e-8).log()

    def reset(self) -> None:
        source = len(self._source_state["memory"])
        self.memory, self.memory_labels = self.memory[:source].clone(), self.memory_labels[:source].clone()
        self.load_state_dict(self._source_state)


def symmetric_cross_entropy(student: Tensor, teacher: Tensor, alpha: float = 0.5) -> Tensor:
    r"""Per-sample :math:`-(1-\alpha)\sum_c q_c \log p_c - \alpha \sum_c p_c \log q_c` with :math:`p`, :math:`q`
    the softmax of the ``student`` and (no-gradient) ``teacher`` logits (RMT's self-training loss)."""
    teacher = teacher.detach()
    forward = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1)
    backward = -(student.softmax(-1) * teacher.log_softmax(-1)).sum(-1)
    return (1 - alpha) * forward + alpha * backward


def default_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A light, label-preserving augmentation for small images ``[N, C, H, W]`` and signals ``[N, L]``:
    per-sample contrast in [0.7, 1.3] and brightness in [-0.1, 0.1] (relative to the sample's range), a shift
    of up to one pixel (two samples for signals), and Gaussian noise of 0.5% of the range."""
    n, device = len(x), x.device
    dims = tuple(range(1, x.ndim))
    shape = (n, *[1] * (x.ndim - 1))
    span = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)).clamp(min=1e-6)
    mean = x.mean(dim=dims, keepdim=True)
    contrast = (0.7 + 0.6 * torch.rand(shape, generator=generator)).to(device)
    brightness = (0.2 * torch.rand(shape, generator=generator) - 0.1).to(device) * span
    out = (x - mean) * contrast + mean + brightness
    limit = 2 if x.ndim == 2 else 1
    shifts = torch.randint(-limit, limit + 1, (x.ndim - 1 if x.ndim == 2 else 2,), generator=generator).tolist()
    out = torch.roll(out, shifts=shifts, dims=(-1,) if x.ndim == 2 else (-2, -1))
    return out + 0.005 * span * torch.randn(x.shape, generator=generator).to(device)


class RMT(TTAModule):
    r"""Robust mean teacher (Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation",
    CVPR 2023), source-free: the whole student adapts (BatchNorm on test-batch statistics), an EMA teacher
    :math:`\theta_t \leftarrow m\,\theta_t + (1-m)\,\theta_s` (``momentum`` 0.999) follows it, and

    .. math:: \mathcal L = \tfrac12\,\mathrm{SCE}(s(x), t(x)) + \tfrac12\,\mathrm{SCE}(s(\tilde x), t(x))
              + \lambda_\text{cont}\,\mathcal L_\text{SupCon}

    with the symmetric cross-entropy (:math:`\alpha = 0.5`, :func:`symmetric_cross_entropy`), :math:`\tilde x` an
    augmented view, and, when source class ``prototypes`` are given, the contrastive loss pulling the projected
    features of :math:`x`, :math:`\tilde x` and :math:`x`'s nearest prototype together (temperature 0.1). The
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
        steps, episodic, domain_names: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.999, prototypes: Tensor | None = None,
        lambda_cont: float = 1.0, temperature: float = 0.1, augment=None, steps: int = 1, episodic: bool = False,
        domain_names: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}.")
        if prototypes is not None and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ValueError("RMT's contrastive term needs model.forward_features and model.forward_head.")
        self._source_prototypes = prototypes  # registered in build_models, before the state is snapshot
        super().__init__(model, lr=lr, steps=steps, episodic=episodic, domain_names=domain_names)
        self.momentum, self.lambda_cont, self.temperature = momentum, lambda_cont, temperature
        self.augment = augment or default_augment

    def build_models(self) -> None:
        self.teacher = copy.deepcopy(self.model)
        self.projector = None
        if self._source_prototypes is not None:
            d = self._source_prototypes.shape[1]
            self.projector = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128))
            self.register_buffer("prototypes", F.normalize(self._source_prototypes.float(), dim=1))

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(True)
        use_batch_statistics(self.model)
        self.teacher.eval().requires_grad_(False)
        use_batch_statistics(self.teacher)

    def collect_params(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        return params + (list(self.projector.parameters()) if self.projector is not None else [])

    def _contrastive(self, f_x: Tensor, f_aug: Tensor) -> Tensor:
        nearest = (F.normalize(f_x.detach(), dim=1) @ self.prototypes.T).argmax(dim=1)
        views = torch.stack([self.prototypes[nearest], f_x, f_aug], dim=1)  # [B, 3, D]
        z = F.normalize(self.projector(views.flatten(0, 1)), dim=1)  # [3B, 128], sample-major
        b = len(f_x)
        logits = z @ z.T / self.temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        same = torch.arange(b, device=z.device).repeat_interleave(3)
        self_mask = torch.eye(3 * b, dtype=torch.bool, device=z.device)
        positives = (same[:, None] == same[None, :]) & ~self_mask
        log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1, keepdim=True)
        return -(log_prob * positives).sum(dim=1).div(positives.sum(dim=1)).mean()

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
