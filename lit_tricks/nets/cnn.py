"""Small convolutional networks for 1-D signals (MNIST-1D) and small images (8x8 digits, 32x32)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_block(conv: type[nn.Module], norm: type[nn.Module], c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out), nn.ReLU())


class CNN1D(nn.Module):
    """Three strided ``Conv1d -> BatchNorm -> ReLU`` blocks, global average pooling, a linear head.

    Input ``[N, L]`` or ``[N, C, L]`` (a 2-D input is read as one channel), so MNIST-1D's ``[N, 40]``
    signals go in as they are.

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
        channels: width of every block.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: int = 32) -> None:
        super().__init__()
        if min(num_classes, in_channels, channels) < 1:
            raise ValueError("num_classes, in_channels and channels must be positive.")
        self.in_channels = in_channels
        self.body = nn.Sequential(
            _conv_block(nn.Conv1d, nn.BatchNorm1d, in_channels, channels, 1),
            _conv_block(nn.Conv1d, nn.BatchNorm1d, channels, channels, 2),
            _conv_block(nn.Conv1d, nn.BatchNorm1d, channels, channels, 2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels, num_classes)
        self.num_features = channels

    def forward_features(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(1)
        return self.body(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class CNN2D(nn.Module):
    """Two stages of two ``Conv2d -> BatchNorm -> ReLU`` blocks (the second stage strided), global average
    pooling and a linear head; any image size, e.g. 8x8 digits or 32x32 images.

    Args:
        num_classes: number of outputs.
        in_channels: image channels.
        width: channels of the first stage (the second has twice as many).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if min(num_classes, in_channels, width) < 1:
            raise ValueError("num_classes, in_channels and width must be positive.")
        self.body = nn.Sequential(
            _conv_block(nn.Conv2d, nn.BatchNorm2d, in_channels, width, 1),
            _conv_block(nn.Conv2d, nn.BatchNorm2d, width, width, 1),
            _conv_block(nn.Conv2d, nn.BatchNorm2d, width, 2 * width, 2),
            _conv_block(nn.Conv2d, nn.BatchNorm2d, 2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)
        self.num_features = 2 * width

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
