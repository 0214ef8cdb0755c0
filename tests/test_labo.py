import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks.data import ArrayDataModule
from lit_tricks.functional.labo import (
    labo_class_name_prior,
    labo_class_similarity,
    labo_discriminability,
    labo_init_weights,
    labo_select,
)
from lit_tricks.modules.concept_bottleneck.labo import LaBo


def test_discriminability_by_hand():
    # Sim = [[1, 0.1], [1, 1]]; column sums 2, 1.1; joint = Sim / (2 * sums) = [[1/4, 1/22], [1/4, 5/11]]
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # class 1's mean image is (0, 2): Sim halves it back
    t = torch.tensor([[1.0, 0.05], [1.0, 0.5]])
    labels = torch.tensor([0, 1, 1])
    assert labo_class_similarity(x, labels, t, 2).tolist() == [[1.0, pytest.approx(0.1)], [1.0, 1.0]]
    j = [[1 / 4, 1 / 22], [1 / 4, 5 / 11]]
    want = [sum(p * math.log(p / (sum(row) / 2)) for p in row) for row in j]
    assert labo_discriminability(x, labels, t, 2).tolist() == pytest.approx(want, rel=1e-5)
    assert want[0] > want[1]  # concept 0 points at class 0 only: the more discriminative one
    # a concept equally similar to every class carries no information
    assert labo_discriminability(x, labels, torch.tensor([[1.0, 0.5]]), 2).abs().item() < 1e-7


def _one_class(t):
    # one class whose images give every candidate a positive similarity; D = 0 for all
    return torch.ones(1, t.shape[1]), torch.tensor([0]), torch.zeros(len(t), dtype=torch.long)


def test_greedy_coverage_by_hand_cosine_and_released():
    # t0 = t1 (duplicates), t2 orthogonal, t3 = (1, 1, 1)/sqrt(3) after normalising
    t = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0.5]])
    x, y, cls = _one_class(t)
    c = 1 / math.sqrt(3)
    # cosine facility location, first gains: t0, t1: 1 + 1 + 0 + c; t2: 1 + c; t3: 3c + 1 -> t3;
    # then the rows' best are (c, c, c, 1): t0, t1 gain 2 (1 - c), t2 gain (1 - c) -> t0 (first of the tie);
    # then t1 gains 0, t2 gains 1 - c -> t2
    assert 3 * c + 1 > 2 + c
    assert labo_select(x, y, t, cls, 1, k=3, coverage_weight=1.0).tolist() == [3, 0, 2]
    # released (apricot 0.6.1): rows a = [alpha D, t] = [0, t] read as similarities; first gains 1, 1, 1, 1.5 -> t3;
    # then the columns' best are (0, .5, .5, .5): t0, t1, t2 gain .5 -> t0; then t1 gains 0, t2 .5 -> t2
    assert labo_select(x, y, t, cls, 1, k=3, coverage="released").tolist() == [3, 0, 2]
    # the released coverage counts feature values, not concepts: a long vector wins; under cosine 5 t0 is one more
    # copy of t0's direction, whose three copies now outweigh t3 (gains 3 + c against 1 + 4c): the first, t0
    big = torch.cat([t, 5 * t[:1]])
    x, y, cls = _one_class(big)
    assert labo_select(x, y, big, cls, 1, k=1, coverage="released").tolist() == [4]
    assert 3 + c > 1 + 4 * c and labo_select(x, y, big, cls, 1, k=1, coverage="cosine").tolist() == [0]


def test_discriminability_and_coverage_trade_off():
    # class 0 has 4 candidates: two near-duplicates pointing at class 0 (most discriminative), one less
    # discriminative but different, one generic; class 1 has one candidate (taken as is with strict=False)
    x = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1]])
    y = torch.tensor([0, 1])
    t = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.1, 0.01], [0.6, 0.2, 1.0], [0.5, 0.5, 0.5], [0.1, 1.0, 0.0]])
    cls = torch.tensor([0, 0, 0, 0, 1])
    d = labo_discriminability(x, y, t, 2)
    assert d[0] > d[2] and d[1] > d[2] and d[0] > d[3]
    # discriminability alone ranks by D: the duplicates first
    only_d = labo_select(x, y, t, cls, 2, k=2, coverage_weight=0.0, strict=False)
    assert only_d.tolist() == [0, 1, 4]
    # reference greedy with the paper's weights on the cosine facility location, by loops
    # (with the paper's alpha = 1e7, D differences of ~0.02 here outweigh any coverage gain (<= 4) unless beta is
    # large: beta = 5e5 makes the generic candidate 3 beat the duplicate 0 for the second place)
    alpha, beta = 1e7, 5e5
    tn = torch.nn.functional.normalize(t[:4], dim=1)
    sim = (tn @ tn.T).tolist()
    chosen, best = [], [0.0] * 4
    for _ in range(2):
        gains = [
            -math.inf
            if c in chosen
            else alpha * d[c].item() + beta * sum(max(sim[c][r] - best[r], 0.0) for r in range(4))
            for c in range(4)
        ]
        pick = gains.index(max(gains))
        chosen.append(pick)
        best = [max(b, sim[pick][r]) for r, b in enumerate(best)]
    mixed = labo_select(x, y, t, cls, 2, k=2, coverage_weight=beta, strict=False)
    assert mixed.tolist() == chosen + [4] == [1, 3, 4]
    assert labo_select(x, y, t, cls, 2, k=2, coverage_weight=1.0, strict=False).tolist() == only_d.tolist()


def test_init_weights_by_hand():
    assert labo_init_weights(torch.tensor([1, 0, 1, 2]), 3, value=2.0).tolist() == [
        [0.0, 2.0, 0.0, 0.0],
        [2.0, 0.0, 2.0, 0.0],
        [0.0, 0.0, 0.0, 2.0],
    ]
    # class names at (1, 0) and (0, 1); concept distances 1.0 / 0.1 / 0.5 and 0.0 / 1.35 / 1.12 -> nearest two
    names = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    concepts = torch.tensor([[1.0, 1.0], [1.0, 0.1], [0.5, 0.0]])
    assert labo_class_name_prior(names, concepts, 2).tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]


def test_bad_input():
    x, y = torch.rand(4, 3) + 0.1, torch.tensor([0, 0, 1, 1])
    t, cls = torch.rand(4, 3) + 0.1, torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="do not match concept_embeddings"):
        labo_select(torch.rand(4, 5), y, t, cls, 2, k=1)
    with pytest.raises(ValueError, match="non-empty candidate list"):
        labo_select(x, y, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2, k=1)
    with pytest.raises(ValueError, match="k=3 is larger than the candidates"):
        labo_select(x, y, t, cls, 2, k=3)
    with pytest.raises(ValueError, match="k \\(concepts per class\\) must be >= 1"):
        labo_select(x, y, t, cls, 2, k=0)
    with pytest.raises(ValueError, match="at least one image"):
        labo_select(x, torch.zeros(4, dtype=torch.long), t, cls, 2, k=1)
    with pytest.raises(ValueError, match="must be positive"):
        labo_discriminability(x, y, -t, 2)
    with pytest.raises(ValueError, match="coverage must be"):
        labo_select(x, y, t, cls, 2, k=1, coverage="euclidean")
    with pytest.raises(ValueError, match="concept_classes must be"):
        labo_select(x, y, t, cls[:3], 2, k=1)
    with pytest.raises(ValueError, match="concept_classes must lie"):
        labo_init_weights(torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match="init_weights must be"):
        LaBo(t, cls, 2, init_weights=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="activation must be"):
        LaBo(t, cls, 2, activation="sigmoid")
    with pytest.raises(ValueError, match="lr must be"):
        LaBo(t, cls, 2, lr=0.0)
    with pytest.raises(ValueError, match="the image encoder must output"):
        LaBo(t, cls, 2)(torch.rand(2, 5))


def _toy_space(seed=0, n=60):
    """Three classes in a unit-norm 'vision-language' space: images scattered around their class prototype; per
    class four candidates: two near the prototype (near-duplicates), one generic (the mean prototype), one random."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.ones(3, 12) + torch.eye(3, 12) + 0.2 * torch.rand(3, 12, generator=g)
    y = torch.arange(3).repeat_interleave(n)
    x = torch.nn.functional.normalize(proto[y] + 0.5 * torch.randn(3 * n, 12, generator=g), dim=1)
    cands, cls = [], []
    for c in range(3):
        near = proto[c] + 0.05 * torch.randn(12, generator=g)
        cands += [near, near + 0.01, proto.mean(0), torch.rand(12, generator=g) + 0.5]
        cls += [c] * 4
    return x, y, torch.nn.functional.normalize(torch.stack(cands), dim=1), torch.tensor(cls)


def test_real_fit_selects_and_trains(quiet_trainer_kwargs):
    x, y, cands, cls = _toy_space()
    model = LaBo.from_candidates(x, y, cands, cls, 3, k=2)
    # the discriminative pair of each class, not the generic or the random candidate
    assert model.selected.tolist() == [0, 1, 4, 5, 8, 9] and model.concept_classes.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(model.weights.detach(), labo_init_weights(model.concept_classes, 3))

    class Embeddings(ArrayDataModule):
        num_classes = 3

        def load_arrays(self):
            return x[::2], y[::2], x[1::2], y[1::2]

    def accuracy(m):
        with torch.no_grad():
            return (m(x[1::2]).argmax(-1) == y[1::2]).float().mean().item()

    prior_acc = accuracy(model)
    assert prior_acc > 0.8  # the language prior alone classifies
    # from a wrong prior (each class given the next class's concepts), training the class-concept matrix recovers
    wrong = labo_init_weights((model.concept_classes + 1) % 3, 3)
    trained = LaBo(model.concepts, model.concept_classes, 3, init_weights=wrong, lr=0.1)
    assert accuracy(trained) < 0.2
    pl.seed_everything(0, verbose=False)
    data = Embeddings(batch_size=30, val_fraction=0.0)
    pl.Trainer(max_epochs=10, limit_val_batches=0, **quiet_trainer_kwargs).fit(trained, data)
    assert accuracy(trained) > prior_acc - 0.05
    assert (trained.class_concept_weights().argmax(1) // 2).tolist() == [0, 1, 2]  # each class's own concepts now
