"""Concept bottlenecks: interventions and policies by hand, the toy data, CBM / CEM behaviour, post-hoc models."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import ConceptBottleneckModel, ConceptEmbeddingModel, PostHocCBM
from lit_tricks.data import ConceptToyDataModule, DigitsConceptDataModule, ShapesDataModule, concept_toy, render_shapes
from lit_tricks.functional import concepts as cf
from lit_tricks.modules import SparseCBM


# ---------------------------------------------------------------- functions
def test_intervene_by_hand():
    z, true = torch.tensor([[0.25, 0.75]]), torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[True, False]])
    assert cf.intervene(z, true, mask).tolist() == [[1.0, 0.75]]
    low, high = torch.tensor([-3.0, -2.0]), torch.tensor([4.0, 5.0])
    everything = torch.ones(1, 2, dtype=torch.bool)
    assert cf.intervene(torch.zeros(1, 2), true, everything, low, high).tolist() == [[4.0, -2.0]]


def test_logit_percentiles():
    low, high = cf.logit_percentiles(torch.arange(101.0).view(-1, 1).expand(101, 2))
    assert low.tolist() == [5.0, 5.0] and high.tolist() == [95.0, 95.0]


def test_policies_choose_the_right_groups():
    probs = torch.tensor([[0.9, 0.52, 0.1, 0.3], [0.45, 0.99, 0.01, 0.8]])
    single = cf.group_matrix(4, None)
    mask = cf.intervention_mask(probs, 1, "uncertainty", single)
    assert mask.tolist() == [[False, True, False, False], [True, False, False, False]]
    fixed = cf.intervention_mask(probs, 2, "fixed", single, order=[3, 0, 1, 2])
    assert fixed.tolist() == [[True, False, False, True]] * 2
    random = cf.intervention_mask(probs.repeat(50, 1), 3, "random", single, torch.Generator().manual_seed(0))
    assert (random.sum(dim=1) == 3).all() and random.any(dim=0).all()
    groups = cf.group_matrix(4, [[0, 1], [2, 3]])
    grouped = cf.intervention_mask(probs, 1, "uncertainty", groups)
    assert grouped.tolist() == [[True, True, False, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="n_groups"):
        cf.intervention_mask(probs, 5, "random", single)
    with pytest.raises(ValueError, match="order"):
        cf.intervention_mask(probs, 1, "fixed", single)
    with pytest.raises(ValueError, match="cover every concept"):
        cf.group_matrix(4, [[0, 1]])


def test_gumbel_loss_and_concept_matrix_search():
    z = torch.randn(8, 5)
    loss = cf.gumbel_contrastive_loss(z, 1.0, torch.Generator().manual_seed(0))
    assert loss.isfinite() and loss > 0
    assert loss == cf.gumbel_contrastive_loss(z, 1.0, torch.Generator().manual_seed(0))
    image_concept = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7]])
    class_concept = torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    assert cf.concept_matrix_search(image_concept, class_concept).tolist() == [1, 0]
    assert cf.concept_matrix_search(image_concept, class_concept, "max").tolist() == [1, 0]


def test_concept_only_accuracy_is_the_bayes_ceiling():
    c = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).float().repeat(10, 1)
    y = c[:, 0].long() ^ c[:, 1].long()
    assert cf.concept_only_accuracy(c, y, c, y) == 1.0  # XOR is complete
    noisy = y.clone()
    noisy[:8] = 1 - noisy[:8]  # a fifth of the labels flipped (two of each pattern)
    assert cf.concept_only_accuracy(c, noisy, c, noisy) == pytest.approx(0.8)


# ---------------------------------------------------------------- data
def test_toy_sets_follow_their_formulas():
    x, c, y = concept_toy("xor", 2000)
    assert torch.equal(c, (x > 0.5).float()) and torch.equal(y, (c[:, 0] != c[:, 1]).long())
    _, c, y = concept_toy("trig", 20000)
    assert c.shape == (20000, 3) and 0.35 < y.float().mean() < 0.42
    assert 0.78 < cf.concept_only_accuracy(c, y, c, y) < 0.84  # incomplete: ~0.81
    x, c, y = concept_toy("dot", 20000)
    assert not torch.equal(c[:, 1], 1 - c[:, 0]) and 0.45 < y.float().mean() < 0.55  # v3 is not v1
    assert 0.72 < cf.concept_only_accuracy(c, y, c, y) < 0.78  # ~0.75
    with pytest.raises(ValueError, match="name must be"):
        concept_toy("and", 10)


def test_concept_datamodules():
    data = ConceptToyDataModule("trig", num_samples=400, batch_size=50)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) >= {"inputs", "concepts", "targets", "index"} and batch["concepts"].shape == (50, 3)
    # concepts follow the same split as the inputs
    x, c, _ = concept_toy("trig", 500, 42)
    row = int(batch["index"][0])
    raw = data.train_set.inputs[row]
    match = ((x - x[:400].mean(0)) / x[:400].std(0) - raw).abs().sum(dim=1).argmin()
    assert torch.equal(c[match], data.train_set.extras["concepts"][row])
    digits = DigitsConceptDataModule()
    digits.setup()
    assert digits.n_concepts == 7 and cf.concept_only_accuracy(
        digits.train_set.extras["concepts"], digits.train_set.targets,
        digits.test_set.extras["concepts"], digits.test_set.targets) == 1.0  # fmt: skip


def test_rendered_shapes():
    images, concepts, targets = render_shapes(300, size=16, cooccurrence=0.0, seed=0)
    assert images.shape == (300, 3, 16, 16) and concepts.shape == (300, 12)
    for group in ShapesDataModule.concept_groups:
        assert (concepts[:, group].sum(dim=1) == 1).all()  # one value per group
    assert torch.equal(targets, concepts[:, :3].argmax(1) * 3 + concepts[:, 3:6].argmax(1))
    colour_energy = images.clamp(min=0).sum(dim=(2, 3)).argmax(dim=1)
    assert (colour_energy == concepts[:, 3:6].argmax(1)).float().mean() > 0.95  # drawn in its colour
    _, correlated, _ = render_shapes(3000, cooccurrence=0.9, seed=0)
    circles = correlated[:, 1] == 1
    assert correlated[circles, 3].mean() > 0.9  # circles are red


# ---------------------------------------------------------------- models in a Trainer
def _mlp(d_in, d_out, hidden=32):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, d_out))  # fmt: skip


def _fit(model, data, quiet, epochs=60):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, **{**quiet, "limit_val_batches": 0, "num_sanity_val_steps": 0})
    trainer.fit(model, data)
    data.setup()
    x, c, y = data.test_set.inputs, data.test_set.extras["concepts"], data.test_set.targets
    with torch.no_grad():
        probs, logits = model.eval()(x)
        everything = torch.ones_like(c, dtype=torch.bool)
        c_logits, state = model.concept_logits(x)
        intervened = model.task_logits(c_logits, state, everything, c)
    acc = (logits.argmax(-1) == y).float().mean().item()
    concept_acc = ((probs > 0.5) == c.bool()).float().mean().item()
    return acc, concept_acc, (intervened.argmax(-1) == y).float().mean().item()


def _toy(name):
    return ConceptToyDataModule(name, num_samples=1200, batch_size=256, val_fraction=0.0)


def test_xor_needs_embeddings_or_a_nonlinear_head(quiet_trainer_kwargs):
    torch.manual_seed(0)
    linear = ConceptBottleneckModel(_mlp(2, 2), nn.Linear(2, 2), n_concepts=2)
    acc, concept_acc, _ = _fit(linear, _toy("xor"), quiet_trainer_kwargs)
    assert concept_acc > 0.9 and acc < 0.8  # a linear head cannot compute XOR of the concepts
    torch.manual_seed(0)
    cem = ConceptEmbeddingModel(_mlp(2, 32), n_concepts=2, n_tasks=2, latent_dim=32)
    acc, concept_acc, intervened = _fit(cem, _toy("xor"), quiet_trainer_kwargs)
    assert acc > 0.9 and concept_acc > 0.9 and intervened > 0.9


def test_joint_cbm_leaks_on_trig_and_independent_does_not(quiet_trainer_kwargs):
    data = _toy("trig")
    data.setup()
    ceiling = cf.concept_only_accuracy(data.train_set.extras["concepts"], data.train_set.targets,
                                       data.test_set.extras["concepts"], data.test_set.targets)  # fmt: skip
    torch.manual_seed(0)
    joint = ConceptBottleneckModel(_mlp(7, 3), _mlp(3, 2), n_concepts=3)
    acc, _, intervened = _fit(joint, _toy("trig"), quiet_trainer_kwargs)
    assert acc > ceiling + 0.05 and intervened < acc - 0.05  # beats the ceiling only by leaking
    torch.manual_seed(0)
    independent = ConceptBottleneckModel(_mlp(7, 3), _mlp(3, 2), n_concepts=3, mode="independent")
    acc, _, intervened = _fit(independent, _toy("trig"), quiet_trainer_kwargs)
    assert intervened >= acc - 0.02 and intervened > ceiling - 0.05


def test_sequential_mode_trains_the_encoder_on_concepts_only(quiet_trainer_kwargs):
    torch.manual_seed(0)
    model = ConceptBottleneckModel(_mlp(2, 2), nn.Linear(2, 2), n_concepts=2, mode="sequential",
                                   concept_loss_weight=0.0)  # fmt: skip
    before = [p.clone() for p in model.concept_encoder.parameters()]
    _fit(model, _toy("xor"), quiet_trainer_kwargs, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.concept_encoder.parameters(), strict=True))
    assert not torch.equal(model.task_head.weight, nn.Linear(2, 2).weight)


def test_cem_randint_feeds_true_concepts():
    torch.manual_seed(0)
    cem = ConceptEmbeddingModel(_mlp(2, 8), n_concepts=2, n_tasks=2, latent_dim=8, training_intervention_prob=1.0)
    x, c = torch.randn(5, 2), torch.tensor([[1.0, 0.0]] * 5)
    c_logits, state = cem.concept_logits(x)
    everything = torch.ones_like(c, dtype=torch.bool)
    assert torch.equal(cem.training_head_inputs(c_logits, state, c), cem.task_logits(c_logits, state, everything, c))


def test_logit_bottleneck_interventions_use_training_percentiles(quiet_trainer_kwargs):
    torch.manual_seed(0)
    model = ConceptBottleneckModel(_mlp(7, 3), _mlp(3, 2), n_concepts=3, bottleneck="logit")
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match="calibrate_interventions"):
        model.intervene((x, torch.ones(4, 3), torch.zeros(4).long()), 1)
    _fit(model, _toy("trig"), quiet_trainer_kwargs, epochs=3)
    assert not model.logit_low.isnan().any() and (model.logit_low < model.logit_high).all()


def test_intervention_curve_and_hybrid(quiet_trainer_kwargs):
    torch.manual_seed(0)
    model = ConceptBottleneckModel(_mlp(2, 2), _mlp(2, 2), n_concepts=2, mode="independent")
    _fit(model, _toy("xor"), quiet_trainer_kwargs, epochs=40)
    data = _toy("xor")
    data.setup()
    test = data.test_set
    curve = model.intervention_curve(test.inputs, test.extras["concepts"], test.targets, trials=4)
    assert list(curve) == [0, 1, 2] and curve[2][0] == pytest.approx(1.0) and curve[0][0] <= curve[2][0]
    assert curve[1][1] >= 0  # a std over trials
    hybrid = ConceptBottleneckModel(_mlp(2, 2 + 8), nn.Linear(2 + 8, 2), n_concepts=2, extra_dims=8)
    acc, concept_acc, _ = _fit(hybrid, _toy("xor"), quiet_trainer_kwargs)
    assert acc > 0.9 and concept_acc > 0.9  # the extra dimensions carry what a linear head needs


def test_cbm_errors():
    with pytest.raises(ValueError, match="mode"):
        ConceptBottleneckModel(nn.Linear(2, 2), nn.Linear(2, 2), 2, mode="greedy")
    with pytest.raises(ValueError, match="independent"):
        ConceptBottleneckModel(nn.Linear(2, 2), nn.Linear(2, 2), 2, mode="independent", bottleneck="logit")
    with pytest.raises(ValueError, match="concept_pos_weight"):
        ConceptBottleneckModel(nn.Linear(2, 2), nn.Linear(2, 2), 2, concept_pos_weight=[1.0])
    with pytest.raises(ValueError, match="concept_weight needs 2 values >= 0"):
        ConceptBottleneckModel(nn.Linear(2, 2), nn.Linear(2, 2), 2, concept_weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="concept_loss_weight must be a finite number"):
        ConceptBottleneckModel(nn.Linear(2, 2), nn.Linear(2, 2), 2, concept_loss_weight=float("nan"))
    model = ConceptBottleneckModel(nn.Linear(2, 3), nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="n_concepts \\+ extra_dims"):
        model.concept_logits(torch.randn(1, 2))
    with pytest.raises(ValueError, match="'concepts'"):
        model.training_step({"inputs": torch.randn(1, 2), "targets": torch.zeros(1).long()}, 0)


def test_concept_loss_is_a_weighted_mean_over_concepts():
    # BCE(0, 1) = ln 2 and BCE(ln 3, 0) = ln 4: the mean over the two concepts is 1.5 ln 2 (Koh's joint code sums
    # them: 3 ln 2, so their lambda is lambda / k here)
    ln2 = math.log(2)
    c_logits, c = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[1.0, 0.0]])
    model = ConceptBottleneckModel(nn.Identity(), nn.Linear(2, 2), 2)
    assert model.concept_loss(c_logits, c).item() == pytest.approx(1.5 * ln2)
    # concept_weight scales a concept's whole term (Koh's and cem's `weight`): (2 ln 2 + 2 ln 2) / 2
    weighted = ConceptBottleneckModel(nn.Identity(), nn.Linear(2, 2), 2, concept_weight=[2.0, 1.0])
    assert weighted.concept_loss(c_logits, c).item() == pytest.approx(2 * ln2)
    assert weighted.concept_loss(c_logits, 1 - c).item() == pytest.approx(  # negatives scale too: BCE(0, 0) = ln 2
        (2 * ln2 + math.log(4 / 3)) / 2
    )
    # concept_pos_weight scales only the positive part: (3 ln 2 + 2 ln 2) / 2, and BCE(0, 0) stays ln 2
    positive = ConceptBottleneckModel(nn.Identity(), nn.Linear(2, 2), 2, concept_pos_weight=[3.0, 1.0])
    assert positive.concept_loss(c_logits, c).item() == pytest.approx(2.5 * ln2)
    assert positive.concept_loss(c_logits, 1 - c).item() == pytest.approx((ln2 + math.log(4 / 3)) / 2)
    # the training loss: CE of a zero head (ln 2) + lambda * the mean
    weighted.concept_loss_weight = 0.5
    nn.init.zeros_(weighted.task_head.weight)
    nn.init.zeros_(weighted.task_head.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = weighted.training_step((c_logits, c, torch.tensor([0])), 0)
    assert loss.item() == pytest.approx(ln2 + 0.5 * 2 * ln2)


# ---------------------------------------------------------------- post-hoc
def test_post_hoc_cbm_concept_bank_sparsity_and_hybrid(quiet_trainer_kwargs):
    torch.manual_seed(0)
    d, k = 8, 4
    # concept j is "embedding dimension j is positive"; classes depend on concepts 0 and 1 and on dimension 7
    positives = [torch.randn(100, d) + 2 * torch.eye(d)[j] for j in range(k)]
    negatives = [torch.randn(100, d) - 2 * torch.eye(d)[j] for j in range(k)]
    bank, intercepts = PostHocCBM.concept_bank_from_examples(positives, negatives)
    cosines = nn.functional.cosine_similarity(bank, torch.eye(d)[:k], dim=1)
    assert (cosines > 0.8).all()

    e = torch.randn(2000, d)
    y = ((e[:, 0] > 0).long() + (e[:, 1] > 0).long() * 2) % 4
    from lit_tricks.data import ArrayDataModule

    class Embeddings(ArrayDataModule):
        num_classes = 4

        def load_arrays(self):
            return e[:1600], y[:1600], e[1600:], y[1600:]

    data = Embeddings(batch_size=200, val_fraction=0.0)
    model = PostHocCBM(bank, n_classes=4, intercepts=intercepts, lam=0.03, lr=0.5)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=30, **quiet_trainer_kwargs).fit(model, data)
    with torch.no_grad():
        acc = (model(e[1600:]).argmax(-1) == y[1600:]).float().mean()
    assert acc > 0.85 and (model.head.weight == 0).float().mean() > 0.2  # sparse: unused concepts drop out
    hybrid = model.hybrid()
    assert not hybrid.head.weight.requires_grad and torch.equal(hybrid.head.weight, model.head.weight)
    # the authors' PCBM-h: the residual keeps nn.Linear's default initialisation and trains with Adam at 0.01
    assert hybrid.residual.weight.abs().sum() > 0 and hybrid.configure_optimizers().defaults["lr"] == 0.01
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0.0, inf\)"):
        model.hybrid(lr=0.0)


def test_cavs_are_linear_kernel_svc_vectors():
    # four points, all support vectors at the bound C: w = C * (sum of positives - sum of negatives) = (0.4, 0)
    # (scikit-learn's SVC(kernel="linear"), as the authors; LinearSVC's squared hinge gives 0.444)
    positives, negatives = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])], [torch.tensor([[-1.0, 0.0], [-1.0, 1.0]])]
    bank, intercepts = PostHocCBM.concept_bank_from_examples(positives, negatives, C=0.1)
    assert bank.tolist() == [[pytest.approx(0.4), pytest.approx(0.0)]] and intercepts.abs().item() < 1e-6
    with pytest.raises(ValueError, match=r"C must be a finite number in \(0.0, inf\)"):
        PostHocCBM.concept_bank_from_examples(positives, negatives, C=0.0)


def test_post_hoc_objective_is_scikit_learns_elastic_net():
    # projections = embeddings (unit concept vectors, no intercepts); zero inputs and bias: every logit is 0, so
    # each of the C = 2 one-vs-rest BCE terms is ln 2
    model = PostHocCBM(torch.eye(2), n_classes=2, lam=0.1, l1_ratio=0.5)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.5]]))
        model.head.bias.zero_()
    e, y = torch.zeros(3, 2), torch.tensor([0, 1, 1])
    # lam * (l1_ratio * |W|_1 + (1 - l1_ratio) / 2 * |W|_2^2) = 0.1 * (0.5 * 3.5 + 0.25 * 5.25), unscaled by C k
    assert model.objective(e, y).item() == pytest.approx(2 * math.log(2) + 0.30625)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = model.training_step({"inputs": e, "targets": y}, 0)  # the l1 part is left to the cumulative step
    assert loss.item() == pytest.approx(2 * math.log(2) + 0.1 * 0.25 * 5.25)


def test_cumulative_l1_penalty_by_hand():
    # scikit-learn's l1penalty (Tsuruoka et al. 2009): each step offers lr * lam * l1_ratio = 0.1 to every weight;
    # a weight moves toward 0 (never across) by what it was offered so far minus what it has received
    model = PostHocCBM(torch.eye(2), n_classes=1, lam=0.1, l1_ratio=1.0, lr=1.0)
    no_gradient = model.configure_optimizers()  # the SGD step itself does nothing without gradients
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.25, -0.05]]))
    model.optimizer_step(0, 0, no_gradient)  # offered 0.1: 0.25 -> 0.15; -0.05 -> 0 (received 0.05)
    assert model.head.weight.tolist() == [[pytest.approx(0.15), 0.0]]
    with torch.no_grad():
        model.head.weight[0, 1] = 0.12  # a (noisy) gradient step pushes the zero weight out again
    model.optimizer_step(0, 1, no_gradient)  # offered 0.2: 0.15 - (0.2 - 0.1) = 0.05; 0.12 - (0.2 - 0.05) < 0 -> 0
    assert model.head.weight.tolist() == [[pytest.approx(0.05), 0.0]]


def test_post_hoc_lam_is_scikit_learns_alpha(quiet_trainer_kwargs):
    # with l1_ratio = 1, W = 0 is optimal iff lam >= lam_max = max |dData/dW| at W = 0 (intercepts at the class
    # log-odds), whatever the solver: ours and SGDClassifier(alpha=lam) zero the same weights around lam_max
    from sklearn.linear_model import SGDClassifier

    from lit_tricks.data import ArrayDataModule

    s = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    y = (s[:, 0] > 0).long() + (s[:, 1] > 0.5).long()
    prior = y.bincount(minlength=3).float() / len(y)
    lam_max = ((prior - nn.functional.one_hot(y, 3).float()).T @ s / len(y)).abs().max().item()

    class Scores(ArrayDataModule):
        num_classes = 3

        def load_arrays(self):
            return s, y, s[:10], y[:10]

    for factor in (1.1, 0.9):
        torch.manual_seed(0)
        model = PostHocCBM(torch.eye(4), n_classes=3, lam=factor * lam_max, l1_ratio=1.0, lr=0.1)
        pl.seed_everything(0, verbose=False)
        pl.Trainer(max_epochs=20, **quiet_trainer_kwargs).fit(model, Scores(batch_size=50, val_fraction=0.0))
        sgd = SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=factor * lam_max, l1_ratio=1.0,
                            max_iter=10_000, random_state=0).fit(s.numpy(), y.numpy())  # fmt: skip
        nonzero = model.head.weight != 0
        assert torch.equal(nonzero, torch.from_numpy(sgd.coef_ != 0))
        assert nonzero.sum() == (0 if factor > 1 else 2)


def test_sparse_cbm_trains(quiet_trainer_kwargs):
    torch.manual_seed(0)
    s = torch.rand(1500, 6)
    y = s[:, :3].argmax(dim=1)
    from lit_tricks.data import ArrayDataModule

    class Similarities(ArrayDataModule):
        num_classes = 3

        def load_arrays(self):
            return s[:1200], y[:1200], s[1200:], y[1200:]

    model = SparseCBM(6, 3, lr=1e-2)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=40, **quiet_trainer_kwargs).fit(model, Similarities(batch_size=100, val_fraction=0.0))
    with torch.no_grad():
        acc = (model(s[1200:])[1].argmax(-1) == y[1200:]).float().mean()
    assert acc > 0.8
