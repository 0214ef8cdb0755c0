"""L-infinity PGD (projected gradient descent) attacks, and class weights for imbalanced adversarial training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def pgd_attack(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    clamp_min: float | None = None,
    clamp_max: float | None = None,
) -> Tensor:
    r"""The L-infinity PGD attack of Madry et al. ("Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018): from :math:`x^0 = x + \delta`, :math:`\delta \sim U[-\epsilon, \epsilon]^d` (or :math:`x^0 = x`),

    .. math:: x^{t+1} = \Pi_{[a, b]}\,\Pi_{B_\infty(x, \epsilon)}
              \big(x^t + \alpha\,\mathrm{sign}\,\nabla_{x}\textstyle\sum_i \ell(f(x^t_i), y_i)\big)

    with :math:`\alpha` = ``step_size``, ``steps`` iterations, the input range :math:`[a, b]` =
    ``[clamp_min, clamp_max]`` (``None``: unbounded on that side, as for standardised inputs).

    The gradient is taken with respect to the inputs only (``torch.autograd.grad``), so no parameter's ``.grad``
    changes; the caller chooses the model's mode (evaluation mode for adversarial training, so batch-norm
    statistics are not updated by the attack). Summing the per-sample losses rather than averaging them changes
    no sign, so the attack is the same as with the mean loss.

    Args:
        model_fn: inputs -> logits.
        x: clean inputs, batch first.
        y: targets as ``loss_fn`` reads them (class ids ``[N]`` or probabilities ``[N, C]``).
        eps: :math:`\epsilon`, the L-infinity radius.
        step_size: :math:`\alpha`.
        steps: number of gradient-sign steps (0 returns the random start, or ``x``).
        random_start: start from a uniform draw in the ball.
        generator: the generator of the random start (drawn on its device, then moved to ``x``'s); ``None``:
            the global one on ``x``'s device.
        loss_fn: ``(logits, y) -> per-sample losses [N]``; default the cross-entropy.
        clamp_min, clamp_max: the valid input range.

    Returns:
        The adversarial inputs, detached, same shape and dtype as ``x``.

    Example::

        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
        >>> x_adv = pgd_attack(model, x, y, eps=0.1, step_size=0.05, steps=3, generator=torch.Generator())
        >>> bool((x_adv - x).abs().max() <= 0.1)
        True
    """
    loss_fn = loss_fn or (lambda logits, targets: F.cross_entropy(logits, targets, reduction="none"))
    x = x.detach()
    if random_start:
        device = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
        x_adv = x + (2 * noise.to(x.device) - 1) * eps
    else:
        x_adv = x.clone()
    x_adv = x_adv.clamp(clamp_min, clamp_max) if clamp_min is not None or clamp_max is not None else x_adv
    low, high = x - eps, x + eps
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model_fn(x_adv), y).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + step_size * grad.sign(), low), high)
        if clamp_min is not None or clamp_max is not None:
            x_adv = x_adv.clamp(clamp_min, clamp_max)
    return x_adv.detach()


def class_balanced_weights(class_counts: Tensor, beta: float) -> Tensor:
    r"""Class weights from the effective number of samples (Cui et al., CVPR 2019), as deferred re-weighting
    (DRW, Cao et al., NeurIPS 2019) applies them: :math:`w_c \propto (1 - \beta) / (1 - \beta^{n_c})`, the limit
    :math:`w_c \propto 1/n_c` at :math:`\beta = 1` (inverse frequency) and uniform weights at :math:`\beta = 0`.

    Normalised so that the mean weight over the training samples is 1, :math:`\sum_c n_c w_c = \sum_c n_c`: the
    loss keeps ERM's scale in expectation (DRW's code normalises :math:`\sum_c w_c = C` and then divides each batch
    by its sum of weights; the ratios between classes are the same).

    Example::

        >>> class_balanced_weights(torch.tensor([30, 10]), beta=1.0)
        tensor([0.6667, 2.0000])
    """
    counts = class_counts.double()
    if beta == 1.0:
        raw = 1.0 / counts
    else:
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (raw * counts.sum() / (raw * counts).sum()).float()
