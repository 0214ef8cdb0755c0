import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import ConceptBottleneckModel
from lit_tricks.data.concepts import render_shape_scenes
from lit_tricks.data.constrained_cbm import ConceptDecorrelationSampler, ShapeScenesDataModule
from lit_tricks.functional.constrained_cbm import (
    concept_saliency,
    cooccurrence_matrix,
    independence_weights,
    pointing_game,
    saliency_in_region,
)


def test_cooccurrence_matrix_by_hand():
    c = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0]])
    m = cooccurrence_matrix(c)
    # P(c1 | c0) = 2/3, P(c2 | c0) = 1/3, P(c0 | c1) = 2/3, P(c2 | c1) = 0, P(c0 | c2) = 1
    expected = torch.tensor([[1.0, 2 / 3, 1 / 3], [2 / 3, 1.0, 0.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(m, expected)
    assert cooccurrence_matrix(torch.tensor([[1, 0], [1, 0]]))[1].isnan().all()  # never present: NaN row


def test_independence_weights_by_hand_and_they_decorrelate():
    # marginals 2/3 and 2/3; patterns (1,1) x3, (0,0), (1,0), (0,1): w = p_indep / p_observed, mean 1
    c = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0], [1, 0], [0, 1]])
    torch.testing.assert_close(independence_weights(c), torch.tensor([8, 8, 8, 6, 12, 12]) / 9.0)
    # strongly co-occurring pair (90% together): the weighted joint equals the product of the marginals
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2000, generator=g) < 0.5
    b = torch.where(torch.rand(2000, generator=g) < 0.9, a, torch.rand(2000, generator=g) < 0.5)
    c = torch.stack([a, b], dim=1).long()
    w = independence_weights(c)
    p = lambda v: (w * v.float()).mean()  # noqa: E731
    assert p(a & b).item() == pytest.approx((p(a) * p(b)).item(), abs=1e-5)
    assert (a & b).float().mean() > 0.45  # the unweighted data are far from independent (0.25)
    # concepts that always co-occur: nothing to separate, all weights 1
    torch.testing.assert_close(independence_weights(torch.tensor([[1, 1], [0, 0]])), torch.ones(2))


def test_saliency_by_hand():
    # logit = sum(w * x) over a 1-channel 2x2 image: the gradient is w, integrated gradients (baseline 0) x * w
    w = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    f = lambda x: torch.stack([(x[:, 0] * w).sum((1, 2)), (x[:, 0] ** 2).sum((1, 2))], dim=1)  # noqa: E731
    x = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]]])
    torch.testing.assert_close(concept_saliency(f, x, 0, "gradient"), w.abs().unsqueeze(0))
    torch.testing.assert_close(concept_saliency(f, x, 0, "integrated_gradients", steps=1), (x[:, 0] * w))
    # a quadratic concept: gradients at the point 2x; integrated gradients x^2 exactly (completeness)
    torch.testing.assert_close(concept_saliency(f, x, 1, "gradient"), (2 * x[:, 0]).abs())
    torch.testing.assert_close(concept_saliency(f, x, 1, "integrated_gradients", steps=4), x[:, 0] ** 2)
    # channels are summed (signed for IG, absolute for gradients); one concept index per sample
    f3 = lambda x: torch.stack([x[:, 0].sum((1, 2)) - x[:, 1].sum((1, 2)), x.sum((1, 2, 3))], dim=1)  # noqa: E731
    x3 = torch.ones(2, 2, 1, 1)
    torch.testing.assert_close(concept_saliency(f3, x3, torch.tensor([0, 1])), torch.full((2, 1, 1), 2.0))
    ig = concept_saliency(f3, x3, torch.tensor([0, 1]), "integrated_gradients")
    torch.testing.assert_close(ig, torch.tensor([[[0.0]], [[2.0]]]))


def test_saliency_in_region_and_pointing_game_by_hand():
    s = torch.tensor([[[3.0, -1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    m = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    torch.testing.assert_close(saliency_in_region(s, m), torch.tensor([0.75, 0.5]))
    assert pointing_game(s, m).tolist() == [True, False]  # a tie goes to the first maximum
    assert saliency_in_region(torch.zeros(1, 2, 2), m[:1]).isnan().all()


def test_scenes_masks_concepts_and_cooccurrence():
    x, c, y, masks = render_shape_scenes(600, cooccurrence=1.0, seed=3)
    assert x.shape == (600, 3, 16, 16) and c.shape == (600, 6) and masks.shape == (600, 6, 16, 16)
    torch.testing.assert_close(masks.any(dim=(2, 3)).float(), c)  # a concept is present iff its mask is not empty
    torch.testing.assert_close(y, (c[:, :3] * torch.tensor([1.0, 2.0, 4.0])).sum(1).long())
    # the object pixels of a mask are lit in that object's colour channel
    red = masks[:, 3]
    assert (x[:, 0][red] > 0.7).float().mean() > 0.99 and (x[:, 0][~masks[:, 3:].any(1)] < 0.3).all()
    assert (c[:, 0] == c[:, 1]).all()  # square and circle always together
    _, c0, _, _ = render_shape_scenes(600, cooccurrence=0.0, seed=3)
    assert (c0[:, 0] != c0[:, 1]).float().mean() > 0.5
    m = cooccurrence_matrix(c)
    assert m[0, 1] == 1.0 and m[1, 0] == 1.0 and m[2, 0] < 1.0


def test_sampler_is_a_function_of_seed_and_epoch_and_decorrelates():
    _, c, _, _ = render_shape_scenes(1000, cooccurrence=0.9, seed=0)
    sampler = ConceptDecorrelationSampler(c, seed=1)
    first = list(sampler)
    assert len(first) == 1000 and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    drawn = c[torch.tensor(first)]
    alone = lambda cc: (cc[:, 0] != cc[:, 1]).float().mean().item()  # noqa: E731
    assert alone(drawn) > 2 * alone(c)  # lone circles / squares drawn far more often


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster on a shared machine
    yield
    torch.set_num_threads(threads)


def _encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 6),
    )  # fmt: skip


def test_fit_constrained_model_looks_at_the_right_shape(one_thread):
    # circle and square co-occur in 95% of the images that have one; the decorrelated sampler is the constraint
    share = {}
    for decorrelate in (False, True):
        pl.seed_everything(0, verbose=False)
        data = ShapeScenesDataModule(num_samples=1200, cooccurrence=0.95, decorrelate=decorrelate, batch_size=64,
                                     val_fraction=0.0)  # fmt: skip
        model = ConceptBottleneckModel(_encoder(), nn.Linear(6, 8), n_concepts=6)
        pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(model, data)  # fmt: skip
        x, c = data.test_set.inputs, data.test_set.extras["concepts"]
        rows = c[:, 1].bool()  # images with a circle
        model.eval()
        s = concept_saliency(lambda z, m=model: m.concept_logits(z)[0], x[rows], 1)
        masks = data.test_masks[rows]
        # of the saliency on the shapes, the share on the circle (not on the square that came with it in training)
        share[decorrelate] = saliency_in_region(s, masks[:, 1], within=masks[:, :3].any(dim=1)).nanmean().item()
    assert share[True] > share[False] + 0.05, share


def test_bad_input():
    with pytest.raises(ValueError, match="concepts must be a non-empty"):
        independence_weights(torch.ones(3))
    with pytest.raises(ValueError, match="0/1 labels"):
        cooccurrence_matrix(torch.tensor([[0.5, 1.0]]))
    f = lambda x: x.flatten(1)  # noqa: E731
    with pytest.raises(ValueError, match="method must be"):
        concept_saliency(f, torch.ones(1, 1, 2, 2), 0, method="lrp")
    with pytest.raises(ValueError, match=r"inputs must be \[N, C, H, W\]"):
        concept_saliency(f, torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="steps must be"):
        concept_saliency(f, torch.ones(1, 1, 2, 2), 0, "integrated_gradients", steps=0)
    with pytest.raises(ValueError, match="must have one shape"):
        saliency_in_region(torch.ones(1, 2, 2), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cooccurrence must be in"):
        ShapeScenesDataModule(cooccurrence=1.5)
    with pytest.raises(ValueError, match="cooccurrence must be in"):
        render_shape_scenes(4, cooccurrence=-0.1)
    with pytest.raises(TypeError, match="decorrelate must be True or False"):
        ShapeScenesDataModule(decorrelate="yes")
    with pytest.raises(ValueError, match="decorrelate chooses the training sampler"):
        ShapeScenesDataModule(decorrelate=True, balance="over")
