"""NearestMeanClassifier: means and predictions by hand, a real fit on a stream, checkpoint restore, bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_tricks import ContinualEvaluation, ExperienceReplay
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.modules.nmc import NearestMeanClassifier

POINTS = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [4.0, 4.0]])
LABELS = torch.tensor([0, 0, 1, 1, 2])


def _trainer(**kwargs):
    return pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_means_and_prediction_by_hand():
    model = NearestMeanClassifier(torch.nn.Identity(), num_classes=4, normalize=False)
    model.training_step({"inputs": POINTS[:3], "targets": LABELS[:3]}, 0)  # two batches = one batch of all five
    model.training_step({"inputs": POINTS[3:], "targets": LABELS[3:]}, 1)
    assert model.class_counts.tolist() == [2, 2, 1, 0]
    assert model.class_sums.tolist() == [[2, 0], [0, 6], [4, 4], [0, 0]]
    assert model.class_means()[:3].tolist() == [[1, 0], [0, 3], [4, 4]]
    logits = model(torch.tensor([[1.0, 1.0], [0.0, 3.5]]))
    # (1, 1): distances 1, sqrt(5), sqrt(18) to the three means; class 3 was never seen
    assert logits[0, :3].tolist() == pytest.approx([-1.0, -math.sqrt(5), -math.sqrt(18)])
    assert logits[:, 3].tolist() == [-math.inf, -math.inf]
    assert logits.argmax(dim=1).tolist() == [0, 1]


def test_normalised_features_by_hand():
    # the authors': L2-normalise the features, average them, compare without re-normalising the means
    model = NearestMeanClassifier(torch.nn.Identity(), num_classes=2)
    model.training_step(
        {"inputs": torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0]]), "targets": torch.tensor([0, 0, 1])}, 0
    )
    torch.testing.assert_close(model.class_means(), torch.tensor([[0.3, 0.9], [1.0, 0.0]]))
    # (10, 0) normalises to (1, 0): distance sqrt(0.49 + 0.81) to class 0's mean, 0 to class 1's
    assert model(torch.tensor([[10.0, 0.0]]))[0].tolist() == pytest.approx([-math.sqrt(1.3), 0.0])


def test_before_any_class_all_logits_are_zero():
    model = NearestMeanClassifier(torch.nn.Identity(), num_classes=3)
    assert model(POINTS).tolist() == [[0.0] * 3] * 5


def test_fit_on_a_stream_with_continual_evaluation(tmp_path):
    pl.seed_everything(0, verbose=False)
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh())
    before = [p.clone() for p in encoder.parameters()]
    model = NearestMeanClassifier(encoder, num_classes=10)
    assert list(model.parameters()) == [] and model.configure_optimizers() is None
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), num_tasks=5)
    evaluation = ContinualEvaluation(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(callbacks=[evaluation, checkpoint])
    trainer.fit(model, stream)
    assert trainer.global_step == math.ceil(len(stream.train_set) / 64)  # every batch counts as a step
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters(), strict=True))
    # the running means are the per-class means of the normalised features of the whole training set
    train = stream.train_set
    with torch.no_grad():
        features = torch.nn.functional.normalize(encoder(train.inputs), dim=1)
    means = torch.stack([features[train.targets == c].mean(0) for c in range(10)])
    assert model.class_counts.tolist() == torch.bincount(train.targets, minlength=10).float().tolist()
    torch.testing.assert_close(model.class_means(), means, atol=1e-5, rtol=0)
    summary = evaluation.summary()
    assert summary["acc"] > 0.7  # no forgetting: a class's mean never moves once its task is over
    assert summary["forgetting"] < 0.15
    # a checkpoint restores the means into a fresh model (lazily sized buffers take the saved size)
    restored = NearestMeanClassifier.load_from_checkpoint(tmp_path / "last.ckpt", encoder=encoder)
    assert torch.equal(restored.class_sums, model.class_sums) and torch.equal(restored.class_counts, model.class_counts)
    inputs = stream.test_set.inputs[:50]
    assert torch.equal(restored(inputs), model(inputs))
    result = _trainer().test(restored, stream, verbose=False)
    assert result[0]["test/acc"] > 0.7


def test_on_a_si_blurry_stream():
    pl.seed_everything(0, verbose=False)
    model = NearestMeanClassifier(torch.nn.Identity(), num_classes=10)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), scenario="si_blurry", seed=1)
    evaluation = ContinualEvaluation(every_n_steps=100, eval_period=200)
    _trainer(callbacks=[evaluation], enable_checkpointing=False).fit(model, stream)
    summary = evaluation.summary()
    assert summary["a_last"] > 0.8 and summary["a_auc"] > 0.8


def test_bad_input():
    with pytest.raises(TypeError, match="encoder"):
        NearestMeanClassifier(42, num_classes=10)
    with pytest.raises(TypeError, match="normalize"):
        NearestMeanClassifier(torch.nn.Identity(), num_classes=10, normalize="yes")
    with pytest.raises(ValueError, match="num_classes"):
        NearestMeanClassifier(torch.nn.Identity(), num_classes=1)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        NearestMeanClassifier("no/such/run.ckpt", num_classes=10)
    flat = NearestMeanClassifier(torch.nn.Unflatten(1, (8, 8)), num_classes=10)  # [N, 8, 8] features
    with pytest.raises(ValueError, match=r"encoder must map a batch to features \[N, D\]"):
        _trainer(enable_checkpointing=False).fit(flat, DigitsDataModule(val_fraction=0.0))
    model = NearestMeanClassifier(torch.nn.Identity(), num_classes=10)
    with pytest.raises(ValueError, match="no gradient step"):
        _trainer(enable_checkpointing=False, callbacks=[ExperienceReplay(memory_size=10)]).fit(
            model, ContinualDataModule(DigitsDataModule(val_fraction=0.0)))  # fmt: skip
    model.training_step({"inputs": POINTS, "targets": LABELS}, 0)
    with pytest.raises(ValueError, match="2 features but the class means have 64"):
        other = NearestMeanClassifier(torch.nn.Identity(), num_classes=10)
        other.load_state_dict({"class_sums": torch.zeros(10, 64), "class_counts": torch.ones(10)})
        other(POINTS)
