import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lit_tricks import Classifier, Trick
from lit_tricks.callbacks.efficient_train import EfficientTrain, _shift
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.fourier_crop import fourier_crop
from lit_tricks.nets import CNN2D, MLP


def _wave(k: int, n: int, phase: float = 0.0) -> torch.Tensor:
    return torch.cos(2 * math.pi * k * torch.arange(n, dtype=torch.float64) / n + phase)


def test_fourier_crop_keeps_the_low_sines_and_the_mean_of_a_signal():
    # DC 3, frequencies 2 and 5 (kept by a window of 20), 15 (dropped): the kept ones come back at the new
    # length with their amplitudes and phases, exactly up to round-off
    x = 3 + _wave(2, 40) + 0.5 * _wave(5, 40, 0.3) + _wave(15, 40)
    expected = 3 + _wave(2, 20) + 0.5 * _wave(5, 20, 0.3)
    torch.testing.assert_close(fourier_crop(x.view(1, 40), 20), expected.view(1, 20))
    torch.testing.assert_close(fourier_crop(x.view(1, 1, 40), 20), expected.view(1, 1, 20))  # [N, C, L]
    odd = fourier_crop(x.view(1, 40), 11)  # an odd window keeps -5..5, symmetric
    torch.testing.assert_close(odd, (3 + _wave(2, 11) + 0.5 * _wave(5, 11, 0.3)).view(1, 11))
    assert fourier_crop(x.view(1, 40), 40) is not None and torch.equal(fourier_crop(x.view(1, 40), 40), x.view(1, 40))


def test_fourier_crop_of_an_image_and_the_even_window_at_its_edge():
    # 1 + cos(h) cos(2w) at frequencies (1, 2) is kept by a 6 x 6 window; cos(pi h) at frequency 4 is dropped
    image = 1 + _wave(1, 8)[:, None] * _wave(2, 8)[None, :] + _wave(4, 8)[:, None]
    out = fourier_crop(image.view(1, 1, 8, 8), (6, 6))
    torch.testing.assert_close(out, (1 + _wave(1, 6)[:, None] * _wave(2, 6)[None, :]).view(1, 1, 6, 6))
    # the authors' even window keeps frequency -B/2 but not +B/2: a cosine at B/2 comes back at half amplitude
    edge = fourier_crop(_wave(2, 8).view(1, 8), 4)
    torch.testing.assert_close(edge, 0.5 * _wave(2, 4).view(1, 4))


@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_fourier_crop_is_the_centred_window_of_the_shifted_spectrum(size):
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    spectrum = np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1))
    rows = slice(4 - size[0] // 2, 4 - size[0] // 2 + size[0])
    cols = slice(5 - size[1] // 2, 5 - size[1] // 2 + size[1])
    window = np.fft.ifftshift(spectrum[..., rows, cols], axes=(-2, -1))
    expected = np.fft.ifft2(window).real * (size[0] / 8) * (size[1] / 10)
    out = fourier_crop(x, size)
    torch.testing.assert_close(out, torch.from_numpy(expected))
    torch.testing.assert_close(out.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)))  # the DC component is kept
    assert fourier_crop(x.float(), size).dtype == torch.float32


def test_fourier_crop_refuses_bad_input():
    with pytest.raises(ValueError, match=r"size must be in \[1, side\]"):
        fourier_crop(torch.randn(2, 40), 41)
    with pytest.raises(ValueError, match="images \\[N, C, H, W\\] or 1-D signals"):
        fourier_crop(torch.randn(40), 20)
    with pytest.raises(TypeError, match="floating-point"):
        fourier_crop(torch.ones(2, 40, dtype=torch.long), 20)
    with pytest.raises(TypeError, match="size must be an int or 2 ints"):
        fourier_crop(torch.randn(1, 1, 8, 8), (4, 4, 4))


def test_schedule_values_at_fractions_of_training():
    et = EfficientTrain()
    small, mid = 160 / 224, 192 / 224
    expected = {0.0: (small, 1.0), 0.19: (small, 1.0), 0.2: (small, 3.0), 0.45: (small, 5.0), 0.6: (mid, 7.0),
                0.79: (mid, 7.0), 0.8: (1.0, 9.0), 1.0: (1.0, 9.0)}  # fmt: skip
    for progress, stage in expected.items():
        assert et.stage_at(progress) == pytest.approx(stage), progress
    assert [EfficientTrain._sides(torch.zeros(1, 40), 1, f) for f in (small, mid, 1.0)] == [(29,), (34,), (40,)]
    custom = EfficientTrain(schedule=[[0.0, 0.5, 0.0], [0.5, 1.0, 10.0]])
    assert custom.stage_at(0.49) == (0.5, 0.0) and custom.stage_at(0.5) == (1.0, 10.0)


def test_shift_translates_each_sample_with_zero_fill():
    x = torch.arange(1.0, 6.0).repeat(2, 1, 1)  # [2, 1, 5]
    out = _shift(x, torch.tensor([1, -2]), -1)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1, 2, 3, 4]], [[3.0, 4, 5, 0, 0]]]))


class Record(Trick):
    """Keeps the inputs a step starts with (order -20) or the network gets (order 0)."""

    def __init__(self, order):
        self.order, self.inputs = order, []

    def before_forward(self, trainer, module, batch):
        self.inputs.append(batch.inputs.clone())
        return batch


def _fit(callbacks, net, quiet_trainer_kwargs, max_epochs=2, **kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=5, limit_val_batches=0, callbacks=callbacks,
                         log_every_n_steps=1, **quiet_trainer_kwargs, **kwargs)  # fmt: skip
    trainer.fit(Classifier(net, num_classes=10), DigitsDataModule(batch_size=16, as_image=True))
    return trainer


def test_a_real_fit_follows_the_schedule(quiet_trainer_kwargs):
    # 10 steps, five stages of 2: sides round(8 * 160/224) = 6 (x3 stages), round(8 * 192/224) = 7, 8
    before, after = Record(-20), Record(0)
    et = EfficientTrain(max_shift=0.0, noise_std=0.0)
    _fit([et, before, after], CNN2D(10, width=4), quiet_trainer_kwargs)
    assert [x.shape[-1] for x in after.inputs] == [6] * 6 + [7] * 2 + [8] * 2
    for original, seen in zip(before.inputs, after.inputs, strict=True):
        torch.testing.assert_close(seen, fourier_crop(original, tuple(seen.shape[-2:])))


def test_total_steps_fixes_the_budget_and_a_run_without_one_is_refused(quiet_trainer_kwargs):
    after = Record(0)
    _fit([EfficientTrain(max_shift=0.0, noise_std=0.0, total_steps=5), after], CNN2D(10, width=4), quiet_trainer_kwargs)
    assert [x.shape[-1] for x in after.inputs] == [6, 6, 6, 7] + [8] * 6  # stages of one step, then full size
    with pytest.raises(ValueError, match="no step budget .* or EfficientTrain\\(total_steps=...\\)"):
        _fit([EfficientTrain()], CNN2D(10, width=4), quiet_trainer_kwargs, max_epochs=-1, max_time="00:00:00:05")


def test_augmentation_grows_and_the_generator_is_saved(quiet_trainer_kwargs):
    et = EfficientTrain(schedule=[[0.0, 1.0, 0.0], [0.5, 1.0, 10.0]], max_shift=0.0, noise_std=0.2, seed=3)
    state = et.state_dict()
    before, after = Record(-20), Record(0)
    trainer = _fit([et, before, after], CNN2D(10, width=4), quiet_trainer_kwargs)
    noise = [(seen - original).std().item() for original, seen in zip(before.inputs, after.inputs, strict=True)]
    assert noise[:5] == [0.0] * 5 and all(0.17 < n < 0.23 for n in noise[5:])  # magnitude 0, then 10 x 0.2
    assert float(trainer.callback_metrics["tricks/EfficientTrain/magnitude"]) == 10.0
    et.load_state_dict(state)  # the same draws again from the saved generator state
    again = et._augment(before.inputs[5], 2, 1.0)
    torch.testing.assert_close(again - before.inputs[5], after.inputs[5] - before.inputs[5])


def test_fixed_size_networks_and_bad_arguments_are_clear_errors(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match="accepts any input size .*if_fixed_size='warn'"):
        _fit([EfficientTrain()], torch.nn.Sequential(torch.nn.Flatten(), MLP(64, 10)), quiet_trainer_kwargs)
    after = Record(0)
    with pytest.warns(UserWarning, match="EfficientTrain is off for this run"):
        _fit([EfficientTrain(if_fixed_size="warn"), after], torch.nn.Sequential(torch.nn.Flatten(), MLP(64, 10)),
             quiet_trainer_kwargs)  # fmt: skip
    assert all(x.shape[-1] == 8 for x in after.inputs)
    with pytest.raises(ValueError, match="must begin at 0.0 and increase"):
        EfficientTrain(schedule=[[0.1, 0.5, 1], [0.5, 1.0, 9]])
    with pytest.raises(ValueError, match="last stage must train at full size"):
        EfficientTrain(schedule=[[0.0, 0.5, 1]])
    with pytest.raises(ValueError, match=r"magnitude must be a finite number in \[0.0, 10.0\]"):
        EfficientTrain(schedule=[[0.0, 1.0, 11]])
    with pytest.raises(TypeError, match=r"schedule\[0\] must be \[start_fraction, size_fraction, magnitude\]"):
        EfficientTrain(schedule=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="schedule must be one of"):
        EfficientTrain(schedule="efficienttrain++")
    with pytest.raises(ValueError, match=r"total_steps must be an integer in \[1, inf\)"):
        EfficientTrain(total_steps=0)
    with pytest.raises(ValueError, match="if_fixed_size must be"):
        EfficientTrain(if_fixed_size="ignore")
