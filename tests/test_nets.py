import pytest
import torch

from lit_tricks.nets import CNN1D, CNN2D, MLP


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (MLP(64, 10, hidden=(16, 8), dropout=0.1), (5, 64)),
        (MLP(64, 10), (5, 1, 8, 8)),
        (CNN1D(num_classes=10), (5, 40)),
        (CNN1D(num_classes=3, in_channels=2), (5, 2, 40)),
        (CNN2D(num_classes=10), (5, 1, 8, 8)),
        (CNN2D(num_classes=10, in_channels=3, width=8), (5, 3, 32, 32)),
    ],
)
def test_shapes_and_feature_split(net, shape):
    net.eval()
    x = torch.randn(shape)
    logits = net(x)
    assert logits.shape == (5, net.head.out_features)
    features = net.forward_features(x)
    assert features.shape == (5, net.num_features)
    torch.testing.assert_close(net.forward_head(features), logits)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLP(0, 10), "positive"),
        (lambda: MLP(64, 10, dropout=1.0), "dropout"),
        (lambda: CNN1D(channels=0), "positive"),
        (lambda: CNN2D(width=0), "positive"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
