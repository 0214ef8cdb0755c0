r"""Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017).

One scalar :math:`T > 0` divides the logits, :math:`\hat p = \mathrm{softmax}(z / T)`, chosen to minimise the
negative log-likelihood on held-out data,

.. math:: T^\star = \arg\min_{T > 0} \; -\frac1N \sum_i \log \mathrm{softmax}(z_i / T)_{y_i},

which leaves the argmax (accuracy) unchanged. Fitted here by L-BFGS on :math:`\log T`, so :math:`T` stays positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.core.checks import check_number


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 50, init: float = 1.0) -> float:
    """The temperature :math:`T^\\star` that minimises the NLL of ``softmax(logits / T)`` on ``targets``.

    Args:
        logits: ``[N, C]`` held-out logits (before any softmax).
        targets: ``[N]`` class ids.
        max_iter: L-BFGS iterations (strong-Wolfe line search, in float64, on :math:`\\log T`).
        init: the starting temperature.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> true_logits = 2 * torch.randn(4000, 5, generator=g)
        >>> labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
        >>> round(fit_temperature(3 * true_logits, labels), 1)  # over-confident by a factor 3
        3.0
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with C >= 2 classes, got {tuple(logits.shape)}.")
    if targets.shape != logits.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be [N] = [{logits.shape[0]}] class ids, got {tuple(targets.shape)}.")
    if logits.shape[0] == 0:
        raise ValueError("fitting a temperature needs at least one held-out sample, got none.")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite to fit a temperature; they hold NaN or inf.")
    check_number("max_iter", max_iter, at_least=1, integer=True)
    check_number("init", init, above=0.0)
    z, y = logits.detach().double(), targets.long()
    log_t = torch.tensor(math.log(init), dtype=torch.float64, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def scale_logits(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``logits / temperature``: the calibrated logits (the argmax is unchanged).

    Example::

        >>> scale_logits(torch.tensor([[3.0, 0.0]]), 3.0).softmax(1)
        tensor([[0.7311, 0.2689]])
    """
    return logits / temperature
