"""FPF and k-FPF: fine-tune only the forgetting-prone parameters on the replay memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lit_tricks.callbacks.experience_replay import ExperienceReplay
from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.tasks import batch_task
from lit_tricks.core.trick import log_tag
from lit_tricks.functional.fpf import forgetting_prone, group_drift, parameter_groups


class FPF(ExperienceReplay):
    r"""Forgetting Prioritized Finetuning (Zhao, Zhou, Long, Jiang & Zhang, "Does Continual Learning Equally Forget
    All Parameters?", ICML 2023) on top of :class:`~lit_tricks.ExperienceReplay`'s reservoir memory.

    A *phase* fine-tunes only the forgetting-prone modules on the memory: ``finetune_steps`` steps of SGD on

    .. math:: \min_{\theta_S}\; \frac1B \sum_{(x, y) \sim \mathcal M} \mathrm{CE}(f_\theta(x), y),

    where :math:`S` are the modules named in ``modules`` or else the ``num_groups`` modules of largest drift
    :math:`d_g = \lVert\theta_g - \theta_g^{\text{ref}}\rVert_1 / |\theta_g|` since the start of the current task
    (:mod:`lit_tricks.functional.fpf`). Every other parameter and the other normalisation layers' running
    statistics stay as they are.

    - **FPF** (``replay=True``, ``every_n_steps=None``): experience replay as usual, then a phase at the end of
      the fit (and at every task switch with ``at_task_end``).
    - **k-FPF** (``replay=False``, ``every_n_steps=n``): plain fine-tuning on the stream, no per-step replay (the
      memory is still filled), and a phase every ``n`` optimizer steps: :math:`k \approx` steps / ``n``.

    A phase runs inside the Lightning hooks with its own SGD over the selected parameters, created afresh for each
    phase (the paper fine-tunes from a fresh optimizer; nothing of it outlives the phase), so the main optimizer,
    its state, its scheduler and the parameters' ``.grad`` are untouched. Its batches come from a private
    generator and its dropout from a seed that generator draws, so the global RNG is untouched too and, under DDP,
    every rank (same memory, same draws, same weights) runs the same phase: no gradient is all-reduced.
    ``batch["task"]`` (from :class:`~lit_tricks.data.ContinualDataModule`) marks task switches (the highest
    task so far, as :class:`~lit_tricks.ContinualEvaluation` reads it; one host read per step). Put this
    callback before ``ContinualEvaluation`` in the callback list so that its task-end and final evaluations see
    the fine-tuned model. Phases are kept in :attr:`phases` (step, task, modules, loss before and after) and in
    checkpoints, with the reference weights, the memory and both generators.

    Args:
        memory_size: replay memory capacity in samples (as ``ExperienceReplay``).
        replay: replay the memory beside every batch (FPF on ER); ``False`` only fills the memory (k-FPF).
        every_n_steps: a phase every this many optimizer steps (k-FPF); ``None``: none during training.
        at_task_end: a phase at every task switch, before the new task's first step.
        at_fit_end: a phase after the fit's last optimizer step (the last batch of ``max_epochs``, or
            ``max_steps``; FPF "at the end of any CL method"), before that step's evaluations and checkpoints.
        modules: the modules to fine-tune, each a module name (``"backbone.head"``) or a class name
            (``"BatchNorm2d"``: every such module); ``None``: the ``num_groups`` of largest drift.
        num_groups: how many modules the drift criterion selects.
        finetune_steps: SGD steps per phase.
        finetune_batch_size: memory samples per fine-tuning step.
        lr: the phase's SGD learning rate.
        momentum: the phase's SGD momentum.
        replay_batch_size, new_weight: as ``ExperienceReplay`` (used when ``replay``).
        seed: seed of the reservoir and replay draws; the phases' draws use ``seed + 1``.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> fpf = FPF(memory_size=100, replay=False, every_n_steps=10, finetune_steps=10)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[fpf], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), stream)
        >>> [phase["step"] for phase in fpf.phases], fpf.phases[0]["modules"]
        ([10, 20, 23], ['backbone.head'])
    """

    def __init__(
        self,
        memory_size: int = 2000,
        replay: bool = True,
        every_n_steps: int | None = None,
        at_task_end: bool = False,
        at_fit_end: bool = True,
        modules: Sequence[str] | None = None,
        num_groups: int = 1,
        finetune_steps: int = 50,
        finetune_batch_size: int = 32,
        lr: float = 0.05,
        momentum: float = 0.9,
        replay_batch_size: int | None = None,
        new_weight: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(memory_size, replay_batch_size, new_weight, seed)
        for name, flag in (("replay", replay), ("at_task_end", at_task_end), ("at_fit_end", at_fit_end)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if every_n_steps is not None:
            check_number("every_n_steps", every_n_steps, at_least=1, integer=True, hint="Or None: no periodic phase.")
        if every_n_steps is None and not (at_task_end or at_fit_end):
            raise ValueError("FPF never fine-tunes: set every_n_steps, at_task_end=True or at_fit_end=True.")
        if modules is not None and (
            isinstance(modules, str) or not modules or not all(isinstance(m, str) for m in modules)
        ):
            raise TypeError(f"modules must be a non-empty list of module or class names, or None; got {modules!r}.")
        check_number("num_groups", num_groups, at_least=1, integer=True)
        check_number("finetune_steps", finetune_steps, at_least=1, integer=True)
        check_number("finetune_batch_size", finetune_batch_size, at_least=1, integer=True)
        check_number("lr", lr, above=0.0)
        check_number("momentum", momentum, at_least=0.0, below=1.0)
        self.replay, self.every_n_steps, self.at_task_end, self.at_fit_end = (
            replay,
            every_n_steps,
            at_task_end,
            at_fit_end,
        )
        self.modules, self.num_groups = None if modules is None else list(modules), num_groups
        self.finetune_steps, self.finetune_batch_size, self.lr, self.momentum = (
            finetune_steps,
            finetune_batch_size,
            lr,
            momentum,
        )
        self._phase_generator = torch.Generator().manual_seed(seed + 1)
        self._groups: dict[str, list[str]] = {}
        self.reference: dict[str, Tensor] = {}  # the weights at the start of the current task (drift criterion)
        self.task = -1  # the highest task seen so far (-1: none yet)
        self.phases: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._groups = parameter_groups(pl_module)
        if self.modules is not None:
            kinds = {name: type(pl_module.get_submodule(name)).__name__ for name in self._groups}
            unknown = [m for m in self.modules if m not in kinds and m not in kinds.values()]
            if unknown:
                raise ValueError(
                    f"FPF modules {unknown} name no module with trainable parameters; choose among the modules "
                    f"{list(kinds)[:12]} or the classes {sorted(set(kinds.values()))}."
                )
        elif self.num_groups > len(self._groups):
            raise ValueError(
                f"num_groups={self.num_groups} but the model has {len(self._groups)} modules with trainable "
                f"parameters: choose num_groups <= {len(self._groups)}."
            )

    def _with_replay(
        self, trainer: pl.Trainer, batch: TrickBatch, new: dict[str, Tensor], sizes: list[int]
    ) -> TrickBatch:
        return super()._with_replay(trainer, batch, new, sizes) if self.replay else batch

    def _snapshot(self, pl_module: pl.LightningModule) -> None:
        """The current weights become the drift criterion's reference (only when the criterion is used)."""
        if self.modules is None:
            self.reference = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ the loop
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.reference:
            self._snapshot(pl_module)
        self.reference = {name: value.to(pl_module.device) for name, value in self.reference.items()}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        task = batch_task(trainer, pl_module, batch, reader="FPF(at_task_end=True)" if self.at_task_end else None)
        if task is None:
            return
        if task > self.task:
            if self.at_task_end and self.task >= 0:
                self.finetune(trainer, pl_module)
            if self.task >= 0:
                self._snapshot(pl_module)
            self.task = task

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        periodic = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        if periodic or (self.at_fit_end and _fit_ends(trainer)):
            self.finetune(trainer, pl_module)

    # ------------------------------------------------------------------ a phase
    def select(self, pl_module: nn.Module) -> list[str]:
        """The modules a phase fine-tunes now: ``modules`` resolved to names, or the drift criterion's choice."""
        if self.modules is not None:
            return [
                g
                for g in self._groups
                if g in self.modules or type(pl_module.get_submodule(g)).__name__ in self.modules
            ]
        current = dict(pl_module.named_parameters())
        drift = group_drift(self.reference, current, self._groups)
        return forgetting_prone(drift, list(self._groups), self.num_groups)

    def finetune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Run one phase now (nothing while the memory is empty); returns its record."""
        filled = min(self.seen, self.memory_size)
        if filled == 0:
            return None
        selected = self.select(pl_module)
        params = [p for name, p in pl_module.named_parameters() if any(name in self._groups[g] for g in selected)]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        seed = int(torch.randint(2**62, (1,), generator=self._phase_generator))
        draws = torch.randint(filled, (self.finetune_steps, self.finetune_batch_size), generator=self._phase_generator)
        draws = draws.to(pl_module.device)
        losses = []
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _phase_mode(pl_module, selected), torch.enable_grad():
            torch.manual_seed(seed)  # dropout during the phase: the same on every rank, the global RNG untouched
            for rows in draws:
                with trainer.precision_plugin.train_step_context():
                    logits = pl_module(self.memory["inputs"][rows])
                    loss = F.cross_entropy(logits.float(), self.memory["targets"][rows])
                grads = torch.autograd.grad(loss, params)
                kept = [p.grad for p in params]  # the main run's gradients, given back after the step
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
                for p, g in zip(params, kept, strict=True):
                    p.grad = g
                losses.append(loss.detach())
        record = {
            "step": trainer.global_step,
            "task": self.task,
            "modules": selected,
            "num_params": sum(p.numel() for p in params),
            "loss_first": float(losses[0]),
            "loss_last": float(losses[-1]),
        }
        self.phases.append(record)
        if trainer.logger is not None and trainer.is_global_zero:
            values = {log_tag(self, k): float(record[k]) for k in ("num_params", "loss_first", "loss_last")}
            trainer.logger.log_metrics(values, step=trainer.global_step)
        return record

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "phase_generator": self._phase_generator.get_state(),
            "reference": self.reference,
            "task": self.task,
            "phases": [dict(phase) for phase in self.phases],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._phase_generator.set_state(state_dict["phase_generator"])
        self.reference, self.task = dict(state_dict["reference"]), state_dict["task"]
        self.phases = [dict(phase) for phase in state_dict["phases"]]


def _fit_ends(trainer: pl.Trainer) -> bool:
    """Whether this optimizer step is the fit's last: ``max_steps`` reached, or the last batch of the last epoch."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


@contextmanager
def _phase_mode(module: nn.Module, selected: Sequence[str]) -> Iterator[None]:
    """Train mode for the phase, except the normalisation layers not selected (their running statistics must not
    move); afterwards every layer's own train flag back."""
    flags = [(layer, layer.training) for layer in module.modules()]
    module.train()
    for name, layer in module.named_modules():
        if isinstance(layer, _NormBase) and name not in selected:
            layer.eval()
    try:
        yield
    finally:
        for layer, flag in flags:
            layer.training = flag
