"""TFUP: the cache selection against a loop written like the authors', the similarity and logits by hand, a real
fit (cache from an unlabelled target set) and test, the checkpointed cache, bad input."""

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks.functional.tfup import cache_shots, kl_similarity, select_cache, tfup_logits
from lit_tricks.modules.tta.tfup import TFUP


def _reference_cache(features, text, shots):
    """The authors' loop (``refine_few_shots_without_label``), in float64."""
    f, w = F.normalize(features.double(), dim=1), F.normalize(text.double(), dim=1)
    probs = F.softmax(10.0 * f @ w.T, dim=1)
    rows, labels = [], []
    for c in range(len(text)):
        order = probs[:, c].sort(descending=True).indices
        candidates = probs[order[: 2 * shots]]
        score = torch.stack([(p * torch.log(p / candidates)).sum() for p in candidates])
        rows.append(order[score.sort().indices[:shots]])
        labels += [c] * len(rows[-1])
    return torch.cat(rows), torch.tensor(labels)


def test_cache_selection_matches_the_authors_loop():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(4, 6, generator=generator)
    features = torch.randn(40, 6, generator=generator) + 0.5 * text[torch.arange(40) % 4]
    for shots in (1, 3, 5, 30):  # 30: fewer samples than 2k, every class takes all of them
        rows, labels = select_cache(features, text, shots)
        expected_rows, expected_labels = _reference_cache(features, text, shots)
        for c in range(4):  # the same set per class (the order within a class does not matter)
            assert set(rows[labels == c].tolist()) == set(expected_rows[expected_labels == c].tolist())
        assert torch.equal(labels, expected_labels)


def test_cache_selection_prefers_prototypical_samples_by_hand():
    # k = 2: class 0's 2k = 4 most confident samples are 0, 1, 3, 2 (in that order); the two at the ends of that
    # range (0, the most confident, and 2) diverge most from the others, so the cache keeps the middle: 1 and 3
    text = torch.eye(2)
    features = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, 0.6], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    rows, labels = select_cache(features, text, shots=2)
    assert labels.tolist() == [0, 0, 1, 1]
    assert set(rows[:2].tolist()) == {1, 3}  # the middle of {0, 1, 3, 2}: least divergent from the others
    assert cache_shots(100, 10) == 9 and cache_shots(400, 10) == 12 and cache_shots(1000, 10) == 16


def test_similarity_and_logits_by_hand():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3]])
    d = [
        0.0,
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
        0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3),
    ]
    expected = [2 * (1 - (x - min(d)) / (max(d) - min(d))) for x in d]
    torch.testing.assert_close(kl_similarity(p, q), torch.tensor([expected]))
    torch.testing.assert_close(kl_similarity(p, q[:1]), torch.ones(1, 1))  # equal divergences: neutral 1
    # one test feature 30 degrees from class 0's text, 60 from class 1's; cache: one key on each text
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # un-normalised on purpose
    f = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])  # cos 0.866 to class 0, 0.5 to class 1
    keys, labels = torch.tensor([[5.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    cos = torch.tensor([0.866025, 0.5])
    pf = torch.softmax(10 * cos, 0)
    kls = [(pf * (pf / torch.softmax(10 * torch.tensor(row), 0)).log()).sum() for row in ([1.0, 0.0], [0.0, 1.0])]
    sim = torch.tensor([2.0, 0.0]) if kls[0] < kls[1] else torch.tensor([0.0, 2.0])
    cache = torch.exp(-2.0 * (1 - cos * sim))
    expected = 100 * cos + 0.3 * cache
    torch.testing.assert_close(tfup_logits(f, text, keys, labels, beta=2.0), expected[None], atol=1e-4, rtol=1e-5)
    assert sim[0] == 2.0  # the key of class 0 is the semantically closer one


def _shifted_target(n=300, seed=1):
    """Class texts on the unit circle of a 6-D space, target images = their class text + a domain shift + noise, seen
    through a fixed random linear encoder (8 -> 6), so zero-shot is imperfect and the cache can help."""
    generator = torch.Generator().manual_seed(seed)
    encoder = nn.Linear(8, 6)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(6, 8, generator=generator) / 8**0.5)
        encoder.bias.zero_()
    means = torch.randn(5, 8, generator=generator)
    labels = torch.arange(n) % 5
    x = means[labels] + 1.5 * torch.randn(8, generator=generator) + 0.2 * torch.randn(n, 8, generator=generator)
    with torch.no_grad():
        text = encoder(means)
    return encoder, text, x, labels


def test_fit_builds_the_cache_and_test_predicts_with_it(quiet_trainer_kwargs, tmp_path):
    encoder, text, x, y = _shifted_target()
    tfup = TFUP(encoder, text_embeddings=text)
    quiet = {**quiet_trainer_kwargs, "enable_checkpointing": False}
    trainer = pl.Trainer(max_epochs=1, **quiet)
    trainer.fit(tfup, DataLoader(TensorDataset(x), batch_size=64))  # unlabelled: inputs only
    with torch.no_grad():
        features = encoder(x)
    rows, labels = select_cache(features, text, cache_shots(300, 5))
    assert cache_shots(300, 5) == 16 and len(tfup.cache_keys) == 5 * 16
    torch.testing.assert_close(tfup.cache_keys, features[rows])
    assert torch.equal(tfup.cache_labels, labels)
    assert trainer.callback_metrics["tricks/TFUP/cache_size"] == 80
    assert not any(p.requires_grad for p in encoder.parameters())
    labelled = DataLoader(TensorDataset(x, y), batch_size=64)
    result = pl.Trainer(**quiet).test(tfup, labelled, verbose=False)[0]
    zero_shot = ((F.normalize(features, dim=1) @ F.normalize(text, dim=1).T).argmax(1) == y).float().mean()
    tfup_acc = (tfup_logits(features, text, features[rows], labels).argmax(1) == y).float().mean()
    assert result["test/acc"] == pytest.approx(tfup_acc.item(), abs=1e-6)
    assert tfup_acc > zero_shot + 0.15, (zero_shot, tfup_acc)  # 0.60 -> 0.83
    # the cache is in the checkpoint: a fresh module (empty cache) predicts the same after loading it
    trainer.save_checkpoint(tmp_path / "tfup.ckpt")
    fresh = TFUP(encoder, text_embeddings=text)
    again = pl.Trainer(**quiet).test(fresh, labelled, ckpt_path=tmp_path / "tfup.ckpt", verbose=False)[0]
    assert again["test/acc"] == result["test/acc"] and torch.equal(fresh.cache_keys, tfup.cache_keys)
    fresh.reset()  # a stream's reset flag leaves the cache alone
    assert len(fresh.cache_keys) == 80


def test_without_a_fit_the_cache_comes_from_the_whole_test_stream(quiet_trainer_kwargs):
    encoder, text, x, y = _shifted_target()
    tfup = TFUP(encoder, text_embeddings=text)
    stream = DataLoader(TensorDataset(x, y), batch_size=64)
    result = pl.Trainer(limit_test_batches=2, **quiet_trainer_kwargs).test(tfup, stream, verbose=False)[0]
    with torch.no_grad():
        features = encoder(x)
    rows, labels = select_cache(features, text, 16)  # all 300 samples, though only 2 batches are scored
    torch.testing.assert_close(tfup.cache_keys, features[rows])
    scored = tfup_logits(features[:128], text, features[rows], labels).argmax(1) == y[:128]
    assert result["test/acc"] == pytest.approx(scored.float().mean().item(), abs=1e-6)


def test_text_encoder_file_and_shots(tmp_path):
    table = nn.Embedding(3, 4)
    tfup = TFUP(nn.Identity(), text_encoder=table, text_inputs=[0, 1, 2], shots=2)
    torch.testing.assert_close(tfup.text, table.weight.detach())
    torch.save(table.weight.detach(), tmp_path / "text.pt")
    from_file = TFUP(nn.Identity(), text_embeddings=str(tmp_path / "text.pt"), shots=2)
    torch.testing.assert_close(from_file.text, tfup.text)
    tfup.build_cache(torch.randn(10, 4))
    assert tfup.cache_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_clear_errors(quiet_trainer_kwargs):
    text = torch.eye(4)
    with pytest.raises(ValueError, match="either as text_embeddings"):
        TFUP(nn.Identity())
    with pytest.raises(ValueError, match="not both"):
        TFUP(nn.Identity(), text_embeddings=text, text_encoder=nn.Identity(), text_inputs=text)
    with pytest.raises(ValueError, match=r"\[C, D\]"):
        TFUP(nn.Identity(), text_embeddings=torch.ones(4))
    with pytest.raises(ValueError, match="alpha"):
        TFUP(nn.Identity(), text_embeddings=text, alpha=-1.0)
    with pytest.raises(ValueError, match="shots"):
        TFUP(nn.Identity(), text_embeddings=text, shots=0)
    tfup = TFUP(nn.Linear(4, 5), text_embeddings=text)  # 5-D image features, 4-D text
    with pytest.raises(ValueError, match="do not match the text embeddings"):
        pl.Trainer(max_epochs=1, **quiet_trainer_kwargs).fit(tfup, DataLoader(TensorDataset(torch.randn(8, 4))))
    empty = TFUP(nn.Identity(), text_embeddings=text, cache_from_test=False)
    with pytest.raises(ValueError, match="cache is empty"):
        pl.Trainer(**quiet_trainer_kwargs).test(empty, DataLoader(TensorDataset(text, torch.arange(4))))
    with pytest.raises(ValueError, match="cache is empty"):
        tfup_logits(text, text, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="cache_keys"):
        tfup_logits(text, text, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_the_recipe_tests_on_digits_c_with_a_cache_from_the_stream(tmp_path, monkeypatch):
    # the recipe's stand-in encoder (flattened pixels) with class-mean images as "text" embeddings; no fit: the cache
    # comes from the test stream itself (the authors' protocol)
    from conftest import ROOT

    from lit_tricks.cli import LitTricksCLI
    from lit_tricks.data import DigitsDataModule

    monkeypatch.chdir(tmp_path)
    digits = DigitsDataModule(as_image=True, val_fraction=0.0)
    digits.setup()
    x, y = digits.train_set.inputs.flatten(1), digits.train_set.targets
    torch.save(torch.stack([x[y == c].mean(0) for c in range(10)]), tmp_path / "text_embeddings.pt")
    configs = ["--config", str(ROOT / "configs/tta/digits_c.yaml"), "--config", str(ROOT / "configs/tta/tfup.yaml")]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = LitTricksCLI(args=["test", *configs, *quiet, "--trainer.limit_test_batches=12"])
    assert isinstance(cli.model, TFUP) and cli.model.text.shape == (10, 64) and cli.model.alpha == 0.3
    assert len(cli.model.cache_keys) == 10 * 16  # 10 domains x 359 images: k = clip(int(0.3 * 3590 / 10), 9, 16)
    metrics = cli.trainer.callback_metrics
    assert 0 <= metrics["test/acc"] <= 1 and "test/error/gaussian_noise_5" in metrics


def test_under_ddp_the_ranks_gather_the_stream_into_one_cache(tmp_path):
    script = Path(__file__).with_name("ddp_tfup.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["metrics"] == ranks[1]["metrics"]
    encoder, text, x, y = _shifted_target()
    with torch.no_grad():
        features = encoder(x)
    rows, labels = select_cache(features, text, cache_shots(300, 5))
    keys, cache_labels = ranks[0]["cache"]
    assert torch.equal(keys, ranks[1]["cache"][0]) and torch.equal(cache_labels, ranks[1]["cache"][1])
    for c in range(5):  # every sample, gathered from both ranks: the single-process cache, class by class
        assert {tuple(k.tolist()) for k in keys[cache_labels == c]} == {
            tuple(k.tolist()) for k in features[rows[labels == c]]
        }
    expected = (tfup_logits(features, text, features[rows], labels).argmax(1) == y).float().mean().item()
    assert ranks[0]["metrics"]["test/acc"] == pytest.approx(expected, abs=1e-6)  # the ranks' halves summed


def test_a_fit_under_ddp_is_refused_with_a_way_out():
    from types import SimpleNamespace

    tfup = TFUP(nn.Identity(), text_embeddings=torch.eye(3))
    tfup._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="fit the cache on one device"):
        tfup.setup("fit")
    tfup.setup("test")  # testing under DDP is fine
