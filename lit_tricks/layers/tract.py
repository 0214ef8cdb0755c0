"""TrAct (Petersen, Borgelt and Ermon, "TrAct: Making First-layer Pre-Activations Trainable", NeurIPS 2024): the
first layer's weight gradient becomes the closed-form update that moves its pre-activations, not its weights, by
a gradient step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from lit_tricks.core.checks import check_number

_HINT = "The paper's default is 0.1."


def tract_weight_grad(grad_rows: Tensor, input_rows: Tensor, lam: float) -> Tensor:
    """The TrAct weight gradient ``dW' = G^T A (A^T A / n + lam I)^-1``, the paper's closed-form update.

    ``A`` (``input_rows``, ``[n, d]``) holds the layer's ``n`` inputs (a conv layer's input patches: one row per
    sample and output position) and ``G`` (``grad_rows``, ``[n, c]``) the loss gradient of its ``n``
    pre-activations, so ``G^T A`` is the ordinary weight gradient. When ``n < d`` the equal form
    ``G^T (A A^T / n + lam I)^-1 A`` solves an ``n x n`` system instead (as the authors' code does). The systems
    are solved in at least float32. Returns ``[c, d]`` in ``grad_rows``' dtype.
    """
    check_number("lam", lam, above=0.0, hint=_HINT)
    dtype = torch.promote_types(grad_rows.dtype, torch.float32)
    a, g = input_rows.to(dtype), grad_rows.to(dtype)
    n, d = a.shape
    if n < d:
        gram = a @ a.T / n + lam * torch.eye(n, dtype=dtype, device=a.device)
        out = torch.linalg.solve(gram, g).T @ a
    else:
        gram = a.T @ a / n + lam * torch.eye(d, dtype=dtype, device=a.device)
        out = torch.linalg.solve(gram, a.T @ g).T  # the Gram matrix is symmetric: (G^T A) M^-1 = (M^-1 A^T G)^T
    return out.to(grad_rows.dtype)


class _TrActWeightGrad(torch.autograd.Function):
    """Identity on the layer output ``z``; in backward the weight receives the TrAct gradient from ``dL/dz``."""

    @staticmethod
    def forward(ctx, out: Tensor, weight: Tensor, input: Tensor, layer: _TrAct) -> Tensor:
        ctx.save_for_backward(input)
        ctx.layer, ctx.lam = layer, layer.lam
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (input,) = ctx.saved_tensors
        layer = ctx.layer
        grad = tract_weight_grad(layer.output_rows(grad_out), layer.input_rows(input), ctx.lam)
        return grad_out, grad.reshape(layer.weight.shape).to(layer.weight.dtype), None, None


class _TrAct:
    """What the TrAct layers add to ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``: in training with gradients the
    output is the plain layer's on a detached weight (so input and bias gradients are PyTorch's own), and the
    weight gets the TrAct gradient through :class:`_TrActWeightGrad`; otherwise it is the plain layer."""

    lam: float
    weight: nn.Parameter
    plain: type[nn.Module]

    def forward(self, input: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(input)
        out = self.forward_with(input, self.weight.detach())
        return _TrActWeightGrad.apply(out, self.weight, input.detach(), self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}"


class TrActLinear(_TrAct, nn.Linear):
    """``nn.Linear`` whose weight gradient is TrAct's (rows of ``A``: inputs, all leading dims flattened).

    Args:
        in_features, out_features, bias, device, dtype: as in ``torch.nn.Linear``.
        lam: the regulariser ``lambda`` of ``(A^T A / n + lambda I)^-1`` (the paper: 0.1).
    """

    plain = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        lam: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_number("lam", lam, above=0.0, hint=_HINT)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.lam = lam

    def forward_with(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.bias)

    def input_rows(self, input: Tensor) -> Tensor:
        return input.reshape(-1, self.in_features)

    def output_rows(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(-1, self.out_features)


class _TrActConv(_TrAct):
    """Rows of ``A`` for a conv layer: the (padded) input unfolded into one patch per sample and output position,
    flattened in the weight's ``(in_channels, *kernel)`` order; rows of ``G``: the output gradient per position."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str | tuple[int, ...]
    padding_mode: str

    def forward_with(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(input, weight, self.bias)

    def _batched(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0) if x.dim() == len(self.kernel_size) + 1 else x

    def _pad(self) -> list[int]:
        """``F.pad`` amounts, last dimension first, as ``torch.nn.Conv*d`` pads (``"same"``: extra on the right)."""
        amounts: list[int] = []
        for i in reversed(range(len(self.kernel_size))):
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                amounts += [total // 2, total - total // 2]
            else:
                amounts += [0, 0] if self.padding == "valid" else [self.padding[i]] * 2
        return amounts

    def input_rows(self, input: Tensor) -> Tensor:
        x = F.pad(self._batched(input), self._pad(), "constant" if self.padding_mode == "zeros" else self.padding_mode)
        kernel, dilation, stride = self.kernel_size, self.dilation, self.stride
        if len(kernel) == 1:  # a 1-D signal is an image of height 1
            x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * prod(kernel), positions]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_rows(self, grad_out: Tensor) -> Tensor:
        return self._batched(grad_out).flatten(2).transpose(1, 2).reshape(-1, self.out_channels)


class TrActConv1d(_TrActConv, nn.Conv1d):
    """``nn.Conv1d`` (``groups=1``) whose weight gradient is TrAct's, on its input patches.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode, device, dtype: as in
            ``torch.nn.Conv1d``.
        lam: the regulariser ``lambda`` of ``(A^T A / n + lambda I)^-1`` (the paper: 0.1).
    """

    plain = nn.Conv1d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: str | int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        lam: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_number("lam", lam, above=0.0, hint=_HINT)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode, device, dtype
        )
        self.lam = lam


class TrActConv2d(_TrActConv, nn.Conv2d):
    """``nn.Conv2d`` (``groups=1``) whose weight gradient is TrAct's, on its input patches (the paper's image
    first layer).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode, device, dtype: as in
            ``torch.nn.Conv2d``.
        lam: the regulariser ``lambda`` of ``(A^T A / n + lambda I)^-1`` (the paper: 0.1).
    """

    plain = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        lam: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_number("lam", lam, above=0.0, hint=_HINT)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode, device, dtype
        )
        self.lam = lam


_TRACT = {nn.Linear: TrActLinear, nn.Conv1d: TrActConv1d, nn.Conv2d: TrActConv2d}
_TRACT_TYPES = tuple(_TRACT.values())


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def _check_supported(name: str, module: nn.Module) -> None:
    where = f"{name!r} ({type(module).__name__})" if name else type(module).__name__
    if isinstance(module, LazyModuleMixin):
        raise TypeError(f"{where} is a lazy layer: run one forward pass first to materialise it, then apply TrAct.")
    if isinstance(module, _TRACT_TYPES):
        return
    if type(module) not in _TRACT:
        raise TypeError(
            f"{where} is not a plain torch.nn.Linear, Conv1d or Conv2d, the layer types TrAct supports: pass "
            "layer= the name of the network's first Linear/Conv1d/Conv2d layer."
        )
    if getattr(module, "groups", 1) != 1:
        raise ValueError(f"{where} has groups={module.groups}; TrAct supports groups=1 only (a dense first layer).")


def _first_candidate(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if _is_candidate(module):
            return name
    raise ValueError(
        f"{type(model).__name__} has no Linear or Conv layer for TrAct to train: TrAct needs a network whose first "
        "layer is a torch.nn.Linear, Conv1d or Conv2d."
    )


def tract(layer_or_model: nn.Module, lam: float = 0.1, layer: str | None = None) -> nn.Module:
    """Make one layer train its pre-activations (TrAct), in place; return ``layer_or_model``.

    The layer (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups=1``) becomes its ``TrAct*`` subclass,
    the very object (same parameters, hooks and state-dict keys): forward and inference are unchanged, and in
    training its weight gradient is ``dW' = dW (A^T A / n + lam I)^-1`` (see :func:`tract_weight_grad`), which
    any optimizer then uses. Bias and input gradients are unchanged.

    Args:
        layer_or_model: the layer itself, or a model holding it.
        lam: the regulariser ``lambda`` (the paper: 0.1 throughout; larger is closer to plain training).
        layer: dotted name of the layer in the model; default: the first ``Linear`` or ``Conv`` module in
            ``named_modules()`` order (registration order, which for our nets and most vision nets is the
            first layer the input meets; name it when a model registers, e.g., its head first).

    A layer that already is a TrAct layer takes the new ``lam``. :func:`remove_tract` undoes it.

    Example::

        >>> from lit_tricks.nets import CNN2D
        >>> net = tract(CNN2D(), lam=0.1)
        >>> type(net.body[0][0]).__name__
        'TrActConv2d'
    """
    if not isinstance(layer_or_model, nn.Module):
        raise TypeError(f"layer_or_model must be a torch.nn.Module, got {type(layer_or_model).__name__}.")
    check_number("lam", lam, above=0.0, hint=_HINT)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be the dotted name of a submodule (a str) or None, got {type(layer).__name__}.")
    name = layer
    if name is None:
        name = "" if _is_candidate(layer_or_model) else _first_candidate(layer_or_model)
    try:
        target = layer_or_model.get_submodule(name)
    except AttributeError:
        candidates = [n for n, m in layer_or_model.named_modules() if _is_candidate(m)][:5]
        raise ValueError(
            f"{type(layer_or_model).__name__} has no submodule {layer!r}: layer must name its first layer, e.g. "
            f"one of {candidates}."
        ) from None
    _check_supported(name, target)
    if not isinstance(target, _TRACT_TYPES):
        target.__class__ = _TRACT[type(target)]
    target.lam = lam
    return layer_or_model


def remove_tract(layer_or_model: nn.Module) -> nn.Module:
    """Turn every TrAct layer of ``layer_or_model`` (or the layer itself) back into its plain ``torch.nn`` class,
    in place (same parameters and state-dict keys); return ``layer_or_model``. A model without one is unchanged."""
    if not isinstance(layer_or_model, nn.Module):
        raise TypeError(f"layer_or_model must be a torch.nn.Module, got {type(layer_or_model).__name__}.")
    for module in layer_or_model.modules():
        if isinstance(module, _TRACT_TYPES):
            module.__class__ = module.plain
            del module.lam
    return layer_or_model
