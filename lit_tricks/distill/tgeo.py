"""TGeo-KD: a sample-wise KD/CE fusion ratio from the student/teacher/ground-truth geometry, learned bilevel."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.func import functional_call

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import logging_due
from lit_tricks.distill.base import TeacherLoss
from lit_tricks.functional.distillation import distillation_kl
from lit_tricks.functional.kd_losses import fused_kd_loss, teacher_class_mean, tgeo_relations
from lit_tricks.functional.losses import soft_target_cross_entropy, to_probabilities

if TYPE_CHECKING:
    from lit_tricks.distill.teachers import Teacher


def ratio_network(num_classes: int, hidden: Sequence[int] = (32, 16)) -> nn.Sequential:
    """The fusion-ratio network of the authors' code: ``9C -> 32 -> 16 -> 1``, LeakyReLU, sigmoid output."""
    layers: list[nn.Module] = []
    width = 9 * num_classes
    for next_width in hidden:
        layers += [nn.Linear(width, next_width), nn.LeakyReLU()]
        width = next_width
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Sigmoid())


class _Links:
    """Run-time links of a loss (the student, the held-out iterator): neither copied with it nor saved."""

    def __init__(self) -> None:
        self.student: pl.LightningModule | None = None
        self.batches: Iterator[Any] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Links:
        return _Links()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def _cycle(loader: Iterable[Any], skip: int) -> Iterator[Any]:
    """Batches of ``loader`` over and over, the first ``skip`` dropped."""
    if hasattr(loader, "__len__") and len(loader) > 0:
        skip %= len(loader)
    while True:
        empty = True
        for batch in loader:
            empty = False
            if skip:
                skip -= 1
                continue
            yield batch
        if empty:
            raise ValueError("TGeoLoss's held-out data is empty: give it at least one batch.")


class TGeoLoss(TeacherLoss):
    r"""TGeo-KD ("Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation",
    Hu et al., ICLR 2024; authors' code ``Chengming0501/TGeo-KD``).

    Each sample gets its own fusion ratio :math:`\alpha_i = f_\omega(x_i) \in (0, 1)` between the teacher
    and the label,

    .. math:: \ell_i = \alpha_i\, T^2\,\mathrm{KL}\big(\sigma(z^t_i/T)\,\|\,\sigma(z^s_i/T)\big)
              + (1 - \alpha_i)\,\mathrm{CE}(z^s_i, y_i),

    where :math:`f_\omega` is a small network (:func:`ratio_network`) on the trilateral geometry of the
    student prediction :math:`S_i`, the teacher prediction :math:`T_i`, the ground truth :math:`G_i` and the
    teacher's mean prediction :math:`\bar T_i` over samples of the same class
    (:func:`~lit_tricks.functional.tgeo_relations`; probabilities at temperature 1, no gradient). It holds
    the label loss itself, so :class:`~lit_tricks.Distill` drops its own (``replaces_hard_loss``).

    :math:`\omega` is learned bilevel: :math:`\min_\omega \mathcal L^{CE}_{held\text{-}out}(\theta^*(\omega))`
    with :math:`\theta^*(\omega)` the student trained on :math:`\ell`. Every ``update_every`` steps one
    held-out batch gives the one-step look-ahead hypergradient (as in learning-to-reweight):
    :math:`\theta' = \theta - \eta\nabla_\theta \tfrac1N\sum_i \ell_i(\theta, \omega)`, then
    :math:`\nabla_\omega \mathcal L^{CE}_{held\text{-}out}(\theta')` steps :math:`\omega`'s own Adam; the
    student's step then uses :math:`\alpha` from the updated :math:`\omega`, with no gradient into
    :math:`\omega`. This costs a second-order backward through the student each time.

    Differences from the authors' released code (read in full; the method section was not available here):
    their upper-level step backpropagates a held-out loss that does not depend on :math:`\omega` (the ratio
    is computed under ``no_grad``), so their ratio network never leaves its initialisation; an earlier
    CIFAR version trained it jointly on the training loss instead. :math:`\bar T` is the running mean of
    the teacher's training-batch predictions per class (all ranks' batches, kept in the checkpoint); the
    authors' scripts average over the training set (tabular) or a held-out set (CIFAR) before training.

    Args:
        temperature: :math:`T` of the KD term (authors' tabular script: 1.5; CIFAR: 1).
        held_out: batches for the upper level; ``None`` uses the data module's ``val_dataloader()`` (then
            report test, not validation, metrics: the ratio was fitted on the validation split).
        update_every: upper-level step every this many training steps.
        ratio_lr: learning rate of :math:`\omega`'s Adam.
        ratio_weight_decay: weight decay of that Adam (authors' tabular script: lr 0.1, decay 0.05, full batch).
        lookahead_lr: :math:`\eta`; ``None`` uses the student optimizer's current learning rate.
        hidden: hidden widths of the ratio network.
    """

    replaces_hard_loss = True

    def __init__(
        self,
        temperature: float = 1.5,
        held_out: Iterable[Any] | None = None,
        update_every: int = 1,
        ratio_lr: float = 1e-3,
        ratio_weight_decay: float = 0.0,
        lookahead_lr: float | None = None,
        hidden: Sequence[int] = (32, 16),
    ) -> None:
        super().__init__()
        check_number("temperature", temperature, above=0.0, hint="The authors use 1 to 1.5.")
        check_number("update_every", update_every, at_least=1, integer=True)
        check_number("ratio_lr", ratio_lr, above=0.0)
        check_number("ratio_weight_decay", ratio_weight_decay, at_least=0.0)
        if lookahead_lr is not None:
            check_number("lookahead_lr", lookahead_lr, above=0.0)
        for width in hidden:
            check_number("hidden widths", width, at_least=1, integer=True)
        self.temperature, self.update_every = temperature, update_every
        self.ratio_lr, self.ratio_weight_decay, self.lookahead_lr = ratio_lr, ratio_weight_decay, lookahead_lr
        self.hidden = tuple(hidden)
        self.held_out = held_out
        self.ratio_net: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._links = _Links()
        self.steps = self.held_out_batches = 0

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, teacher: Teacher) -> None:
        num_classes = getattr(module, "num_classes", None)
        if not isinstance(num_classes, int):
            raise TypeError(f"TGeoLoss needs a module with an integer num_classes, got {type(module).__name__}.")
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self.held_out is None and not callable(getattr(trainer.datamodule, "val_dataloader", None)):
            raise ValueError(
                "TGeoLoss learns its fusion ratio on held-out data: pass held_out=<DataLoader> or fit with a "
                "LightningDataModule that has a val_dataloader()."
            )
        self._links.student = module
        if self.ratio_net is None:
            device = next(module.parameters()).device
            # Frozen for autograd: only the upper-level step moves it, so the student's backward, its optimizer
            # and DDP's gradient reduction all leave it alone.
            self.ratio_net = ratio_network(num_classes, self.hidden).to(device).requires_grad_(False)
            self.register_buffer("class_sums", torch.zeros(num_classes, num_classes, device=device))
            self.register_buffer("class_counts", torch.zeros(num_classes, device=device))
            self._optimizer = torch.optim.Adam(
                self.ratio_net.parameters(), lr=self.ratio_lr, weight_decay=self.ratio_weight_decay
            )

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        module = self._links.student
        if self.ratio_net is None or module is None:
            raise RuntimeError("TGeoLoss.setup(trainer, module, teacher) must run before the loss.")
        logits = student.logits
        g = to_probabilities(targets, logits.shape[-1]).float()
        p_t = teacher_logits.detach().float().softmax(dim=-1)
        training = self.training and torch.is_grad_enabled()
        if training:
            self._add_to_class_means(module, g, p_t)
        mean_t = teacher_class_mean(g, self.class_sums, self.class_counts)
        state = tgeo_relations(logits.detach().float().softmax(dim=-1), p_t, g, mean_t)
        kd = distillation_kl(logits, teacher_logits, self.temperature)
        ce = soft_target_cross_entropy(logits, targets)
        if training:
            if self.steps % self.update_every == 0:
                self._upper_step(module, state, kd, ce)
            self.steps += 1
        alpha = self.ratio_net(state).squeeze(-1)
        if training and logging_due(module.trainer):
            module.log("tricks/Distill/tgeo_alpha", alpha.mean(), batch_size=len(alpha))
        return fused_kd_loss(alpha, kd, ce)

    def _add_to_class_means(self, module: pl.LightningModule, target_probs: Tensor, teacher_probs: Tensor) -> None:
        """Add this step's teacher predictions (every rank's) to the per-class running sums."""
        strategy = module.trainer.strategy
        self.class_sums += strategy.reduce(target_probs.T @ teacher_probs, reduce_op="sum")
        self.class_counts += strategy.reduce(target_probs.sum(dim=0), reduce_op="sum")

    def _upper_step(self, module: pl.LightningModule, state: Tensor, kd: Tensor, ce: Tensor) -> None:
        """One Adam step of the ratio network on the one-step look-ahead held-out loss."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        ratio = {n: p.detach().requires_grad_() for n, p in self.ratio_net.named_parameters()}
        alpha = functional_call(self.ratio_net, ratio, (state,)).squeeze(-1)
        inner = fused_kd_loss(alpha, kd, ce).mean()
        grads = torch.autograd.grad(inner, [p for _, p in named], create_graph=True, allow_unused=True)
        lr = self.lookahead_lr or module.trainer.optimizers[0].param_groups[0]["lr"]
        looked = {n: p if g is None else p - lr * g for (n, p), g in zip(named, grads, strict=True)}
        # copies of the buffers, so the look-ahead forward leaves e.g. BatchNorm statistics untouched
        own = {id(b) for b in self.buffers()}
        buffers = {n: b.clone() for n, b in module.named_buffers() if id(b) not in own}
        batch = TrickBatch.from_batch(self._next_held_out(module))
        inputs, targets = batch.inputs.to(module.device), batch.targets.to(module.device)
        outer = soft_target_cross_entropy(functional_call(module, {**looked, **buffers}, (inputs,)), targets).mean()
        ratio_grads = torch.autograd.grad(outer, list(ratio.values()), retain_graph=True)
        strategy = module.trainer.strategy
        params = list(self.ratio_net.parameters())
        for p, g in zip(params, ratio_grads, strict=True):
            p.grad = strategy.reduce(g.detach(), reduce_op="mean")
        self._optimizer.step()
        for p in params:  # so the student's optimizer, which also holds them, never steps them
            p.grad = None

    def _next_held_out(self, module: pl.LightningModule) -> Any:
        """The next held-out batch, cycling; a restored run first skips the batches already drawn."""
        if self._links.batches is None:
            loader = self.held_out if self.held_out is not None else module.trainer.datamodule.val_dataloader()
            self._links.batches = _cycle(loader, skip=self.held_out_batches)
        self.held_out_batches += 1
        return next(self._links.batches)

    def get_extra_state(self) -> dict[str, Any]:
        optimizer = self._optimizer.state_dict() if self._optimizer is not None else None
        return {"optimizer": optimizer, "steps": self.steps, "held_out_batches": self.held_out_batches}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self._optimizer is not None and state["optimizer"] is not None:
            self._optimizer.load_state_dict(state["optimizer"])
        self.steps, self.held_out_batches = state["steps"], state["held_out_batches"]
        self._links.batches = None

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, update_every={self.update_every}, ratio_lr={self.ratio_lr}"
