"""Concept global importance, existence and location (Aysel et al. 2025): the math on hand-built tensors, the
metrics' sums, the callback in real fits of a CBM and a PCBM, and bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import ConceptBottleneckModel, PostHocCBM
from lit_tricks.callbacks.concept_metrics import ConceptMetrics, ConceptView, concept_view
from lit_tricks.data import ArrayDataModule, ShapesDataModule
from lit_tricks.data.concepts import render_shape_masks, render_shapes
from lit_tricks.functional import concept_metrics as cmf
from lit_tricks.metrics.concepts import ConceptExistence, ConceptGlobalImportance, ConceptLocation

TAG = "tricks/ConceptMetrics/"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the math ----------------------------------------------------------------------------------------------------------
def test_class_concept_matrix_and_cgim_by_hand():
    concepts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    v = cmf.class_concept_matrix(concepts, torch.tensor([0, 0, 1, 1]), 3)
    torch.testing.assert_close(v, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    theta = torch.tensor([[3.0, -4.0, 7.0], [0.0, 0.0, 0.0]])
    rho = cmf.concept_global_importance(theta, v)
    assert rho[0].item() == pytest.approx(3 / 5 * 1 / math.sqrt(1 + 49 / 25))  # (3*1) / (||theta_0|| ||v_0||)
    assert math.isnan(rho[1].item())  # a concept with no importance has no direction
    assert cmf.concept_global_importance(v, v)[0].item() == pytest.approx(1.0)


def test_jacobian_of_a_linear_head_is_its_weights_and_local_importance_is_weight_times_activation():
    head = nn.Linear(3, 2)
    u = torch.rand(4, 3)
    with torch.inference_mode():  # as in a validation loop
        jacobian = cmf.concept_jacobian(head, u)
    torch.testing.assert_close(jacobian, head.weight.detach().T.expand(4, 3, 2))
    classes = torch.tensor([0, 1, 1, 0])
    expected = head.weight.detach()[classes] * u
    torch.testing.assert_close(cmf.local_importance(jacobian, u, classes), expected)
    torch.testing.assert_close(cmf.local_importance(head.weight.detach().T, u, classes), expected)


def test_existence_counts_present_concepts_among_the_top_l():
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.1, 0.2, 0.7]])
    concepts = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(cmf.concept_existence(importance, concepts, 1), torch.tensor([1.0, 0.0]))
    # top 3: {1, 2, 3} has 2 present; {0, 3, 2} has 1 present
    torch.testing.assert_close(cmf.concept_existence(importance, concepts, 3), torch.tensor([2 / 3, 1 / 3]))


def test_top_region_size_ties_and_flat_maps():
    maps = torch.arange(24.0).view(1, 1, 4, 6)
    assert cmf.top_region(maps, alpha=1.0).sum() == 2  # ceil(24 / 12)
    assert cmf.top_region(maps, alpha=6.0).sum() == 12
    assert cmf.top_region(maps, alpha=6.0)[0, 0, 2:].all()  # the 12 largest values
    assert not cmf.top_region(torch.ones(1, 1, 4, 6), alpha=12.0).any()  # a flat map locates nothing


def test_mask_centroids():
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    points = cmf.mask_centroids(masks)
    assert points.tolist() == [[2, 3], [-1, -1]]


def _shape_points(n=64, size=16, seed=3):
    """Rendered shapes: their masks, the concepts, and the (centroid) point of every present concept."""
    _, concepts, _ = render_shapes(n, size, seed=seed)
    masks = render_shape_masks(n, size, seed=seed)
    points = cmf.mask_centroids(masks).unsqueeze(1).expand(-1, 12, -1).clone()
    return masks, concepts, points.masked_fill((concepts == 0).unsqueeze(-1), -1)


def test_location_is_one_when_each_concept_map_is_exactly_its_region_and_lower_when_random():
    masks, concepts, points = _shape_points()
    exact = masks.unsqueeze(1).float().expand(-1, 12, -1, -1)  # concept k's attribution = the shape's pixels
    importance = torch.rand(len(masks), 12, generator=torch.Generator().manual_seed(0))
    for top_l in (1, 3):
        scores, valid = cmf.concept_location(importance, exact, points, top_l=top_l, alpha=1.0)
        assert valid.all() and (scores == 1).all()
    random_maps = torch.rand(len(masks), 12, 16, 16, generator=torch.Generator().manual_seed(1))
    scores, _ = cmf.concept_location(importance, random_maps, points, top_l=3, alpha=1.0)
    assert scores.mean() < 0.3  # about alpha / 12 = 0.083 by chance
    shifted = exact.roll(shifts=8, dims=-1)  # the right region's shape, in the wrong half of the image
    assert cmf.concept_location(importance, shifted, points, top_l=3)[0].mean() == 0


def test_location_only_ranks_present_concepts_and_skips_samples_without_any():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1, 0, 0] = 1.0
    points = torch.tensor([[[-1, -1], [0, 0], [3, 3]], [[-1, -1]] * 3])
    importance = torch.tensor([[9.0, 2.0, 1.0], [1.0, 2.0, 3.0]])  # concept 0 ranks first but is absent
    scores, valid = cmf.concept_location(importance, maps, points, top_l=1)
    assert scores.tolist() == [1.0, 0.0] and valid.tolist() == [True, False]
    scores, _ = cmf.concept_location(importance, maps, points, top_l=3)  # two located: one hit of two
    assert scores[0].item() == 0.5


def test_coam_is_the_mean_over_channels_of_concept_vector_times_features():
    features = torch.arange(8.0).view(1, 2, 2, 2)  # d = 2 channels of 2x2
    bank = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    maps = cmf.concept_activation_maps(features, bank)
    torch.testing.assert_close(maps[0, 0], features[0, 0] / 2)
    torch.testing.assert_close(maps[0, 1], (features[0, 0] - features[0, 1]) / 2)
    assert cmf.concept_activation_maps(features, bank, (6, 6)).shape == (1, 2, 6, 6)


def test_input_gradient_maps_of_a_region_sum_are_the_region():
    region = torch.zeros(16, 16)
    region[2:6, 9:14] = 1.0
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        maps = cmf.input_gradient_maps(lambda inputs: (inputs * region).sum(dim=(1, 2, 3)).unsqueeze(1), x)
    torch.testing.assert_close(maps, 3 * region.expand(3, 1, 16, 16))  # |d/dx| summed over the 3 channels


# the metrics -------------------------------------------------------------------------------------------------------
def test_cgim_metric_variants_match_the_functions_and_split_updates_sum():
    g = torch.Generator().manual_seed(0)
    u, c = torch.rand(40, 4, generator=g), (torch.rand(40, 4, generator=g) > 0.5).float()
    y, logits = torch.randint(0, 3, (40,), generator=g), torch.randn(40, 3, generator=g)
    jacobian = torch.randn(40, 4, 3, generator=g)
    v = cmf.class_concept_matrix(c, y, 3)
    u_star = cmf.mean_correct_activations(u, logits, y)
    theta = jacobian.mean(dim=0)
    expected = {"weights": theta, "mean_prediction": u_star, "weighted": theta * u_star}
    for variant, importance in expected.items():
        whole = ConceptGlobalImportance(4, 3, variant, average="none")
        whole.update(u, c, logits, y, jacobian)
        halves = ConceptGlobalImportance(4, 3, variant)
        for part in (slice(0, 17), slice(17, 40)):
            halves.update(u[part], c[part], logits[part], y[part], jacobian[part])
        rho = cmf.concept_global_importance(importance, v)
        torch.testing.assert_close(whole.compute(), rho)
        assert halves.compute().item() == pytest.approx(rho.nanmean().item(), abs=1e-6)


def test_existence_and_location_metrics_average_over_samples_and_filter_correct_ones():
    importance = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.6, 0.4]])
    concepts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    logits, y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    metric = ConceptExistence(top_l=1)
    metric.update(importance, concepts, logits, y)
    assert metric.compute().item() == pytest.approx(2 / 3)
    correct = ConceptExistence(top_l=1, correct_only=True)
    correct.update(importance, concepts, logits, y)  # samples 0 and 2
    assert correct.compute().item() == 1.0
    location = ConceptLocation()
    assert math.isnan(location.compute().item())  # nothing located yet
    maps = torch.zeros(3, 2, 4, 4)
    maps[:, 0, 0, 0] = 1.0
    points = torch.tensor([[[0, 0], [-1, -1]], [[0, 0], [-1, -1]], [[3, 3], [0, 0]]])
    location.update(importance, maps, points)
    assert location.compute().item() == pytest.approx(2 / 3)


# the callback in real fits -----------------------------------------------------------------------------------------
def _trainer(callbacks, **kwargs):
    quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=callbacks, logger=False, **quiet, **kwargs)


def test_fit_and_test_of_a_cbm_on_shapes_log_every_metric():
    pl.seed_everything(0, verbose=False)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                            nn.Linear(128, 12))  # fmt: skip
    model = ConceptBottleneckModel(encoder, nn.Linear(12, 9), n_concepts=12)
    data = ShapesDataModule(num_samples=400, batch_size=50, with_masks=True)
    trainer = _trainer([ConceptMetrics(top_l=2)])
    trainer.fit(model, data)
    names = ["cgim_weights", "cgim_mean_prediction", "cgim_weighted", "existence", "location"]
    for name in names:
        value = float(trainer.callback_metrics[f"{TAG}val/{name}"])
        assert (-1 <= value <= 1) if name.startswith("cgim") else (0 <= value <= 1), (name, value)
    # the callback's CGIM with weights equals the metric computed by hand from the head's weights
    data.setup()
    val = data.val_set
    with torch.no_grad():
        probs, logits = model(val.inputs)
    v = cmf.class_concept_matrix(val.extras["concepts"], val.targets, 9)
    rho = cmf.concept_global_importance(model.task_head.weight.T, v).nanmean()
    assert float(trainer.callback_metrics[f"{TAG}val/cgim_weights"]) == pytest.approx(rho.item(), abs=1e-5)
    trainer.test(model, data, verbose=False)
    assert f"{TAG}test/location" in trainer.callback_metrics


def test_pcbm_with_feature_maps_gets_coam_location_and_without_masks_no_location():
    g = torch.Generator().manual_seed(0)
    masks, concepts, _ = _shape_points(n=120)
    features = torch.randn(120, 6, 4, 4, generator=g)  # pre-pooling maps of a "backbone"
    features += 3 * nn.functional.avg_pool2d(masks[:, None].float(), 4)  # channel 0.. light up on the shape
    embeddings = features.mean(dim=(2, 3))
    targets = concepts[:, :3].argmax(dim=1)

    class Embeddings(ArrayDataModule):
        num_classes = 3

        def __init__(self, with_masks: bool) -> None:
            super().__init__(batch_size=40, val_fraction=0.25)
            self.with_masks = with_masks

        def load_arrays(self):
            return embeddings[:80], targets[:80], embeddings[80:], targets[80:]

        def setup(self, stage=None):
            super().setup(stage)
            extras = {"concepts": concepts, "feature_maps": features, **({"masks": masks} if self.with_masks else {})}
            order = torch.randperm(80, generator=torch.Generator().manual_seed(self.seed))
            for name, values in extras.items():
                self.train_set.extras[name] = values[:80][order[20:]]
                self.val_set.extras[name] = values[:80][order[:20]]
                self.test_set.extras[name] = values[80:]

    bank = torch.randn(12, 6, generator=g)
    for with_masks in (True, False):
        pl.seed_everything(0, verbose=False)
        trainer = _trainer([ConceptMetrics(top_l=3)])
        trainer.fit(PostHocCBM(bank, 3, lam=1e-3), Embeddings(with_masks))
        assert 0 <= float(trainer.callback_metrics[f"{TAG}val/existence"]) <= 1
        assert (f"{TAG}val/location" in trainer.callback_metrics) == with_masks


def test_a_module_without_a_head_logs_mean_prediction_cgim_only():
    class ProbabilitiesOnly(ConceptBottleneckModel):
        def concept_view(self, batch):
            probs, logits = self(batch["inputs"])
            return ConceptView(probs, batch["concepts"], batch["targets"], logits)

    pl.seed_everything(0, verbose=False)
    model = ProbabilitiesOnly(nn.Sequential(nn.Flatten(), nn.Linear(768, 12)), nn.Linear(12, 9), n_concepts=12)
    trainer = _trainer([ConceptMetrics(use_head=False)])
    trainer.fit(model, ShapesDataModule(num_samples=200, batch_size=50, with_masks=True))
    logged = {k.removeprefix(f"{TAG}val/") for k in trainer.callback_metrics if k.startswith(TAG)}
    assert logged == {"cgim_mean_prediction", "existence"}
    with pytest.raises(ValueError, match="differentiable task head"):
        _trainer([ConceptMetrics()]).validate(model, ShapesDataModule(num_samples=200, batch_size=50), verbose=False)


# data ----------------------------------------------------------------------------------------------------------------
def test_shape_masks_are_where_the_shapes_are_painted_and_the_datamodule_splits_them_with_the_images():
    images, concepts, _ = render_shapes(50, seed=4)
    masks = render_shape_masks(50, seed=4)
    assert ((images.amax(dim=1) > 0.5) == masks).float().mean() > 0.999  # paint 1, noise std 0.05
    data = ShapesDataModule(num_samples=200, with_masks=True)
    data.setup()
    for split in (data.train_set, data.val_set, data.test_set):
        assert ((split.inputs.amax(dim=1) > 0.5) == split.extras["masks"]).float().mean() > 0.999
    plain = ShapesDataModule(num_samples=200)
    plain.setup()
    assert "masks" not in plain.val_set.extras and torch.equal(plain.val_set.inputs, data.val_set.inputs)


# bad input -----------------------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="top_l"):
        ConceptMetrics(top_l=0)
    with pytest.raises(ValueError, match="alpha"):
        ConceptMetrics(alpha=13)
    with pytest.raises(TypeError, match="use_head"):
        ConceptMetrics(use_head="yes")
    with pytest.raises(ValueError, match="variant"):
        ConceptGlobalImportance(3, 2, variant="cgim1")
    with pytest.raises(ValueError, match="average"):
        ConceptGlobalImportance(3, 2, average="micro")
    with pytest.raises(ValueError, match="alpha"):
        ConceptLocation(alpha=0.0)
    metric = ConceptGlobalImportance(3, 2)
    with pytest.raises(ValueError, match="needs the jacobian"):
        metric.update(torch.rand(4, 3), torch.ones(4, 3), torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="activations must be"):
        metric.update(torch.rand(4, 2), torch.ones(4, 3), torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="correct_only=True needs logits"):
        ConceptExistence(correct_only=True).update(torch.rand(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="use_head=False"):
        cmf.concept_jacobian(lambda u: u.detach() @ torch.ones(3, 2), torch.rand(4, 3))
    with pytest.raises(ValueError, match="location=False"):
        cmf.input_gradient_maps(lambda x: x.detach().flatten(1)[:, :3], torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="maps"):
        cmf.concept_location(torch.rand(2, 3), torch.rand(2, 4, 5, 5), torch.zeros(2, 3, 2, dtype=torch.long))


def test_a_module_that_is_not_a_concept_model_is_refused_at_setup():
    from lit_tricks import Classifier
    from lit_tricks.data import DigitsDataModule
    from lit_tricks.nets import MLP

    with pytest.raises(TypeError, match="concept_view"):
        _trainer([ConceptMetrics()]).fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    with pytest.raises(TypeError, match="concept_view"):
        concept_view(nn.Linear(2, 2), {})


def test_the_yaml_option_stacks_on_the_shapes_cem_recipe(tmp_path, monkeypatch):
    from conftest import ROOT

    from lit_tricks.cli import LitTricksCLI

    monkeypatch.chdir(tmp_path)
    configs = [ROOT / "configs/cbm/shapes_cem.yaml", ROOT / "configs/cbm/options/concept_metrics.yaml"]
    args = [arg for path in configs for arg in ("--config", str(path))]
    short = ["--data.init_args.num_samples=200", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    cli = LitTricksCLI(args=["fit", *args, *short])
    assert cli.datamodule.with_masks
    assert 0 <= float(cli.trainer.callback_metrics[f"{TAG}val/location"]) <= 1


def test_a_cbm_whose_concept_k_reads_exactly_region_k_locates_1_and_a_random_one_less():
    from torch.utils.data import DataLoader

    regions = torch.zeros(12, 16, 16)
    for k in range(12):  # 4x4 blocks on a grid
        regions[k, 4 * (k // 4) : 4 * (k // 4) + 4, 4 * (k % 4) : 4 * (k % 4) + 4] = 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    batches = [{"inputs": x[i : i + 16], "concepts": torch.ones(16, 12), "targets": y[i : i + 16],
                "masks": regions.bool().expand(16, -1, -1, -1)} for i in (0, 16)]  # fmt: skip
    scores = {}
    for name in ("exact", "random"):
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 256, 12, bias=False))
        if name == "exact":
            with torch.no_grad():
                encoder[1].weight.copy_(regions.flatten(1).repeat(1, 3))  # logit k = the sum of region k's pixels
        model = ConceptBottleneckModel(encoder, nn.Linear(12, 3), n_concepts=12)
        trainer = _trainer([ConceptMetrics(top_l=3)])
        trainer.validate(model, DataLoader(batches, batch_size=None), verbose=False)
        scores[name] = float(trainer.callback_metrics[f"{TAG}val/location"])
    assert scores["exact"] == 1.0 and scores["random"] < 0.4, scores  # chance: ceil(256 / 12) / 256 = 0.09


def test_tensorboard_gets_each_concepts_cgim_by_name(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    model = ConceptBottleneckModel(nn.Sequential(nn.Flatten(), nn.Linear(768, 12)), nn.Linear(12, 9), n_concepts=12)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[ConceptMetrics()], enable_progress_bar=False,
                         logger=TensorBoardLogger(tmp_path, name="cm"), enable_checkpointing=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, ShapesDataModule(num_samples=200, batch_size=50, with_masks=True))
    events = EventAccumulator(str(tmp_path / "cm" / "version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"{TAG}val/cgim_weights/square", f"{TAG}val/cgim_weighted/bottom_right", f"{TAG}val/location"} <= scalars
