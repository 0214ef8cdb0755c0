"""Modular arithmetic tables (Power et al., 2022): the grokking task, all pairs ``(a, b) -> (a op b) mod p``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_tricks.core.checks import check_number
from lit_tricks.data.array_datamodule import ArrayDataModule

Operation = Literal["add", "sub", "mul", "div"]
Inputs = Literal["onehot", "tokens"]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _check_table(p: int, operation: str) -> None:
    check_number("p", p, at_least=2, integer=True, hint="The grokking papers use 97 or 113.")
    if operation not in ("add", "sub", "mul", "div"):
        raise ValueError(f"operation must be 'add', 'sub', 'mul' or 'div', got {operation!r}.")
    if operation == "div" and not _is_prime(p):
        raise ValueError(f"operation='div' needs a prime p (every b != 0 invertible mod p), got p={p}.")


def modular_table(p: int, operation: Operation = "add") -> tuple[Tensor, Tensor]:
    """Every pair ``(a, b)``, ``a, b`` in ``0..p-1`` (``b != 0`` for ``"div"``), and ``c = (a op b) mod p``.

    ``"div"`` is :math:`c = a\\,b^{-1} \\bmod p` (``p`` must be prime). Returns ``(pairs [M, 2], c [M])``, long,
    with ``M = p^2`` (``p(p - 1)`` for ``"div"``), in row-major order of ``(a, b)``.
    """
    _check_table(p, operation)
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(-1)
    if operation == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    if operation == "add":
        c = a + b
    elif operation == "sub":
        c = a - b
    elif operation == "mul":
        c = a * b
    else:  # Fermat: b^(p-2) is the inverse of b mod prime p
        c = a * torch.tensor([pow(int(x), p - 2, p) for x in range(p)])[b]
    return torch.stack([a, b], dim=-1), c.remainder(p)


class ModularArithmeticDataModule(ArrayDataModule):
    """All pairs ``(a, b) -> (a op b) mod p``, a seeded ``train_fraction`` of them for training, the rest held out.

    The held-out pairs are the test split and, unless ``val_fraction > 0`` carves a validation split from the
    training pairs, the validation split too: the "validation accuracy" of the grokking papers is accuracy on the
    unseen pairs. Inputs are the two one-hot vectors concatenated (``[2p]`` floats, as in Prieto et al. 2025 and
    Kumar et al. 2024) or the token ids ``[2]`` (long) for a net with an embedding. ``num_classes = p``.

    Args:
        p: the modulus (and number of classes).
        operation: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"`` (``b != 0``, prime ``p``).
        train_fraction: fraction of all pairs in the training split, in (0, 1).
        inputs: ``"onehot"`` or ``"tokens"``.
        batch_size: training batch size; ``None`` trains full-batch (the whole training split each step, as the
            papers do).
        seed: seed of the split and of the shuffling.
        **kwargs: see :class:`~lit_tricks.data.ArrayDataModule` (``val_fraction`` defaults to 0 here).

    Example::

        >>> dm = ModularArithmeticDataModule(p=5, train_fraction=0.6, batch_size=None)
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), dm.batch_size, dm.train_set.inputs.shape[1]
        (15, 10, 15, 10)
    """

    def __init__(
        self,
        p: int = 97,
        operation: Operation = "add",
        train_fraction: float = 0.4,
        inputs: Inputs = "onehot",
        batch_size: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.0,
        **kwargs,
    ) -> None:
        _check_table(p, operation)
        check_number("train_fraction", train_fraction, above=0.0, below=1.0, hint="The papers use 0.3 to 0.5.")
        if inputs not in ("onehot", "tokens"):
            raise ValueError(f"inputs must be 'onehot' (for an MLP) or 'tokens' (for an embedding), got {inputs!r}.")
        if batch_size is not None:
            check_number("batch_size", batch_size, at_least=1, integer=True, hint="None trains full-batch.")
        super().__init__(batch_size=batch_size or 1, seed=seed, val_fraction=val_fraction, **kwargs)
        self.p, self.operation, self.train_fraction, self.inputs = p, operation, train_fraction, inputs
        self.full_batch = batch_size is None
        self.num_classes = p

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2 * self.p,) if self.inputs == "onehot" else (2,)

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pairs, targets = modular_table(self.p, self.operation)
        if self.inputs == "onehot":
            x = torch.cat([torch.nn.functional.one_hot(pairs[:, i], self.p) for i in (0, 1)], dim=-1).float()
        else:
            x = pairs
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_train = int(self.train_fraction * len(x))
        if n_train < 1 or n_train == len(x):
            raise ValueError(
                f"train_fraction={self.train_fraction} of {len(x)} pairs leaves an empty split: choose p or "
                "train_fraction so that both splits hold pairs."
            )
        train, held_out = order[:n_train], order[n_train:]
        return x[train], targets[train], x[held_out], targets[held_out]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        if self.val_set is None:
            self.val_set = self.test_set
        if self.full_batch:
            self.batch_size = len(self.train_set)
