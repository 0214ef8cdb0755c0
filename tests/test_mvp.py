import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_tricks import Classifier, ContinualEvaluation
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.functional.mvp import (
    compensation_scores,
    focal_weights,
    ignore_scores,
    instance_logit_mask,
    masked_logits,
    prompt_contrastive_loss,
    select_prompts,
)
from lit_tricks.modules.mvp import MVP
from lit_tricks.nets.vit import ViT


def _vit(depth=3, seed=0):
    torch.manual_seed(seed)
    return ViT(image_size=8, patch_size=4, dim=16, depth=depth, heads=2)


def _mvp(**kwargs):
    args = dict(pool_size=3, g_prompt_layers=(0,), g_prompt_length=2, e_prompt_layers=(1, 2), e_prompt_length=3)
    return MVP(_vit(), num_classes=4, **{**args, **kwargs})


def test_key_selection_masks_and_seen_classes_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    selected, distance = select_prompts(query, keys)
    r = 1 - math.sqrt(0.5)  # 1 - cos 45 degrees
    torch.testing.assert_close(distance, torch.tensor([[0.0, 1.0, 2.0], [r, r, 1 + math.sqrt(0.5)], [1.0, 2.0, 1.0]]))
    assert selected.tolist() == [0, 0, 0]  # ties go to the first key
    # count-scaled: (1 - cos) (n + 1); key 0 used 3 times -> 4x its distance
    assert select_prompts(query, keys, torch.tensor([3.0, 0.0, 0.0]))[0].tolist() == [0, 1, 2]
    # mask 2 sigmoid(mu) of the selected key; unseen classes -inf; nothing seen: logits untouched
    mu = torch.tensor([[0.0, -1.0, 2.0], [math.log(3.0), 0.0, 0.0]])
    mask = instance_logit_mask(mu, torch.tensor([1, 0]))
    torch.testing.assert_close(mask, torch.tensor([[1.5, 1.0, 1.0], [1.0, 2 / (1 + math.e), 2 / (1 + math.exp(-2))]]))
    logits = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 1.0]])
    out = masked_logits(logits, mask, torch.tensor([True, False, True]))
    torch.testing.assert_close(out[:, [0, 2]], torch.tensor([[1.5, 3.0], [-1.0, 2 / (1 + math.exp(-2))]]))
    assert torch.isinf(out[:, 1]).all() and (out[:, 1] < 0).all()
    torch.testing.assert_close(masked_logits(logits, None, torch.zeros(3, dtype=torch.bool)), logits)


def _authors_scores(head, features, mask, seen_mask, targets, margin):
    """The authors' ``_compute_grads``/``_get_ignore``/``_get_compensation``: one backward pass per sample."""
    head = copy.deepcopy(head)
    logit = head(features) * mask + seen_mask
    sample_loss = F.cross_entropy(logit, targets, reduction="none")
    sample_grad = []
    for i in range(len(targets)):
        head.zero_grad()
        sample_loss[i].backward(retain_graph=True)
        sample_grad.append(head.weight.grad[targets[i]].clone())
    head.zero_grad()
    F.cross_entropy(logit, targets).backward()
    batch_grad = head.weight.grad[targets]
    ignore = 1 - torch.cosine_similarity(torch.stack(sample_grad), batch_grad, dim=1)
    compensation = 1 - torch.cosine_similarity(head.weight[targets].detach(), features, dim=1) + margin
    return ignore, compensation


def test_ignore_and_compensation_scores_equal_the_authors_per_sample_backward():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(5, 6)
    features, targets = torch.randn(7, 5, generator=g), torch.tensor([0, 1, 1, 3, 0, 2, 3])
    mask = torch.rand(7, 6, generator=g) * 2
    seen = torch.tensor([True, True, True, True, False, False])
    seen_mask = torch.zeros(6).masked_fill(~seen, -torch.inf)
    want_ignore, want_compensation = _authors_scores(head, features, mask, seen_mask, targets, 0.5)
    with torch.no_grad():
        probs = masked_logits(head(features), mask, seen).softmax(dim=1)
        torch.testing.assert_close(ignore_scores(features, probs, mask, targets), want_ignore, atol=1e-6, rtol=0)
        torch.testing.assert_close(compensation_scores(head.weight, features, targets, 0.5), want_compensation)
    # by hand: two samples of class 0, orthogonal features, uniform probabilities -> 1 - cos 45 degrees
    probs = torch.full((2, 2), 0.5)
    torch.testing.assert_close(
        ignore_scores(torch.eye(2), probs, None, torch.tensor([0, 0])), torch.full((2,), 1 - math.sqrt(0.5))
    )
    # the head row is the feature: score = margin; opposite: 2 + margin
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(
        compensation_scores(w, torch.tensor([[2.0, 0.0], [0.0, -1.0]]), torch.tensor([0, 1]), 0.5),
        torch.tensor([0.5, 2.5]),
    )
    torch.testing.assert_close(focal_weights(torch.tensor([0.0, 0.5, 2.0]), 0.5, 2.0), torch.tensor([0.5, 0.625, 2.5]))
    torch.testing.assert_close(focal_weights(torch.tensor([0.3, 2.0]), 0.0, 2.0), torch.ones(2))


def _authors_contrastive(key, topk, distance, count):
    """The expression of the authors' models/mvp.py (before the 2024 edits), with its [B, 1] top-k broadcasting."""
    mass = count + 1
    key_wise_distance = 1 - F.cosine_similarity(key.unsqueeze(1), key, dim=-1)
    num = (key_wise_distance[topk] / mass[topk]).exp().mean()
    return -(num / ((distance / mass[topk]).exp().mean() + num) + 1e-6).log()


def test_contrastive_prompt_loss_equals_the_authors_expression():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    selected, distance = select_prompts(torch.tensor([[1.0, 0.0]]), keys)
    a = (1 + math.e) / 2  # mean of e^0, e^1 (key 0 to keys 0, 1); the query sits on key 0: B = e^0
    torch.testing.assert_close(
        prompt_contrastive_loss(keys, selected, distance, torch.zeros(2)), torch.tensor(-math.log(a / (a + 1) + 1e-6))
    )
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(5, 4, generator=g, requires_grad=True)
    counts = torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0])  # unequal masses: the all-pairs broadcasting matters
    selected, distance = select_prompts(torch.randn(6, 4, generator=g), keys, counts)
    own = distance.gather(1, selected.unsqueeze(1)).squeeze(1)
    ours = prompt_contrastive_loss(keys, selected, distance, counts)
    theirs = _authors_contrastive(keys, selected.unsqueeze(1), own, counts)
    torch.testing.assert_close(ours, theirs)
    grad_ours, grad_theirs = torch.autograd.grad(ours, keys, retain_graph=True)[0], torch.autograd.grad(theirs, keys)[0]
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_prompts_enter_the_listed_blocks_only_and_only_the_prompts_head_keys_masks_train():
    model = _mvp()
    x = torch.rand(5, 1, 8, 8)
    vit = model.backbone
    with torch.no_grad():  # a plain re-implementation of the authors' prompt_tuning loop
        tokens = torch.cat([vit.cls_token.expand(5, -1, -1), vit.patch_embed(x).flatten(2).transpose(1, 2)], 1)
        tokens = tokens + vit.pos_embed
        query = vit.blocks[1](vit.blocks[0](tokens))[:, 0]  # all blocks but the last
        selected = (1 - F.cosine_similarity(query.unsqueeze(1), model.keys, dim=-1)).argmin(1)
        e = model.e_prompts[selected].view(5, 2, 3, -1)
        h = vit.blocks[0](torch.cat([tokens, model.g_prompts.view(1, 2, -1).expand(5, -1, -1)], 1))[:, :5]
        h = vit.blocks[1](torch.cat([h, e[:, 0]], 1))[:, :5]
        h = vit.blocks[2](torch.cat([h, e[:, 1]], 1))[:, :5]
        want = model.head(vit.norm(h)[:, 0]) * (model.mask_logits[selected].sigmoid() * 2)
        features, got_selected, _ = model.prompt_features(x)
    assert torch.equal(got_selected, selected)
    torch.testing.assert_close(model(x), want)  # nothing seen yet: no -inf
    # one update: gradients reach the head, keys, masks, shared and selected prompts, never the backbone
    model.seen[:3] = True
    targets = torch.tensor([0, 1, 2, 0, 1])
    loss, terms = model.mvp_loss(x, targets)
    loss.backward()
    for name in ("head.weight", "head.bias", "keys", "mask_logits", "g_prompts"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    used = model.e_prompts.grad.abs().sum(dim=(1, 2)) > 0
    assert used.tolist() == [k in selected.tolist() for k in range(3)]
    assert all(p.grad is None for p in vit.parameters())
    assert not any(name.startswith("backbone") for name in model.state_dict())
    assert model.key_counts.tolist() == torch.bincount(selected, minlength=3).float().tolist()
    # the loss by its parts: batch focal = mean CE x mean weight (the authors' code); sample: mean of products
    # mask_unseen_in_training=False: the training logits keep every class (seen: all)
    for focal, mask_unseen in (("batch", True), ("sample", True), (None, True), ("batch", False)):
        m = _mvp(focal=focal, contrastive=False, mask_unseen_in_training=mask_unseen)
        m.seen[:3] = True
        seen = m.seen if mask_unseen else torch.ones(4, dtype=torch.bool)
        with torch.no_grad():
            feats, sel, dist = m.prompt_features(x)
            mask = m.mask_logits[sel].sigmoid() * 2
            probs = masked_logits(m.head(feats), mask, seen).softmax(1)
            w = focal_weights(ignore_scores(feats, probs, mask, targets), 0.5, 2.0)
            c = compensation_scores(m.head.weight, feats, targets, 0.5)
            ce = F.cross_entropy(masked_logits(m.head(feats / c.unsqueeze(1)), mask, seen), targets, reduction="none")
            want = {"batch": ce.mean() * w.mean(), "sample": (ce * w).mean(), None: ce.mean()}[focal]
            want = want + dist.gather(1, sel.unsqueeze(1)).mean()
            torch.testing.assert_close(m.mvp_loss(x, targets)[0], want)


def test_online_si_blurry_fit_learns_and_round_trips():
    # a ViT pretrained for 3 epochs on digits (about 80% test accuracy), then MVP on the Si-Blurry digits stream, one
    # pass of 20 batches, online metrics
    torch.manual_seed(0)
    vit = ViT(image_size=8, patch_size=4, dim=32, depth=3, heads=2)
    pretrain = Classifier(vit, num_classes=10, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = DigitsDataModule(as_image=True, batch_size=32)
    pl.Trainer(max_epochs=3, limit_val_batches=0, **kwargs).fit(pretrain, data)
    model = MVP(vit, num_classes=10, pool_size=5, g_prompt_layers=(0,), e_prompt_layers=(1,), e_prompt_length=5)
    evaluation = ContinualEvaluation(every_n_steps=1000, eval_period=300)
    stream = ContinualDataModule(
        DigitsDataModule(as_image=True, batch_size=32, val_fraction=0.0), scenario="si_blurry", seed=1
    )
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=20, callbacks=[evaluation], **kwargs)
    trainer.fit(model, stream)
    summary = evaluation.summary()
    assert trainer.global_step == 20 * 3  # three updates per incoming batch
    assert model.key_counts.sum().item() == 20 * 32 * 3
    assert summary["a_last"] > 0.3 and summary["a_auc"] > 0.3, summary  # chance on the 6+ seen classes: < 0.17
    assert model.seen.sum().item() == len(evaluation.state_dict()["online"]["seen"]) > 1
    # state: counts, seen classes and the trained parameters, not the backbone
    clone = MVP(vit, num_classes=10, pool_size=5, g_prompt_layers=(0,), e_prompt_layers=(1,), e_prompt_length=5)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(clone(x), model(x))
    assert torch.equal(clone.key_counts, model.key_counts) and torch.equal(clone.seen, model.seen)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="backbone must be a ViT"):
        MVP(nn.Linear(64, 10), num_classes=10)
    with pytest.raises(ValueError, match=r"e_prompt_layers=\[2, 3, 4\] must list blocks .* has 3"):
        MVP(_vit(), num_classes=4)
    with pytest.raises(ValueError, match="names a block twice"):
        _mvp(g_prompt_layers=(0, 0))
    with pytest.raises(ValueError, match="focal must be"):
        _mvp(focal="mean")
    with pytest.raises(ValueError, match="alpha must be"):
        _mvp(alpha=1.5)
    with pytest.raises(ValueError, match="margin must be"):
        _mvp(margin=0.0)
    with pytest.raises(TypeError, match="online_iter must be an integer"):
        _mvp(online_iter=1.5)
    with pytest.raises(TypeError, match="use_mask must be True or False"):
        _mvp(use_mask=1)
    with pytest.raises(ValueError, match="as_image=True"):
        _mvp()(torch.rand(2, 1, 16, 16))
    # a trained Classifier holding the ViT is accepted; tricks are refused at setup
    assert MVP(Classifier(_vit(), num_classes=10), num_classes=10, e_prompt_layers=(1, 2)).backbone is not None
    from lit_tricks import Mixup

    trainer = pl.Trainer(callbacks=[Mixup()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model = _mvp()
    model.trainer = trainer
    with pytest.raises(ValueError, match="remove \\['Mixup'\\]"):
        model.setup("fit")


def test_a_missing_backbone_checkpoint_is_named():
    with pytest.raises(FileNotFoundError, match="no_such.ckpt"):
        MVP("no_such.ckpt", num_classes=10)
