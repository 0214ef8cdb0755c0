import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import PlainModule
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lit_tricks import Classifier, CutMix, Mixup, Trick
from lit_tricks.data import DigitsDataModule, IndexedDataset, MNIST1DDataModule
from lit_tricks.functional import (
    cutmix_,
    cutmix_box,
    cutmix_masks,
    mixed_one_hot,
    mixup_,
    one_hot,
    paste_box_,
    smooth_labels,
)
from lit_tricks.nets import CNN1D, CNN2D, MLP


# ---------------------------------------------------------------- the math
def test_mixup_and_targets_by_hand():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    mixup_(x, torch.tensor([1, 0]), torch.tensor([0.75]))
    assert x.tolist() == [[1.5, 1.5], [2.5, 2.5]]
    x = torch.tensor([[1.0], [3.0], [5.0]])
    mixup_(x, torch.tensor([2, 0, 1]), torch.tensor([1.0, 0.0, 0.5]))  # per sample; odd batch size
    assert x.squeeze(1).tolist() == [1.0, 1.0, 4.0]
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mixup_(y, torch.tensor([1, 0]), torch.tensor([0.75])).tolist() == [[0.75, 0.25], [0.25, 0.75]]
    assert one_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    torch.testing.assert_close(
        smooth_labels(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.2), torch.tensor([[0.85, 0.05, 0.05, 0.05]])
    )


class FixedCentres:
    """A stand-in for the numpy generator: hands out the given centres, one array per axis, in order."""

    def __init__(self, *centres):
        self.centres = iter(centres)

    def integers(self, low, high, size):
        return np.asarray(next(self.centres))


def test_cutmix_box_follows_the_official_rand_bbox_by_hand():
    # half-side int(S * sqrt(1 - lam)) // 2 (CutMix-PyTorch and timm), not round(S * sqrt(1 - lam) / 2)
    lam = 1 - (15 / 32) ** 2  # side 15 exactly: half 7 (rounding would give 8)
    box, corrected = cutmix_box((32, 32), lam, FixedCentres([10], [30]))
    assert box == (slice(3, 17), slice(23, 32))  # columns 23:37 clipped to 32
    assert corrected == 1 - 14 * 9 / 1024
    # one row per sample; 31 * sqrt(0.25) = 15.5: half 7; lam 1: nothing pasted
    mask, corrected = cutmix_masks(
        (32, 31), torch.tensor([lam, 0.75, 1.0], dtype=torch.float64), FixedCentres([10, 0, 5], [30, 15, 5])
    )
    expected = torch.zeros(3, 32, 31, dtype=torch.bool)
    expected[0, 3:17, 23:31] = True  # side 15 along both axes (15 * 31 / 32 = 14.53: 14 along the 31 one)
    expected[1, 0:8, 8:22] = True  # 32 * 0.5 = 16: half 8, rows -8:8 clipped; 31 * 0.5: half 7
    assert torch.equal(mask, expected)
    torch.testing.assert_close(corrected, torch.tensor([1 - 14 * 8 / 992, 1 - 8 * 14 / 992, 1.0]))


def test_cutmix_segment_by_hand():
    # 10 * (1 - 0.45) = 5.5: half 2 (rounding would give 3); centres 1 and 9
    mask, corrected = cutmix_masks((10,), torch.tensor([0.45, 0.45], dtype=torch.float64), FixedCentres([1, 9]))
    assert mask.int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(corrected, torch.tensor([0.7, 0.7]))
    assert cutmix_box((10,), 0.45, FixedCentres([1]))[0] == (slice(0, 3),)


def test_cutmix_boxes_are_boxes_and_lambda_is_the_kept_area():
    lam = torch.tensor([0.3, 0.7, 1.0])
    mask, corrected = cutmix_masks((8, 8), lam, np.random.default_rng(1))
    for m, c in zip(mask, corrected, strict=True):
        rows, cols = m.any(dim=1), m.any(dim=0)
        assert m.sum() == rows.sum() * cols.sum()  # a rectangle
        assert c.item() == pytest.approx(1 - m.float().mean().item())
    assert not mask[2].any() and corrected[2] == 1.0  # lambda 1: nothing pasted
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    original = images.clone()
    cutmix_(images, torch.tensor([1, 0]), mask[:1])  # one box for the batch, shared by channels
    inside = mask[0].expand(3, 8, 8)
    assert torch.equal(images[0][inside], original[1][inside]) and torch.equal(images[0][~inside], original[0][~inside])


@pytest.mark.parametrize("sizes", [(8, 8), (7, 5), (12,)])
def test_batch_box_by_slicing_equals_the_mask(sizes):
    for seed, lam in enumerate([0.05, 0.3, 0.5, 0.93, 1.0]):
        mask, corrected = cutmix_masks(sizes, torch.tensor([lam], dtype=torch.float64), np.random.default_rng(seed))
        box, box_lam = cutmix_box(sizes, lam, np.random.default_rng(seed))
        from_box = torch.zeros(sizes, dtype=torch.bool)
        from_box[box] = True
        assert torch.equal(from_box, mask[0]) and box_lam == pytest.approx(corrected.item())
        inputs = torch.randn(5, 3, *sizes)
        perm = torch.tensor([2, 0, 4, 1, 3])
        assert torch.equal(paste_box_(inputs.clone(), perm, box), cutmix_(inputs.clone(), perm, mask))


# ---------------------------------------------------------------- in a real fit
class Snapshot(Callback):
    """Copies each training batch before any trick touches it."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})


class Spy(Trick):
    order = 5

    def __init__(self):
        self.seen = []

    def before_forward(self, trainer, module, batch):
        self.seen.append((batch.inputs.clone(), batch.targets.clone()))
        return batch


def _fit(tricks, quiet_trainer_kwargs, net=None, datamodule=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(net or MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer_kwargs.setdefault("max_steps", 3)
    trainer = pl.Trainer(limit_val_batches=0, callbacks=tricks, **quiet_trainer_kwargs, **trainer_kwargs)
    trainer.fit(model, datamodule or DigitsDataModule(batch_size=15))
    return trainer


def test_mixup_in_a_real_fit_follows_its_seed(quiet_trainer_kwargs):
    snapshot, spy = Snapshot(), Spy()
    _fit([snapshot, Mixup(alpha=0.4, seed=3), spy], quiet_trainer_kwargs)
    rng = np.random.default_rng(3)
    for original, (inputs, targets) in zip(snapshot.batches, spy.seen, strict=True):
        rng.random()  # the draw of `prob`
        perm, lam = torch.as_tensor(rng.permutation(15)), float(rng.beta(0.4, 0.4))
        torch.testing.assert_close(inputs, lam * original["inputs"] + (1 - lam) * original["inputs"][perm])
        onehot = torch.nn.functional.one_hot(original["targets"], 10).float()
        torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot[perm])


def test_per_sample_mode_and_label_smoothing(quiet_trainer_kwargs):
    spy = Spy()
    _fit([Mixup(alpha=1.0, mode="elem", label_smoothing=0.1), spy], quiet_trainer_kwargs)
    targets = spy.seen[0][1]
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(15))
    assert targets.min() >= 0.01 - 1e-6  # smoothing put 0.1 / 10 on every class
    assert len({round(float(v), 4) for v in targets.max(dim=1).values}) > 3  # per-sample lambdas


def test_early_stopped_mixup(quiet_trainer_kwargs):
    spy = Spy()
    _fit([Mixup(alpha=1.0, stop_at=0.5), spy], quiet_trainer_kwargs, max_steps=4)
    mixed = [bool((t.max(dim=1).values < 1).any()) for _, t in spy.seen]
    assert mixed == [True, True, False, False]


@pytest.mark.parametrize(
    ("trick", "net", "datamodule"),
    [
        (CutMix(alpha=1.0), CNN2D(10, width=4), DigitsDataModule(batch_size=15, as_image=True)),
        (CutMix(alpha=1.0, mode="elem"), CNN1D(10, channels=4), MNIST1DDataModule(num_samples=200, batch_size=15)),
        (
            Mixup(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, mode="elem"),
            CNN2D(10, width=4),
            DigitsDataModule(batch_size=15, as_image=True),
        ),
    ],
    ids=["cutmix-2d", "cutmix-1d-elem", "switch"],
)
def test_cutmix_on_images_and_signals(trick, net, datamodule, quiet_trainer_kwargs):
    spy = Spy()
    trainer = _fit(
        [trick, spy], quiet_trainer_kwargs, net=net, datamodule=datamodule, max_steps=4, log_every_n_steps=2
    )  # tricks log only on the steps Lightning writes
    assert trainer.global_step == 4
    for _, targets in spy.seen:
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(targets)))
    assert "tricks/" + type(trick).__name__ + "/lam" in trainer.callback_metrics


def test_plain_lightning_module_with_dict_batches(quiet_trainer_kwargs):
    trainer = pl.Trainer(max_steps=3, callbacks=[Mixup(alpha=0.4, num_classes=10)], **quiet_trainer_kwargs)
    trainer.fit(PlainModule(), DigitsDataModule())
    assert trainer.global_step == 3


def test_plain_lightning_module_errors(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match=r"needs Mixup\(num_classes=...\)"):
        pl.Trainer(max_steps=1, callbacks=[Mixup()], **quiet_trainer_kwargs).fit(PlainModule(), DigitsDataModule())
    data = TensorDataset(torch.randn(16, 64), torch.randint(0, 10, (16,)))
    tuples = DataLoader(data, batch_size=8, collate_fn=lambda items: tuple(default_collate(items)))
    with pytest.raises(TypeError, match="batch is a tuple.*dict"):
        pl.Trainer(max_steps=1, callbacks=[Mixup(num_classes=10)], **quiet_trainer_kwargs).fit(PlainModule(), tuples)
    with pytest.raises(ValueError, match=r"num_classes=5"):
        pl.Trainer(max_steps=1, callbacks=[Mixup(num_classes=5)], **quiet_trainer_kwargs).fit(
            PlainModule(), DigitsDataModule()
        )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Mixup(alpha=-0.1), r"alpha must be a finite number in \[0.0, inf\)"),
        (lambda: Mixup(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: Mixup(alpha=float("inf")), "alpha must be a finite number"),
        (lambda: Mixup(alpha=0.0), "both 0"),
        (lambda: CutMix(alpha=0.0), r"alpha must be a finite number in \(0.0, inf\)"),
        (lambda: Mixup(mode="pair"), "mode must be"),
        (lambda: Mixup(prob=1.5), r"prob must be a finite number in \[0.0, 1.0\]"),
        (lambda: Mixup(switch_prob=-1), "switch_prob"),
        (lambda: Mixup(label_smoothing=1.0), "label_smoothing"),
        (lambda: Mixup(stop_at=0.0), "stop_at"),
        (lambda: Mixup(stop_at=float("nan")), "stop_at"),
        (lambda: Mixup(num_classes=1), "num_classes"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_integer_inputs_and_unbounded_runs_are_refused_clearly(quiet_trainer_kwargs):
    images = DataLoader(IndexedDataset(TensorDataset(torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8),
                                                     torch.randint(0, 10, (16,)))), batch_size=8)  # fmt: skip

    class FromBytes(nn.Linear):
        def forward(self, x):
            return super().forward(x.flatten(1).float() / 255)

    model = Classifier(FromBytes(64, 10), num_classes=10)
    with pytest.raises(TypeError, match=r"torch.uint8: convert them to floating point"):
        pl.Trainer(max_steps=1, callbacks=[Mixup()], **quiet_trainer_kwargs).fit(model, images)
    pl.Trainer(max_steps=1, callbacks=[CutMix()], **quiet_trainer_kwargs).fit(model, images)  # pasting needs no floats
    unbounded = pl.Trainer(
        max_epochs=-1, max_time="00:00:00:05", callbacks=[Mixup(stop_at=0.5)], **quiet_trainer_kwargs
    )
    with pytest.raises(ValueError, match=r"no step budget.*set max_steps or max_epochs"):
        unbounded.fit(model, images)


def test_mixed_one_hot_is_float32_under_a_low_precision_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what precision="bf16-true" does around the step
    try:
        probs = mixed_one_hot(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.25]), 3)
    finally:
        torch.set_default_dtype(default)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75, 0.0], [0.75, 0.25, 0.0]]))


def test_mixed_one_hot_equals_mixing_one_hot_targets():
    targets, perm = torch.tensor([2, 0, 1, 2]), torch.tensor([1, 0, 2, 3])  # samples 2 and 3 paired with themselves
    lam = torch.tensor([0.7])
    expected = torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(mixed_one_hot(targets, perm, lam, 3), expected)  # by hand
    per_sample = torch.tensor([0.1, 0.5, 0.9, 0.3])
    torch.testing.assert_close(
        mixed_one_hot(targets, perm, per_sample, 3), mixup_(one_hot(targets, 3), perm, per_sample)
    )
