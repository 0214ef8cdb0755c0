import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_tricks import Classifier, EMATeacher, Trick
from lit_tricks.callbacks.mic import MIC
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.mic import block_mask, mic_loss, mic_pseudo_labels
from lit_tricks.nets import CNN2D, MLP


def test_block_mask_structure_and_ratio():
    images = torch.ones(3, 2, 8, 8)
    mask = block_mask(images, 2, 0.7, torch.Generator().manual_seed(1))
    numbers = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))  # one number per 2x2 block
    expected = (numbers > 0.7).float().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(mask, expected)
    signals = torch.ones(2, 10)  # [N, L]: segments of 5
    segments = block_mask(signals, 5, 0.5, torch.Generator().manual_seed(2))
    numbers = torch.rand(2, 1, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(segments, (numbers[:, 0] > 0.5).float().repeat_interleave(5, dim=1))
    assert block_mask(torch.ones(2, 3, 10), 5, 0.5).shape == (2, 1, 10)
    big = block_mask(torch.ones(2000, 1, 20, 20), 2, 0.7, torch.Generator().manual_seed(0))
    assert abs((1 - big.mean()).item() - 0.7) < 0.01  # 200k blocks: the masked fraction is the ratio
    with pytest.raises(ValueError, match="block_size=40 leaves no block"):
        block_mask(torch.ones(1, 1, 8, 8), 40, 0.5)


def test_pseudo_labels_quality_and_loss_by_hand():
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(9.0)]])  # top p: 0.75, 0.5, 0.9
    labels, quality = mic_pseudo_labels(teacher, "confidence")
    torch.testing.assert_close(labels, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(quality, torch.tensor([0.75, 0.5, 0.9]))
    _, fraction = mic_pseudo_labels(teacher, "threshold_fraction", threshold=0.7)
    torch.testing.assert_close(fraction, torch.full((3,), 2 / 3))
    torch.testing.assert_close(mic_pseudo_labels(teacher, "none")[1], torch.ones(3))
    student = torch.zeros(3, 2)  # CE = log 2 for every sample
    torch.testing.assert_close(mic_loss(student, labels, quality), quality * math.log(2.0))
    with pytest.raises(ValueError, match="weighting must be"):
        mic_pseudo_labels(teacher, "prob")


class Probe(Trick):
    """Keeps the mask generator's state before MIC draws (before_forward) and MIC's term after it (order 10)."""

    order = 10

    def __init__(self, mic):
        self.mic, self.rng, self.seen = mic, None, None

    def before_forward(self, trainer, module, batch):
        self.rng = self.mic._rng.get_state()
        return batch

    def after_loss(self, trainer, module, batch, out):
        mask = block_mask(batch.inputs, 2, 0.7, torch.Generator().set_state(self.rng))
        teacher = EMATeacher.of(trainer).teacher(batch.inputs)  # the cached output MIC used
        with torch.no_grad():
            student = module(batch.inputs * mask)
        self.seen = (teacher.clone(), student, out.aux_losses["mic"].detach())
        return out


def test_mic_fit_matches_the_weighted_pseudo_label_loss(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    mic = MIC(block_size=2, ratio=0.7, weighting="confidence", weight=0.5)
    probe = Probe(mic)
    callbacks = [EMATeacher(decay=0.9), mic, probe]
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, log_every_n_steps=1, callbacks=callbacks, **quiet_trainer_kwargs
    )
    trainer.fit(Classifier(CNN2D(10, width=8), num_classes=10), DigitsDataModule(batch_size=16, as_image=True))
    teacher, student, term = probe.seen
    probs = teacher.softmax(dim=-1)  # the authors' cls code: mean(max-prob * CE(masked student, argmax))
    expected = 0.5 * torch.mean(
        probs.max(dim=1).values * F.cross_entropy(student, probs.argmax(dim=1), reduction="none")
    )
    torch.testing.assert_close(term, expected)
    assert 0.3 < float(trainer.callback_metrics["tricks/MIC/masked_fraction"]) < 1.0


def test_generator_state_round_trip():
    first, second = MIC(seed=3), MIC(seed=4)
    block_mask(torch.ones(4, 1, 8, 8), 2, 0.7, first._rng)
    second.load_state_dict(first.state_dict())
    x = torch.ones(4, 1, 8, 8)
    torch.testing.assert_close(block_mask(x, 2, 0.7, first._rng), block_mask(x, 2, 0.7, second._rng))


def test_mic_on_flat_inputs_masks_segments(quiet_trainer_kwargs):
    mic = MIC()  # block 64 / 8 = 8 of the 64 features
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, callbacks=[EMATeacher(), mic], **quiet_trainer_kwargs)
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_clear_errors(quiet_trainer_kwargs):
    trainer = pl.Trainer(max_steps=1, callbacks=[MIC()], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="MIC matches the pseudo-labels of an EMA teacher.*add lit_tricks.EMATeacher"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    with pytest.raises(ValueError, match=r"ratio must be a finite number in \[0.0, 1.0\)"):
        MIC(ratio=1.0)
    with pytest.raises(ValueError, match="block_size must be an integer"):
        MIC(block_size=0)
    with pytest.raises(ValueError, match="weighting must be 'confidence'"):
        MIC(weighting="prob")
