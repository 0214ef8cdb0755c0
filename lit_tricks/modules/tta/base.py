"""Test-time adaptation: the base module that adapts a trained source model while it predicts a test stream,
and the helpers every method shares."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.core.checks import check_number

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES = {"batch": BATCH_NORMS, "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,)}


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm normalise with the statistics of the current batch, in train *and* eval mode
    (``track_running_stats=False``, running buffers removed), so Lightning's ``model.eval()`` before testing
    cannot undo adaptation. Returns the BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
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
        self._batch_norms = any(isinstance(m, BATCH_NORMS) and not m.track_running_stats for m in self.modules())
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
