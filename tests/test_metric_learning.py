"""Metric learning and Metrix: losses and Recall@K by hand, Metrix pairs and labels, a real fit, resume, errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lit_tricks.data.unseen_classes import UnseenClassesDataModule
from lit_tricks.functional.metric_losses import contrastive_loss, multi_similarity_loss, multi_similarity_mining
from lit_tricks.functional.metrix import (
    metrix_pairs,
    mix_pairs,
    mixed_contrastive_loss,
    mixed_multi_similarity_loss,
    pair_labels,
)
from lit_tricks.metrics.retrieval import RecallAtK, recall_at_k
from lit_tricks.modules.metric_learning import MetricLearner
from lit_tricks.nets import MLP


def _unit(*angles_deg: float) -> torch.Tensor:
    a = torch.tensor(angles_deg) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_contrastive_by_hand():
    e = _unit(0, 20, 90, 100, 180)  # labels 0 0 1 1 0
    labels = torch.tensor([0, 0, 1, 1, 0])
    d = lambda i, j: 2 * math.sin(math.radians(abs([0, 20, 90, 100, 180][i] - [0, 20, 90, 100, 180][j])) / 2)  # noqa: E731
    pos = [d(0, 1), d(0, 4), d(1, 4), d(2, 3)]  # all > 0: averaged (each ordered pair twice: same mean)
    neg = [0.5 - d(i, j) for i in (0, 1, 4) for j in (2, 3)]
    neg = [v for v in neg if v > 0]  # every negative distance here is > 0.5: no negative term
    expected = sum(pos) / len(pos) + (sum(neg) / len(neg) if neg else 0.0)
    assert contrastive_loss(e, labels).item() == pytest.approx(expected, abs=1e-6)
    # a negative within the margin counts, averaged over the non-zero ones only
    e2 = _unit(0, 10, 80)
    got = contrastive_loss(e2, torch.tensor([0, 1, 1]), neg_margin=0.5)
    d01 = 2 * math.sin(math.radians(5))
    assert got.item() == pytest.approx(2 * math.sin(math.radians(35)) + (0.5 - d01), abs=1e-6)


def test_multi_similarity_by_hand():
    e = _unit(0, 30, 40, 90)
    labels = torch.tensor([0, 0, 1, 1])
    s = (e @ e.T).tolist()
    pos, neg = multi_similarity_mining(e @ e.T, labels, epsilon=0.1)
    # anchor 0: positive 1 (s=.866), negatives 2 (.766, kept: .866 > .866-.1) and 3 (0, dropped)
    assert pos[0].tolist() == [False, True, False, False] and neg[0].tolist() == [False, False, True, False]
    alpha, beta, base = 2.0, 50.0, 0.5
    total = 0.0
    for a in range(4):
        ps = [s[a][j] for j in range(4) if pos[a, j]]
        ns = [s[a][j] for j in range(4) if neg[a, j]]
        total += math.log1p(sum(math.exp(-alpha * (v - base)) for v in ps)) / alpha
        total += math.log1p(sum(math.exp(beta * (v - base)) for v in ns)) / beta
    assert multi_similarity_loss(e, labels).item() == pytest.approx(total / 4, rel=1e-5)
    assert pos.sum() > 0 and neg.sum() > 0


def test_recall_at_k_by_hand_and_metric_gathers_batches():
    e = _unit(0, 10, 50, 60, 120, 170)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    # nearest others: 0->1 (miss), 1->0 (miss), 2->3 (miss), 3->2 (miss), 4->5 (hit, 50 deg vs 60), 5->4 (hit)
    # second: 0->2 (hit), 1->2 (miss: 40 deg vs 3 at 50), 2->1 (miss), 3->1 (hit)
    r = recall_at_k(e, labels, ks=(1, 2))
    assert r.tolist() == pytest.approx([2 / 6, 4 / 6])
    metric = RecallAtK(ks=(1, 2))
    metric.update(e[:4], labels[:4])
    metric.update(e[4:], labels[4:])
    out = metric.compute()
    assert float(out["recall@1"]) == pytest.approx(2 / 6) and float(out["recall@2"]) == pytest.approx(4 / 6)


def test_metrix_pairs_and_labels_by_hand():
    labels = torch.tensor([0, 0, 1, 2])
    anchor, first, second = metrix_pairs(labels, np.random.default_rng(0))
    # anchors 0, 1 mix their only positive (1, 0) with each negative; 2 and 3 have none and mix themselves
    assert anchor.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert first.tolist() == [1, 1, 0, 0, 2, 2, 2, 3, 3, 3]
    assert second.tolist() == [2, 3, 2, 3, 0, 1, 3, 0, 1, 2]
    lam = torch.tensor([0.7], dtype=torch.float64)
    y = pair_labels(labels[anchor], labels[first], labels[second], lam)
    assert y.tolist() == pytest.approx([0.7] * 10)  # a positive (or the anchor) mixed with a negative
    assert pair_labels(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor(0.7)).item() == (
        pytest.approx(0.3)
    )
    # top_k: only the most similar negative of each anchor
    sim = torch.tensor([[1, 0.9, 0.2, 0.5], [0.9, 1, 0.6, 0.1], [0.2, 0.6, 1, 0.0], [0.5, 0.1, 0.0, 1.0]])
    anchor, _, second = metrix_pairs(labels, np.random.default_rng(0), sim, top_k=1)
    assert anchor.tolist() == [0, 1, 2, 3] and second.tolist() == [3, 2, 1, 0]
    mixed = mix_pairs(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), lam)
    assert mixed[0].tolist() == pytest.approx([0.7, 0.3])


def test_mixed_losses_by_hand():
    a, m = _unit(0, 0), _unit(60, 10)  # distances 1.0 and 2 sin 5 deg = 0.1743
    y = torch.tensor([0.7, 0.7])
    # positive: 0.7 * d for both (non-zero); negative: 0.3 * (0.5 - d) only for the close one
    expected = 0.7 * (1.0 + 2 * math.sin(math.radians(5))) / 2 + 0.3 * (0.5 - 2 * math.sin(math.radians(5)))
    assert mixed_contrastive_loss(a, m, y).item() == pytest.approx(expected, abs=1e-6)
    s = torch.tensor([0.9, 0.2])
    got = mixed_multi_similarity_loss(torch.tensor([0, 0]), s, y, num_anchors=3)
    pos = math.log1p(0.7 * (math.exp(-2 * 0.4) + math.exp(-2 * -0.3))) / 2
    neg = math.log1p(0.3 * (math.exp(50 * 0.4) + math.exp(50 * -0.3))) / 50
    assert got.item() == pytest.approx((pos + neg) / 3, rel=1e-5)


def _fit(model, max_steps=None, epochs=1, **kwargs):
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps or -1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model, UnseenClassesDataModule(train_classes=5, batch_size=64))
    return trainer


@pytest.mark.parametrize(
    ("loss", "metrix"), [("contrastive", "input"), ("multi_similarity", "feature"), ("contrastive", "embedding")]
)
def test_real_fit_learns_unseen_classes(loss, metrix):
    pl.seed_everything(0)
    model = MetricLearner(MLP(64, 32, hidden=(64,)), 32, loss=loss, metrix=metrix, metrix_top_k=1)
    trainer = _fit(model, epochs=2)
    assert trainer.callback_metrics["val/recall@1"] > 0.8
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_metrix_generator_state_is_restored(tmp_path):
    pl.seed_everything(0)
    model = MetricLearner(MLP(64, 16, hidden=(32,)), 16, metrix="embedding")
    trainer = _fit(model, max_steps=3)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = model._rng.bit_generator.state
    model._rng.random(10)  # move on, then restore
    restored = MetricLearner(MLP(64, 16, hidden=(32,)), 16, metrix="embedding")
    restored.on_load_checkpoint(torch.load(path, weights_only=False))
    assert restored._rng.bit_generator.state == saved


def test_bad_input():
    net = MLP(64, 16, hidden=(32,))
    with pytest.raises(ValueError, match="loss must be"):
        MetricLearner(net, 16, loss="triplet")
    with pytest.raises(ValueError, match="metrix must be"):
        MetricLearner(net, 16, metrix="cutmix")
    with pytest.raises(ValueError, match="forward_features"):
        MetricLearner(torch.nn.Linear(64, 16), 16, metrix="feature")
    with pytest.raises(ValueError, match="neg_margin"):
        MetricLearner(net, 16, pos_margin=0.5, neg_margin=0.2)
    with pytest.raises(TypeError, match="metrix_top_k"):
        MetricLearner(net, 16, metrix_top_k=1.5)
    with pytest.raises(ValueError, match="ks must be"):
        RecallAtK(ks=(0, 1))
    with pytest.raises(ValueError, match="train_classes"):
        UnseenClassesDataModule(train_classes=10)
    with pytest.raises(ValueError, match="embedding_dim"):
        MetricLearner(MLP(64, 8, hidden=(32,)), 16)(torch.zeros(2, 64))
