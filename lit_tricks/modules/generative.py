"""What the generative LightningModules share: data checks, the evaluation EMA, sample-quality metrics, figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.functional import consistency as ct
from lit_tricks.metrics.sample_quality import (
    EnergyDistance,
    FrechetDistance,
    MaximumMeanDiscrepancy,
    digits_features,
)

DIGITS_SHAPE = (1, 8, 8)


class GenerativeModule(RestoresRNG, pl.LightningModule):
    """Base of :class:`~lit_tricks.ConsistencyModel` and :class:`~lit_tricks.modules.EDMDiffusion`: a
    noise-conditioned ``net(x, c_noise)`` trained on batches of ``data_shape`` samples; subclasses implement
    ``training_step`` and :meth:`sample`.

    Validation generates as many samples as it sees real ones (up to ``num_eval_samples``), with 1 and 2
    steps (``eval_steps``), and logs ``val/energy_<k>step`` and ``val/mmd_<k>step`` (and, for 8x8 digits,
    ``val/fd_<k>step``: the Fréchet distance on a small digits classifier's features); every
    ``figure_every_n_epochs`` a scatter plot (2-D data) or an image grid goes to TensorBoard.
    ``predict_step`` returns as many samples as the batch holds, with ``predict_steps`` steps.
    """

    def __init__(
        self,
        net: nn.Module,
        data_shape: Sequence[int],
        optimizer: OptimizerCallable | None,
        lr_scheduler: LRSchedulerCallable | None,
        ema_decay: float | None,
        eval_steps: Sequence[int],
        num_eval_samples: int,
        figure_every_n_epochs: int,
        predict_steps: int,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"net must be a torch.nn.Module mapping (x, c_noise) to x's shape, got {type(net).__name__}."
            )
        if not data_shape or min(data_shape) < 1:
            raise ValueError(f"data_shape must be the shape of one sample, e.g. [2] or [1, 8, 8]; got {data_shape}.")
        if ema_decay is not None:
            check_number("ema_decay", ema_decay, above=0.0, below=1.0, hint="Or None for no EMA.")
        if not eval_steps or min(eval_steps) < 1 or predict_steps < 1:
            raise ValueError(f"eval_steps and predict_steps must be >= 1, got {eval_steps}, {predict_steps}.")
        self.net, self.data_shape = net, tuple(data_shape)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.ema_decay, self.eval_steps, self.predict_steps = ema_decay, tuple(eval_steps), predict_steps
        self.num_eval_samples, self.figure_every_n_epochs = num_eval_samples, figure_every_n_epochs
        self.dim = math.prod(self.data_shape)
        self.is_digits = self.data_shape == DIGITS_SHAPE
        self._ema: EMATeacher | None = None
        self._checked = False
        self._real: list[Tensor] = []
        metrics = {}
        for k in self.eval_steps:
            metrics[f"energy_{k}step"] = EnergyDistance()
            metrics[f"mmd_{k}step"] = MaximumMeanDiscrepancy()
            if self.is_digits:
                metrics[f"fd_{k}step"] = FrechetDistance(digits_features)
        self.val_metrics = nn.ModuleDict(metrics)

    # ------------------------------------------------------------------ set-up
    def configure_callbacks(self) -> list[pl.Callback]:
        if self.ema_decay is None:
            return []
        self._ema = EMATeacher(decay=self.ema_decay)
        return [self._ema]

    def configure_optimizers(self):
        optimizer = (
            torch.optim.Adam(self.parameters(), lr=1e-3)
            if self.optimizer is None
            else self.optimizer(self.parameters())
        )
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    @staticmethod
    def check_sigmas(sigma_min: float, sigma_max: float) -> None:
        check_number("sigma_max", sigma_max, above=0.0)
        check_number("sigma_min", sigma_min, above=0.0, below=sigma_max)

    def preconditioned(self, x: Tensor, sigma: Tensor | float, sigma_data: float, sigma_min: float) -> Tensor:
        r""":math:`c_\text{skip} x + c_\text{out} F_\theta(c_\text{in} x, \tfrac14 \ln\sigma)` with the boundary
        scalings of ``sigma_min`` (0: EDM's denoiser), for per-sample or scalar ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x))
        shape = (-1, *[1] * (x.ndim - 1))
        c_skip, c_out, c_in = (s.view(shape) for s in ct.boundary_scalings(sigma, sigma_data, sigma_min))
        return c_skip * x + c_out * self.net(c_in * x, ct.noise_conditioning(sigma))

    def total_steps(self) -> int:
        """The run's optimizer steps :math:`K` (``max_steps``, else Lightning's estimate)."""
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError(f"{type(self).__name__} schedules by the run's length: set max_steps or max_epochs.")
        return int(total)

    def inputs(self, batch: Any) -> Tensor:
        """The samples of a batch (a dict's ``inputs``, a tuple's first element, or a tensor), checked once."""
        x = batch["inputs"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, Sequence) else batch
        if not self._checked:
            if tuple(x.shape[1:]) != self.data_shape:
                raise ValueError(
                    f"{type(self).__name__} was built with data_shape={list(self.data_shape)} but the batches hold "
                    f"samples of shape {list(x.shape[1:])}: make them agree."
                )
            with torch.no_grad(), isolate_rng(include_cuda=True):  # a probe: it must not draw training's dropout
                out = self.net(x[:2], torch.zeros(min(2, len(x)), dtype=x.dtype, device=x.device))
            if out.shape != x[:2].shape:
                raise ValueError(
                    f"net maps samples of shape {list(x.shape[1:])} to {list(out.shape[1:])}; it must return the "
                    "input's shape (a denoiser)."
                )
            self._checked = True
        return x

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, steps: int = 1, **kwargs) -> Tensor:  # pragma: no cover - subclasses implement
        raise NotImplementedError

    def ema_weights(self, enabled: bool = True) -> AbstractContextManager:
        """A context in which the module holds its evaluation-EMA weights (a no-op if not ``enabled``, before a
        fit, or without an EMA)."""
        if not enabled or self._ema is None or not self._ema._live:
            return nullcontext()
        return self._ema.swapped()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        seen = sum(len(r) for r in self._real)
        if seen < self.num_eval_samples:
            self._real.append(self.inputs(batch)[: self.num_eval_samples - seen])

    def on_validation_epoch_end(self) -> None:
        if not self._real:
            return
        real, self._real = torch.cat(self._real), []
        samples = {}
        for k in self.eval_steps:
            # a private generator: evaluating must not move the global RNG that training draws from;
            # use_ema=False because the EMA weights are already swapped in for validation
            generator = torch.Generator().manual_seed(self.global_step)
            samples[k] = self.sample(len(real), steps=k, generator=generator, use_ema=False)
            for name, metric in self.val_metrics.items():
                if name.endswith(f"_{k}step"):
                    metric.update(real, samples[k])
                    self.log(f"val/{name}", metric.compute().float())
                    metric.reset()
        epoch = self.current_epoch
        if isinstance(self.logger, TensorBoardLogger) and epoch % self.figure_every_n_epochs == 0:
            self._log_figures(real, samples)

    def _log_figures(self, real: Tensor, samples: dict[int, Tensor]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = len(samples) + 1
        fig, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 3.2), squeeze=False)
        panels = [("real", real), *((f"{k}-step", s) for k, s in samples.items())]
        for ax, (title, data) in zip(axes[0], panels, strict=True):
            data = data.detach().float().cpu()
            if data[0].numel() == 2:
                ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
                ax.set_aspect("equal")
            else:
                images = data[:64].reshape(-1, *data.shape[-2:])[:64]
                side = int(math.ceil(math.sqrt(len(images))))
                padded = torch.cat([images, images.new_zeros(side * side - len(images), *images.shape[1:])])
                h, w = images.shape[1:]
                canvas = padded.view(side, side, h, w).permute(0, 2, 1, 3).reshape(side * h, side * w)
                ax.imshow(canvas, cmap="gray")
                ax.axis("off")
            ax.set_title(title)
        fig.tight_layout()
        self.logger.experiment.add_figure("samples", fig, self.global_step)
        plt.close(fig)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.sample(len(self.inputs(batch)), steps=self.predict_steps, use_ema=False)
