import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lit_tricks import Classifier
from lit_tricks.callbacks.mixoe import MixOE
from lit_tricks.callbacks.ood_evaluation import OODEvaluation, ood_scores_of
from lit_tricks.callbacks.outlier_exposure import OutlierBatches, OutlierExposure
from lit_tricks.data.open_set import NoiseDataset, OpenSetDigitsDataModule
from lit_tricks.functional.outlier_exposure import mixoe_inputs, mixoe_targets, ood_score, uniform_cross_entropy
from lit_tricks.metrics.ood import OODAUROC, FPRAtTPR, fpr_at_tpr, ood_auroc
from lit_tricks.nets import MLP


def test_uniform_cross_entropy_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; the cross-entropy from u = [1/2, 1/2] is -(ln 1/4 + ln 3/4) / 2
    z = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    expected = [-(math.log(0.25) + math.log(0.75)) / 2, math.log(2.0)]
    torch.testing.assert_close(uniform_cross_entropy(z), torch.tensor(expected))
    # the OE code's form: -(x.mean(1) - logsumexp(x))
    z = torch.randn(5, 7)
    torch.testing.assert_close(uniform_cross_entropy(z), -(z.mean(1) - torch.logsumexp(z, dim=1)))


def test_mixoe_targets_by_hand():
    # 0.6 * e_1 + 0.4 * [1/3, 1/3, 1/3]
    torch.testing.assert_close(
        mixoe_targets(torch.tensor([1]), 0.6, 3), torch.tensor([[0.4 / 3, 0.6 + 0.4 / 3, 0.4 / 3]])
    )
    # probability targets and one lambda per row; lambda 1 keeps the label, 0 gives the uniform distribution
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    out = mixoe_targets(probs, torch.tensor([1.0, 0.0]), 3)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_mixoe_inputs_mixup_and_cutmix_box_as_the_authors():
    x, out = torch.rand(3, 2, 6, 5), torch.rand(3, 2, 6, 5)
    mixed, lam = mixoe_inputs(x, out, 0.3, "mixup")
    torch.testing.assert_close(mixed, 0.3 * x + 0.7 * out)
    assert lam == 0.3
    mixed, lam = mixoe_inputs(x, out, 0.4, "cutmix", np.random.default_rng(5))
    # the authors' rand_bbox (W = size[2], H = size[3]), with the centres from a twin generator
    twin = np.random.default_rng(5)
    W, H, rat = 6, 5, math.sqrt(1 - 0.4)
    cut_w, cut_h = int(W * rat), int(H * rat)
    cx, cy = int(twin.integers(0, W, size=1)[0]), int(twin.integers(0, H, size=1)[0])
    x1, x2 = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    y1, y2 = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    expected = x.clone()
    expected[:, :, x1:x2, y1:y2] = out[:, :, x1:x2, y1:y2]  # the outlier patch pasted into the ID sample
    torch.testing.assert_close(mixed, expected)
    assert lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / (W * H))
    # flat vectors get a segment; the inputs are not changed in place
    v, w = torch.zeros(2, 10), torch.ones(2, 10)
    mixed, lam = mixoe_inputs(v, w, 0.5, "cutmix", np.random.default_rng(0))
    assert lam == pytest.approx(1 - mixed[0].mean().item()) and v.sum() == 0


def test_ood_scores():
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert ood_score(z).item() == pytest.approx(0.75)
    assert ood_score(z, "max_logit").item() == pytest.approx(math.log(3.0))
    assert ood_score(z, "energy").item() == pytest.approx(math.log(4.0))


def _direct_fpr(ids: np.ndarray, oods: np.ndarray, level: float) -> float:
    """Every distinct score as a threshold (keep >= t), up to the highest that keeps all ID samples; the one whose
    ID recall is nearest ``level``, the lowest threshold among equally near ones."""
    candidates = np.unique(np.concatenate([ids, oods]))  # ascending
    candidates = candidates[candidates <= ids.min()][-1:].tolist() + candidates[candidates > ids.min()].tolist()
    recall = np.array([(ids >= t).mean() for t in candidates])
    best = candidates[int(np.argmin(np.abs(recall - level)))]  # argmin: the first, i.e. the lowest threshold
    return float((oods >= best).mean())


def test_auroc_and_fpr95_against_a_direct_computation():
    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = np.round(rng.normal(1.0, 1.0, size=rng.integers(5, 60)), 1)  # rounded: ties within and across sets
        oods = np.round(rng.normal(0.0, 1.0, size=rng.integers(5, 60)), 1)
        pairs = (ids[:, None] > oods[None, :]).mean() + 0.5 * (ids[:, None] == oods[None, :]).mean()
        labels = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
        auroc = ood_auroc(torch.tensor(ids), torch.tensor(oods)).item()
        assert auroc == pytest.approx(pairs) and auroc == pytest.approx(roc_auc_score(labels, np.r_[ids, oods]))
        for level in (0.95, 0.8):
            fpr = fpr_at_tpr(torch.tensor(ids), torch.tensor(oods), level).item()
            assert fpr == pytest.approx(_direct_fpr(ids, oods, level)), trial
    # by hand: 20 ID scores 1..20 keep 19 at threshold 2; OOD 2.5 and 30 pass it
    ids = torch.arange(1.0, 21.0)
    assert fpr_at_tpr(ids, torch.tensor([0.5, 2.5, 30.0])).item() == pytest.approx(2 / 3)
    assert ood_auroc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])).item() == pytest.approx(0.5)


def test_metrics_accumulate_and_merge_as_ranks_do():
    ids, oods = torch.randn(40) + 1, torch.randn(30)
    whole_auroc, whole_fpr = OODAUROC(), FPRAtTPR()
    whole_auroc.update(ids, False)
    whole_auroc.update(oods, True)
    whole_fpr.update(torch.cat([ids, oods]), torch.cat([torch.zeros(40), torch.ones(30)]).bool())
    # two "ranks" with uneven shares, merged as DDP's gather-and-concatenate does
    parts = [OODAUROC(), OODAUROC()]
    parts[0].update(ids[:25], False)
    parts[1].update(torch.cat([ids[25:], oods]), torch.cat([torch.zeros(15), torch.ones(30)]).bool())
    parts[0].merge_state(parts[1])
    assert parts[0].compute().item() == pytest.approx(whole_auroc.compute().item())
    assert whole_auroc.compute().item() == pytest.approx(ood_auroc(ids, oods).item())
    assert whole_fpr.compute().item() == pytest.approx(fpr_at_tpr(ids, oods).item())


def test_outlier_batches_stream_ranks_and_state():
    data = torch.arange(7.0)[:, None]
    one = OutlierBatches(data, seed=3)
    first = torch.cat([one.draw(3) for _ in range(7)]).flatten()  # 21 = three passes of 7
    for k in range(3):
        assert sorted(first[7 * k : 7 * k + 7].tolist()) == list(range(7))  # each pass is a permutation
    assert not torch.equal(first[:7], first[7:14])  # with a new order
    # two ranks: disjoint shares of the same stream, identical state
    ranks = [OutlierBatches(data, seed=3), OutlierBatches(data, seed=3)]
    shares = [torch.cat([ranks[r].draw(2, r, 2) for _ in range(3)]) for r in (0, 1)]
    stream = OutlierBatches(data, seed=3)
    steps = [stream.draw(4) for _ in range(3)]
    torch.testing.assert_close(shares[0], torch.cat([s[:2] for s in steps]))
    torch.testing.assert_close(shares[1], torch.cat([s[2:] for s in steps]))
    assert ranks[0].state_dict()["position"] == ranks[1].state_dict()["position"] == 12 % 7
    # resume: a fresh sampler loaded with the state continues the stream exactly (datasets and callables alike)
    for source in (NoiseDataset(9, [2], seed=1), lambda n, g: torch.rand(n, 2, generator=g)):
        a = OutlierBatches(source, seed=0)
        a.draw(4)
        b = OutlierBatches(source, seed=0)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a.draw(5), b.draw(5))


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        max_steps=4, log_every_n_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=1, **kwargs,
    )  # fmt: skip


def test_fit_oe_and_mixoe_with_ood_evaluation():
    torch.manual_seed(0)
    dm = OpenSetDigitsDataModule(known_classes=6, batch_size=32)
    dm.setup()
    assert dm.num_classes == 6 and int(dm.train_set.targets.max()) == 5 and int(dm.test_set.targets.max()) == 5
    assert int(dm.near_ood_set.targets.min()) == 6 and len(dm.far_ood_set) == len(dm.test_set)
    assert dm.outlier_set.inputs.shape == dm.train_set.inputs.shape
    torch.testing.assert_close(dm.outlier_set.inputs.sort(1).values, dm.train_set.inputs.sort(1).values)  # scrambled
    evaluation = OODEvaluation({"near": dm.near_ood_set, "far": dm.far_ood_set})
    tricks = [MixOE(dm.outlier_set, op="cutmix", alpha=2.0, beta=5.0), OutlierExposure(dm.outlier_set), evaluation]
    model = Classifier(MLP(64, 6, hidden=(32,)), num_classes=6)
    trainer = _trainer(tricks, val_check_interval=4)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert metrics["train/oe"] >= 0.5 * math.log(6) - 1e-5  # beta * CE to uniform >= beta * log C
    assert metrics["train/mixoe"] == pytest.approx(5.0 * metrics["tricks/MixOE/loss"].item(), rel=1e-5)
    assert tricks[0].outliers.position == 4 * 32 and tricks[1].outliers.position == 4 * 64  # 2x the batch
    for name in ("near", "far"):
        assert 0 <= metrics[f"tricks/OODEvaluation/{name}/auroc"] <= 1
        assert 0 <= metrics[f"tricks/OODEvaluation/{name}/fpr95"] <= 1
    # the logged far-OOD AUROC is the one of the network's MSP scores on the validation and noise sets
    val_inputs = dm.val_set.inputs[: dm.eval_batch_size]
    with torch.no_grad():
        ids = ood_score(model(val_inputs))
    far = ood_scores_of(model, dm.far_ood_set)
    expected = ood_auroc(ids, far).item()
    assert metrics["tricks/OODEvaluation/far/auroc"].item() == pytest.approx(expected, abs=1e-6)
    trainer.test(model, dm, verbose=False)
    assert "tricks/OODEvaluation/near/fpr95" in trainer.callback_metrics


def test_mixoe_state_restored():
    data = NoiseDataset(50, [4], seed=0)
    a = MixOE(data, op="cutmix", seed=1)
    a.outliers.draw(30)
    a._rng.beta(1.0, 1.0)
    b = MixOE(data, op="cutmix", seed=1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.outliers.draw(32), b.outliers.draw(32))
    assert a._rng.beta(1.0, 1.0) == b._rng.beta(1.0, 1.0)


def test_bad_input_is_a_clear_error():
    data = torch.rand(10, 64)
    with pytest.raises(ValueError, match="beta"):
        OutlierExposure(data, beta=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        OutlierExposure(data, batch_size=0)
    with pytest.raises(TypeError, match="outliers must be"):
        OutlierExposure(3)
    with pytest.raises(ValueError, match="non-empty"):
        OutlierExposure(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="alpha"):
        MixOE(data, alpha=0.0)
    with pytest.raises(ValueError, match="op must be"):
        MixOE(data, op="mix")
    with pytest.raises(ValueError, match="shape"):
        mixoe_inputs(torch.zeros(2, 3), torch.zeros(2, 4), 0.5, "mixup")
    with pytest.raises(ValueError, match="tpr"):
        FPRAtTPR(tpr=0.0)
    with pytest.raises(ValueError, match="OOD metrics need"):
        ood_auroc(torch.zeros(0), torch.ones(3))
    with pytest.raises(TypeError, match="ood must be"):
        OODEvaluation([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="score"):
        OODEvaluation({"far": torch.zeros(3, 2)}, score="entropy")
    with pytest.raises(ValueError, match="kind"):
        NoiseDataset(5, [2], kind="salt")
    with pytest.raises(ValueError, match="known_classes"):
        OpenSetDigitsDataModule(known_classes=10)
    # outliers shaped unlike the inputs: named at the first step
    dm = OpenSetDigitsDataModule(known_classes=6, batch_size=16)
    with pytest.raises(ValueError, match="shaped like the inputs"):
        _trainer([OutlierExposure(torch.rand(10, 32))]).fit(Classifier(MLP(64, 6), num_classes=6), dm)
    # a plain LightningModule cannot run the trick
    plain = pl.LightningModule()
    with pytest.raises(TypeError, match="TrickModule"):
        MixOE(data).setup(_trainer([]), plain, "fit")


def test_item_by_item_and_in_memory_sources_agree():
    from torch.utils.data import TensorDataset

    x = torch.rand(11, 4)
    a, b = OutlierBatches(x, seed=2), OutlierBatches(TensorDataset(x, torch.zeros(11)), seed=2)
    for _ in range(4):
        torch.testing.assert_close(a.draw(5), b.draw(5))
    model = torch.nn.Linear(4, 3)
    whole = ood_scores_of(model, x, batch_size=4)
    torch.testing.assert_close(ood_scores_of(model, TensorDataset(x), batch_size=4), whole)
    shares = [ood_scores_of(model, x, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(shares).sort().values, whole.sort().values)
