import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_tricks import Classifier, Mixup
from lit_tricks.callbacks.smmix import SMMix
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.smmix import (
    consistency_loss,
    fine_grained_loss,
    max_min_windows,
    smmix_images,
    window_patches,
)
from lit_tricks.nets import MLP
from lit_tricks.nets.vit import ViT


def _hand_attention() -> torch.Tensor:
    # image 0 attends to its top-left 2x2 block, image 1 to its bottom-right 2x2 block (grid 4x4)
    a = torch.zeros(2, 4, 4)
    a[0, :2, :2] = 1.0
    a[1, 2:, 2:] = 1.0
    return a.view(2, 16)


def test_window_patches_by_hand():
    w = window_patches((3, 3), 2)
    assert w.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_patches((4, 4), 1).view(-1).tolist() == list(range(16))


def test_max_min_windows_on_a_hand_built_attention_map():
    low, high = max_min_windows(_hand_attention(), (4, 4), 2)
    # image 0: most attention top-left; least: the first all-zero window in row-major order, corner (0, 2)
    assert high[0].tolist() == [0, 1, 4, 5] and low[0].tolist() == [2, 3, 6, 7]
    # image 1: most attention bottom-right; least: the first window, corner (0, 0)
    assert high[1].tolist() == [10, 11, 14, 15] and low[1].tolist() == [0, 1, 4, 5]


def test_smmix_images_and_label_weight_by_hand():
    # each 2x2 pixel patch holds 100 * image + patch index, so every pasted patch names its origin
    ids = (100 * torch.arange(2).view(2, 1) + torch.arange(16)).float().view(2, 1, 4, 4)
    images = ids.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # [2, 1, 8, 8]
    mixed, source, lam = smmix_images(images, _hand_attention(), (4, 4), 2, torch.tensor([1, 0]))
    assert lam == 1 - 4 / 16
    patches = mixed[:, 0, ::2, ::2].reshape(2, 16)  # one pixel per patch
    expected0 = list(range(16))
    for low, high in zip([2, 3, 6, 7], [10, 11, 14, 15], strict=True):  # image 1's best window into image 0's worst
        expected0[low] = 100 + high
    expected1 = [100 + j for j in range(16)]
    for j in [0, 1, 4, 5]:  # image 0's best window (the same positions) into image 1's worst
        expected1[j] = j
    assert patches[0].tolist() == expected0 and patches[1].tolist() == expected1
    assert source[0].nonzero().view(-1).tolist() == [2, 3, 6, 7]
    assert source[1].nonzero().view(-1).tolist() == [0, 1, 4, 5]
    # pixels within a patch move together
    torch.testing.assert_close(mixed[:, :, 1::2, 1::2], mixed[:, :, ::2, ::2])
    assert images[0, 0, 0, 4] == 2  # the input is left alone


def _authors_smmix(images, attn, side, k):
    """Our port of SMMix.smmix of ChenMnZ/SMMix (smmix.py): unfold/fold, partners by flip(0)."""
    p = images.shape[-1] // side
    x = F.unfold(images, p, stride=p).transpose(1, 2)
    source = x.flip(0)
    sums = F.unfold(attn.view(-1, 1, side, side), k, stride=1).sum(dim=1)
    grid = torch.arange(side * side).float().view(1, 1, side, side)
    windows = F.unfold(grid, k, stride=1).transpose(1, 2).long()[0]
    low, high = windows[sums.argmin(1)], windows[sums.argmax(1)].flip(0)
    rows = torch.arange(len(x)).unsqueeze(1)
    out = x.clone()
    out[rows, low] = source[rows, high]
    mask = torch.zeros(len(x), side * side, dtype=torch.bool)
    mask[rows, low] = True
    return F.fold(out.transpose(1, 2), images.shape[-1], p, stride=p), mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smmix_images_match_the_authors_code(k):
    gen = torch.Generator().manual_seed(k)
    images, attn = torch.rand(5, 3, 16, 16, generator=gen), torch.rand(5, 16, generator=gen)
    mixed, source, lam = smmix_images(images, attn, (4, 4), k, torch.arange(4, -1, -1))
    ref_mixed, ref_source = _authors_smmix(images, attn, 4, k)
    assert torch.equal(mixed, ref_mixed) and torch.equal(source, ref_source)
    assert lam == (16 - k * k) / 16  # the code's lam = (side^2 - k^2) / side^2


def test_fine_grained_loss_by_hand():
    # image 0: source patches [2, 3, 6, 7] carry token (0, 4), the others (4, 0); identity head
    tokens = torch.tensor([4.0, 0.0]).repeat(1, 16, 1)
    source = torch.zeros(1, 16, dtype=torch.bool)
    source[0, [2, 3, 6, 7]] = True
    tokens[source] = torch.tensor([0.0, 4.0])
    own, partner = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = math.log(1 + math.exp(-4.0))  # both regions right with margin 4
    assert fine_grained_loss(tokens, source, lambda t: t, own, partner).item() == pytest.approx(expected, rel=1e-5)
    # swapped labels: both wrong with margin 4
    swapped = fine_grained_loss(tokens, source, lambda t: t, partner, own).item()
    assert swapped == pytest.approx(math.log(1 + math.exp(4.0)), rel=1e-6)


def test_consistency_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    perm = torch.tensor([1, 0])
    # target of image 0: softmax(0.75 * (0, 0) + 0.25 * (2, 0)) = softmax(0.5, 0)
    target0 = torch.softmax(torch.tensor([0.5, 0.0]), dim=0)
    target1 = torch.softmax(torch.tensor([1.5, 0.0]), dim=0)
    assert consistency_loss(torch.stack([torch.tensor([0.5, 0.0]), torch.tensor([1.5, 0.0])]), z, perm, 0.75) < 1e-7
    kl = sum(float((t * (t / 0.5).log()).sum()) for t in (target0, target1)) / 2  # uniform prediction
    assert consistency_loss(torch.zeros(2, 2), z, perm, 0.75).item() == pytest.approx(kl, rel=1e-5)


class _Record(pl.Callback):
    """Keeps each step's SMMix losses (empty on Mixup steps); logging every step."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        smmix = float(metrics["tricks/SMMix/smmix"])
        keys = ("train/smmix_fine", "train/smmix_consistency") if smmix else ()
        self.steps.append({k: float(metrics[k]) for k in keys})


def _trainer(callbacks, steps):
    return pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )


def test_before_forward_mixes_by_the_models_own_attention():
    pl.seed_everything(0)
    vit = ViT(dim=16, depth=1, heads=2)
    model = Classifier(vit, num_classes=10)
    trick = SMMix(switch_prob=1.0, label_smoothing=0.0, min_side_ratio=0.5, max_side_ratio=0.5)
    trainer = _trainer([trick], 1)
    trainer.fit(model, DigitsDataModule(batch_size=8, as_image=True))  # runs setup
    batch = next(iter(trainer.datamodule.train_dataloader()))
    images, labels = batch["inputs"].clone(), batch["targets"]
    from lit_tricks.core.batch import TrickBatch

    model.log = lambda *args, **kwargs: None  # outside the loop there is nowhere to log
    out = trick.before_forward(trainer, model, TrickBatch(batch["inputs"], labels))
    model.eval()
    model(images)
    expected, _, lam = smmix_images(images, vit.patch_attention(), (4, 4), 2, torch.arange(7, -1, -1))
    torch.testing.assert_close(out.inputs, expected)
    assert lam == 0.75
    y = F.one_hot(labels, 10).float()
    torch.testing.assert_close(out.targets, 0.75 * y + 0.25 * y.flip(0))
    assert vit.keep_tokens  # the training forward's tokens are wanted once
    model.train()
    logits = model(out.inputs)
    from lit_tricks.core.batch import StepOutput

    step = trick.after_loss(trainer, model, out, StepOutput(logits, None, torch.zeros(8)))
    assert set(step.aux_losses) == {"smmix_fine", "smmix_consistency"}
    assert not vit.keep_tokens and vit.tokens is None


def test_real_fit_with_the_vit_on_digits():
    pl.seed_everything(0)
    vit = ViT(dim=32, depth=2, heads=4, token_head=True)
    model = Classifier(vit, 10, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    token_head = vit.token_head.weight.detach().clone()
    record = _Record()
    trainer = _trainer([SMMix(seed=1), record], 200)
    trainer.fit(model, DigitsDataModule(batch_size=32, as_image=True))
    smmix_steps = [s for s in record.steps if "train/smmix_fine" in s]
    assert 60 < len(smmix_steps) < 140  # about half of the batches (switch_prob 0.5)
    assert all(math.isfinite(v) for s in smmix_steps for v in s.values())
    assert not torch.equal(vit.token_head.weight, token_head)  # the fine-grained labels train the token head
    assert trainer.callback_metrics["val/acc"] > 0.15  # chance is 0.1; SMMix slows a small ViT's start


def test_cls_attention_option_runs():
    pl.seed_everything(0)
    trainer = _trainer([SMMix(switch_prob=1.0, attention="cls")], 2)
    trainer.fit(Classifier(ViT(dim=16, depth=1), 10), DigitsDataModule(batch_size=16, as_image=True))
    assert trainer.callback_metrics["tricks/SMMix/smmix"] == 1.0


def test_state_round_trip():
    a, b = SMMix(seed=3), SMMix(seed=4)
    a._rng.random()
    b.load_state_dict(a.state_dict())
    assert a._rng.random() == b._rng.random()


def test_bad_input():
    with pytest.raises(ValueError, match="switch_prob"):
        SMMix(switch_prob=1.5)
    with pytest.raises(ValueError, match="mixup_alpha=0"):
        SMMix(mixup_alpha=0.0)
    with pytest.raises(ValueError, match="max_side_ratio"):
        SMMix(max_side_ratio=1.0)
    with pytest.raises(ValueError, match="swap"):
        SMMix(min_side_ratio=0.6, max_side_ratio=0.4)
    with pytest.raises(ValueError, match="attention"):
        SMMix(attention="rollout")
    data = DigitsDataModule(batch_size=16, as_image=True)
    with pytest.raises(TypeError, match="contains no lit_tricks.nets.vit.ViT"):
        _trainer([SMMix()], 1).fit(Classifier(MLP(64, 10), 10), DigitsDataModule(batch_size=16))
    with pytest.raises(ValueError, match="remove Mixup"):
        _trainer([SMMix(), Mixup()], 1).fit(Classifier(ViT(dim=16, depth=1), 10), data)
    with pytest.raises(ValueError, match="leaves no window"):  # one 8x8 patch: no window smaller than the image
        _trainer([SMMix()], 1).fit(Classifier(ViT(patch_size=8, dim=16, depth=1), 10), data)


def test_recipe_with_the_smmix_option_runs(tmp_path, monkeypatch):
    from conftest import ROOT

    from lit_tricks.cli import LitTricksCLI

    monkeypatch.chdir(tmp_path)
    configs = [
        "--config",
        str(ROOT / "configs/vit/digits.yaml"),
        "--config",
        str(ROOT / "configs/vit/options/smmix.yaml"),
    ]
    short = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    cli = LitTricksCLI(args=["fit", *configs, *short])
    assert cli.trainer.global_step == 3 and any(isinstance(cb, SMMix) for cb in cli.trainer.callbacks)
    assert (tmp_path / "lightning_logs").exists()
