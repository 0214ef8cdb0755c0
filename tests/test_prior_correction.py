"""Thresholding by class priors (Buda et al., 2018): the division, the Classifier option, its checkpointed priors."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.prior_correction import class_priors, prior_correction
from lit_tricks.nets import MLP


def test_the_authors_example_by_hand():
    # mateuszbuda.github.io/2018/09/15/thresholding: counts [100, 400, 500], outputs [0.2, 0.2, 0.6]
    priors = class_priors([100, 400, 500])
    assert torch.allclose(priors, torch.tensor([0.1, 0.4, 0.5]))
    y = torch.tensor([[0.2, 0.2, 0.6]])
    raw = prior_correction(y, priors, normalize=False)
    assert torch.allclose(raw, torch.tensor([[2.0, 0.5, 1.2]]))
    assert int(y.argmax()) == 2 and int(raw.argmax()) == 0
    assert torch.allclose(prior_correction(y, priors), torch.tensor([[2.0, 0.5, 1.2]]) / 3.7)


def test_normalised_correction_is_the_softmax_of_logits_minus_log_priors():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    priors = class_priors([50, 30, 15, 5])
    expected = (logits - priors.log()).softmax(dim=-1)
    assert torch.allclose(prior_correction(logits.softmax(dim=-1), priors), expected, atol=1e-6)
    assert torch.allclose(prior_correction(logits.softmax(-1), class_priors([7, 7, 7, 7])), logits.softmax(-1))


def test_bad_input():
    with pytest.raises(ValueError, match="at least one training sample"):
        class_priors([10, 0, 3])
    with pytest.raises(ValueError, match="integer counts"):
        class_priors([0.5, 0.5])
    with pytest.raises(ValueError, match="priors must be"):
        prior_correction(torch.ones(2, 3) / 3, torch.ones(4) / 4)
    with pytest.raises(TypeError, match="prior_correction must be True or False"):
        Classifier(MLP(in_features=64, num_classes=10), num_classes=10, prior_correction="yes")


def _model(**kwargs):
    torch.manual_seed(0)
    return Classifier(MLP(in_features=64, num_classes=10), num_classes=10, **kwargs)


def test_fit_without_class_counts_is_refused(quiet_trainer_kwargs):
    trainer = pl.Trainer(max_steps=1, **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="prior_correction=True needs the training class counts"):
        trainer.fit(_model(prior_correction=True), DigitsDataModule())
    # no counts and no checkpoint: evaluation has no priors
    loader = DataLoader(torch.zeros(4, 64), batch_size=4)
    with pytest.raises(ValueError, match="prior_correction=True has no class priors"):
        pl.Trainer(**quiet_trainer_kwargs).predict(_model(prior_correction=True), loader)


def test_fit_corrects_test_and_predict_outputs_and_checkpoints_the_priors(quiet_trainer_kwargs, tmp_path):
    dm = DigitsDataModule(batch_size=64, imbalance_ratio=10)
    model = _model(prior_correction=True)
    trainer = pl.Trainer(max_epochs=2, **quiet_trainer_kwargs)
    trainer.fit(model, dm)
    counts = dm.train_class_counts
    assert torch.allclose(model.class_prior, counts.float() / counts.sum())

    # test metrics are those of the corrected decision, computed here by hand
    test_acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    x, y = dm.test_set.inputs, dm.test_set.targets
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)
    corrected = (probs / model.class_prior).argmax(dim=-1)
    assert test_acc == pytest.approx(float((corrected == y).float().mean()), abs=1e-6)
    assert not torch.equal(corrected, probs.argmax(dim=-1))  # the correction moved some decisions

    predicted = torch.cat(trainer.predict(model, dm))
    assert torch.allclose(predicted, prior_correction(probs, model.class_prior), atol=1e-6)
    assert torch.allclose(predicted.sum(dim=-1), torch.ones(len(x)))

    # the priors travel in the checkpoint: a loaded model predicts without the data module
    trainer.save_checkpoint(tmp_path / "pc.ckpt")
    loaded = Classifier.load_from_checkpoint(tmp_path / "pc.ckpt", backbone=MLP(in_features=64, num_classes=10))
    assert torch.equal(loaded.class_prior, model.class_prior)
    again = torch.cat(pl.Trainer(**quiet_trainer_kwargs).predict(loaded, DataLoader(x, batch_size=512)))
    assert torch.allclose(again, predicted, atol=1e-6)
    # and the option is off by default: plain softmax outputs, no buffer
    assert not hasattr(_model(), "class_prior")
