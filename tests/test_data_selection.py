"""Selective backprop, data-diet scores (EL2N, GraNd) with pruning, and RS2."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lit_tricks import Classifier, DataDietScores, SelectiveBackprop, Trick, TrickBatch
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.data import DigitsDataModule, RS2Sampler, rs2_indices
from lit_tricks.functional import (
    el2n_scores,
    grand_scores,
    keep_by_scores,
    load_scores,
    select_by_loss,
    selection_probabilities,
)
from lit_tricks.nets import CNN2D, MLP


class RecordBatches(Trick):
    """Remembers the size and dataset indices of every batch the training forward pass sees."""

    order = 50

    def __init__(self) -> None:
        self.sizes, self.indices = [], []

    def before_forward(self, trainer, module, batch):
        self.sizes.append(len(batch))
        self.indices.append(batch.index.clone())
        return batch


# ---------------------------------------------------------------- pieces
def test_trick_batch_select_slices_every_per_sample_field():
    batch = TrickBatch(
        torch.arange(8.0).view(4, 2),
        torch.tensor([0, 1, 2, 3]),
        index=torch.tensor([10, 11, 12, 13]),
        weight=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        extras={"clean_targets": torch.tensor([3, 2, 1, 0]), "note": "kept", "scalar": torch.tensor(5)},
    )
    part = batch.select(torch.tensor([2, 0]))
    assert part.inputs.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert part.targets.tolist() == [2, 0] and part.index.tolist() == [12, 10] and part.weight.tolist() == [3.0, 1.0]
    assert part.extras["clean_targets"].tolist() == [1, 3]
    assert part.extras["note"] == "kept" and int(part.extras["scalar"]) == 5


def test_eval_mode_restores_each_layers_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    net[1].eval()
    with eval_mode(net):
        assert not any(layer.training for layer in net.modules())
    assert [layer.training for layer in net.modules()] == [True, True, False, True]


def test_el2n_on_a_known_case():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]]))
    scores = el2n_scores(logits, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(scores, torch.tensor([0.5 * 2**0.5, 0.1 * 2**0.5, 0.9 * 2**0.5]))
    # probability targets: distance to the target distribution
    torch.testing.assert_close(el2n_scores(logits[:1], torch.tensor([[0.5, 0.5]])), torch.tensor([0.0]))


def test_grand_of_a_linear_model_is_the_closed_form():
    # for z = W x + b: dCE/dW = (p - y) x^T and dCE/db = p - y, so ||grad|| = ||p - y|| sqrt(||x||^2 + 1)
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    expected = el2n_scores(model(x), y) * (x.pow(2).sum(dim=1) + 1).sqrt()
    torch.testing.assert_close(grand_scores(model, x, y), expected.detach())


def test_grand_matches_autograd_one_sample_at_a_time():
    torch.manual_seed(0)
    model = MLP(6, 3, hidden=(5,)).eval()
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 1])
    loop = []
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        loop.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    torch.testing.assert_close(grand_scores(model, x, y), torch.stack(loop))


def test_keep_by_scores_keeps_the_highest_after_the_offset():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    assert keep_by_scores(scores, 0.4).tolist() == [1, 3]
    assert keep_by_scores(scores, 0.4, offset=1).tolist() == [3, 4]
    assert keep_by_scores(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fraction"):
        keep_by_scores(scores, 0.0)
    with pytest.raises(ValueError, match="offset"):
        keep_by_scores(scores, 0.8, offset=2)


def test_selection_probabilities_follow_the_percentile_power():
    torch.testing.assert_close(selection_probabilities(4, 1.0), torch.full((4,), 0.25))
    # keep = 0.5: p_j proportional to (j + 1/2) / N
    torch.testing.assert_close(selection_probabilities(4, 0.5), torch.tensor([1.0, 3.0, 5.0, 7.0]) / 16)
    # keep = 0.25: power 3
    weights = torch.tensor([0.125, 0.375, 0.625, 0.875]) ** 3
    torch.testing.assert_close(selection_probabilities(4, 0.25), weights / weights.sum())
    with pytest.raises(ValueError, match="keep"):
        selection_probabilities(4, 1.5)


def test_select_by_loss_favours_high_losses_and_draws_without_replacement():
    losses = torch.arange(100.0).flip(0)  # sample i has loss 99 - i
    generator = torch.Generator().manual_seed(0)
    picked = select_by_loss(losses, 0.1, generator)
    assert picked.numel() == 10 and picked.unique().numel() == 10
    assert losses[picked].mean() > 80  # a uniform draw would average 49.5
    everything = select_by_loss(losses, 1.0, generator)
    assert sorted(everything.tolist()) == list(range(100))


def test_rs2_covers_every_sample_once_per_cycle_without_repeats_in_an_epoch():
    n, fraction = 10, 0.3  # 3 per epoch, cycles of 4 epochs, the last round wraps round
    epochs = [rs2_indices(n, fraction, e, seed=1) for e in range(8)]
    assert all(e.numel() == 3 and e.unique().numel() == 3 for e in epochs)
    for cycle in (epochs[:4], epochs[4:]):
        assert set(torch.cat(cycle).tolist()) == set(range(n))
    assert not torch.equal(torch.cat(epochs[:4]), torch.cat(epochs[4:]))  # a fresh permutation per cycle
    assert torch.equal(rs2_indices(n, fraction, 5, seed=1), epochs[5])  # a function of (seed, epoch)
    # 1/r epochs exactly when K divides N
    quarters = torch.cat([rs2_indices(100, 0.25, e) for e in range(4)])
    assert sorted(quarters.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="fraction"):
        rs2_indices(10, 0.0, 0)


def test_rs2_sampler_follows_set_epoch():
    sampler = RS2Sampler(range(20), fraction=0.5, seed=2)
    assert len(sampler) == 10
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first + second) == list(range(20))
    with pytest.raises(ValueError, match="fraction"):
        RS2Sampler(range(20), fraction=1.5)


# ---------------------------------------------------------------- in a Trainer
def _trainer(quiet_trainer_kwargs, callbacks, **kwargs):
    return pl.Trainer(callbacks=callbacks, **{**quiet_trainer_kwargs, **kwargs})


def test_selective_backprop_trains_on_the_kept_part_inside_its_window(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    recorder = RecordBatches()
    trick = SelectiveBackprop(keep=0.25, start=0.5, end=1.0, interrupt=0)
    model = Classifier(CNN2D(num_classes=10, width=4), num_classes=10)
    trainer = _trainer(quiet_trainer_kwargs, [trick, recorder], max_steps=8, limit_train_batches=8)
    trainer.fit(model, DigitsDataModule(batch_size=32, as_image=True, val_fraction=0.0))
    assert recorder.sizes == [32] * 4 + [8] * 4
    # the selection forward runs in eval mode: batch norm counted the 8 training forwards only
    norm = next(layer for layer in model.modules() if isinstance(layer, nn.BatchNorm2d))
    assert int(norm.num_batches_tracked) == 8
    assert model.training and model.backbone.training


def test_selective_backprop_interrupts_with_full_batches(quiet_trainer_kwargs):
    recorder = RecordBatches()
    trick = SelectiveBackprop(keep=0.5, start=0.0, end=1.0, interrupt=2)
    trainer = _trainer(quiet_trainer_kwargs, [trick, recorder], max_steps=6)
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(batch_size=16))
    assert recorder.sizes == [8, 16, 8, 16, 8, 16]


def test_selective_backprop_errors():
    with pytest.raises(ValueError, match="keep"):
        SelectiveBackprop(keep=0.0)
    with pytest.raises(ValueError, match="start and end"):
        SelectiveBackprop(start=0.9, end=0.5)
    with pytest.raises(ValueError, match="interrupt"):
        SelectiveBackprop(interrupt=-1)


def test_selective_backprop_needs_a_finite_run(quiet_trainer_kwargs):
    trainer = _trainer(quiet_trainer_kwargs, [SelectiveBackprop()], max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())


def test_data_diet_scores_are_the_el2n_of_the_model_at_that_epoch(quiet_trainer_kwargs, tmp_path):
    pl.seed_everything(0, verbose=False)
    scorer = DataDietScores("el2n", epoch=4, save_to=tmp_path / "run0.pt")
    adam = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.3), num_classes=10, optimizer=adam)
    datamodule = DigitsDataModule(batch_size=32, label_noise=0.3)
    _trainer(quiet_trainer_kwargs, [scorer], max_epochs=4).fit(model, datamodule)
    train = datamodule.train_set
    with torch.no_grad():
        expected = el2n_scores(model.eval()(train.inputs), train.targets)
    torch.testing.assert_close(scorer.scores, expected)
    torch.testing.assert_close(load_scores(tmp_path / "run0.pt"), expected)
    # mislabelled samples score higher than clean ones
    noisy = train.targets != train.extras["clean_targets"]
    assert scorer.scores[noisy].mean() > 1.5 * scorer.scores[~noisy].mean()


def test_data_diet_scores_go_to_the_run_directory(quiet_trainer_kwargs, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = quiet_trainer_kwargs["default_root_dir"]

    def fit(save_to, **kwargs):
        scorer = DataDietScores("el2n", epoch=0, save_to=save_to)
        trainer = _trainer({**quiet_trainer_kwargs, **kwargs}, [scorer], max_steps=1)
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        return scorer

    relative = fit("data_diet/el2n.pt")  # no logger: under the default_root_dir
    assert relative.saved_to == root / "data_diet" / "el2n.pt"
    torch.testing.assert_close(load_scores(relative.saved_to), relative.scores)
    logged = fit("el2n.pt", logger=CSVLogger(root / "logs"))  # a logger's versioned directory, as checkpoints
    assert logged.saved_to == root / "logs" / "lightning_logs" / "version_0" / "el2n.pt" and logged.saved_to.is_file()
    absolute = fit(tmp_path / "elsewhere" / "el2n.pt")  # kept as it is
    assert absolute.saved_to == tmp_path / "elsewhere" / "el2n.pt" and absolute.saved_to.is_file()
    assert not any(cwd.iterdir())  # nothing written to the current directory


def test_data_diet_scoring_leaves_training_unchanged(quiet_trainer_kwargs):
    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.3), num_classes=10)
        _trainer(quiet_trainer_kwargs, callbacks, max_epochs=2, limit_train_batches=5).fit(model, DigitsDataModule())
        return model.state_dict()

    with_scores, without = fit([DataDietScores("grand", epoch=1)]), fit([])
    assert all(torch.equal(with_scores[k], without[k]) for k in without)


def test_grand_at_initialisation(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    scorer = DataDietScores("grand", epoch=0, batch_size=100)
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    initial = MLP(64, 10, hidden=(16,))
    initial.load_state_dict(model.backbone.state_dict())
    datamodule = DigitsDataModule()
    _trainer(quiet_trainer_kwargs, [scorer], max_steps=1).fit(model, datamodule)
    train = datamodule.train_set
    torch.testing.assert_close(scorer.scores[:50], grand_scores(initial, train.inputs[:50], train.targets[:50]))


def test_pruning_by_saved_scores_averages_runs_and_keeps_the_highest(tmp_path):
    full = DigitsDataModule(seed=3)
    full.setup()
    n = len(full.train_set)
    first, second = torch.rand(n), torch.rand(n)
    torch.save({"scores": first}, tmp_path / "a.pt")
    torch.save({"scores": second}, tmp_path / "b.pt")
    pruned = DigitsDataModule(seed=3, prune_scores=[str(tmp_path / "a.pt"), str(tmp_path / "b.pt")], prune_keep=0.3)
    pruned.setup()
    keep = keep_by_scores((first + second) / 2, 0.3)
    assert len(pruned.train_set) == keep.numel() == round(0.3 * n)
    assert torch.equal(pruned.train_set.inputs, full.train_set.inputs[keep])
    assert torch.equal(pruned.train_set.extras["clean_targets"], full.train_set.extras["clean_targets"][keep])
    assert pruned.train_set[0]["index"] == 0  # indices count within the pruned set, for per-sample memories


def test_pruning_errors(tmp_path):
    torch.save({"scores": torch.rand(7)}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="prune_scores hold 7 scores"):
        DigitsDataModule(prune_scores=str(tmp_path / "short.pt"), prune_keep=0.5).setup()
    with pytest.raises(ValueError, match="need prune_scores"):
        DigitsDataModule(prune_keep=0.5)
    with pytest.raises(ValueError, match="prune_keep"):
        DigitsDataModule(prune_scores="x.pt", prune_keep=0.0)
    with pytest.raises(ValueError, match="rs2_fraction"):
        DigitsDataModule(rs2_fraction=0.0)
    with pytest.raises(ValueError, match="score must be"):
        DataDietScores("forgetting")
    with pytest.raises(ValueError, match="epoch"):
        DataDietScores(epoch=-1)
    with pytest.raises(TypeError, match="save_to must be a str or Path"):
        DataDietScores(save_to=3)


def test_rs2_datamodule_trains_on_fresh_subsets(quiet_trainer_kwargs):
    recorder = RecordBatches()
    datamodule = DigitsDataModule(batch_size=100, rs2_fraction=0.25, val_fraction=0.0)
    trainer = _trainer(quiet_trainer_kwargs, [recorder], max_epochs=4)
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), datamodule)
    n = len(datamodule.train_set)
    per_epoch = math.ceil(round(0.25 * n) / 100)
    assert trainer.num_training_batches == per_epoch and trainer.global_step == 4 * per_epoch
    seen = torch.cat(recorder.indices)
    assert seen.numel() == 4 * round(0.25 * n)
    assert seen.unique().numel() >= n - 1  # all of it (K may not divide N: the last round wraps round)


def test_data_diet_scoring_epoch_out_of_reach(quiet_trainer_kwargs):
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    with pytest.raises(ValueError, match=r"epoch=3\) scores after epoch 3, but the run stops after max_epochs=2"):
        trainer = pl.Trainer(max_epochs=2, callbacks=[DataDietScores(epoch=3)], **quiet_trainer_kwargs)
        trainer.fit(model, DigitsDataModule())
    scorer = DataDietScores(epoch=2)
    trainer = pl.Trainer(max_epochs=2, max_steps=3, limit_val_batches=0, callbacks=[scorer], **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match=r"saved no scores: training stopped before the end of epoch 2"):
        trainer.fit(model, DigitsDataModule())
    assert scorer.scores is None


def test_a_damaged_score_file_is_named(tmp_path):
    damaged = tmp_path / "el2n.pt"
    damaged.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"el2n.pt' is damaged"):
        load_scores(damaged)
