"""Few-shot fine-tuning for SFDA: the seeded k-shot draw, LP-FT's two stages against a hand-written loop, the
switch's optimizer and train modes, a real fine-tune on a corrupted digits domain, resume state, bad input."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lit_tricks import Classifier
from lit_tricks.data import CorruptionStreamDataModule, DigitsDataModule
from lit_tricks.data.few_shot import FewShotDataModule, few_shot_indices
from lit_tricks.modules.tta import SourceOnly
from lit_tricks.modules.tta.few_shot import FewShotFineTune
from lit_tricks.nets import CNN2D, MLP


def test_few_shot_indices_draw_k_per_class_and_a_disjoint_holdout():
    targets = torch.tensor([0] * 5 + [1] * 4 + [2] * 6)
    train, val = few_shot_indices(targets, shots=3, seed=1)
    assert targets[train].bincount().tolist() == [3, 3, 3] and targets[val].tolist() == [0, 1, 2]
    assert not set(train.tolist()) & set(val.tolist())
    again, _ = few_shot_indices(targets, shots=3, seed=1)
    assert torch.equal(train, again)
    assert any(not torch.equal(train, few_shot_indices(targets, 3, seed=s)[0]) for s in range(2, 6))
    # the reference's rule: per class one permutation, the first k train, the last one validates
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(5, generator=generator)
    assert train[:3].tolist() == order[:3].tolist() and val[0].item() == order[-1].item()
    train, val = few_shot_indices(targets, shots=4, seed=0, holdout=0)
    assert len(train) == 12 and len(val) == 0
    with pytest.raises(ValueError, match="class 1 has 4 samples"):
        few_shot_indices(targets, shots=4, seed=0)
    with pytest.raises(ValueError, match="class ids"):
        few_shot_indices(torch.rand(6), shots=1)


def test_few_shot_data_module_draws_per_domain_and_fills_the_epoch():
    data = DigitsDataModule(as_image=True, val_fraction=0.0)
    few = FewShotDataModule(data, shots=2, corruptions=["contrast", "fog"], steps_per_epoch=3, batch_size=16)
    few.setup("fit")
    assert len(few.few_shot_set) == 2 * 10 * 2 and len(few.val_set) == 10 * 2
    assert few.few_shot_set.targets.bincount().tolist() == [4] * 10
    assert len(few.train_set) == 40 * 2 and len(few.train_dataloader()) >= 3  # ceil(3 * 16 / 40) = 2 copies
    assert few.domain_names == ["contrast_5", "fog_5"]
    assert few.test_set.extras["domain"].bincount().tolist() == [len(data.test_set)] * 2
    # the samples are corrupted (contrast 5 squeezes each image towards its mean) and from the training split
    contrast = few.few_shot_set.inputs[:20]
    assert (contrast.amax((1, 2, 3)) - contrast.amin((1, 2, 3))).max() < 0.2
    with pytest.raises(ValueError, match="unknown"):
        FewShotDataModule(data, corruptions=["no_such_corruption"])


class _Record(Callback):
    def __init__(self):
        self.batches, self.modes, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if k in ("inputs", "targets")})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after the module's switch
        self.modes.append((module.model.body.training, module.model.head.training))
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def _digits_few_shot(**kwargs):
    return FewShotDataModule(DigitsDataModule(val_fraction=0.0), shots=2, steps_per_epoch=4, batch_size=8, **kwargs)


def test_lp_ft_equals_a_probe_then_a_fresh_adam_over_everything(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    source = MLP(64, 10, hidden=(16,))
    tuner = FewShotFineTune(copy.deepcopy(source), lp_steps=3, lp_lr=1e-2, lr=1e-3, weight_decay=1e-4)
    record = _Record()
    trainer = pl.Trainer(max_steps=7, callbacks=[record], **quiet_trainer_kwargs)
    trainer.fit(tuner, _digits_few_shot())
    # by hand: Adam on the head for 3 steps, then a new Adam on every parameter
    net = copy.deepcopy(source)
    stages = [(torch.optim.Adam(net.head.parameters(), lr=1e-2, weight_decay=1e-4), range(3))]
    stages.append((torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4), range(3, 7)))
    for optimizer, steps in stages:
        for step in steps:
            net.zero_grad()
            batch = record.batches[step]
            nn.functional.cross_entropy(net(batch["inputs"]), batch["targets"]).backward()
            optimizer.step()
    for (name, mine), theirs in zip(tuner.model.named_parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert not torch.equal(net.body[1].weight, source.body[1].weight)  # the fine-tune moved the body
    assert record.modes == [(False, True)] * 3 + [(True, True)] * 4  # the probe keeps the body in eval mode
    assert record.lrs == [[1e-2]] * 3 + [[1e-3]] * 4
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups[0]["params"]) == 4
    assert optimizer.state[tuner.model.head.weight]["step"].item() == 4  # a fresh Adam at the switch
    assert bool(tuner.finetuning) and trainer.callback_metrics["tricks/FewShotFineTune/finetuning"] == 1


def test_the_probe_keeps_batch_norm_statistics_and_the_body_fixed(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    net = CNN2D(num_classes=10, width=4)
    before = copy.deepcopy(net.body.state_dict())
    tuner = FewShotFineTune(net, lp_steps=5, lp_lr=1e-2)
    few = FewShotDataModule(DigitsDataModule(as_image=True), shots=2, steps_per_epoch=5, batch_size=8)
    pl.Trainer(max_steps=5, **quiet_trainer_kwargs).fit(tuner, few)
    assert not bool(tuner.finetuning)
    for key, value in net.body.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and running statistics alike


def test_fine_tuning_on_a_few_target_digits_beats_the_source(quiet_trainer_kwargs, tmp_path):
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(as_image=True, batch_size=64, val_fraction=0.0)
    classifier = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    pl.Trainer(max_epochs=3, **quiet_trainer_kwargs).fit(classifier, data)
    source = classifier.backbone
    domains = ["fog", "contrast"]
    stream = CorruptionStreamDataModule(data, domains, severity=5, batch_size=64)
    baseline = pl.Trainer(**quiet_trainer_kwargs).test(SourceOnly(copy.deepcopy(source)), stream, verbose=False)[0]
    few = FewShotDataModule(data, shots=3, corruptions=domains, steps_per_epoch=20, batch_size=32)
    tuner = FewShotFineTune(copy.deepcopy(source), lp_steps=20, lp_lr=1e-2, lr=1e-3)
    best = ModelCheckpoint(tmp_path, monitor="val/loss", mode="min")
    quiet = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    trainer = pl.Trainer(max_steps=60, callbacks=[best], **quiet)
    trainer.fit(tuner, few)
    assert set(trainer.callback_metrics) >= {"val/loss", "val/acc", "train/loss_epoch"}
    tuned = trainer.test(tuner, stream, ckpt_path="best", verbose=False)[0]
    assert tuned["test/acc"] > baseline["test/acc"] + 0.15, (baseline, tuned)
    assert {"test/error/fog_5", "test/error/contrast_5"} <= set(tuned)
    tuner.reset()  # a reset flag in a stream returns to the fine-tuned weights, not the source's
    assert not torch.equal(tuner.model.head.weight, source.head.weight)


def test_the_stage_and_its_optimizer_come_back_from_a_checkpoint(quiet_trainer_kwargs, tmp_path):
    pl.seed_everything(0, verbose=False)
    tuner = FewShotFineTune(MLP(64, 10, hidden=(16,)), lp_steps=2)
    trainer = pl.Trainer(max_steps=3, **quiet_trainer_kwargs)
    trainer.fit(tuner, _digits_few_shot())
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    fresh = FewShotFineTune(MLP(64, 10, hidden=(16,)), lp_steps=2)
    assert len(fresh.configure_optimizers().param_groups[0]["params"]) == 2
    resumed = pl.Trainer(max_steps=4, **quiet_trainer_kwargs)
    resumed.fit(fresh, _digits_few_shot(), ckpt_path=tmp_path / "ft.ckpt")
    assert bool(fresh.finetuning) and len(resumed.optimizers[0].param_groups[0]["params"]) == 4
    assert resumed.optimizers[0].state[fresh.model.head.weight]["step"].item() == 2  # 1 before the save, 1 after


def test_plain_fine_tuning_and_bad_input():
    tuner = FewShotFineTune(MLP(64, 10, hidden=(16,)), lp_steps=0)  # the paper's "FT": no probe
    assert bool(tuner.finetuning) and len(tuner.configure_optimizers().param_groups[0]["params"]) == 4
    net = MLP(64, 10, hidden=(16,))
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        FewShotFineTune(net, head="fc")
    with pytest.raises(ValueError, match="has no parameters"):
        FewShotFineTune(net, head="body.2")
    with pytest.raises(ValueError, match="lp_steps"):
        FewShotFineTune(net, lp_steps=-1)
    with pytest.raises(ValueError, match="lr"):
        FewShotFineTune(net, lr=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        FewShotFineTune(net, label_smoothing=1.0)
    with pytest.raises(TypeError, match="augment"):
        FewShotFineTune(net, augment="flip")
    with pytest.raises(TypeError, match="model"):
        FewShotFineTune("not a model")


def test_the_recipes_fit_on_few_shots_then_test_on_the_stream(tmp_path, monkeypatch):
    from conftest import ROOT

    from lit_tricks.cli import LitTricksCLI

    monkeypatch.chdir(tmp_path)
    tta = ROOT / "configs" / "tta"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    short = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", *quiet]
    LitTricksCLI(args=["fit", "--config", str(tta / "digits_c.yaml"), "--config", str(tta / "source.yaml"), *short])
    fit = ["fit", "--config", str(tta / "few_shot_data.yaml"), "--config", str(tta / "few_shot.yaml"), *short]
    cli = LitTricksCLI(args=[*fit, "--model.lp_steps=2", "--trainer.val_check_interval=3"])
    assert bool(cli.model.finetuning) and (tmp_path / "checkpoints/tta/few_shot.ckpt").exists()
    assert cli.datamodule.few_shot_set.targets.bincount().tolist() == [3 * 10] * 10  # 3 shots x 10 domains
    test = ["test", "--config", str(tta / "digits_c.yaml"), "--config", str(tta / "few_shot.yaml")]
    cli = LitTricksCLI(args=[*test, "--ckpt_path", "checkpoints/tta/few_shot.ckpt", "--trainer.limit_test_batches=12"])
    metrics = cli.trainer.callback_metrics
    assert 0 <= metrics["test/acc"] <= 1 and "test/error/gaussian_noise_5" in metrics
