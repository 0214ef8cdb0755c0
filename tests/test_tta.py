"""Test-time adaptation: corruptions by hand, the stream protocols, each method's loss and semantics, DDP."""

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_tricks import RMT, AdaNPC, BNAdapt, Classifier, EcoTTA, Tent
from lit_tricks.data import CORRUPTIONS, CorruptionStreamDataModule, DigitsDataModule, MNIST1DDataModule, corrupt
from lit_tricks.data.corruptions import PARAMS, _disk_kernel
from lit_tricks.functional.tta import (
    class_prototypes,
    default_augment,
    filtered_entropy,
    knn_probabilities,
    prototype_contrastive_loss,
    softmax_entropy,
    symmetric_cross_entropy,
)
from lit_tricks.modules.tta import SourceOnly
from lit_tricks.modules.tta.ecotta import _MetaPart
from lit_tricks.nets import CNN1D, CNN2D


# ---------------------------------------------------------------- corruptions
def test_closed_form_corruptions_by_hand():
    x = torch.tensor([[[[0.2, 0.6], [0.4, 0.8]]]])  # one 2x2 grey image, mean 0.5
    torch.testing.assert_close(corrupt(x, "contrast", 5), (x - 0.5) * 0.15 + 0.5)
    torch.testing.assert_close(corrupt(x, "brightness", 2), (x + 0.1).clamp(0, 1))
    rgb = torch.tensor([0.2, 0.4, 0.5]).view(1, 3, 1, 1)  # HSV value 0.5 -> 0.8: every channel scaled by 1.6
    torch.testing.assert_close(corrupt(rgb, "brightness", 5), rgb * 1.6)
    big = torch.full((1, 1, 64, 64), 0.5)
    noisy = corrupt(big, "gaussian_noise", 5, torch.Generator().manual_seed(0))
    assert abs((noisy - 0.5).std().item() - 0.10) < 0.01
    impulse = corrupt(big, "impulse_noise", 5, torch.Generator().manual_seed(0))
    flipped = (impulse != 0.5).float().mean().item()
    assert abs(flipped - 0.07) < 0.015 and set(impulse[impulse != 0.5].unique().tolist()) <= {0.0, 1.0}
    shot = corrupt(big, "shot_noise", 5, torch.Generator().manual_seed(0))
    assert abs((shot - 0.5).var().item() - 0.5 / 50) < 0.002  # Poisson(x c)/c has variance x / c


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_corruptions_follow_their_definitions_at_every_severity(severity):
    x = torch.tensor([[[[0.2, 0.6], [0.4, 0.8]]]])  # mean 0.5
    c = PARAMS["contrast"][severity - 1]
    torch.testing.assert_close(corrupt(x, "contrast", severity), (x - 0.5) * c + 0.5)
    torch.testing.assert_close(corrupt(x, "brightness", severity), (x + PARAMS["brightness"][severity - 1]).clamp(0, 1))
    flat = torch.full((1, 1, 128, 128), 0.5)
    g = torch.Generator().manual_seed(severity)
    sigma = PARAMS["gaussian_noise"][severity - 1]
    assert (corrupt(flat, "gaussian_noise", severity, g) - 0.5).std().item() == pytest.approx(sigma, rel=0.05)
    speckle = PARAMS["speckle_noise"][severity - 1]  # x + x N(0, c^2): std 0.5 c
    assert (corrupt(flat, "speckle_noise", severity, g) - 0.5).std().item() == pytest.approx(0.5 * speckle, rel=0.05)
    rate = (corrupt(flat, "impulse_noise", severity, g) != 0.5).float().mean().item()
    assert rate == pytest.approx(PARAMS["impulse_noise"][severity - 1], rel=0.15)
    lam = PARAMS["shot_noise"][severity - 1]  # Poisson(x c) / c: variance x / c
    assert (corrupt(flat, "shot_noise", severity, g) - 0.5).var().item() == pytest.approx(0.5 / lam, rel=0.1)
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    blurred = corrupt(ramp, "gaussian_blur", severity)  # a blur keeps a ramp's interior (a linear function)
    torch.testing.assert_close(blurred[..., 6:10], ramp[..., 6:10], atol=1e-5, rtol=0)


def test_blur_kernels_follow_the_reference():
    # defocus radius <= 0.5: the disk is the centre pixel (then smoothed); radius 1: the 5-pixel plus
    assert _disk_kernel(0.3, 0.4).shape == (3, 3) and _disk_kernel(1.0, 0.2).shape == (5, 5)
    assert _disk_kernel(1.0, 0.2).sum().item() == pytest.approx(1.0)
    flat = torch.full((1, 1, 8, 8), 0.3)
    for name in ("gaussian_blur", "defocus_blur", "pixelate"):
        torch.testing.assert_close(corrupt(flat, name, 5), flat)  # blurs preserve constants


def test_every_corruption_for_images_and_signals():
    images, signals = torch.rand(3, 1, 8, 8), torch.rand(3, 40)
    for name in CORRUPTIONS:
        assert len(PARAMS[name]) == 5
        for x in (images, signals):
            out = corrupt(x, name, 5)
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x), name
    with pytest.raises(ValueError, match="Unknown corruption"):
        corrupt(images, "snow", 3)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "fog", 6)


def test_stream_protocols():
    digits = DigitsDataModule(as_image=True, val_fraction=0.0)
    stream = CorruptionStreamDataModule(digits, ["contrast", "fog"], severity=4, protocol="reset", batch_size=50)
    stream.setup()
    n = len(digits.test_set)
    assert len(stream.stream) == 2 * n and stream.domain_names == ["contrast_4", "fog_4"]
    domain, reset = stream.stream.extras["domain"], stream.stream.extras["reset"]
    assert domain[:n].eq(0).all() and domain[n:].eq(1).all() and reset.nonzero().flatten().tolist() == [0, n]
    gradual = CorruptionStreamDataModule(digits, ["fog"], protocol="gradual")
    assert [s for _, s in gradual.domains] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    mixed = CorruptionStreamDataModule(digits, ["contrast", "fog"], protocol="mixed")
    mixed.setup()
    first = mixed.stream.extras["domain"][:100]
    assert 0 < first.float().mean() < 1  # domains interleaved
    signals = CorruptionStreamDataModule(MNIST1DDataModule(num_samples=500), ["gaussian_noise"])
    signals.setup()
    assert signals.stream.inputs.shape[1:] == (40,)
    with pytest.raises(ValueError, match="Unknown or no corruptions"):
        CorruptionStreamDataModule(digits, ["snow"])
    with pytest.raises(ValueError, match="protocol"):
        CorruptionStreamDataModule(digits, protocol="online")


# ---------------------------------------------------------------- methods
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_entropy_by_hand():
    uniform = torch.zeros(1, 4)
    assert softmax_entropy(uniform).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert softmax_entropy(torch.tensor([[100.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_tent_adapts_only_normalisation_affine_parameters_and_resets_exactly():
    tent = Tent(_net(), lr=1e-2)
    trainable = sorted(name for name, p in tent.named_parameters() if p.requires_grad)
    assert trainable == ["model.1.bias", "model.1.weight"]
    before = copy.deepcopy(tent.state_dict())
    x = torch.randn(16, 4) * 3 + 1
    first = tent.adapt({"inputs": x})
    after_one = copy.deepcopy(tent.state_dict())
    assert not torch.equal(after_one["model.1.weight"], before["model.1.weight"])
    assert torch.equal(after_one["model.0.weight"], before["model.0.weight"])  # the rest is frozen
    tent.adapt({"inputs": x})
    tent.reset()
    assert all(torch.equal(tent.state_dict()[k], before[k]) for k in before)
    assert torch.equal(tent.adapt({"inputs": x}), first)  # the optimizer state was reset too
    episodic = Tent(_net(), lr=1e-2, episodic=True)
    out1, out2 = episodic.adapt({"inputs": x}), episodic.adapt({"inputs": x})
    assert torch.equal(out1, out2)  # reset before every batch


def test_batch_statistics_survive_eval_mode():
    adapt = BNAdapt(_net()).eval()
    x = torch.randn(32, 4) * 5 + 3
    h = adapt.model[0](x)
    normalised = adapt.model[1](h)
    torch.testing.assert_close(normalised.mean(dim=0), adapt.model[1].bias.detach().expand(8), atol=1e-5, rtol=0)


def test_a_reset_flag_in_the_batch_resets():
    tent = Tent(_net(), lr=1e-1)
    x = torch.randn(16, 4)
    fresh = tent.adapt({"inputs": x})
    tent.adapt({"inputs": x})
    assert torch.equal(tent.adapt({"inputs": x, "reset": torch.tensor([True] + [False] * 15)}), fresh)


def test_errors():
    with pytest.raises(ValueError, match="normalisation layers"):
        Tent(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="source nn.Module"):
        Tent("resnet")
    with pytest.raises(ValueError, match="features="):
        AdaNPC(nn.Linear(4, 3), torch.randn(5, 4), torch.zeros(5).long())


def _mixed_norms():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.Linear(6, 3),
    )  # fmt: skip


def test_tent_norm_types_choose_the_adapted_layers():
    def trainable(**kwargs):
        return sorted(n for n, p in Tent(_mixed_norms(), **kwargs).named_parameters() if p.requires_grad)

    assert trainable() == ["model.4.bias", "model.4.weight"]  # default: BatchNorm only (paper, official code)
    assert trainable(norm_types="group") == ["model.1.bias", "model.1.weight"]
    assert trainable(norm_types=["layer"]) == ["model.8.bias", "model.8.weight"]
    assert len(trainable(norm_types=["batch", "layer", "group"])) == 6
    tent = Tent(_mixed_norms(), norm_types=["layer"])
    adapted = {id(p) for p in tent.tta_optimizer.param_groups[0]["params"]}
    assert adapted == {id(tent.model[8].weight), id(tent.model[8].bias)}
    assert tent.model[4].running_mean is None  # BatchNorm still normalises with the test batch
    with pytest.raises(ValueError, match="norm_types must name one or more of 'batch', 'layer', 'group'"):
        Tent(_mixed_norms(), norm_types=["instance"])
    for bad in ([], None, [["batch"]], [nn.BatchNorm2d]):
        with pytest.raises(ValueError, match="norm_types must name"):
            Tent(_mixed_norms(), norm_types=bad)
    gn_only = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"norm_types=\['batch'\], but the model has none"):
        Tent(gn_only)


def test_adanpc_memory_grows_with_confident_samples_and_resets():
    torch.manual_seed(0)
    source = torch.cat([torch.randn(50, 2) + 4, torch.randn(50, 2) - 4])
    labels = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    identity = nn.Identity()
    npc = AdaNPC(nn.Linear(2, 2), source, labels, features=identity, k=10, beta=0.9)
    probs = npc.adapt({"inputs": torch.tensor([[4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]])}).exp()
    assert probs[0, 0] > 0.99 and probs[1, 1] > 0.99
    assert len(npc.memory) == 102  # the two confident samples joined, the ambiguous one did not
    npc.reset()
    assert len(npc.memory) == 100


def _source(quiet):
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(as_image=True, batch_size=64, val_fraction=0.0)
    classifier = Classifier(CNN2D(num_classes=10, width=16), num_classes=10)
    pl.Trainer(max_epochs=10, **quiet).fit(classifier, data)
    return classifier.backbone.eval(), data


def test_adaptation_beats_the_source_model_on_a_corrupted_stream(quiet_trainer_kwargs):
    source, data = _source(quiet_trainer_kwargs)
    stream = CorruptionStreamDataModule(data, ["contrast", "fog", "pixelate"], severity=5)
    stream.setup()
    with torch.no_grad():
        source_acc = (source(stream.stream.inputs).argmax(-1) == stream.stream.targets).float().mean().item()
    results = {}
    for method in (BNAdapt, lambda m: Tent(m, lr=1e-3), lambda m: RMT(m, lr=1e-3)):
        module = method(copy.deepcopy(source))
        trainer = pl.Trainer(inference_mode=False, **quiet_trainer_kwargs)
        results[type(module).__name__] = trainer.test(module, datamodule=stream, verbose=False)[0]
    assert results["BNAdapt"]["test/acc"] > source_acc + 0.15
    assert results["Tent"]["test/acc"] > source_acc + 0.15
    assert results["RMT"]["test/acc"] > source_acc + 0.15
    assert {"test/error/contrast_5", "test/error/fog_5", "test/error/pixelate_5"} <= set(results["Tent"])
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        pl.Trainer(**quiet_trainer_kwargs).test(Tent(copy.deepcopy(source)), datamodule=stream, verbose=False)


def test_adanpc_follows_a_gradual_shift(quiet_trainer_kwargs):
    """AdaNPC's memory absorbs confident test features, so on the gradual protocol (severities 1-5-1) it keeps up
    with a shift that the frozen source model cannot handle."""
    source, data = _source(quiet_trainer_kwargs)
    stream = CorruptionStreamDataModule(data, ["gaussian_blur", "brightness"], severity=5, protocol="gradual")
    stream.setup()
    with torch.no_grad():
        source_acc = (source(stream.stream.inputs).argmax(-1) == stream.stream.targets).float().mean().item()
    npc = AdaNPC(copy.deepcopy(source), source.forward_features(data.train_set.inputs), data.train_set.targets, k=10)
    result = pl.Trainer(**quiet_trainer_kwargs).test(npc, datamodule=stream, verbose=False)[0]  # no gradients
    assert result["test/acc"] > source_acc + 0.1
    assert len(npc.memory) > len(data.train_set)


def test_tta_on_signals(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(num_samples=1000, batch_size=64, val_fraction=0.0)
    classifier = Classifier(CNN1D(num_classes=10, channels=16), num_classes=10)
    pl.Trainer(max_epochs=3, **quiet_trainer_kwargs).fit(classifier, data)
    stream = CorruptionStreamDataModule(data, ["contrast"], severity=5, batch_size=100)
    tent = Tent(copy.deepcopy(classifier.backbone), lr=1e-3)
    result = pl.Trainer(inference_mode=False, **quiet_trainer_kwargs).test(tent, datamodule=stream, verbose=False)
    assert 0 <= result[0]["test/acc"] <= 1


def test_symmetric_cross_entropy_by_hand():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[100.0, 0.0]])  # p = (.5, .5), q = (1, 0)
    # alpha = 0 leaves the forward term: -log 0.5
    assert symmetric_cross_entropy(student, teacher, alpha=0.0).item() == pytest.approx(
        torch.log(torch.tensor(2.0)).item()
    )
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p, q = s.softmax(-1), t.softmax(-1)
    expected = -0.5 * (q * p.log()).sum() - 0.5 * (p * q.log()).sum()
    assert symmetric_cross_entropy(s, t).item() == pytest.approx(expected.item())


def test_rmt_teacher_is_an_ema_and_reset_restores_every_network():
    torch.manual_seed(0)
    net = CNN2D(num_classes=10, width=8)
    rmt = RMT(copy.deepcopy(net), momentum=0.9, prototypes=torch.randn(10, 16))
    assert {"model", "teacher", "projector"} <= {name for name, _ in rmt.named_children()}
    teacher_before = [p.clone() for p in rmt.teacher.parameters()]
    x = torch.rand(8, 1, 8, 8)
    rmt.adapt({"inputs": x})
    for t0, t1, s in zip(teacher_before, rmt.teacher.parameters(), rmt.model.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)  # theta_t = m theta_t + (1 - m) theta_s
    rmt.reset()
    for a, b in zip(rmt.state_dict().values(), rmt._source_state.values(), strict=True):
        assert torch.equal(a, b)
    assert default_augment(x).shape == x.shape and default_augment(torch.rand(4, 40)).shape == (4, 40)
    with pytest.raises(ValueError, match="forward_features"):
        RMT(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)), prototypes=torch.randn(2, 2))


def test_rmt_contrastive_term_projects_the_raw_nearest_prototype():
    """As the authors' code: the nearest prototype is chosen by cosine similarity, and the raw class mean (not a
    unit vector) goes through the projector beside the raw features of x and its augmented view."""
    prototypes = torch.tensor([[10.0, 0.0], [0.0, 1.0]])  # width-1 CNN2D: 2 features
    rmt = RMT(CNN2D(num_classes=2, width=1), prototypes=prototypes)
    seen = []

    class Shift(nn.Module):  # records its input; a shift, so that the loss depends on the views' norms
        def forward(self, views):
            seen.append(views)
            return views + 1.0

    rmt.projector = Shift()
    f_x = torch.tensor([[0.2, 1.0], [1.0, 0.5]])  # by dot product both are nearest to [10, 0]; by cosine, not
    f_aug = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    loss = rmt._contrastive(f_x, f_aug)
    expected_views = torch.stack([torch.tensor([[0.0, 1.0], [10.0, 0.0]]), f_x, f_aug], dim=1)
    assert torch.equal(seen[0], expected_views)
    torch.testing.assert_close(loss, prototype_contrastive_loss(expected_views + 1.0, rmt.temperature))
    assert torch.equal(rmt.prototypes, prototypes)  # stored raw


# ---------------------------------------------------------------- non-finite test batches
def _adapting_methods():
    torch.manual_seed(0)
    net = CNN2D(num_classes=3, width=2)
    source = torch.randn(12, 4)
    return {
        "Tent": Tent(copy.deepcopy(net), lr=0.1),
        "RMT": RMT(copy.deepcopy(net), lr=0.1, prototypes=torch.randn(3, 4), augment=lambda x: x.flip(-1)),
        "EcoTTA": EcoTTA(copy.deepcopy(net), ["body.0", "body.2"], input_shape=[1, 8, 8], lr=0.1),
        "AdaNPC": AdaNPC(copy.deepcopy(net), source, torch.arange(12) % 3, k=3, beta=0.0),
    }


@pytest.mark.parametrize("name", ["Tent", "RMT", "EcoTTA", "AdaNPC"])
def test_a_nonfinite_batch_leaves_the_adapted_state_untouched(name):
    module, twin = _adapting_methods()[name], _adapting_methods()[name]
    x1, x2 = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    bad = x1.clone()
    bad[0, 0, 0, 0], bad[1, 0, 3, 3] = float("nan"), float("inf")
    module.adapt({"inputs": x1})
    twin.adapt({"inputs": x1})
    before = copy.deepcopy(module.state_dict())
    optimizer = copy.deepcopy(module.tta_optimizer.state_dict()) if module.tta_optimizer else None
    module.adapt({"inputs": bad})
    assert module.nonfinite_batches == 1 and module._adapted_batches == 1
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    if optimizer is not None:
        state = module.tta_optimizer.state_dict()["state"]
        assert all(torch.equal(v, state[i][k]) for i, s in optimizer["state"].items() for k, v in s.items())
    torch.testing.assert_close(module.adapt({"inputs": x2}), twin.adapt({"inputs": x2}), rtol=0, atol=0)


def test_nonfinite_batches_are_counted_logged_and_scored_as_errors(quiet_trainer_kwargs):
    torch.manual_seed(0)
    x = torch.rand(3, 8, 1, 8, 8)
    x[1, 2, 0, 1, 1] = float("nan")  # one NaN pixel: BatchNorm on batch statistics spreads it over the batch
    batches = [{"inputs": x[i], "targets": torch.zeros(8).long(), "domain": torch.full((8,), i)} for i in range(3)]
    tent = Tent(CNN2D(num_classes=3, width=2), lr=0.1)
    metrics = pl.Trainer(inference_mode=False, **quiet_trainer_kwargs).test(
        tent, dataloaders=DataLoader(batches, batch_size=None), verbose=False
    )[0]
    assert metrics["tricks/Tent/nonfinite"] == 1.0 and tent.nonfinite_batches == 1
    assert metrics["test/error/domain1"] == 1.0  # NaN predictions are never right, even for class 0


# ---------------------------------------------------------------- EcoTTA, shared losses, errors, DDP
PARTS = ["body.0", "body.1", "body.2", "body.3"]


def test_filtered_entropy_keeps_only_reliable_samples():
    confident, unsure = torch.tensor([[4.0, 0.0, 0.0]]), torch.zeros(1, 3)  # H(unsure) = ln 3 > 0.4 ln 3
    h = softmax_entropy(confident).item()
    assert h < 0.4 * torch.log(torch.tensor(3.0)).item()
    assert filtered_entropy(torch.cat([confident, unsure])).item() == pytest.approx(h)  # mean over kept samples
    assert filtered_entropy(unsure).item() == 0.0
    assert filtered_entropy(unsure, margin=1.0 + 1e-6).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_meta_part_is_a_residual_with_an_l1_regulariser():
    torch.manual_seed(0)
    part = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU())
    meta = _MetaPart(part, (2, 8, 8), (4, 4, 4), "p")
    x = torch.randn(5, 2, 8, 8)
    frozen = part(x)
    expected = meta.meta_bn(frozen) + meta.conv(x)
    meta.record = True
    out = meta(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(meta.regularisation, (expected - frozen).abs().mean())
    meta.regularisation.backward()  # inputs detached: no gradient reaches x's producers
    assert all(p.grad is not None for p in meta.conv.parameters())
    with pytest.raises(ValueError, match="integer stride"):
        _MetaPart(part, (2, 8, 8), (4, 3, 3), "p")


def test_ecotta_adapts_only_meta_networks_and_resets_exactly():
    torch.manual_seed(0)
    net = CNN2D(num_classes=10, width=8)
    eco = EcoTTA(copy.deepcopy(net), PARTS, input_shape=[1, 8, 8], lr=0.05)
    trainable = {name for name, p in eco.named_parameters() if p.requires_grad}
    assert trainable and all(".conv." in n or ".meta_bn." in n for n in trainable)
    frozen_before = {k: v.clone() for k, v in eco.state_dict().items() if ".part." in k or "head" in k}
    before = copy.deepcopy(eco.state_dict())
    x = torch.rand(32, 1, 8, 8) * 4  # confident enough that some samples pass the entropy filter
    first = eco.adapt({"inputs": x})
    after = eco.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())  # the source model is untouched
    assert any(not torch.equal(after[k], before[k]) for k in before if ".conv." in k or ".meta_bn." in k)
    eco.reset()
    assert all(torch.equal(eco.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(eco.adapt({"inputs": x}), first)
    for bad, match in ((["body.9"], "not a submodule"), ("body.0", "parts must list"), (["body.5"], "layout")):
        with pytest.raises(ValueError, match=match):
            EcoTTA(copy.deepcopy(net), bad, input_shape=[1, 8, 8])


def test_ecotta_warm_up_then_adaptation_beats_the_source(quiet_trainer_kwargs, tmp_path):
    source, data = _source(quiet_trainer_kwargs)
    stream = CorruptionStreamDataModule(data, ["contrast", "fog", "pixelate"], severity=5)
    stream.setup()
    with torch.no_grad():
        source_acc = (source(stream.stream.inputs).argmax(-1) == stream.stream.targets).float().mean().item()
    eco = EcoTTA(copy.deepcopy(source), PARTS, input_shape=[1, 8, 8])
    with pytest.warns(UserWarning, match="not warmed up"):
        pl.Trainer(inference_mode=False, **quiet_trainer_kwargs).test(copy.deepcopy(eco), datamodule=stream)
    warm = pl.Trainer(max_epochs=5, **{**quiet_trainer_kwargs, "enable_checkpointing": True})
    warm.fit(eco, data)
    assert bool(eco.warmed_up)
    torch.testing.assert_close(eco._source_state["model.body.0.conv.0.weight"], eco.model.body[0].conv[0].weight)
    result = pl.Trainer(inference_mode=False, **quiet_trainer_kwargs).test(eco, datamodule=stream, verbose=False)[0]
    assert result["test/acc"] > source_acc + 0.15
    # a new EcoTTA resumes from the warm-up checkpoint, which becomes its reset point
    fresh = EcoTTA(copy.deepcopy(source), PARTS, input_shape=[1, 8, 8])
    tester = pl.Trainer(inference_mode=False, **quiet_trainer_kwargs)
    again = tester.test(fresh, datamodule=stream, ckpt_path=warm.checkpoint_callback.best_model_path, verbose=False)
    assert again[0]["test/acc"] == pytest.approx(result["test/acc"])
    assert bool(fresh._source_state["warmed_up"])


def test_knn_and_prototype_helpers_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    probs = knn_probabilities(torch.tensor([[2.0, 0.0]]), memory, torch.tensor([0, 1, 1]), 2, k=2, temperature=1.0)
    w = torch.tensor([1.0, 0.6]).softmax(0)  # similarities of the two nearest: rows 0 (class 0), 2 (class 1)
    torch.testing.assert_close(probs, w.view(1, 2))
    features, labels = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 0, 1])
    torch.testing.assert_close(class_prototypes(features, labels, 2), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    with pytest.raises(ValueError, match=r"missing for classes \[2\]"):
        class_prototypes(features, labels, 3)
    # two samples, two views each; views of a sample identical and orthogonal to the other sample's: the loss
    # is -log(e^{1/t} / (e^{1/t} + 2)) per anchor
    views = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    t = 0.5
    expected = -torch.log(torch.exp(torch.tensor(1 / t)) / (torch.exp(torch.tensor(1 / t)) + 2))
    torch.testing.assert_close(prototype_contrastive_loss(views, t), expected)


def test_clear_errors_for_bad_streams_and_statistics():
    with pytest.raises(ValueError, match="batch_size >= 2"):
        BNAdapt(_net()).adapt({"inputs": torch.randn(1, 4)})
    with pytest.raises(ValueError, match="NaN rows"):
        RMT(CNN2D(num_classes=3, width=4), prototypes=torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        RMT(CNN2D(num_classes=3, width=4), prototypes=torch.randn(3, 5))
    with pytest.raises(ValueError, match="one label each"):
        AdaNPC(CNN2D(num_classes=3, width=4), torch.randn(5, 8), torch.zeros(4).long())


def test_reset_every_and_the_predict_path(quiet_trainer_kwargs):
    tent = Tent(_net(), lr=1e-1, reset_every=2)
    x = torch.randn(16, 4)
    outs = [tent.adapt({"inputs": x}) for _ in range(3)]
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    digits = DigitsDataModule(as_image=True, val_fraction=0.0)
    stream = CorruptionStreamDataModule(digits, ["fog"], batch_size=100)
    stream.setup()
    module = Tent(CNN2D(num_classes=10, width=4), lr=1e-3)
    probs = torch.cat(pl.Trainer(inference_mode=False, **quiet_trainer_kwargs).predict(module, datamodule=stream))
    assert probs.shape == (len(stream.stream), 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        pl.Trainer(**quiet_trainer_kwargs).predict(module, datamodule=stream)


def test_ecotta_under_ddp_sums_the_ranks_errors(tmp_path):
    script = Path(__file__).with_name("ddp_tta.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for name, value in ranks[0]["warmed"].items():  # the warm-up trained the same meta networks on both ranks
        torch.testing.assert_close(value, ranks[1]["warmed"][name])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    domain = torch.cat([d for r in ranks for d, _ in r["records"]])
    hits = torch.cat([h for r in ranks for _, h in r["records"]])
    for d, name in enumerate(["contrast_5", "fog_5"]):
        expected = 1 - hits[domain == d].mean().item()
        assert ranks[0]["metrics"][f"test/error/{name}"] == pytest.approx(expected)


def test_ecotta_warm_up_resumes_bit_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def warm_up(root, max_epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        eco = EcoTTA(CNN2D(num_classes=10, width=4), ["body.0", "body.2"], input_shape=[1, 8, 8])
        trainer = pl.Trainer(
            max_epochs=max_epochs, limit_train_batches=4, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)],
        )  # fmt: skip
        trainer.fit(eco, DigitsDataModule(as_image=True, batch_size=32, val_fraction=0.0), ckpt_path=ckpt_path)
        return eco, trainer

    full, full_trainer = warm_up(tmp_path / "full", 2)
    warm_up(tmp_path / "half", 1)
    resumed, resumed_trainer = warm_up(tmp_path / "resumed", 2, ckpt_path=tmp_path / "half" / "last.ckpt")
    assert resumed_trainer.global_step == full_trainer.global_step == 8
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    momentum = [s["momentum_buffer"] for s in resumed_trainer.optimizers[0].state.values()]
    expected = [s["momentum_buffer"] for s in full_trainer.optimizers[0].state.values()]
    assert momentum and all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))
    assert all(torch.equal(v, resumed._source_state[k]) for k, v in resumed.state_dict().items())  # reset point


def test_ecotta_warm_up_logs_its_loss_even_when_shorter_than_the_logging_interval(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    eco = EcoTTA(CNN2D(num_classes=10, width=4), ["body.0", "body.2"], input_shape=[1, 8, 8])
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, log_every_n_steps=2, accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path, name="warm"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(eco, DigitsDataModule(as_image=True, batch_size=32, val_fraction=0.0))
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    per_epoch = [float(r["warmup/loss_epoch"]) for r in rows if r["warmup/loss_epoch"]]
    per_step = [int(r["step"]) for r in rows if r["warmup/loss_step"]]
    assert len(per_epoch) == 2 and all(0 < v < 10 for v in per_epoch)
    assert per_step == [1, 3, 5]  # every log_every_n_steps = 2 of the 6 steps


def test_source_only_logs_the_methods_per_domain_errors(quiet_trainer_kwargs, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = CNN2D(num_classes=10, width=4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    digits = DigitsDataModule(as_image=True, val_fraction=0.0)
    stream = CorruptionStreamDataModule(digits, ["contrast", "fog"], batch_size=100)
    stream.setup()
    source = SourceOnly(copy.deepcopy(net))
    assert not any(p.requires_grad for p in source.parameters())
    metrics = pl.Trainer(**quiet_trainer_kwargs).test(source, datamodule=stream, verbose=False)[0]  # no gradients
    with torch.no_grad():
        wrong = (net.eval()(stream.stream.inputs).argmax(-1) != stream.stream.targets).float()
    domain = stream.stream.extras["domain"]
    for d, name in enumerate(stream.domain_names):  # the frozen model with its running statistics
        assert metrics[f"test/error/{name}"] == pytest.approx(wrong[domain == d].mean().item())
    source.adapt({"inputs": torch.rand(1, 1, 8, 8)})  # its own statistics: a batch of one is fine
    # the YAML recipe, from a plain state dict
    monkeypatch.chdir(tmp_path)
    torch.save(net.state_dict(), tmp_path / "source.pt")
    from lit_tricks.cli import LitTricksCLI

    tta = Path(__file__).parents[1] / "configs" / "tta"
    cli = LitTricksCLI(
        args=["test", "--config", str(tta / "digits_c.yaml"), "--config", str(tta / "source_only.yaml"),
              "--model.init_args.source_checkpoint=source.pt", "--model.init_args.model.init_args.width=4",
              "--trainer.limit_test_batches=3", "--trainer.enable_progress_bar=false"],
    )  # fmt: skip
    assert "test/error/gaussian_noise_5" in cli.trainer.callback_metrics


def test_a_damaged_source_checkpoint_is_named(tmp_path):
    from lit_tricks.modules.tta import load_source_weights

    damaged = tmp_path / "source.ckpt"
    damaged.write_bytes(b"")
    with pytest.raises(ValueError, match=r"source.ckpt' is damaged"):
        load_source_weights(torch.nn.Linear(2, 2), str(damaged))
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        load_source_weights(torch.nn.Linear(2, 2), str(tmp_path / "missing.ckpt"))
