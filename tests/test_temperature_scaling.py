import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_tricks import Classifier
from lit_tricks.callbacks.temperature_scaling import TemperatureScaling
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.temperature_scaling import fit_temperature, scale_logits
from lit_tricks.nets import MLP

TAG = "tricks/TemperatureScaling/"


def sampled(scale: float, n: int = 20000, seed: int = 0):
    """Labels drawn from softmax(true logits); the model reports ``scale`` x the true logits."""
    g = torch.Generator().manual_seed(seed)
    true = 1.5 * torch.randn(n, 6, generator=g)
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    return scale * true, labels


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_recovers_a_known_miscalibration(scale):
    logits, labels = sampled(scale)
    assert fit_temperature(logits, labels) == pytest.approx(scale, rel=0.05)
    # from any start
    assert fit_temperature(logits, labels, init=0.1) == pytest.approx(scale, rel=0.05)


def test_fitted_temperature_minimises_the_nll():
    logits, labels = sampled(2.0, n=3000, seed=1)
    t = fit_temperature(logits, labels)
    nll = [F.cross_entropy(scale_logits(logits.double(), t * f), labels).item() for f in (0.97, 1.0, 1.03)]
    assert nll[1] < nll[0] and nll[1] < nll[2]
    # by hand: one sample, two classes, z = [1, 0], label 0: NLL decreases as T -> 0 (no interior minimum),
    # with a second sample of label 1 at the same logits the optimum is where p = 1/2: T -> inf; with labels 3:1
    # it is where sigmoid(1/T) = 3/4, T = 1 / log 3
    z = torch.tensor([[1.0, 0.0]] * 4)
    assert fit_temperature(z, torch.tensor([0, 0, 0, 1])) == pytest.approx(1 / math.log(3), rel=1e-4)


def _trainer(tmp_path=None, callbacks=(), epochs=2):
    return pl.Trainer(
        max_epochs=epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=tmp_path is not None,
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, limit_train_batches=8,
    )  # fmt: skip


def _model():
    torch.manual_seed(0)
    return Classifier(MLP(64, 10, hidden=(64,)), num_classes=10)


def test_fit_then_validate_test_predict_use_the_temperature(tmp_path):
    scaling = TemperatureScaling()
    trainer = _trainer(tmp_path, [scaling, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    model, data = _model(), DigitsDataModule(batch_size=64)
    trainer.fit(model, data)
    summary = scaling.fit_summary
    assert scaling.temperature == summary["temperature"] > 0 and scaling.temperature != pytest.approx(1.0, abs=1e-3)
    assert summary["nll_after"] < summary["nll_before"]
    logged = {k[len(TAG) :]: v.item() for k, v in trainer.callback_metrics.items() if k.startswith(TAG)}
    assert logged == pytest.approx(summary)
    assert trainer.callback_metrics["val/nll"].item() == pytest.approx(summary["nll_before"], rel=1e-4)  # uncalibrated
    # validate reports exactly the calibrated validation NLL and ECE the fit computed
    val = trainer.validate(model, data, verbose=False)[0]
    assert val["val/nll"] == pytest.approx(summary["nll_after"], rel=1e-4)
    assert val["val/ece"] == pytest.approx(summary["ece_after"], abs=1e-4)
    # predict returns softmax(logits / T); without the callback, softmax(logits)
    inputs = next(iter(data.val_dataloader()))["inputs"]
    probs = torch.cat(trainer.predict(model, DataLoader(inputs, batch_size=64), return_predictions=True))
    with torch.no_grad():
        raw = model.eval()(inputs)
    torch.testing.assert_close(probs, (raw / scaling.temperature).softmax(1))
    assert not model.backbone._forward_hooks  # the hook is only there during evaluation

    # a fresh callback gets T back from the checkpoint
    restored = TemperatureScaling()
    test = _trainer(callbacks=[restored]).test(_model(), data, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert restored.temperature == scaling.temperature
    plain = _trainer().test(model, data, verbose=False)[0]
    assert test[0]["test/acc"] == pytest.approx(plain["test/acc"])  # the argmax is unchanged
    assert test[0]["test/nll"] != pytest.approx(plain["test/nll"], rel=1e-3)


def test_state_dict_round_trip_and_unfitted_is_a_no_op():
    scaling = TemperatureScaling()
    assert scaling.state_dict() == {"temperature": None}
    other = TemperatureScaling()
    other.load_state_dict({"temperature": 2.5})
    assert other.state_dict() == {"temperature": 2.5}
    model, data = _model(), DigitsDataModule(batch_size=64)
    trainer = _trainer(callbacks=[scaling])
    plain = trainer.validate(model, data, verbose=False)[0]
    assert plain == _trainer().validate(model, data, verbose=False)[0]


def test_bad_input():
    with pytest.raises(ValueError, match="max_iter"):
        TemperatureScaling(max_iter=0)
    with pytest.raises(TypeError, match="logits_module"):
        TemperatureScaling(logits_module=None)
    with pytest.raises(ValueError, match="no submodule 'net'"):
        _trainer(callbacks=[TemperatureScaling(logits_module="net")]).fit(_model(), DigitsDataModule(batch_size=64))
    with pytest.raises(ValueError, match=r"\[N, C\] logits \(C = num_classes\) from 'backbone.body'"):
        _trainer(callbacks=[TemperatureScaling(logits_module="backbone.body")]).fit(_model(), DigitsDataModule())
    with pytest.raises(TypeError, match="ece_bins"):
        TemperatureScaling(ece_bins=2.5)
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        fit_temperature(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="init"):
        fit_temperature(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), init=-1.0)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[TemperatureScaling()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="validation"):
        trainer.fit(_model(), DigitsDataModule(batch_size=64))
