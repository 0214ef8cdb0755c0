"""EfficientTrain: a curriculum that first trains on the low frequencies of smaller inputs, growing in size,
with augmentation growing in strength."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.fourier_crop import fourier_crop, spatial_dims

#: The authors' EfficientTrain schedule (``ET_training.py``): five equal fifths of training at input sizes
#: 160, 160, 160, 192, 224 (of 224) and RandAugment magnitudes 1, 3, 5, 7, 9 (of 10).
EFFICIENTTRAIN_SCHEDULE = (
    (0.0, 160 / 224, 1.0),
    (0.2, 160 / 224, 3.0),
    (0.4, 160 / 224, 5.0),
    (0.6, 192 / 224, 7.0),
    (0.8, 1.0, 9.0),
)
SCHEDULES = {"efficienttrain": EFFICIENTTRAIN_SCHEDULE}
MAX_MAGNITUDE = 10.0  # RandAugment's magnitude scale (timm's level denominator)


def _check_schedule(schedule: str | Sequence[Sequence[float]]) -> tuple[tuple[float, float, float], ...]:
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} or a list of stages, got {schedule!r}.")
        return SCHEDULES[schedule]
    form = "Give stages as [start_fraction, size_fraction, magnitude], e.g. [[0.0, 0.7, 1], [0.8, 1.0, 9]]."
    if not isinstance(schedule, Sequence) or not schedule:
        raise TypeError(f"schedule must be a name or a non-empty list of stages, got {schedule!r}. {form}")
    stages = []
    for i, stage in enumerate(schedule):
        if not isinstance(stage, Sequence) or len(stage) != 3:
            raise TypeError(f"schedule[{i}] must be [start_fraction, size_fraction, magnitude], got {stage!r}. {form}")
        start, size, magnitude = stage
        check_number(f"schedule[{i}] start_fraction", start, at_least=0.0, below=1.0, hint=form)
        check_number(f"schedule[{i}] size_fraction", size, above=0.0, at_most=1.0, hint=form)
        check_number(f"schedule[{i}] magnitude", magnitude, at_least=0.0, at_most=MAX_MAGNITUDE, hint=form)
        stages.append((float(start), float(size), float(magnitude)))
    starts = [stage[0] for stage in stages]
    if starts[0] != 0.0 or any(b <= a for a, b in zip(starts[:-1], starts[1:], strict=True)):
        raise ValueError(f"schedule start fractions must begin at 0.0 and increase, got {starts}. {form}")
    if stages[-1][1] != 1.0:
        raise ValueError(
            f"the last stage must train at full size (size_fraction 1.0), the size the model is evaluated at; "
            f"got {stages[-1][1]}."
        )
    return tuple(stages)


def _shift(x: Tensor, shifts: Tensor, axis: int) -> Tensor:
    """Translate each sample by ``shifts[n]`` positions along ``axis`` (negative), filling with zeros."""
    side = x.shape[axis]
    view = [1] * x.ndim
    view[0], view[axis] = len(x), side
    source = (torch.arange(side, device=x.device) - shifts.to(x.device)[:, None]).view(view)
    inside = (source >= 0) & (source < side)
    moved = x.gather(axis, source.clamp(0, side - 1).expand(x.shape))
    return moved * inside


class EfficientTrain(Trick):
    r"""EfficientTrain ("EfficientTrain: Exploring Generalized Curriculum Learning for Training Visual
    Backbones", Wang et al., ICCV 2023): a curriculum in which each stage trains on the low-frequency part
    of the inputs, cropped in the Fourier spectrum to a smaller size (:func:`~lit_tricks.functional.fourier_crop`:
    :math:`\tilde x = \mathrm{Re}\,\mathrm{IFFT}_B(\frac{B}{S} X[-B/2 .. B/2))` per side), while the
    augmentation strength grows.

    The default ``schedule="efficienttrain"`` is the authors' ``ET_training.py``: five equal fifths of training
    with sides :math:`B/S` = 160/224, 160/224, 160/224, 192/224, 1 and RandAugment magnitudes 1, 3, 5, 7, 9
    (of 10). A side is ``round(fraction * S)``. Our data has no RandAugment, so the magnitude :math:`m`
    drives a simple documented augmentation, applied at full size before the crop (as RandAugment is in the
    authors' pipeline): a random per-sample translation by up to :math:`\lfloor (m/10)\,\text{max\_shift}\,S
    \rfloor` positions per side (zero fill) and Gaussian noise of standard deviation :math:`(m/10)\,
    \text{noise\_std}`. ``max_shift=0, noise_std=0`` turns the augmentation off.

    It runs in ``before_forward`` on the device, on the whole batch (as the authors crop the loaded batch in
    their training loop), before Mixup and the like (``order = -10``); evaluation sees full-size inputs.
    The network must accept any input size (global pooling, as :class:`~lit_tricks.nets.CNN1D` and
    :class:`~lit_tricks.nets.CNN2D`; not :class:`~lit_tricks.nets.MLP`): the first batch is tried at the
    smallest size and a network that fails raises a clear error (``if_fixed_size="warn"``: warn and train
    unchanged). Inputs are images ``[N, C, H, W]`` or signals ``[N, L]`` / ``[N, C, L]``. The random draws
    come from a private generator saved in checkpoints.

    Args:
        schedule: ``"efficienttrain"`` or stages ``[[start_fraction, size_fraction, magnitude], ...]``:
            from ``start_fraction`` of the optimizer steps on, sides are ``size_fraction`` of the full ones
            and the augmentation magnitude is ``magnitude`` (0-10). Starts begin at 0 and increase; the last
            stage must have ``size_fraction`` 1.
        max_shift: largest translation at magnitude 10, as a fraction of each side.
        noise_std: noise standard deviation at magnitude 10.
        if_fixed_size: ``"raise"`` or ``"warn"`` when the network fails on smaller inputs.
        total_steps: the optimizer steps the fractions refer to (``None``: the trainer's estimate from
            ``max_steps`` / ``max_epochs``); set it when a run is split into parts with different budgets.
        seed: seed of the private generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import CNN2D
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[EfficientTrain()], logger=False, log_every_n_steps=5,
        ...                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(CNN2D(10, width=8), num_classes=10), DigitsDataModule(as_image=True))
        >>> float(trainer.callback_metrics["tricks/EfficientTrain/magnitude"])  # the last fifth of the run
        9.0
    """

    order = -10

    def __init__(
        self,
        schedule: str | Sequence[Sequence[float]] = "efficienttrain",
        max_shift: float = 0.1,
        noise_std: float = 0.1,
        if_fixed_size: Literal["raise", "warn"] = "raise",
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.schedule = _check_schedule(schedule)
        check_number("max_shift", max_shift, at_least=0.0, at_most=1.0, hint="It is a fraction of each side.")
        check_number("noise_std", noise_std, at_least=0.0, hint="0 turns the noise off.")
        if if_fixed_size not in ("raise", "warn"):
            raise ValueError(f"if_fixed_size must be 'raise' or 'warn', got {if_fixed_size!r}.")
        if total_steps is not None:
            check_number("total_steps", total_steps, at_least=1, integer=True)
        check_number("seed", seed, integer=True)
        self.max_shift, self.noise_std, self.if_fixed_size = max_shift, noise_std, if_fixed_size
        self.total_steps = total_steps
        self._generator = torch.Generator().manual_seed(seed)
        self._total_steps = total_steps or 0
        self._probed = False
        self._active = True

    def stage_at(self, progress: float) -> tuple[float, float]:
        """``(size_fraction, magnitude)`` of the stage at ``progress`` (a fraction of the optimizer steps)."""
        return next((size, mag) for start, size, mag in reversed(self.schedule) if progress >= start)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._probed, self._active = False, True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.total_steps is not None:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "EfficientTrain's stages are fractions of the run, but this run has no step budget (max_epochs=-1 "
                "or only max_time): set max_steps or max_epochs, or EfficientTrain(total_steps=...)."
            )
        self._total_steps = max(1, int(total))

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        x = batch.inputs
        dims = spatial_dims(x)
        if not self._probed:
            self._probe(module, x, dims)
        if not self._active:
            return batch
        fraction, magnitude = self.stage_at(trainer.global_step / self._total_steps)
        with torch.no_grad():
            x = self._augment(x, dims, magnitude / MAX_MAGNITUDE)
            batch.inputs = fourier_crop(x, self._sides(x, dims, fraction))
        if logging_due(trainer):
            module.log(self.tag("size_fraction"), batch.inputs.shape[-1] / x.shape[-1])
            module.log(self.tag("magnitude"), magnitude)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _sides(x: Tensor, dims: int, fraction: float) -> tuple[int, ...]:
        return tuple(min(side, max(1, round(fraction * side))) for side in x.shape[-dims:])

    def _augment(self, x: Tensor, dims: int, strength: float) -> Tensor:
        """Random per-sample translation and Gaussian noise, both scaled by ``strength`` in [0, 1]."""
        if not x.is_floating_point():
            raise TypeError(f"EfficientTrain needs floating-point inputs, got {x.dtype}: convert them (x.float()).")
        for axis in range(-dims, 0):
            reach = math.floor(strength * self.max_shift * x.shape[axis])
            if reach > 0:
                shifts = torch.randint(-reach, reach + 1, (len(x),), generator=self._generator)
                x = _shift(x, shifts, axis)
        std = strength * self.noise_std
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=self._generator).to(x.device, x.dtype)
        return x

    def _probe(self, module: pl.LightningModule, x: Tensor, dims: int) -> None:
        """Try the network once on the smallest crop of two samples; refuse (or warn about) one that fails."""
        self._probed = True
        smallest = min(size for _, size, _ in self.schedule)
        if smallest == 1.0:
            return
        small = fourier_crop(x[:2].float(), self._sides(x, dims, smallest)).to(x.dtype)
        problem = ""
        try:
            with torch.no_grad(), eval_mode(module):
                logits = module(small)
            if logits.shape != (len(small), module.num_classes):
                problem = f"it returned shape {tuple(logits.shape)} instead of {(len(small), module.num_classes)}"
        except (RuntimeError, ValueError) as error:
            problem = f"it failed with: {error}"
        if not problem:
            return
        message = (
            f"EfficientTrain feeds inputs of shape {tuple(small.shape[1:])} (full size {tuple(x.shape[1:])}) in its "
            f"early stages, but {problem}. Use a network that accepts any input size (global pooling, e.g. "
            "lit_tricks.nets.CNN1D or CNN2D; not MLP)"
        )
        if self.if_fixed_size == "raise":
            raise ValueError(message + ", or EfficientTrain(if_fixed_size='warn') to train without it.")
        rank_zero_warn(message + ". EfficientTrain is off for this run.")
        self._active = False
