import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_tricks import Classifier
from lit_tricks.callbacks.neural_collapse import NeuralCollapse
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.neural_collapse import equiangularity, equinorm, nc1, self_duality
from lit_tricks.metrics.neural_collapse import NeuralCollapseMetrics
from lit_tricks.nets import MLP

TAG = "tricks/NeuralCollapse/"


def simplex_etf(num_classes: int, dim: int) -> torch.Tensor:
    """Rows: a simplex ETF of ``num_classes`` unit vectors in ``dim`` dimensions (pairwise cosine -1/(C-1))."""
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    gaussian = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    etf = centred @ torch.linalg.qr(gaussian)[0].T  # an isometry of the centred identity into R^dim
    return etf / etf.norm(dim=1, keepdim=True)


def papyan_reference(h, y, w, pred, c):
    """A direct two-pass numpy computation of NC1-NC4 in the form of Papyan et al.'s measurement code."""
    n = len(h)
    means = np.stack([h[y == k].mean(0) for k in range(c)])
    mu_g = h.mean(0)
    sw = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(n)) / n
    m_ = means - mu_g
    sb = m_.T @ m_ / c
    vals, vecs = np.linalg.eigh(sb)
    vals, vecs = vals[-(c - 1) :], vecs[:, -(c - 1) :]  # svds(Sb, k=C-1)
    out = {"nc1": np.trace(sw @ vecs @ np.diag(1 / vals) @ vecs.T) / c}
    for name, v in (("means", m_), ("classifier", w)):
        norms = np.linalg.norm(v, axis=1)
        out[f"nc2_equinorm_{name}"] = norms.std(ddof=1) / norms.mean()
        u = v / norms[:, None]
        g = u @ u.T
        iu = np.triu_indices(c, 1)
        out[f"nc2_cos_std_{name}"] = g[iu].std(ddof=1)
        coherence = g + 1 / (c - 1)
        np.fill_diagonal(coherence, 0)
        out[f"nc2_equiangular_{name}"] = np.abs(coherence).sum() / (c * (c - 1))
    out["nc3_self_duality"] = np.sum((w / np.linalg.norm(w) - m_ / np.linalg.norm(m_)) ** 2)
    ncc = np.argmin(np.linalg.norm(h[:, None, :] - means[None], axis=2), axis=1)
    out["nc4_ncc_agreement"] = np.mean(ncc == pred)
    return out


def test_exact_collapse_gives_the_ideal_values():
    c, d = 5, 8
    etf = simplex_etf(c, d)
    y = torch.arange(c).repeat(7)
    h = 3.0 * etf[y] + torch.linspace(-1, 1, d, dtype=torch.float64)  # a shared offset: the global mean
    metric = NeuralCollapseMetrics(c, d)
    metric.update(h, y, h @ etf.T)  # logits of a classifier W = ETF: argmax = class
    metric.weight = 2.0 * etf  # self-dual: proportional to the centred means
    values = metric.compute()
    for key in ("nc1", "nc2_equinorm_means", "nc2_cos_std_means", "nc2_equiangular_means", "nc3_self_duality"):
        assert values[key].item() == pytest.approx(0.0, abs=1e-9), key
    assert values["nc2_equiangular_classifier"].item() == pytest.approx(0.0, abs=1e-9)
    assert values["nc4_ncc_agreement"].item() == 1.0
    torch.testing.assert_close(metric.mean_cosines, etf @ etf.T)


def test_non_collapsed_features_match_a_direct_numpy_computation():
    g = torch.Generator().manual_seed(1)
    c, d, n = 5, 8, 300
    y = torch.arange(n) % c
    h = torch.randn(c, d, generator=g)[y] + 0.8 * torch.randn(n, d, generator=g)
    w = torch.randn(c, d, generator=g)
    logits = h @ w.T + 0.5 * torch.randn(n, c, generator=g)
    metric = NeuralCollapseMetrics(c, d)
    metric.update(h, y, logits)
    metric.weight = w
    values = metric.compute()
    expected = papyan_reference(h.double().numpy(), y.numpy(), w.double().numpy(), logits.argmax(1).numpy(), c)
    assert set(values) == set(expected)
    for key, value in expected.items():
        assert values[key].item() == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert values["nc1"].item() > 0.05 and 0.0 < values["nc4_ncc_agreement"].item() < 1.0  # really not collapsed


def test_by_hand_on_tiny_tensors():
    # two classes on a line: h = +-1 +- 0.5 (two samples each); Sw = 0.25, Sb = 1, NC1 = 0.25 / 2
    counts, sums = torch.tensor([2.0, 2.0], dtype=torch.float64), torch.tensor([[2.0], [-2.0]], dtype=torch.float64)
    second = torch.tensor([[1.5**2 + 0.5**2 + 0.5**2 + 1.5**2]], dtype=torch.float64)
    assert nc1(counts, sums, second).item() == pytest.approx(0.125)
    assert equinorm(torch.tensor([[1.0, 0.0], [0.0, 3.0]])).item() == pytest.approx(np.std([1, 3], ddof=1) / 2)
    # cosines of three vectors at 90 degrees: |0 + 1/2| on every pair
    std, gap = equiangularity(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert (std.item(), gap.item()) == (0.0, pytest.approx(0.5))
    # W = [[1, 0], [0, 1]], M = [[1, 0], [-1, 0]]: || W/sqrt2 - M/sqrt2 ||^2 = (0 + 0 + 1 + 1) / 2
    assert self_duality(torch.eye(2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(1.0)


def test_two_halves_equal_one_pass_and_absent_classes_are_left_out():
    g = torch.Generator().manual_seed(2)
    c, d, n = 4, 6, 80
    y = torch.randint(0, 3, (n,), generator=g)  # class 3 never occurs
    h, logits = torch.randn(n, d, generator=g) + y[:, None], torch.randn(n, c, generator=g)
    one, halves = NeuralCollapseMetrics(c, d), NeuralCollapseMetrics(c, d)
    one.update(h, y, logits)
    halves.update(h[:30], y[:30], logits[:30])
    halves.update(h[30:], y[30:], logits[30:])
    w = torch.randn(c, d, generator=g)
    one.weight = halves.weight = w
    a, b = one.compute(), halves.compute()
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-10, abs=1e-12), key
        assert a[key].isfinite(), key
    present = NeuralCollapseMetrics(3, d)
    present.update(h, y, logits[:, :3])
    present.weight = w[:3]
    assert a["nc1"].item() == pytest.approx(present.compute()["nc1"].item())
    # fewer than two classes: NaN, not an error
    single = NeuralCollapseMetrics(c, d)
    single.update(h[:3], torch.zeros(3, dtype=torch.long), logits[:3])
    assert single.compute()["nc1"].isnan()


def _fit(callbacks, logger=False, epochs=2):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=6,
    )  # fmt: skip
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return trainer, model


def test_fit_logs_every_scalar_and_a_figure(tmp_path):
    nc = NeuralCollapse(every_n_epochs=2)
    measured = []
    original = nc.on_validation_epoch_end
    nc.on_validation_epoch_end = lambda t, m: (measured.append(nc._hook is not None), original(t, m))
    trainer, model = _fit([nc], logger=TensorBoardLogger(tmp_path, name="nc"), epochs=2)
    assert measured == [False, False, True]  # sanity check, epoch 0, epoch 1
    keys = {k[len(TAG) :] for k in trainer.callback_metrics if k.startswith(TAG)}
    assert keys == {
        "nc1", "nc2_equinorm_means", "nc2_cos_std_means", "nc2_equiangular_means", "nc2_equinorm_classifier",
        "nc2_cos_std_classifier", "nc2_equiangular_classifier", "nc3_self_duality", "nc4_ncc_agreement",
    }  # fmt: skip
    assert all(trainer.callback_metrics[TAG + k].isfinite() for k in keys)
    assert nc.metric.counts.sum().item() == len(trainer.datamodule.val_dataloader().dataset)
    # the hook is gone after the epoch, and the figure went to TensorBoard
    assert not model.backbone.head._forward_hooks
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "nc" / "version_0"))
    events.Reload()
    assert TAG + "cosines" in events.Tags()["images"]
    assert TAG + "nc1" in events.Tags()["scalars"]


def test_validate_measures_and_matches_the_direct_computation():
    nc = NeuralCollapse()
    trainer, model = _fit([nc], epochs=1)
    trainer.validate(model, trainer.datamodule, verbose=False)
    # recompute from the model's own features of the validation set
    loader = trainer.datamodule.val_dataloader()
    model.eval()
    with torch.no_grad():
        batches = [(model.backbone.forward_features(b["inputs"]), b["targets"]) for b in loader]
    h, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    w = model.backbone.head.weight.detach()
    logits = model.backbone.head(h)
    expected = papyan_reference(h.double().numpy(), y.numpy(), w.double().numpy(), logits.argmax(1).numpy(), 10)
    for key, value in expected.items():
        assert trainer.callback_metrics[TAG + key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_bad_input():
    with pytest.raises(ValueError, match="every_n_epochs"):
        NeuralCollapse(every_n_epochs=0)
    with pytest.raises(TypeError, match="head"):
        NeuralCollapse(head="")
    with pytest.raises(ValueError, match="no submodule 'head'"):
        _fit([NeuralCollapse(head="head")], epochs=1)
    with pytest.raises(ValueError, match="32 outputs but the module has num_classes=10"):
        _fit([NeuralCollapse(head="backbone.body")], epochs=1)  # its last nn.Linear is a hidden layer
    with pytest.raises(ValueError, match="final nn.Linear"):
        _fit([NeuralCollapse(head="backbone.body.2")], epochs=1)  # an activation: no nn.Linear in it
    metric = NeuralCollapseMetrics(3, 4)
    with pytest.raises(ValueError, match=r"features must be \[N, 4\]"):
        metric.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2))
    metric.update(torch.randn(6, 4), torch.arange(3).repeat(2), torch.zeros(6, 3))
    metric.weight = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="weight"):
        metric.compute()


def test_a_wrapped_head_is_read_at_its_final_linear():
    """A head another part wrapped (e.g. multi-sample dropout's Sequential) is measured at its last nn.Linear."""
    from lit_tricks import ApplyMultiSampleDropout

    trainer, model = _fit([ApplyMultiSampleDropout(), NeuralCollapse()], epochs=1)
    assert isinstance(model.backbone.head, torch.nn.Module) and not isinstance(model.backbone.head, torch.nn.Linear)
    assert 0.0 < float(trainer.callback_metrics["tricks/NeuralCollapse/nc4_ncc_agreement"]) <= 1.0
