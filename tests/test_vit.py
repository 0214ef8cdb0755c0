import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule
from lit_tricks.nets.vit import ViT


def test_shapes_tokens_and_features():
    torch.manual_seed(0)
    vit = ViT(image_size=16, patch_size=4, num_classes=9, in_channels=3, dim=32, depth=2, heads=4)
    x = torch.rand(5, 3, 16, 16)
    tokens = vit.forward_tokens(x)
    assert tokens.shape == (5, 1 + 16, 32) and vit.grid_size == (4, 4)
    torch.testing.assert_close(vit.forward_features(x), tokens[:, 0])
    torch.testing.assert_close(vit(x), vit.forward_head(tokens[:, 0]))
    assert vit(x).shape == (5, 9)
    assert vit.tokens is None  # kept only on request
    vit.keep_tokens = True
    vit(x)
    torch.testing.assert_close(vit.tokens, tokens)
    assert vit.tokens.requires_grad


def test_last_attention_rows_sum_to_one_and_reductions():
    torch.manual_seed(0)
    vit = ViT(image_size=8, patch_size=2, dim=16, depth=2, heads=2)
    with pytest.raises(RuntimeError, match="forward first"):
        vit.cls_attention()
    vit(torch.rand(3, 1, 8, 8))
    attn = vit.last_attention
    assert attn.shape == (3, 2, 17, 17) and not attn.requires_grad
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, 2, 17))
    torch.testing.assert_close(vit.cls_attention(), attn[:, :, 0, 1:].mean(dim=1))
    torch.testing.assert_close(vit.patch_attention(), attn[:, :, 1:, 1:].mean(dim=(1, 2)))
    assert vit.cls_attention().shape == vit.patch_attention().shape == (3, 16)


def test_explicit_attention_equals_the_fused_kernel():
    torch.manual_seed(0)
    block_attn = ViT(dim=16, depth=1, heads=4).blocks[0].attn
    x = torch.randn(2, 5, 16)
    block_attn.keep_weights = False
    fused = block_attn(x)
    block_attn.keep_weights = True
    torch.testing.assert_close(block_attn(x), fused)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViT(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViT(dim=30, heads=4)
    with pytest.raises(TypeError, match="depth must be an integer"):
        ViT(depth=2.0)
    with pytest.raises(ValueError, match="image_size=8"):
        ViT()(torch.rand(2, 1, 16, 16))


def test_tiny_fit_on_digits():
    pl.seed_everything(0)
    model = Classifier(
        ViT(dim=32, depth=2, heads=4), 10, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05)
    )
    trainer = pl.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, as_image=True))
    assert trainer.callback_metrics["val/acc"] > 0.3  # chance is 0.1; a small ViT starts slowly on 1,000 images
