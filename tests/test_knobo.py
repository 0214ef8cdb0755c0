import math
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from lit_tricks.data import ArrayDataModule
from lit_tricks.data.confounded_digits import confounded_digits
from lit_tricks.functional.knobo import knobo_ground_concepts, knobo_prior_loss, knobo_prior_matrix
from lit_tricks.modules.concept_bottleneck.knobo import KnoBo


def test_prior_matrix_and_loss_by_hand():
    prior = knobo_prior_matrix([["yes", "no", "unknown"], ["no", "no", "yes"]])
    assert prior.tolist() == [[1.0, -1.0, 0.0], [-1.0, -1.0, 1.0]]
    w = torch.tensor([[0.5, 0.0, -1.0], [2.0, -0.3, 0.0]])
    t = [math.tanh(v) for v in w.flatten().tolist()]
    want = (abs(t[0] - 1) + abs(t[1] + 1) + abs(t[2]) + abs(t[3] + 1) + abs(t[4] + 1) + abs(t[5] - 1)) / 6
    assert knobo_prior_loss(w, prior).item() == pytest.approx(want, rel=1e-6)
    # a head that follows the prior exactly (tanh -> +-1, 0) costs nothing
    assert knobo_prior_loss(torch.tensor([[50.0, -50.0, 0.0]]), prior[:1]).item() == pytest.approx(0.0, abs=1e-6)


def test_grounding_skips_unknown_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    labels = torch.stack([(x[:, 0] > 0).long(), (x[:, 1] > 0).long()], dim=1)
    labels[:100, 1] = -1  # unknown for half the images; wrong labels there would not change a thing
    w, b = knobo_ground_concepts(x, labels)
    probs = torch.sigmoid(x @ w.T + b)
    assert ((probs > 0.5).long() == torch.stack([x[:, 0] > 0, x[:, 1] > 0], 1).long()).float().mean() > 0.95
    # each concept's weight points along its own feature
    assert w.abs().argmax(dim=1).tolist() == [0, 1]


def test_concept_scores_and_loss_by_hand():
    prior = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    # grounded: sigmoid(w . x_normalised + b)
    model = KnoBo(prior, concept_weights=torch.tensor([[1.0, 0.0], [0.0, 2.0]]), concept_bias=torch.tensor([0.0, -1]))
    s = model.concepts(torch.tensor([[3.0, 4.0]]))
    assert s.flatten().tolist() == pytest.approx([1 / (1 + math.exp(-0.6)), 1 / (1 + math.exp(-0.6))], rel=1e-6)
    # statements' text embeddings: cosine-like dot products, no sigmoid; no normalisation when asked
    text = KnoBo(prior, concept_embeddings=torch.tensor([[2.0, 0.0], [0.0, 1.0]]), normalize=False)
    assert text.concepts(torch.tensor([[3.0, 4.0]])).tolist() == [[3.0, 4.0]]
    batch = {"inputs": torch.randn(5, 2), "targets": torch.tensor([0, 1, 1, 0, 1])}
    model.prior_weight = 2.0
    model.log_dict = lambda *a, **k: None
    want = F.cross_entropy(model(batch["inputs"]), batch["targets"]) + 2.0 * knobo_prior_loss(model.head.weight, prior)
    assert model.training_step(batch, 0).item() == pytest.approx(want.item())
    assert model.head.bias is not None  # the code's nn.Linear keeps its bias


def test_confounded_digits_flip():
    data = confounded_digits(1, correlation=0.9)
    marked = {name: getattr(data, f"{name}_x")[:, 0] == 1.0 for name in ("train", "val", "test")}
    round_train = marked["train"][data.train_y == 0].float().mean().item()
    round_test = marked["test"][data.test_y == 0].float().mean().item()
    assert round_train > 0.8 and round_test < 0.2  # the marker goes with the round class, then against it
    assert data.corpus_concepts.shape == (len(data.corpus_x), 6) and data.prior.shape == (2, 6)


def test_real_fit_knobo_survives_the_flip(quiet_trainer_kwargs):
    data = confounded_digits(0)

    class Task(ArrayDataModule):
        num_classes = 2

        def load_arrays(self):
            return data.train_x, data.train_y, data.val_x, data.val_y

    pl.seed_everything(0, verbose=False)
    model = KnoBo.from_concept_labels(data.corpus_x, data.corpus_concepts, data.prior, lr=1e-2)
    before = model.head.weight.detach().clone()
    pl.Trainer(max_epochs=10, **quiet_trainer_kwargs).fit(model, Task(batch_size=64, val_fraction=0.0))
    assert not torch.equal(before, model.head.weight)
    with torch.no_grad():
        shifted = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
        in_domain = (model(data.val_x).argmax(1) == data.val_y).float().mean().item()
    assert in_domain > 0.8 and shifted > 0.8  # a linear probe: ~0.4 shifted (below)
    # the head leans where the prior says: "curved bottom" (+1 round, -1 angular)
    assert model.head.weight[0, 3] > model.head.weight[1, 3]


def test_evidence_script_linear_probe_falls_for_the_marker():
    sys.path.insert(0, str(ROOT / "examples"))
    from knobo_domain_shift import run

    r = run(seed=0, epochs=40)
    assert r["linear_in"] > 0.9 and r["linear_shift"] < 0.6  # the probe learned the marker
    assert r["knobo_shift"] > r["linear_shift"] + 0.3


def test_bad_input():
    prior = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="answers must be 'yes', 'no' or 'unknown'"):
        knobo_prior_matrix([["yes", "maybe"]])
    with pytest.raises(ValueError, match="row 1 has 1 answers"):
        knobo_prior_matrix([["yes", "no"], ["yes"]])
    with pytest.raises(ValueError, match="prior must have the head's shape"):
        knobo_prior_loss(torch.zeros(2, 3), prior)
    with pytest.raises(ValueError, match="pass exactly one of concept_weights"):
        KnoBo(prior)
    with pytest.raises(ValueError, match="pass exactly one of concept_weights"):
        KnoBo(prior, concept_weights=torch.eye(2), concept_embeddings=torch.eye(2))
    with pytest.raises(ValueError, match="the prior has K = 2 concepts"):
        KnoBo(prior, concept_embeddings=torch.eye(3))
    with pytest.raises(ValueError, match="concept_embeddings must be \\[M, D\\] with M >= 1 concepts"):
        KnoBo(prior, concept_embeddings=torch.zeros(0, 3))
    with pytest.raises(ValueError, match="prior entries must lie in"):
        KnoBo(prior * 2, concept_embeddings=torch.eye(2))
    with pytest.raises(ValueError, match="prior_weight must be"):
        KnoBo(prior, concept_embeddings=torch.eye(2), prior_weight=-1.0)
    with pytest.raises(ValueError, match="concept_bias must be"):
        KnoBo(prior, concept_weights=torch.eye(2), concept_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="do not match the concepts' size"):
        KnoBo(prior, concept_embeddings=torch.eye(2))(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="concept 0 needs known positive"):
        knobo_ground_concepts(torch.randn(4, 2), torch.tensor([[1], [1], [-1], [-1]]))
    with pytest.raises(ValueError, match="must have the same N"):
        knobo_ground_concepts(torch.randn(4, 2), torch.ones(3, 1))
    with pytest.raises(ValueError, match="correlation must be in"):
        confounded_digits(correlation=1.5)
