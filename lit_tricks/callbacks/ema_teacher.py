"""An exponential moving average of the model, serving as teacher and as evaluation weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import logging_due
from lit_tricks.functional.ema import ema_decay, ema_update_, ema_update_finite_, half_life_to_decay


def _average_dtype(tensor: Tensor) -> torch.dtype:
    """Averages of half-precision weights are kept in float32: an update of weight 1 - decay (e.g. 0.001) is
    below bfloat16's resolution (2^-8) and would be rounded away."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


class EMATeacher(Callback):
    r"""Keep :math:`\theta_{\mathrm{EMA}} \leftarrow \beta_t \theta_{\mathrm{EMA}} + (1 - \beta_t)\theta`
    after every optimizer step; use it as a teacher and for evaluation.

    The mean teacher of Tarvainen & Valpola (2017), used by Robust Mean Teacher, MEAL V2 and many
    self-distillation methods, and the evaluation EMA of most modern training recipes. One instance per
    trainer serves every part that needs a teacher: ``EMATeacher.of(trainer)`` finds it, and ``teacher(x)``
    returns the EMA model's outputs (eval mode, no grad), computed at most once per step for the same input.
    (Lightning itself refuses a second instance in one trainer.)

    The update is one fused ``torch._foreach_lerp_`` over tensors cached at the start of the fit, with the
    decay a Python float: no host-device synchronisation. An update in which any weight is NaN or infinite
    is skipped, so the average never takes a non-finite value (decided on the device on accelerators; the
    check costs a fused norm, and on accelerators a fused power, beside the lerp: about 2x a bare update in a
    CPU fit; ``skip_nonfinite=False`` turns it off) and the skipped updates are counted
    (``tricks/EMATeacher/nonfinite``; the decay schedule still counts them). Evaluation swaps the parameter
    storage (pointers, not copies) and swaps back exactly. It counts optimizer steps (``trainer.global_step``),
    so gradient accumulation is respected. Under DDP every rank keeps the same average without communicating.

    Args:
        decay: :math:`\beta`, in (0, 1). Ignored when ``half_life`` is given.
        half_life: optimizer steps after which the weight of the past halves
            (:math:`\beta = 0.5^{k/h}` for updates every :math:`k` steps).
        warmup: ramp the decay up as :math:`\min(\beta, 1 - (1 + t/\gamma)^{-p})` (timm's ``ModelEmaV3``).
        warmup_gamma: :math:`\gamma` of the warm-up.
        warmup_power: :math:`p` of the warm-up (2/3 for long runs, 3/4 for short ones).
        start_step: before this optimizer step the average just copies the weights.
        every_n_steps: update every ``k`` optimizer steps.
        buffers: ``"average"``: floating-point buffers (BatchNorm statistics) are averaged like the
            parameters, so the EMA weights are evaluated with statistics that match them; ``"copy"``: the
            teacher uses the live model's buffers, at no extra memory (fine for networks without BatchNorm;
            with BatchNorm it cost up to 8 points of accuracy in our MNIST-1D benchmark).
        swap_for_eval: evaluate (validation, test, predict) with the EMA weights.
        skip_nonfinite: skip (and count) an update in which any weight is NaN or infinite. The check reads
            every weight once more (about 2x a bare update inside a fit on CPU); ``False`` gives the bare
            fused update for runs that stop at a non-finite loss anyway (e.g. ``on_nonfinite="raise"``).

    The checkpoint's ``state_dict`` holds the **live** weights, so a resumed run continues training them;
    the averages are in the callback state. To get a module with the EMA weights use
    :meth:`ema_state_dict` (in a run) or :meth:`ema_weights_from_checkpoint` (from a file).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, EMATeacher
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> ema = EMATeacher(decay=0.99)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[ema], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> model = Classifier(MLP(64, 10), num_classes=10)
        >>> trainer.fit(model, DigitsDataModule())
        >>> ema.num_updates == trainer.global_step
        True
    """

    tunable = ("decay",)  # PBT may change it mid-run (lit_tricks.tune)

    def __init__(
        self,
        decay: float = 0.999,
        half_life: float | None = None,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        start_step: int = 0,
        every_n_steps: int = 1,
        buffers: Literal["average", "copy"] = "average",
        swap_for_eval: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        check_number("decay", decay, above=0.0, below=1.0, hint="E.g. 0.999, or give half_life in steps.")
        if half_life is not None:
            check_number("half_life", half_life, above=0.0, hint="It is in optimizer steps.")
        check_number("every_n_steps", every_n_steps, at_least=1, integer=True)
        check_number("start_step", start_step, at_least=0, integer=True)
        check_number("warmup_gamma", warmup_gamma, above=0.0)
        check_number("warmup_power", warmup_power, above=0.0)
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}.")
        self.decay = decay if half_life is None else half_life_to_decay(half_life, every_n_steps)
        self.warmup, self.warmup_gamma, self.warmup_power = warmup, warmup_gamma, warmup_power
        self.start_step, self.every_n_steps = start_step, every_n_steps
        self.buffers, self.swap_for_eval, self.skip_nonfinite = buffers, swap_for_eval, skip_nonfinite
        self.num_updates = 0  # updates since start_step; the warm-up's t
        self._last_step = -1  # the global step of the last update
        self._names: list[str] = []
        self._live: list[Tensor] = []
        self._ema: list[Tensor] = []
        self._stash: list[Tensor | None] = []  # live half-precision weights set aside while the EMA is swapped in
        self._upcast = False  # some averages are float32 copies of half-precision weights
        self._loaded: dict[str, Any] | None = None
        self._swapped = False
        self._cache: tuple[int, Tensor, Tensor] | None = None
        self._module: pl.LightningModule | None = None
        self.nonfinite = torch.zeros((), dtype=torch.long)  # updates skipped because a weight was not finite

    # ------------------------------------------------------------------ the service
    @staticmethod
    def of(trainer: pl.Trainer) -> EMATeacher:
        """The trainer's one ``EMATeacher``, with a clear error when there is none."""
        found = [cb for cb in trainer.callbacks if isinstance(cb, EMATeacher)]
        if not found:
            raise ValueError("This needs an EMA teacher: add lit_tricks.EMATeacher(...) to Trainer(callbacks=[...]).")
        return found[0]

    @torch.no_grad()
    def teacher(self, inputs: Tensor) -> Tensor:
        """The EMA model's outputs for ``inputs`` (eval mode, no grad; afterwards every layer has its own
        train/eval flag back); reused when asked again in the same step for the same tensor."""
        module = self._attached_module()
        step = module.trainer.global_step
        if self._cache is not None and self._cache[0] == step and self._cache[1] is inputs:
            return self._cache[2]
        self._ensure_allocated()
        with eval_mode(module), self.swapped():
            outputs = module(inputs)
        self._cache = (step, inputs, outputs)
        return outputs

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The module's ``state_dict()`` with the EMA weights in place of the live ones (copies)."""
        module = self._attached_module()
        self._ensure_allocated()
        with self.swapped():
            return {key: value.detach().clone() for key, value in module.state_dict().items()}

    @staticmethod
    def ema_weights_from_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Tensor]:
        """A checkpoint's ``state_dict`` with the EMA weights in place of the live ones, e.g.
        ``model.load_state_dict(EMATeacher.ema_weights_from_checkpoint("last.ckpt"))``. A missing or damaged
        file raises an error that names it."""
        checkpoint = load_checkpoint(path, map_location)
        states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("EMATeacher")]
        if not states:
            raise ValueError(f"{path} holds no EMATeacher state: was the run trained with EMATeacher?")
        return {**checkpoint["state_dict"], **states[0]["ema"]}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise NotImplementedError(
                f"EMATeacher does not support {type(trainer.strategy).__name__} yet (sharded parameters); "
                "use strategy='ddp' or a single device."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_allocated()
        self.nonfinite = self.nonfinite.to(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if step == self._last_step or step % self.every_n_steps:
            return  # no optimizer step in this batch (accumulation), or not an update step
        self._last_step = step
        if step <= self.start_step:
            decay = 0.0  # before the start the average follows the weights
        else:
            decay = ema_decay(self.num_updates, self.decay, self.warmup, self.warmup_gamma, self.warmup_power)
            self.num_updates += 1
        live = self._live
        if self._upcast:  # low-precision training: one cast per tensor, so the float32 averages keep every update
            live = [value.to(average.dtype) for value, average in zip(live, self._ema, strict=True)]
        if not self.skip_nonfinite:
            ema_update_(self._ema, live, decay)
        else:
            finite = ema_update_finite_(self._ema, live, decay)
            if finite is not True:  # decided on an accelerator (counted there), or skipped on the CPU
                self.nonfinite += ~torch.as_tensor(finite, device=self.nonfinite.device)
        if logging_due(trainer):
            pl_module.log("tricks/EMATeacher/decay", decay)
            pl_module.log("tricks/EMATeacher/nonfinite", self.nonfinite.float())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def state_dict(self) -> dict[str, Any]:
        if self._swapped:
            raise RuntimeError("EMATeacher.state_dict() was called while the EMA weights were swapped in.")
        return {
            "ema": {name: tensor.detach().clone() for name, tensor in zip(self._names, self._ema, strict=True)},
            "num_updates": self.num_updates,
            "last_step": self._last_step,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it moves the model to its device: keep the state until then.
        self.num_updates, self._last_step = state_dict["num_updates"], state_dict["last_step"]
        self.nonfinite = state_dict.get("nonfinite", torch.zeros((), dtype=torch.long))
        self._loaded = state_dict["ema"]
        self._names, self._live, self._ema = [], [], []

    # ------------------------------------------------------------------ internals
    def _tracked(self, module: pl.LightningModule) -> Iterator[tuple[str, Tensor]]:
        yield from ((n, p) for n, p in module.named_parameters() if p.is_floating_point())
        if self.buffers == "average":
            yield from ((n, b) for n, b in module.named_buffers() if b.is_floating_point())

    def _attached_module(self) -> pl.LightningModule:
        if self._module is None:
            raise RuntimeError("EMATeacher is not attached to a module yet: use it inside Trainer.fit/validate/test.")
        return self._module

    def _ensure_allocated(self) -> None:
        if self._ema:
            return
        tracked = list(self._tracked(self._attached_module()))
        self._names = [name for name, _ in tracked]
        self._live = [tensor for _, tensor in tracked]
        if self._loaded is not None:
            missing = set(self._names) - set(self._loaded)
            if missing:
                raise ValueError(f"The EMATeacher state in the checkpoint lacks {sorted(missing)[:5]}...")
            self._ema = [self._loaded[n].to(t.device, _average_dtype(t), copy=True) for n, t in tracked]
            self._loaded = None
        else:
            self._ema = [tensor.detach().to(_average_dtype(tensor), copy=True) for tensor in self._live]
        self._upcast = any(e.dtype != t.dtype for e, t in zip(self._ema, self._live, strict=True))
        self._stash = [None] * len(self._ema)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the module holds the EMA weights (storage swapped, not copied)."""
        already = self._swapped
        if not already:
            self._exchange()
        try:
            yield
        finally:
            if not already:
                self._exchange()

    def _exchange(self) -> None:
        for k, (live, ema) in enumerate(zip(self._live, self._ema, strict=True)):
            if live.dtype == ema.dtype:
                live.data, ema.data = ema.data, live.data
            elif not self._swapped:  # a float32 average of a half-precision weight: lend a cast copy
                self._stash[k], live.data = live.data, ema.to(live.dtype)
            else:
                live.data, self._stash[k] = self._stash[k], None
        self._swapped = not self._swapped

    def _swap_in(self) -> None:
        if self.swap_for_eval and not self._swapped:
            self._ensure_allocated()
            self._exchange()

    def _swap_out(self) -> None:
        if self._swapped:
            self._exchange()
