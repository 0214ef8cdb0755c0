import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import Classifier, ContinualEvaluation
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.functional.dkvb import ema_kmeans_step, nearest_keys, retrieve
from lit_tricks.modules.dkvb import DKVB


def test_retrieval_by_hand():
    # two codebooks of three 2-D keys; one point
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], [[5.0, 5.0], [-1.0, 0.0], [0.0, 0.5]]])
    z = torch.tensor([[[0.9, 0.1], [0.0, 0.0]]])
    assert nearest_keys(z, keys, 1).tolist() == [[[1], [2]]]
    assert nearest_keys(z, keys, 2).tolist() == [[[1, 0], [2, 1]]]
    values = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)  # [C=2, K=3, V=2]
    # top-1: mean of values[0, 1] = (2, 3) and values[1, 2] = (10, 11)
    torch.testing.assert_close(retrieve(values, nearest_keys(z, keys, 1)), torch.tensor([[6.0, 7.0]]))
    # top-2: mean of values[0, 1], values[0, 0], values[1, 2], values[1, 1] = (2+0+10+8)/4, (3+1+11+9)/4
    torch.testing.assert_close(retrieve(values, nearest_keys(z, keys, 2)), torch.tensor([[5.0, 6.0]]))
    with pytest.raises(ValueError, match="top_k"):
        nearest_keys(z, keys, 4)


def test_ema_kmeans_by_hand_and_convergence():
    # two codebooks, 1-D: the update of each codebook is its own
    z = torch.tensor([[[0.0], [10.0]], [[1.0], [12.0]]])  # 2 points
    keys = torch.tensor([[[0.5], [9.0]], [[11.0], [20.0]]])
    counts, sums = torch.ones(2, 2), keys.clone()
    new_keys, new_counts, new_sums = ema_kmeans_step(z, keys, counts, sums, decay=0.9, eps=0.0)
    # codebook 0: both points nearest key 0 (0 -> 0.5, 1 -> 0.5); codebook 1: both nearest key 0 (10, 12 -> 11)
    torch.testing.assert_close(new_counts, torch.tensor([[0.9 + 0.2, 0.9], [0.9 + 0.2, 0.9]]))
    torch.testing.assert_close(new_sums[0, :, 0], torch.tensor([0.9 * 0.5 + 0.1 * 1.0, 0.9 * 9.0]))
    torch.testing.assert_close(new_keys[1, :, 0], torch.tensor([(0.9 * 11 + 0.1 * 22) / 1.1, 20.0]))
    # repeated on two well-separated clusters, the keys settle on the cluster means
    data = torch.cat([torch.randn(200, 1, 2) * 0.1, torch.randn(200, 1, 2) * 0.1 + 5.0])
    keys, counts, sums = (
        data[[0, 300]].transpose(0, 1).clone(),
        torch.ones(1, 2),
        data[[0, 300]].transpose(0, 1).clone(),
    )
    for _ in range(100):
        keys, counts, sums = ema_kmeans_step(data, keys, counts, sums, decay=0.8)
    means = torch.stack([data[:200, 0].mean(0), data[200:, 0].mean(0)])
    torch.testing.assert_close(keys[0], means, atol=1e-3, rtol=0)


def test_only_the_retrieved_values_learn():
    model = DKVB(nn.Identity(), num_classes=3, num_codebooks=4, num_keys=8, key_dim=2)
    model.fit_keys(torch.randn(64, 5))
    x = torch.randn(2, 5)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    used = torch.zeros(4, 8, dtype=torch.bool)
    for row in nearest_keys(model.project(x), model.keys, 1)[..., 0]:
        used[torch.arange(4), row] = True
    touched = model.values.grad.abs().sum(-1) > 0
    assert torch.equal(touched, used) and used.sum() <= 8


def _fit(model, seed: int = 1):
    pl.seed_everything(seed, verbose=False)
    evaluation = ContinualEvaluation(every_n_steps=5)
    stream = ContinualDataModule(DigitsDataModule(batch_size=32, val_fraction=0.0), num_tasks=5, seed=seed)
    trainer = pl.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, stream)
    return evaluation.summary()


def test_split_digits_forgets_little_and_keys_stay_frozen():
    adam = lambda lr: lambda params: torch.optim.Adam(params, lr=lr)  # noqa: E731
    model = DKVB(nn.Identity(), num_classes=10, num_codebooks=64, num_keys=64, optimizer=adam(1e-2))
    keys = []
    model.fit_keys = lambda inputs, fit=model.fit_keys: (fit(inputs), keys.append(model.keys.clone()))  # spy
    dkvb = _fit(model)
    probe = _fit(Classifier(nn.Linear(64, 10), num_classes=10, optimizer=adam(1e-2)))
    assert len(keys) == 1 and torch.equal(model.keys, keys[0])  # fitted once (label-free), then frozen
    # the same data and optimizer, a linear probe on the pixels: ACC 0.591, min-ACC 0.21; DKVB: 0.805, 0.975
    assert dkvb["acc"] > probe["acc"] + 0.1 and dkvb["min_acc"] > probe["min_acc"] + 0.5
    assert model.projection.shape == (64, 64, 8)


def test_state_round_trip_and_no_refit():
    model = DKVB(nn.Identity(), num_classes=3, num_codebooks=4, num_keys=8, key_dim=2, seed=5)
    model.fit_keys(torch.randn(64, 5))
    with torch.no_grad():
        model.values.normal_()
    copy = DKVB(nn.Identity(), num_classes=3, num_codebooks=4, num_keys=8, key_dim=2, seed=6)
    copy.load_state_dict(model.state_dict())
    x = torch.randn(7, 5)
    torch.testing.assert_close(copy(x), model(x))
    assert bool(copy.keys_ready)
    copy.trainer = None  # on_fit_start of a restored model keeps its keys
    copy.on_fit_start()
    torch.testing.assert_close(copy.keys, model.keys)


def test_bad_input():
    with pytest.raises(TypeError, match="encoder"):
        DKVB("resnet", num_classes=3)
    with pytest.raises(ValueError, match="top_k"):
        DKVB(nn.Identity(), num_classes=3, num_keys=4, top_k=5)
    with pytest.raises(ValueError, match="key_decay"):
        DKVB(nn.Identity(), num_classes=3, key_decay=1.0)
    with pytest.raises(TypeError, match="key_init_data"):
        DKVB(nn.Identity(), num_classes=3, key_init_data=[[0.0]])
    model = DKVB(nn.Identity(), num_classes=3, num_keys=16)
    with pytest.raises(ValueError, match="key_init_data or fewer keys"):
        model.fit_keys(torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"features \[N, E\]"):
        DKVB(nn.Identity(), num_classes=3, num_keys=2).fit_keys(torch.randn(8, 2, 2))
    model.fit_keys(torch.randn(32, 5))
    with pytest.raises(ValueError, match="encoder gives 6 features"):
        model(torch.randn(2, 6))
