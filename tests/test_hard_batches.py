"""Hard mini-batches (Sahayam et al., arXiv 2304.03486): the rule, the sampler, the loss feed, and a real fit."""

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier, Trick
from lit_tricks.callbacks.hard_batches import HardBatches
from lit_tricks.data import DigitsDataModule
from lit_tricks.data.hard_batches import HardBatchSampler
from lit_tricks.functional.hard_batches import fixed_batches, hard_batch_round
from lit_tricks.functional.loss_ranking import highest_losses, kept_count
from lit_tricks.nets import MLP


# ---------------------------------------------------------------- the rule
def test_kept_count_floors_like_the_reference_codes_but_keeps_one():
    assert [kept_count(10, f) for f in (1.0, 0.5, 0.29, 0.05)] == [10, 5, 2, 1]
    assert kept_count(7, 0.5) == 3  # DyBAT: int(0.5 * 7)


def test_highest_losses_are_returned_in_index_order_ties_to_the_lower_index():
    losses = torch.tensor([0.2, 3.0, 0.7, 0.7, float("inf"), 0.1])
    assert highest_losses(losses, 3).tolist() == [1, 2, 4]
    assert highest_losses(losses, 4).tolist() == [1, 2, 3, 4]
    assert highest_losses(losses, 0).tolist() == []


def test_fixed_batches_cut_one_seeded_permutation_and_drop_the_rest():
    batches = fixed_batches(11, 3, seed=5)
    assert batches.shape == (3, 3)
    assert batches.flatten().unique().numel() == 9  # disjoint
    assert torch.equal(batches.flatten(), torch.randperm(11, generator=torch.Generator().manual_seed(5))[:9])
    assert not torch.equal(batches, fixed_batches(11, 3, seed=6))


def test_hard_batch_round_by_hand():
    losses = torch.tensor([0.5, 2.0, 0.1, 1.0, 1.5])
    assert hard_batch_round(losses, 0.5, 0).tolist() == [0, 1, 2, 3, 4]  # round 0: everything
    assert hard_batch_round(losses, 0.5, 1).tolist() == [1, 4]  # int(0.5 * 5) = 2 hardest, in batch order
    assert hard_batch_round(losses, 0.6, 3).tolist() == [1, 3, 4]
    assert hard_batch_round(losses, 0.01, 1).tolist() == [1]  # at least one
    assert hard_batch_round(losses, 1.0, 1).tolist() == [0, 1, 2, 3, 4]  # delta = 1: plain training
    unknown = torch.tensor([0.5, float("inf"), 0.1, 9.0])  # a never-trained batch ranks first
    assert hard_batch_round(unknown, 0.5, 1).tolist() == [1, 3]


def _dybat_order(loss_of, b, delta, epochs):
    """The order in which DyBAT's run.py::turbo_train trains batch ids (its loop, with the network replaced by
    ``loss_of(batch, n_iter)``): a full first epoch, then rounds of the int(delta * b) hardest until epochs * b."""
    trained, n_iter, keep = [], 0, int(delta * b)
    retrain = [(0, 0.0)] * b
    for i in range(b):
        trained.append(i)
        retrain[i] = (i, loss_of(i, n_iter))
        n_iter += 1
    while True:
        retrain = sorted(retrain, key=lambda a: a[1], reverse=True)
        batch_ids = [p[0] for p in retrain]
        retrain_ids = sorted(p[0] for p in retrain[:keep])
        for i in retrain_ids:
            if n_iter + 1 > epochs * b:
                return trained
            trained.append(i)
            retrain[batch_ids.index(i)] = (i, loss_of(i, n_iter))
            n_iter += 1


@pytest.mark.parametrize(("b", "delta"), [(7, 0.5), (10, 0.3), (6, 0.8)])
def test_sampler_trains_the_batches_of_the_reference_loop(b, delta):
    """Checked against imjohnzakkam/DyBAT run.py::turbo_train: same batches, same order, same budget."""
    table = torch.rand(b, 200, generator=torch.Generator().manual_seed(b))  # distinct losses: no ties

    def loss_of(batch, n_iter):
        return float(table[batch, n_iter])

    epochs = 4
    expected = _dybat_order(loss_of, b, delta, epochs)
    sampler = HardBatchSampler(num_samples=b * 3 + 2, batch_size=3, delta=delta, seed=1)
    trained = []
    while len(trained) < epochs * b:  # Trainer(max_steps=epochs * b)
        for batch in torch.tensor(list(sampler)).view(-1, 3):
            if len(trained) == epochs * b:
                break
            batch_id = int(sampler.batch_of[batch[0]])
            assert torch.equal(batch, sampler.batches[batch_id])  # a whole fixed batch
            sampler.record(batch, torch.tensor(loss_of(batch_id, len(trained))))
            trained.append(batch_id)
        sampler.set_epoch(sampler.epoch + 1)
    assert trained == expected
    assert len(expected) == epochs * b


def test_sampler_shards_the_global_batches_disjointly_across_ranks():
    ranks = [HardBatchSampler(40, batch_size=4, delta=0.5, num_replicas=2, rank=r) for r in (0, 1)]
    assert ranks[0].num_batches == 5 and len(ranks[0]) == 5 * 4
    shards = [torch.tensor(list(s)).view(5, 4) for s in ranks]
    for j in range(5):  # batch j of each rank is half of global batch j
        both = torch.cat([shards[0][j], shards[1][j]])
        assert both.unique().numel() == 8 and set(both.tolist()) == set(ranks[0].batches[j].tolist())
    for s in ranks:
        for j, loss in enumerate([0.3, 0.1, 0.9, 0.4, 0.2]):
            s.record(s.batches[j][:1], torch.tensor(loss))
        s.set_epoch(1)
    assert len(ranks[1]) == 2 * 4 and ranks[0].round_batches().tolist() == ranks[1].round_batches().tolist() == [2, 3]


def test_sampler_keeps_its_round_and_restores_it_from_the_state():
    sampler = HardBatchSampler(20, batch_size=2, delta=0.3)
    for j in range(10):
        sampler.record(sampler.batches[j], torch.tensor(float(j % 4)))
    sampler.set_epoch(1)
    first = list(sampler)
    assert sampler.round_batches().tolist() == [2, 3, 7]  # losses 3, 3, then the lower id of the two 2s
    sampler.record(sampler.batches[3], torch.tensor(-1.0))  # mid-round updates do not change the round
    assert list(sampler) == first
    resumed = HardBatchSampler(20, batch_size=2, delta=0.3)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(1)
    assert list(resumed) == first and torch.equal(resumed.losses, sampler.losses)
    resumed.set_epoch(2)
    assert 3 not in resumed.round_batches().tolist()  # the next round sees the update


# ---------------------------------------------------------------- errors
def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="delta"):
        HardBatchSampler(10, 2, delta=0.0)
    with pytest.raises(ValueError, match="delta"):
        HardBatchSampler(10, 2, delta=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        HardBatchSampler(10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        HardBatchSampler(3, 4)
    with pytest.raises(ValueError, match="rank"):
        HardBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="hard_batches must be delta"):
        DigitsDataModule(hard_batches=2.0)
    with pytest.raises(ValueError, match="hard_batches chooses the training sampler"):
        DigitsDataModule(hard_batches=0.5, rs2_fraction=0.5)
    with pytest.raises(ValueError, match="resume with the same data"):
        HardBatchSampler(10, 2).load_state_dict(HardBatchSampler(12, 2).state_dict())


def test_sampler_without_the_loss_feed_refuses_round_one():
    sampler = HardBatchSampler(10, 2)
    sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match="add the lit_tricks.HardBatches callback"):
        list(sampler)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip


def test_the_loss_feed_needs_the_sampler_and_a_trick_module():
    with pytest.raises(TypeError, match="hard_batches=delta"):
        _trainer([HardBatches()], max_steps=2).fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP(64, 10)

        def training_step(self, batch, batch_idx):
            return self.net(batch["inputs"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="TrickModule"):
        _trainer([HardBatches()], max_steps=2).fit(Plain(), DigitsDataModule(hard_batches=0.5))


# ---------------------------------------------------------------- a real fit
class RecordRounds(Trick):
    """Remembers the dataset indices of each batch, per epoch, and the sampler's losses at each epoch's end."""

    order = 50

    def __init__(self):
        self.indices, self.losses, self.lengths, self.validations = {}, [], [], 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.lengths.append(trainer.num_training_batches)

    def on_validation_end(self, trainer, pl_module):
        self.validations += not trainer.sanity_checking

    def before_forward(self, trainer, module, batch):
        self.indices.setdefault(trainer.current_epoch, []).append(batch.index.clone())
        return batch

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(trainer.train_dataloader.sampler.losses.clone())


@pytest.mark.parametrize("reload", [False, True])
def test_fit_trains_all_batches_then_the_hardest_within_the_step_budget(reload):
    torch.manual_seed(0)
    record, feed = RecordRounds(), HardBatches()
    data = DigitsDataModule(batch_size=128, hard_batches=0.4)  # 1294 samples: b = 10 batches, rounds of 4
    if reload:  # a new loader (and sampler) each epoch: Lightning sizes every round, validates after each
        schedule = {"reload_dataloaders_every_n_epochs": 1}
    else:  # Lightning sizes epochs once (10 batches): validate every b = 10 steps instead
        schedule = {"val_check_interval": 10, "check_val_every_n_epoch": None}
    trainer = _trainer([record, feed], max_steps=20, **schedule)
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), data)
    sampler = feed.sampler
    assert trainer.global_step == 20 and [len(record.indices[e]) for e in range(4)] == [10, 4, 4, 2]

    def ids(epoch):
        return [int(sampler.batch_of[index[0]]) for index in record.indices[epoch]]

    assert ids(0) == list(range(10))  # the fixed batches in order, each whole
    assert all(torch.equal(index, sampler.batches[j]) for j, index in zip(ids(0), record.indices[0], strict=True))
    assert not record.losses[0].isinf().any()
    for epoch in (1, 2):  # each round: the hardest 40% by the losses at the end of the previous one
        assert ids(epoch) == highest_losses(record.losses[epoch - 1], 4).tolist()
    assert ids(1) != ids(2)
    # the recorded loss is the batch's mean training loss (the module's per-sample cross-entropy)
    assert torch.all(record.losses[0] > 0) and torch.all(record.losses[0] < 10)
    assert float(trainer.callback_metrics["val/acc"]) > 0.5
    assert record.lengths == ([10, 4, 4, 4] if reload else [10, 10, 10, 10])
    assert record.validations == (3 if reload else 2)  # at steps 10, 14, 18 or at 10, 20
    # the same rounds either way; early in training the batches trained longest ago carry the highest losses
    assert ids(1) == [0, 1, 2, 3] and ids(2) == [4, 5, 6, 7]


def test_resume_in_the_middle_of_a_round_is_bit_exact(tmp_path):
    """The harness resumes in epoch 0; here the checkpoint is 2 batches into round 1, after its first batches updated
    their losses: the resumed run must replay the round chosen at its start, not one chosen from the new losses."""
    from test_harness_resume import _assert_same_run, _fit

    full = _fit("hard_batches", tmp_path / "full", 2, every_n_train_steps=7)
    checkpoint = tmp_path / "full" / "steps" / "step=7.ckpt"
    _assert_same_run(full, _fit("hard_batches", tmp_path / "resumed", 2, ckpt_path=checkpoint))
