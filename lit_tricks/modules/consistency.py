"""Consistency training from data (iCT), with the latent-CT options, and 1-, 2- and k-step sampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.functional import consistency as ct
from lit_tricks.modules.generative import GenerativeModule


class ConsistencyModel(GenerativeModule):
    r"""Consistency training without a pretrained diffusion model, as in "Improved Techniques for Training
    Consistency Models" (iCT; Song & Dhariwal, ICLR 2024), with the options of "Improved Training Technique
    for Latent Consistency Models" (Dao et al., ICLR 2025).

    .. math:: f_\theta(x, \sigma) = c_\text{skip}(\sigma) x + c_\text{out}(\sigma) F_\theta(c_\text{in}(\sigma) x,
              \tfrac14 \ln \sigma), \qquad
              \mathcal L = \mathbb E\Big[\frac{d\big(f_\theta(x + \sigma_{i+1} z, \sigma_{i+1}),
              \mathrm{sg}[f_\theta(x + \sigma_i z, \sigma_i)]\big)}{\sigma_{i+1} - \sigma_i}\Big]

    with :math:`c_\text{skip}(\sigma_\min) = 1, c_\text{out}(\sigma_\min) = 0`, the :math:`\sigma_i` a Karras
    grid (:math:`\rho = 7`) of :math:`N(k) = \min(s_0 2^{\lfloor k/K' \rfloor}, s_1) + 1` levels (:math:`K` the
    run's optimizer steps), :math:`i` from a discretised lognormal (:math:`P_\text{mean}, P_\text{std}`), and
    :math:`d` the pseudo-Huber distance with :math:`c = 0.00054\sqrt{d}`. The teacher is the student itself
    under stop-gradient, with the same :math:`z` and the same dropout mask (the student's forward runs in
    ``isolate_rng``, on every device); there is no EMA teacher. An EMA of the student (``ema_decay``, an
    :class:`~lit_tricks.EMATeacher` the module adds) is used for evaluation and sampling.

    Latent-CT options (off by default): ``loss="cauchy"`` :math:`\log(1 + \overline{\Delta^2}/(2c^2))`;
    ``adaptive_c`` (:math:`c(N) = e^{-0.85}(N-1)^{-1.15}` after the first stage); ``diffusion_loss_weight``
    :math:`w` adds :math:`w\,\mathbb E[(\sigma^{-2} + \sigma_d^{-2})\,\overline{(f_\theta(x + \sigma z, \sigma)
    - x)^2}]` over the pairs whose student level is in the lowest quarter of the grid (the paper: 5);
    ``ot_coupling`` pairs noise and data by exact minibatch optimal transport (and re-noises multistep sampling
    with coupled noise). Non-scaling LayerNorm is a net option (``TimeMLP(norm="nonscaling")``).

    It logs ``train/loss``, ``train/consistency_loss`` and the curriculum (``consistency/num_levels``, ``/c``,
    ``/weight_mean``) every ``log_every_n_steps`` and at the first step, so that a short run shows them too.

    Args:
        net: ``F_theta(x, c_noise)``, returning x's shape (e.g. :class:`~lit_tricks.nets.TimeMLP`).
        data_shape: the shape of one sample (``[2]``, ``[1, 8, 8]``).
        sigma_data, sigma_min, sigma_max, rho: :math:`\sigma_d` (standardise the data to this std),
            :math:`\sigma_\min, \sigma_\max, \rho` (iCT: 0.5, 0.002, 80, 7).
        s0, s1: the curriculum's first and last number of intervals (iCT: 10, 1280; small data: 50-160).
        total_steps: the curriculum's :math:`K`; ``None``: the run's ``max_steps`` (or Lightning's estimate).
            Pin it to extend or shorten a resumed run without changing the schedule.
        p_mean, p_std: the lognormal index distribution (iCT: -1.1, 2.0).
        loss: ``"pseudo_huber"`` or ``"cauchy"``.
        huber_reduction: ``"vector"`` (iCT: over all dimensions) or ``"elementwise"`` (mean of per-element).
        c: the loss constant; ``None``: :math:`0.00054\sqrt d`.
        adaptive_c: the latent-CT c(N) schedule (use with ``loss="cauchy"``).
        diffusion_loss_weight: :math:`w` of the small-sigma diffusion loss (0: off).
        ot_coupling: exact minibatch OT between noise and data.
        mid_sigma: the intermediate level of two-step sampling (iCT CIFAR-10: 0.821).
        clamp: ``[low, high]`` to clamp each sampling step's output to (images, e.g. ``[-1, 1]``); ``None`` for
            other data.
        ema_decay: decay of the evaluation EMA (``None``: no EMA); 0.999 suits runs of a few thousand steps.
        optimizer, lr_scheduler: as in :class:`~lit_tricks.Classifier` (``None``: Adam, lr 1e-3).
        eval_steps, num_eval_samples, figure_every_n_epochs, predict_steps: see
            :class:`~lit_tricks.modules.generative.GenerativeModule`.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import ConsistencyModel
        >>> from lit_tricks.data import Toy2DDataModule
        >>> from lit_tricks.nets import TimeMLP
        >>> model = ConsistencyModel(TimeMLP(dim=2, hidden=64), data_shape=[2], s1=160)
        >>> trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(model, Toy2DDataModule("moons", num_samples=2000))
        >>> model.sample(5, steps=2).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        net: nn.Module,
        data_shape: Sequence[int],
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        s0: int = 10,
        s1: int = 1280,
        total_steps: int | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        loss: Literal["pseudo_huber", "cauchy"] = "pseudo_huber",
        huber_reduction: Literal["vector", "elementwise"] = "vector",
        c: float | None = None,
        adaptive_c: bool = False,
        diffusion_loss_weight: float = 0.0,
        ot_coupling: bool = False,
        mid_sigma: float = 0.821,
        clamp: Sequence[float] | None = None,
        ema_decay: float | None = 0.999,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_steps: Sequence[int] = (1, 2),
        num_eval_samples: int = 1000,
        figure_every_n_epochs: int = 1,
        predict_steps: int = 1,
    ) -> None:
        super().__init__(net, data_shape, optimizer, lr_scheduler, ema_decay, eval_steps, num_eval_samples,
                         figure_every_n_epochs, predict_steps)  # fmt: skip
        self.check_sigmas(sigma_min, sigma_max)
        if not 0 < mid_sigma < sigma_max:
            raise ValueError(f"mid_sigma must be in (0, sigma_max), got {mid_sigma}.")
        for name, value in {"sigma_data": sigma_data, "rho": rho, "p_std": p_std}.items():
            check_number(name, value, above=0.0)
        check_number("p_mean", p_mean)
        check_number("s0", s0, at_least=1, integer=True)
        check_number("s1", s1, at_least=s0, integer=True, hint="The curriculum grows from s0 to s1 steps.")
        if total_steps is not None:
            check_number("total_steps", total_steps, at_least=1, integer=True, hint="Or None for the run's length.")
        if loss not in ("pseudo_huber", "cauchy"):
            raise ValueError(f"loss must be 'pseudo_huber' or 'cauchy', got {loss!r}.")
        if huber_reduction not in ("vector", "elementwise"):
            raise ValueError(f"huber_reduction must be 'vector' or 'elementwise', got {huber_reduction!r}.")
        if c is not None:
            check_number("c", c, above=0.0, hint="Or None for 0.00054 sqrt(d).")
        check_number("diffusion_loss_weight", diffusion_loss_weight, at_least=0.0)
        if clamp is not None and (len(clamp) != 2 or clamp[0] >= clamp[1]):
            raise ValueError(f"clamp must be [low, high] with low < high, or None; got {clamp}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.s0, self.s1, self.p_mean, self.p_std = s0, s1, p_mean, p_std
        self.curriculum_steps = total_steps
        self.loss_kind, self.huber_reduction, self.c, self.adaptive_c = loss, huber_reduction, c, adaptive_c
        self.diffusion_loss_weight, self.ot_coupling = diffusion_loss_weight, ot_coupling
        self.mid_sigma, self.clamp = mid_sigma, None if clamp is None else tuple(clamp)

    # ------------------------------------------------------------------ the consistency function
    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        r""":math:`f_\theta(x, \sigma)` for a batch ``x`` and per-sample (or scalar) ``sigma``."""
        return self.preconditioned(x, sigma, self.sigma_data, self.sigma_min)

    def loss_constant(self, num_levels: int) -> float:
        """The pseudo-Huber / Cauchy constant at this stage of the curriculum."""
        if self.adaptive_c:
            return ct.adaptive_c(num_levels, self.dim, self.s0)
        return self.c if self.c is not None else ct.huber_c(self.dim)

    # ------------------------------------------------------------------ training
    def student_and_teacher(
        self, x: Tensor, z: Tensor, sigma_student: Tensor, sigma_teacher: Tensor
    ) -> tuple[Tensor, Tensor]:
        r""":math:`f_\theta(x + \sigma_{i+1} z, \sigma_{i+1})` and, under stop-gradient with the same noise and
        the same dropout masks, :math:`f_\theta(x + \sigma_i z, \sigma_i)`."""
        shape = (-1, *[1] * (x.ndim - 1))
        with isolate_rng(include_cuda=True):  # the teacher below draws the same dropout masks
            student = self(x + sigma_student.view(shape) * z, sigma_student)
        with torch.no_grad():
            teacher = self(x + sigma_teacher.view(shape) * z, sigma_teacher)
        return student, teacher

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.inputs(batch)
        total = self.curriculum_steps or self.total_steps()
        num_levels = ct.discretisation_steps(self.global_step, total, self.s0, self.s1)
        sigmas = ct.karras_sigmas(num_levels, self.sigma_min, self.sigma_max, self.rho).to(x.device)
        probs = ct.lognormal_index_probabilities(sigmas, self.p_mean, self.p_std)
        i = torch.multinomial(probs.float(), len(x), replacement=True)
        z = torch.randn_like(x)
        if self.ot_coupling:
            z = z[ct.ot_pairing(x, z)]
        sigma_student, sigma_teacher = sigmas[i + 1].to(x.dtype), sigmas[i].to(x.dtype)
        student, teacher = self.student_and_teacher(x, z, sigma_student, sigma_teacher)
        c = self.loss_constant(num_levels)
        if self.loss_kind == "cauchy":
            distance = ct.cauchy(student, teacher, c)
        else:
            distance = ct.pseudo_huber(student, teacher, c, self.huber_reduction)
        weight = 1.0 / (sigmas[i + 1] - sigmas[i])  # from the float32 grid: in bfloat16 close levels coincide
        consistency = (weight * distance).mean()
        loss = consistency
        logged: dict[str, Tensor | float] = {}
        if self.diffusion_loss_weight > 0:
            # pairs whose student level is in the lowest quarter of the grid (a masked mean: never empty-NaN)
            low = (i + 1) <= num_levels - 1 - int(0.75 * num_levels)
            mse = (student - x).float().pow(2).flatten(1).mean(dim=1)
            scale = 1.0 / sigma_student.float() ** 2 + 1.0 / self.sigma_data**2
            diffusion = (low * scale * mse).sum() / low.sum().clamp(min=1)
            loss = loss + self.diffusion_loss_weight * diffusion
            logged["train/diffusion_loss"] = diffusion
        logged.update({"train/loss": loss, "train/consistency_loss": consistency, "consistency/c": c})
        logged.update({"consistency/num_levels": float(num_levels), "consistency/weight_mean": weight.mean()})
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({key: value for key, value in logged.items() if key != "train/loss"})
        trainer = self.trainer
        if self.global_step == batch_idx == 0 and trainer.log_every_n_steps > 1 and not trainer.fast_dev_run:
            # Lightning writes first at step log_every_n_steps; write step 0 too, so short runs show training.
            values = {key: float(torch.as_tensor(value).detach()) for key, value in logged.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=0)
        return loss

    # ------------------------------------------------------------------ sampling
    def sampling_sigmas(self, steps: int) -> list[float]:
        """The default levels of ``steps``-step sampling: :math:`\\sigma_\\max`; then ``mid_sigma`` for two
        steps; for more, the top ``steps`` levels of a descending Karras grid of ``steps + 1``."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if steps == 1:
            return [self.sigma_max]
        if steps == 2:
            return [self.sigma_max, self.mid_sigma]
        return ct.karras_sigmas(steps + 1, self.sigma_min, self.sigma_max, self.rho).flip(0)[:steps].tolist()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 1,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """``n`` samples in data space by consistency sampling (CM Algorithm 1): :math:`x = f(\\sigma_0 z,
        \\sigma_0)`, then for each later level :math:`\\tau`: :math:`x = f(x + \\sqrt{\\tau^2 - \\sigma_\\min^2}\\,
        z', \\tau)`. ``sigmas`` (descending, in (sigma_min, sigma_max]) overrides ``steps``; ``generator`` (a CPU
        generator) makes the noise reproducible; ``use_ema`` samples with the evaluation EMA when there is one."""
        levels = list(sigmas) if sigmas is not None else self.sampling_sigmas(steps)
        if not levels or any(not self.sigma_min < s <= self.sigma_max for s in levels):
            raise ValueError(f"sigmas must lie in (sigma_min, sigma_max] = ({self.sigma_min}, {self.sigma_max}].")
        if any(b >= a for a, b in zip(levels[:-1], levels[1:], strict=True)):
            raise ValueError(f"sigmas must be strictly decreasing, got {levels}.")

        def noise() -> Tensor:
            return torch.randn(n, *self.data_shape, generator=generator).to(self.device, self.dtype)

        with eval_mode(self), self.ema_weights(use_ema):
            x = self(levels[0] * noise(), levels[0])
            x = self._clamp(x)
            for tau in levels[1:]:
                z = noise()
                if self.ot_coupling:  # re-noise with noise coupled to the current samples
                    z = z[ct.ot_pairing(x, z)]
                x = self._clamp(self(x + (tau**2 - self.sigma_min**2) ** 0.5 * z, tau))
        return x

    def _clamp(self, x: Tensor) -> Tensor:
        return x if self.clamp is None else x.clamp(*self.clamp)
