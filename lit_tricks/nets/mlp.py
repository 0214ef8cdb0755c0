"""A multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU (-> Dropout)`` per hidden layer, then a linear head.

    Args:
        in_features: size of the flattened input (64 for 8x8 digits, 40 for MNIST-1D).
        num_classes: number of outputs.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(width < 1 for width in hidden):
            raise ValueError("in_features, num_classes and every hidden width must be positive.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for next_width in hidden:
            layers += [nn.Linear(width, next_width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = next_width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.num_features = width

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
