"""ECBM: the energies, losses, inference step and interpretations by hand; a real fit on XOR; interventions."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks.data import ConceptToyDataModule
from lit_tricks.functional import ecbm as ef
from lit_tricks.modules.concept_bottleneck.ecbm import ECBM


def small(**kwargs) -> ECBM:
    defaults = dict(n_concepts=2, n_tasks=2, feature_dim=3, hidden_dim=4)
    return ECBM(nn.Identity(), **{**defaults, **kwargs})


# ---------------------------------------------------------------- functions
def test_gated_energy_and_boltzmann_nll_by_hand():
    h, u = torch.tensor([2.0, -1.0, 3.0]), torch.tensor([0.5, 2.0, -1.0])
    # ReLU(h + h*u) = ReLU([3, -3, 0]) = [3, 0, 0]
    assert ef.gated_energy(h, u, torch.tensor([2.0, 5.0, 7.0]), torch.tensor(-1.0)).item() == 5.0
    nll = ef.boltzmann_nll(torch.tensor([[1.0, 2.0], [0.0, math.log(3)]]), torch.tensor([0, 1]))
    assert torch.allclose(nll, torch.tensor([math.log(1 + math.exp(-1)), math.log(3) + math.log(4 / 3)]))


def test_ecbm_loss_by_hand():
    e_xy, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    e_xc, c = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]]), torch.tensor([[1.0, 0.0]])
    e_cy = torch.tensor([[2.0, 1.0]])
    total, l_xy, l_xc, l_cy = ef.ecbm_loss(e_xy, e_xc, e_cy, y, c, (3.0, 1.0, 1.0))
    assert l_xy.item() == pytest.approx(0.313262, abs=1e-6)
    assert l_xc.item() == pytest.approx(math.log(2) + math.log(4 / 3), abs=1e-6)  # summed over the two concepts
    assert l_cy.item() == pytest.approx(1.313262, abs=1e-6)
    assert total.item() == pytest.approx(3 * 0.313262 + 0.980829 + 1.313262, abs=1e-5)


def test_inference_energy_and_flips():
    e_xy, e_xc, e_cy = torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([4.0, 6.0])
    energy = ef.inference_energy(e_xy, e_xc, e_cy, (2.0, 1.0, 0.5))
    assert energy.item() == pytest.approx(2 * 2 + (2 + 3) + 0.5 * 5)
    c = torch.zeros(10, 5)
    flipped = ef.flip_concepts(c, 0.2, 0.25, torch.Generator().manual_seed(0))
    rows, cols = flipped.any(dim=1), flipped.any(dim=0)
    assert rows.sum() == 3 and cols.sum() == 1  # ceil(0.25 * 10) samples, ceil(0.2 * 5) concepts
    assert flipped[rows].sum() == 3 and (flipped[rows][:, cols] == 1).all()  # the same concept in every flipped row
    assert torch.equal(ef.flip_concepts(c, 0.0, 0.5), c)


def test_interpretations_by_hand():
    states = ef.concept_states(2)
    assert states.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    energy = torch.zeros(4, 2)
    energy[3, 1] = math.log(3)  # p(y | c = 11) = (3/4, 1/4), uniform otherwise
    joint = ef.concept_class_joint(energy, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert torch.allclose(joint[3], torch.tensor([0.3, 0.1])) and torch.allclose(joint[0], torch.tensor([0.05, 0.05]))
    given_class = ef.concept_given_class(joint, states)  # [M, k]
    assert torch.allclose(given_class, torch.tensor([[0.4 / 0.6, 0.45 / 0.6], [0.2 / 0.4, 0.25 / 0.4]]))
    given_concept = ef.concept_given_concept(joint, states)  # [k, k']
    assert torch.allclose(given_concept, torch.tensor([[1.0, 0.4 / 0.7], [0.4 / 0.6, 1.0]]))
    prior = ef.state_prior(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert prior.tolist() == [0.25, 0.0, 0.25, 0.5]
    with pytest.raises(ValueError, match="n_concepts"):
        ef.concept_states(21)


# ---------------------------------------------------------------- the module
def test_relaxed_energies_at_one_hot_equal_the_training_energies():
    torch.manual_seed(0)
    model = small(n_concepts=3, n_tasks=4).eval()
    h_xy, h_xc = model.features(torch.randn(5, 3))
    y, c = torch.tensor([0, 3, 1, 2, 2]), torch.tensor([[0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 0]])
    one_hot_y, one_hot_c = nn.functional.one_hot(y, 4).float(), nn.functional.one_hot(c, 2).float()
    rows = torch.arange(5)
    assert torch.allclose(model.class_energy(h_xy, one_hot_y), model.class_energy(h_xy)[rows, y], atol=1e-6)
    every = model.concept_energy(h_xc)  # [N, k, 2]
    assert torch.allclose(model.concept_energy(h_xc, one_hot_c), every.gather(2, c[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(model.global_energy(one_hot_c, one_hot_y), model.global_energy(one_hot_c)[rows, y], atol=1e-6)


def test_one_inference_step_is_one_adam_step_on_the_weighted_energy():
    torch.manual_seed(0)
    model = small(max_steps=1, inference_weights=(1.0, 2.0, 0.5), lr_concepts=0.1, lr_classes=0.3, relaxation="soft")
    model.eval()
    x = torch.randn(4, 3)
    c_logits, state = model.concept_logits(x)
    c0 = torch.zeros(4, 2, 2, requires_grad=True)
    y0 = torch.zeros(4, 2, requires_grad=True)
    h_xy, h_xc = model.features(x)
    p_c, p_y = c0.softmax(-1), y0.softmax(-1)
    energies = model.class_energy(h_xy, p_y), model.concept_energy(h_xc, p_c), model.global_energy(p_c, p_y)
    energy = ef.inference_energy(*energies, (1.0, 2.0, 0.5))
    g_c, g_y = torch.autograd.grad(energy, [c0, y0])
    # Adam's first step from zero moves each coordinate by lr * g / (|g| + eps)
    assert torch.allclose(state.concepts, -0.1 * g_c / (g_c.abs() + 1e-8), atol=1e-5)
    assert torch.allclose(state.classes, -0.3 * g_y / (g_y.abs() + 1e-8), atol=1e-5)
    assert torch.allclose(c_logits, state.concepts[..., 1] - state.concepts[..., 0])
    assert all(p.grad is None for p in model.parameters())  # the weights get no gradient from inference


def test_stopping_rule_counts_patience_steps(monkeypatch):
    model = small(patience=3, min_improvement=1e9).eval()  # never improves enough: stops after 1 + 3 steps
    calls = []
    original = model.class_energy
    monkeypatch.setattr(model, "class_energy", lambda *a: calls.append(1) or original(*a))
    model.concept_logits(torch.randn(2, 3))
    assert len(calls) == 4
    calls.clear()
    model.max_steps = 2
    model.concept_logits(torch.randn(2, 3))
    assert len(calls) == 2


@pytest.mark.parametrize("relaxation", ["soft", "hard"])
def test_intervention_clamps_and_soft_relaxation_propagates(relaxation):
    torch.manual_seed(0)
    model = small(n_concepts=3, hidden_dim=16, relaxation=relaxation).eval()
    x = torch.randn(6, 3)
    _, state = model.concept_logits(x)
    mask = torch.zeros(6, 3, dtype=torch.bool)
    mask[:3, 0] = True
    true = torch.ones(6, 3)
    after = model.minimise(state._replace(classes=torch.zeros_like(state.classes)), (0.0, 0.0, 3.0), mask, true)
    assert (after.concepts[:3, 0] == torch.tensor([-5.0, 5.0])).all()  # clamped at the authors' +-5 logits
    moved = (after.concepts[:, 1:] - state.concepts[:, 1:]).abs().amax()
    # soft: the global energy's gradient reaches the unknown concepts; hard (the authors' code): it cannot
    assert moved > 1e-3 if relaxation == "soft" else moved == 0
    logits = model.task_logits(None, state, mask, true)
    assert torch.equal(logits[3:], state.classes[3:])  # samples with nothing intervened keep their prediction


def test_bad_arguments():
    with pytest.raises(ValueError, match="train_weights"):
        small(train_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="intervention_weights"):
        small(intervention_weights=(0.0, -1.0, 3.0))
    with pytest.raises(ValueError, match="relaxation"):
        small(relaxation="gumbel")
    with pytest.raises(ValueError, match="lr_concepts"):
        small(lr_concepts=0.0)
    with pytest.raises(ValueError, match="concept_flip"):
        small(concept_flip=1.5)
    with pytest.raises(TypeError, match="patience"):
        small(patience=2.5)
    with pytest.raises(ValueError, match="n_tasks"):
        small(n_tasks=1)
    model = small()
    with pytest.raises(ValueError, match="n_concepts=2"):
        model.training_step({"inputs": torch.randn(2, 3), "concepts": torch.ones(2, 3), "targets": torch.ones(2)}, 0)


# ---------------------------------------------------------------- a real fit
@pytest.fixture(scope="module")
def xor_fit():
    pl.seed_everything(0)
    data = ConceptToyDataModule("xor", num_samples=600, batch_size=100)
    features = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model = ECBM(features, n_concepts=2, n_tasks=2, feature_dim=32, hidden_dim=16)
    trainer = pl.Trainer(max_epochs=15, check_val_every_n_epoch=15, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, data)
    return model, data, trainer


def test_fit_on_xor_predicts_concepts_and_classes(xor_fit):
    model, _, trainer = xor_fit
    metrics = trainer.callback_metrics
    assert metrics["val/concept_acc"] > 0.9 and metrics["val/acc"] > 0.85
    assert metrics["val/acc_intervened"] > 0.95
    # the global energy learned XOR: p(y | c) = p(c, y) / p(c) picks c_1 xor c_2 for every concept vector
    joint = model.concept_interpretations()["joint"]
    assert joint.argmax(dim=1).tolist() == [0, 1, 1, 0]


def test_interventions_with_true_concepts_raise_accuracy(xor_fit):
    model, data, _ = xor_fit
    x, c, y = (data.test_set.inputs, data.test_set.extras["concepts"], data.test_set.targets)
    noisy = x + 0.8 * torch.randn(len(x), 2, generator=torch.Generator().manual_seed(0))  # wrong concepts
    curve = model.intervention_curve(noisy, c, y, trials=2)
    assert curve[0][0] < 0.85 and curve[1][0] > curve[0][0] + 0.05 and curve[2][0] > 0.95
