"""EcoTTA: memory-efficient continual test-time adaptation with meta networks."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional.tta import filtered_entropy
from lit_tricks.modules.tta.base import TTAModule


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
