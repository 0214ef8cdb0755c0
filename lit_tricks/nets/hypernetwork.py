"""A hypernetwork that predicts every weight of a small target network, in the default and the MIP form.

Magnitude Invariant Parametrizations (MIP; Ortiz, Guttag, Dalca, "Magnitude Invariant Parametrizations Improve
Hypernetwork Learning", ICLR 2024) change two things of the default hypernetwork ``theta = H(h)``:

- the input is encoded to a constant norm, ``E(h) = [cos(pi h / 2), sin(pi h / 2)]`` for ``h`` in ``[0, 1]^d``
  (``||E(h)||_2 = sqrt(d)``; the alternative ``[h, 1 - h]`` keeps ``||E(h)||_1 = d``), so the output's magnitude
  no longer scales with the input's;
- the output is additive, ``theta = theta_0 + Delta theta(E(h))``, with ``theta_0`` independent, learnable and
  initialised like a plain network's weights.

As in the authors' hyperlight code, ``theta_0`` is the bias of the hypernetwork's output layer (initialised to
Kaiming-normal weights and zero biases of the target), so the plain and the MIP forms have the same architecture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

Encoding = Literal["cos|sin", "z|1-z"]
ENCODINGS = ("cos|sin", "z|1-z")


def encode_input(h: Tensor, encoding: Encoding = "cos|sin") -> Tensor:
    """MIP's constant-norm input encoding of ``h`` in ``[0, 1]^d`` (last dimension), ``[..., 2d]``:
    ``"cos|sin"``: ``[cos(pi h / 2), sin(pi h / 2)]`` (``||.||_2 = sqrt(d)``); ``"z|1-z"``: ``[h, 1 - h]``
    (``||.||_1 = d``)."""
    if encoding == "cos|sin":
        angle = 0.5 * math.pi * h
        return torch.cat([angle.cos(), angle.sin()], dim=-1)
    if encoding == "z|1-z":
        return torch.cat([h, 1 - h], dim=-1)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")


class HyperNetwork(nn.Module):
    """Predicts all parameters of ``target`` from a conditioning input ``h`` and runs ``target`` with them.

    The hypernetwork is an MLP (``Linear -> LeakyReLU`` per hidden width, then a linear output layer of one unit
    per target parameter), initialised as in hyperlight: Kaiming-normal (fan-out, LeakyReLU gain) hidden weights,
    zero hidden biases, and the output weight initialised per target tensor (fan-out = that tensor's size).

    - ``mip=False``, the default formulation: ``theta = W phi(h) + b`` with ``b`` initialised to zero, so at
      initialisation ``theta`` is proportional to ``h``'s magnitude (``theta = 0`` at ``h = 0``).
    - ``mip=True``: ``theta = theta_0 + W phi(E(h))`` with ``E`` the constant-norm encoding and ``theta_0`` (the
      output bias) initialised to the target's weights: Kaiming normal (fan-in, LeakyReLU gain) for tensors of
      two or more dimensions, zero for biases, the target's own value for any other tensor (e.g. norm scales).

    ``target`` is copied and its parameters become non-persistent buffers of the copy (a template of names and
    shapes, never trained, saved or used in forward), so ``parameters()`` holds the hypernetwork's alone.

    Args:
        input_dim: size ``d`` of the conditioning input ``h``.
        target: the network whose parameters are predicted (e.g. a small :class:`~lit_tricks.nets.MLP`).
        hidden: widths of the hypernetwork's hidden layers (hyperlight's README example: 16, 64, 128).
        mip: use the Magnitude Invariant Parametrization (encoding + additive output).
        encoding: MIP's input encoding, ``"cos|sin"`` (hyperlight's default) or ``"z|1-z"``.
    """

    def __init__(
        self,
        input_dim: int,
        target: nn.Module,
        hidden: Sequence[int] = (16, 64, 128),
        mip: bool = True,
        encoding: Encoding = "cos|sin",
    ) -> None:
        super().__init__()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an integer >= 1 (the size of h), got {input_dim!r}.")
        if not isinstance(target, nn.Module):
            raise TypeError(f"target must be an nn.Module whose parameters are predicted, got {type(target).__name__}.")
        named = [(name, p) for name, p in target.named_parameters()]
        if not named:
            raise ValueError("target has no parameters to predict; give a network with at least one parameter.")
        if any(isinstance(width, bool) or not isinstance(width, int) or width < 1 for width in hidden):
            raise ValueError(f"hidden must be a sequence of positive integer widths, got {tuple(hidden)!r}.")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")
        self.input_dim, self.mip, self.encoding = input_dim, bool(mip), encoding
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.target = _as_template(target)

        layers: list[nn.Module] = []
        width = 2 * input_dim if self.mip else input_dim
        for next_width in hidden:
            linear = nn.Linear(width, next_width)
            nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="leaky_relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.LeakyReLU()]
            width = next_width
        self.body = nn.Sequential(*layers)
        self.output = nn.Linear(width, sum(self.sizes))
        with torch.no_grad():
            for rows in self.output.weight.split(self.sizes, dim=0):
                nn.init.kaiming_normal_(rows, mode="fan_out", nonlinearity="leaky_relu")
            self.output.bias.zero_()
            if self.mip:
                self.output.bias.copy_(torch.cat([_initial_value(n, p).flatten() for n, p in named]))

    def encode(self, h: Tensor) -> Tensor:
        """The hypernetwork's input: ``E(h)`` under MIP, ``h`` itself otherwise."""
        return encode_input(h, self.encoding) if self.mip else h

    def predict_parameters(self, h: Tensor) -> dict[str, Tensor]:
        """The target's parameters for ``h`` of shape ``[d]`` (each of the target's shape) or ``[B, d]`` (each
        ``[B, *shape]``)."""
        self._check_h(h)
        flat = self.output(self.body(self.encode(h)))
        lead = flat.shape[:-1]
        chunks = flat.split(self.sizes, dim=-1)
        return {
            name: chunk.reshape(*lead, *shape)
            for name, shape, chunk in zip(self.names, self.shapes, chunks, strict=True)
        }

    def independent_parameters(self) -> dict[str, Tensor]:
        """``theta_0``: the target's parameters the hypernetwork predicts when its last hidden layer is zero (the
        output bias; MIP's independent weights), as views of the target's shapes."""
        chunks = self.output.bias.split(self.sizes)
        return {name: chunk.view(shape) for name, shape, chunk in zip(self.names, self.shapes, chunks, strict=True)}

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """``target(x)`` with the parameters predicted from ``h``: one set for ``h`` of shape ``[d]``, one per
        sample for ``h`` of shape ``[N, d]`` with ``N = len(x)`` (vectorised with ``torch.func.vmap``)."""
        params = self.predict_parameters(h)
        if h.dim() == 1:
            return functional_call(self.target, params, (x,))
        if h.shape[0] != x.shape[0]:
            raise ValueError(f"h of shape [N, d] needs one row per sample of x: got {h.shape[0]} rows for {len(x)}.")

        def one(sample_params: dict[str, Tensor], sample: Tensor) -> Tensor:
            return functional_call(self.target, sample_params, (sample.unsqueeze(0),)).squeeze(0)

        return vmap(one)(params, x)

    def _check_h(self, h: Tensor) -> None:
        if not isinstance(h, Tensor) or h.dim() not in (1, 2) or h.shape[-1] != self.input_dim:
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h must be a tensor of shape [{self.input_dim}] or [B, {self.input_dim}], got {shape}.")
        if self.mip and ((h < 0).any() or (h > 1).any()):
            raise ValueError(
                "With mip=True the conditioning input h must lie in [0, 1] (its encoding assumes it); "
                "rescale h to [0, 1] or use mip=False."
            )


def _as_template(target: nn.Module) -> nn.Module:
    """A copy of ``target`` whose parameters are non-persistent buffers: ``functional_call`` fills them in."""
    template = copy.deepcopy(target)
    for module in template.modules():
        for name, param in list(module._parameters.items()):
            del module._parameters[name]
            if param is not None:
                module.register_buffer(name, param.detach(), persistent=False)
    return template


def _initial_value(name: str, param: Tensor) -> Tensor:
    """MIP's ``theta_0`` for one target tensor (hyperlight's ``init_independent_weights``)."""
    if name.rsplit(".", 1)[-1] == "bias":
        return torch.zeros_like(param)
    if param.dim() >= 2:
        return nn.init.kaiming_normal_(torch.empty_like(param), nonlinearity="leaky_relu")
    return param.detach().clone()
