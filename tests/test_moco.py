"""MoCo-v2 and MoCHi: InfoNCE with a queue by hand and against the authors' formula, the ring-buffer enqueue, the
momentum update, MoCHi's hardest keys and mixed negatives on a hand-built queue, the module's step against a
recomputation, a real fit, bad input."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.mochi import hardest_negatives, mochi_negatives
from lit_tricks.functional.moco import enqueue_, moco_logits, moco_loss
from lit_tricks.modules.moco import MoCo
from lit_tricks.nets import MLP

E = torch.eye(3)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**(defaults | kwargs))


def test_infonce_with_a_queue_by_hand():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits (q.k, q.n1, q.n2) / 0.5 = (1.2, 0, -2); loss = -log softmax at the positive
    torch.testing.assert_close(moco_logits(q, k, queue, 0.5), torch.tensor([[1.2, 0.0, -2.0]]))
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + 1.0 + math.exp(-2.0)))
    assert moco_loss(q, k, queue, 0.5).item() == pytest.approx(expected, abs=1e-6)
    # a per-query extra negative h = (0.8, 0.6): one more logit 0.8 / 0.5 = 1.6 in the denominator
    extra = torch.tensor([[[0.8, 0.6]]])
    with_extra = -math.log(math.exp(1.2) / (math.exp(1.2) + 1.0 + math.exp(-2.0) + math.exp(1.6)))
    assert moco_loss(q, k, queue, 0.5, extra).item() == pytest.approx(with_extra, abs=1e-6)


def test_infonce_matches_the_authors_formula():
    # facebookresearch/moco moco/builder.py: l_pos = einsum("nc,nc->n") [N, 1], l_neg = einsum("nc,ck->nk") with the
    # queue stored [C, K], logits = cat / T, labels zeros, CrossEntropyLoss in main_moco.py
    g = torch.Generator().manual_seed(0)
    q, k = F.normalize(torch.randn(6, 4, generator=g), dim=1), F.normalize(torch.randn(6, 4, generator=g), dim=1)
    queue_ck = F.normalize(torch.randn(4, 10, generator=g), dim=0)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue_ck)
    logits = torch.cat([l_pos, l_neg], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(moco_logits(q, k, queue_ck.T, 0.2), logits)
    torch.testing.assert_close(moco_loss(q, k, queue_ck.T, 0.2), expected)


def test_enqueue_replaces_the_oldest_keys_and_wraps_around():
    queue, pointer = torch.zeros(5, 2), torch.tensor([3])
    keys = torch.arange(8.0).view(4, 2)
    enqueue_(queue, pointer, keys)  # rows 3, 4, 0, 1
    torch.testing.assert_close(queue, torch.tensor([[4.0, 5], [6, 7], [0, 0], [0, 1], [2, 3]]))
    assert pointer.tolist() == [2]
    enqueue_(queue, pointer, torch.full((3, 2), -1.0))  # rows 2, 3, 4: back to the start
    assert queue[2:].eq(-1).all() and queue[0, 0] == 4.0 and pointer.tolist() == [0]
    with pytest.raises(ValueError, match="at least the global batch"):
        enqueue_(queue, pointer, torch.zeros(6, 2))


def test_mochi_hardest_keys_and_mixed_negatives_on_a_hand_built_queue():
    queue = torch.stack([E[0], E[1], E[2], -E[0]])
    q = torch.tensor([[0.8, 0.6, 0.0]])  # similarities 0.8, 0.6, 0, -0.8: the two hardest are e1 then e2
    torch.testing.assert_close(hardest_negatives(q, queue, 2), torch.stack([E[0], E[1]]).unsqueeze(0))
    h = mochi_negatives(q, queue, 2, 3, 2, torch.Generator().manual_seed(7))
    # the same draws, in the documented order: first key, offset to a different key, alpha, picked key, beta
    g = torch.Generator().manual_seed(7)
    first = torch.randint(2, (1, 3), generator=g)[0]
    second = (first + torch.randint(1, 2, (1, 3), generator=g)[0]) % 2
    alpha = torch.rand(1, 3, 1, generator=g)[0, :, 0]
    picked = torch.randint(2, (1, 2), generator=g)[0]
    beta = 0.5 * torch.rand(1, 2, 1, generator=g)[0, :, 0]
    assert (first != second).all()
    for s in range(3):  # alpha e_a + (1 - alpha) e_b, normalised: (a, b) = (alpha, 1 - alpha) / norm
        raw = alpha[s] * E[first[s]] + (1 - alpha[s]) * E[second[s]]
        torch.testing.assert_close(h[0, s], raw / raw.norm())
    for s in range(2):  # beta q + (1 - beta) e_c, beta < 0.5
        raw = beta[s] * q[0] + (1 - beta[s]) * E[picked[s]]
        torch.testing.assert_close(h[0, 3 + s], raw / raw.norm())
    assert (beta < 0.5).all() and h[..., 2].eq(0).all()  # never e3 nor -e1: only the two hardest were mixed
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(1, 5))


def test_mochi_pairs_two_different_keys():
    # the three hardest keys are e1, e2, e3 (the others point away from q): a mixture of two different ones has
    # exactly two non-zero coordinates, a key mixed with itself would have one
    queue = torch.cat([torch.eye(4)[:3], -torch.eye(4)])
    q = F.normalize(torch.tensor([[1.0, 1.0, 1.0, -0.5]]), dim=1)
    h = mochi_negatives(q, queue, 3, 300, 0, torch.Generator().manual_seed(1))
    assert h.ne(0).sum(dim=-1).eq(2).all()


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def test_momentum_update_is_the_ema_of_the_query_encoder():
    model = MoCo(MLP(6, 4, hidden=(5,)), 4, dim=3, queue_size=8, momentum=0.9)
    for key, query in zip(
        model.key_encoder.parameters(), [*model.backbone.parameters(), *model.head.parameters()], strict=True
    ):
        assert torch.equal(key, query) and not key.requires_grad
    key_before = [p.clone() for p in model.key_encoder.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.momentum_update()
    query = [*model.backbone.parameters(), *model.head.parameters()]
    for before, after, now in zip(key_before, model.key_encoder.parameters(), query, strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * now)


@pytest.mark.parametrize("mochi", [None, 4])
def test_module_step_equals_a_recomputation(mochi):
    # one step: the logged InfoNCE loss equals the formula on the initial weights with the same draws (key encoder =
    # query encoder at step 0, the initial random queue, MoCHi's negatives from the view generator after the views),
    # and the batch's keys then sit in the queue's first rows
    pl.seed_everything(0)
    model = MoCo(MLP(64, 16, hidden=(16,)), 16, dim=8, queue_size=48, temperature=0.2, mochi=mochi, mochi_s1=6,
                 mochi_s2=3, augment=_noise, seed=5)  # fmt: skip
    start = copy.deepcopy(model)
    x = torch.randn(16, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)), 16)
    trainer = _trainer(max_steps=1, log_every_n_steps=1)
    trainer.fit(model, loader)
    g = torch.Generator().manual_seed(5)
    view_q, view_k = _noise(x, g), _noise(x, g)
    with torch.no_grad():
        q = F.normalize(start.head(start(view_q)), dim=1)
        k = F.normalize(start.head(start(view_k)), dim=1)
        extra = None if mochi is None else mochi_negatives(q, start.queue, mochi, 6, 3, g)
        expected = moco_loss(q, k, start.queue, 0.2, extra)
    assert trainer.callback_metrics["train/infonce_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(model.queue[:16], k)
    torch.testing.assert_close(model.queue[16:], start.queue[16:], atol=0, rtol=0)
    assert model.queue_pointer.tolist() == [16]
    if mochi is not None:  # the synthetic negatives raised the loss
        assert expected.item() > moco_loss(q, k, start.queue, 0.2).item()


def test_real_fit_learns_features_a_probe_can_read():
    pl.seed_everything(0)
    model = MoCo(MLP(64, 32, hidden=(64,)), 32, dim=32, queue_size=512, momentum=0.99, mochi=32, mochi_s1=32,
                 mochi_s2=8, mochi_start=5, num_classes=10)  # fmt: skip
    trainer = _trainer(max_epochs=3, log_every_n_steps=5)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/infonce_loss"]) and metrics["train/probe_loss"] > 0
    assert metrics["val/probe_acc"] > 0.3  # chance is 0.1
    assert model.queue_pointer.item() == 3 * len(trainer.train_dataloader.dataset) % 512  # every key enqueued
    assert {"queue", "queue_pointer", "key_encoder.1.2.weight"} <= set(model.state_dict())
    assert model.predict_step(torch.randn(3, 64), 0).shape == (3, 32)


def test_a_queue_smaller_than_the_batch_is_refused():
    model = MoCo(MLP(64, 16, hidden=(8,)), 16, dim=4, queue_size=4, augment=lambda x, g: x)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 64), torch.zeros(8, dtype=torch.long)), 8
    )
    with pytest.raises(ValueError, match="queue_size"):
        _trainer(max_steps=1).fit(model, loader)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(backbone="mlp"), TypeError, "backbone"),
        (dict(feature_dim=0), ValueError, "feature_dim"),
        (dict(dim=0), ValueError, "dim"),
        (dict(mlp="yes"), TypeError, "mlp"),
        (dict(queue_size=0), ValueError, "queue_size"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(mochi=1), ValueError, "mochi"),
        (dict(mochi=64), ValueError, "mochi"),
        (dict(mochi=4, mochi_s1=-1), ValueError, "mochi_s1"),
        (dict(mochi=4, mochi_s2=2.5), TypeError, "mochi_s2"),
        (dict(mochi=4, mochi_s1=0, mochi_s2=0), ValueError, "mochi_s1"),
        (dict(mochi_start=-1), ValueError, "mochi_start"),
        (dict(augment="flip"), TypeError, "augment"),
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(probe_lr=0.0), ValueError, "probe_lr"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(backbone=MLP(64, 16, hidden=(8,)), feature_dim=16, queue_size=32) | kwargs
    with pytest.raises(error, match=match):
        MoCo(**args)
