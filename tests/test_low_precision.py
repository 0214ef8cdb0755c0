"""Every part trains and evaluates under precision="bf16-true", the trick stack under "16-mixed", on the CPU."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import (
    ELR,
    Classifier,
    ConceptBottleneckModel,
    ConceptEmbeddingModel,
    ConsistencyModel,
    ContinualEvaluation,
    CutMix,
    DataDietScores,
    EMATeacher,
    ExperienceReplay,
    Mixup,
    SampleReweighting,
    SelectiveBackprop,
    SelfDistill,
)
from lit_tricks.data import ConceptToyDataModule, ContinualDataModule, DigitsDataModule, Toy2DDataModule
from lit_tricks.modules import EDMDiffusion
from lit_tricks.nets import MLP, TimeMLP


def _classifier():
    return Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=16)


def _toy():
    return Toy2DDataModule(num_samples=256, batch_size=64, eval_samples=64)


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, 16), nn.ReLU(), nn.Linear(16, o))


PARTS = {
    "ema_teacher": lambda: (*_classifier(), [EMATeacher()]),
    "mixup": lambda: (*_classifier(), [Mixup()]),
    "cutmix": lambda: (*_classifier(), [CutMix()]),
    "pskd": lambda: (*_classifier(), [SelfDistill(total_epochs=2)]),
    "ema_kd": lambda: (*_classifier(), [EMATeacher(), SelfDistill("ema")]),
    "elr": lambda: (*_classifier(), [ELR()]),
    "reweighting": lambda: (*_classifier(), [SampleReweighting()]),
    "selective_backprop": lambda: (*_classifier(), [SelectiveBackprop(keep=0.5)]),
    "data_diet": lambda: (*_classifier(), [DataDietScores(epoch=0)]),
    "replay_and_continual_evaluation": lambda: (
        Classifier(MLP(64, 10, hidden=(16,)), num_classes=10),
        ContinualDataModule(DigitsDataModule(batch_size=16), num_tasks=5),
        [ExperienceReplay(memory_size=32), ContinualEvaluation(every_n_steps=2, subset_size=32)],
    ),
    "consistency": lambda: (ConsistencyModel(TimeMLP(2, hidden=16), data_shape=[2], eval_steps=[1],
                                             num_eval_samples=64), _toy(), []),
    "edm": lambda: (EDMDiffusion(TimeMLP(2, hidden=16), data_shape=[2], eval_steps=[2], num_eval_samples=64),
                    _toy(), []),
    "cbm": lambda: (ConceptBottleneckModel(_mlp(2, 2), _mlp(2, 2), n_concepts=2),
                    ConceptToyDataModule("xor", num_samples=256), []),
    "cem": lambda: (ConceptEmbeddingModel(_mlp(2, 16), n_concepts=2, n_tasks=2, latent_dim=16),
                    ConceptToyDataModule("xor", num_samples=256), []),
}  # fmt: skip


def _fit(precision, model, datamodule, callbacks, quiet_trainer_kwargs):
    trainer = pl.Trainer(max_steps=3, max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0,
                         precision=precision, callbacks=callbacks, **quiet_trainer_kwargs)  # fmt: skip
    trainer.fit(model, datamodule)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return trainer


@pytest.mark.parametrize("part", list(PARTS))
def test_each_part_trains_in_bfloat16(part, quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    _fit("bf16-true", *PARTS[part](), quiet_trainer_kwargs)


def test_trick_stack_trains_under_16_mixed_which_is_bfloat16_autocast_on_cpu(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    tricks = [EMATeacher(), Mixup(), SelfDistill(total_epochs=2), ELR(), SampleReweighting()]
    _fit("16-mixed", *_classifier(), tricks, quiet_trainer_kwargs)


@pytest.mark.parametrize("method", ["source_only", "bn_adapt", "tent", "rmt", "adanpc", "ecotta"])
def test_each_tta_method_adapts_in_bfloat16(method, quiet_trainer_kwargs):
    from lit_tricks import RMT, AdaNPC, BNAdapt, EcoTTA, Tent
    from lit_tricks.data import CorruptionStreamDataModule
    from lit_tricks.modules.tta import SourceOnly
    from lit_tricks.nets import CNN2D

    pl.seed_everything(0, verbose=False)
    net = CNN2D(num_classes=10, width=8)
    features = torch.randn(40, net.num_features)
    build = {
        "source_only": lambda: SourceOnly(net),
        "bn_adapt": lambda: BNAdapt(net),
        "tent": lambda: Tent(net),
        "rmt": lambda: RMT(net),
        "adanpc": lambda: AdaNPC(net, features, torch.arange(40) % 10),
        "ecotta": lambda: EcoTTA(net, ["body.0"], input_shape=[1, 8, 8]),
    }
    stream = CorruptionStreamDataModule(DigitsDataModule(as_image=True), ["contrast"], severity=3, batch_size=50)
    trainer = pl.Trainer(precision="bf16-true", inference_mode=False, limit_test_batches=2, **quiet_trainer_kwargs)
    module = build[method]()
    result = trainer.test(module, datamodule=stream, verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0 and module.nonfinite_batches == 0
    assert next(module.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in module.parameters())
