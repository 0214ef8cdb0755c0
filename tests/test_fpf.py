import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import Classifier, ContinualEvaluation, ExperienceReplay
from lit_tricks.callbacks.fpf import FPF
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.functional.fpf import forgetting_prone, group_drift, parameter_groups
from lit_tricks.nets import MLP


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_groups_and_drift_by_hand():
    net = _bn_net()
    assert parameter_groups(net) == {
        "1": ["1.weight", "1.bias"],
        "2": ["2.weight", "2.bias"],
        "4": ["4.weight", "4.bias"],
    }
    net[2].bias.requires_grad_(False)  # frozen parameters are not fine-tuned, so they are in no group
    assert parameter_groups(net)["2"] == ["2.weight"]
    # hand-set drifts: the big layer moves most in total (L1 64) but least per parameter (64 / 1040)
    ref = {name: p.detach().clone() for name, p in net.named_parameters()}
    now = {name: p.detach().clone() for name, p in ref.items()}
    now["1.weight"][0] += 1.0  # 64 entries moved by 1
    now["2.weight"][:4] -= 0.5  # 4 x 0.5 = 2 over the 16 + 16 batch-norm parameters
    now["4.bias"][0] += 3.0  # 3 over 170 head parameters
    groups = {"1": ["1.weight", "1.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
    drift = group_drift(ref, now, groups)
    torch.testing.assert_close(drift, torch.tensor([64 / 1040, 2 / 32, 3 / 170]))
    assert forgetting_prone(drift, list(groups), 1) == ["2"]
    assert forgetting_prone(drift, list(groups), 2) == ["2", "1"]
    assert forgetting_prone(torch.tensor([0.2, 0.2, 0.1]), ["a", "b", "c"], 1) == ["a"]  # ties: the earlier
    with pytest.raises(ValueError, match="num_groups"):
        forgetting_prone(drift, list(groups), 4)
    with pytest.raises(ValueError, match="no reference"):
        group_drift({}, now, groups)


def _stream(batch_size: int = 32, epochs_per_task: int = 1, seed: int = 0) -> ContinualDataModule:
    data = DigitsDataModule(batch_size=batch_size, val_fraction=0.0)
    return ContinualDataModule(data, num_tasks=5, epochs_per_task=epochs_per_task, seed=seed)


def _fit(backbone: nn.Module, callbacks: list, stream, seed: int = 0, momentum: float = 0.0) -> Classifier:
    pl.seed_everything(seed, verbose=False)
    model = Classifier(backbone, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum))
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, stream)
    return model


def test_selection_follows_the_drift_since_the_task_start():
    fpf = FPF(memory_size=50, replay=False, every_n_steps=1000, at_fit_end=False, num_groups=1)
    model = _fit(_bn_net(), [fpf], _stream(batch_size=64))
    assert fpf.task == 4 and not fpf.phases
    with torch.no_grad():  # the reference is the start of task 4; make the first layer drift most per parameter
        fpf.reference = {name: p.detach().clone() for name, p in model.named_parameters()}
        model.backbone[1].weight.add_(1.0)
        model.backbone[4].weight[0, 0].add_(50.0)
    assert fpf.select(model) == ["backbone.1"]
    fpf.num_groups = 2
    assert fpf.select(model) == ["backbone.1", "backbone.4"]  # 1.0 per parameter, then 50 / 170
    fpf.modules = ["BatchNorm1d", "backbone.4"]  # by class name and by module name, in the model's order
    assert fpf.select(model) == ["backbone.2", "backbone.4"]


def test_a_phase_touches_only_the_selected_parameters():
    fpf = FPF(memory_size=100, replay=False, every_n_steps=1000, at_fit_end=False, modules=["backbone.4"])
    model = _fit(_bn_net(), [fpf], _stream(batch_size=64), momentum=0.9)
    trainer = model.trainer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = {k: v["momentum_buffer"].clone() for k, v in trainer.optimizers[0].state.items()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    model.eval()
    model.backbone[1].train()  # a user's own mix of modes comes back as it was
    flags = [m.training for m in model.modules()]
    record = fpf.finetune(trainer, model)
    assert record["modules"] == ["backbone.4"] and record["num_params"] == 170
    assert record["loss_last"] < record["loss_first"]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"backbone.4.weight", "backbone.4.bias"}  # the batch norm's running statistics stay
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    for key, buffer in optimizer_state.items():  # so is the main optimizer's state
        assert torch.equal(trainer.optimizers[0].state[key]["momentum_buffer"], buffer)
    assert all(p.grad is grads[name] for name, p in model.named_parameters())
    assert [m.training for m in model.modules()] == flags


def test_fpf_at_the_end_lifts_er_on_split_digits():
    # Split-Digits, 5 tasks, 5 epochs per task; ER with a 200-sample memory, then FPF on the drift's top module
    accuracy = {}
    for name, make in {"er": lambda: ExperienceReplay(200, seed=1), "fpf": lambda: FPF(200, seed=1)}.items():
        evaluation = ContinualEvaluation(every_n_steps=25)
        replay = make()
        _fit(MLP(64, 10, hidden=(200, 200)), [replay, evaluation], _stream(epochs_per_task=5, seed=1), seed=1)
        accuracy[name] = evaluation.summary()["acc"]
    assert [phase["step"] for phase in replay.phases] == [225]  # one phase, after the last step
    assert replay.phases[0]["modules"] == ["backbone.head"]
    assert accuracy["fpf"] > accuracy["er"] + 0.15  # measured 0.877 vs 0.548


def test_k_fpf_phases_and_state_round_trip():
    fpf = FPF(memory_size=100, replay=False, every_n_steps=10, at_task_end=True, num_groups=2, seed=3)
    evaluation = ContinualEvaluation(every_n_steps=5)
    _fit(MLP(64, 10, hidden=(32,)), [fpf, evaluation], _stream(batch_size=64))
    steps = [phase["step"] for phase in fpf.phases]
    # every 10 steps, at each of the 4 task switches (tasks of ~4.6 batches) and after the last step (23)
    assert steps == sorted(steps) and {10, 20, 23} <= set(steps) and len(steps) == 3 + 4
    assert all(len(phase["modules"]) == 2 for phase in fpf.phases)
    assert fpf.seen == 1438 and len(fpf.memory["inputs"]) == 100
    # the state restores the memory, the reference, the task, the history and the phases' generator
    copy = FPF(memory_size=100, replay=False, every_n_steps=10, at_task_end=True, num_groups=2, seed=99)
    copy.load_state_dict(fpf.state_dict())
    assert copy.task == fpf.task == 4 and copy.phases == fpf.phases and copy.seen == fpf.seen
    assert all(torch.equal(copy.reference[k], v) for k, v in fpf.reference.items())
    assert torch.equal(copy.memory["inputs"], fpf.memory["inputs"])
    assert torch.equal(torch.rand(3, generator=copy._phase_generator), torch.rand(3, generator=fpf._phase_generator))


def test_replay_off_trains_on_the_new_batch_only():
    # k-FPF fills the memory but trains each step on the new batch alone: the same weights as plain fine-tuning
    # until the first phase
    pl.seed_everything(0, verbose=False)  # the same initial weights for both (_fit seeds after they are built)
    plain = _fit(MLP(64, 10, hidden=(16,)), [], _stream(batch_size=64))
    fpf = FPF(memory_size=100, replay=False, every_n_steps=1000, at_fit_end=False)
    pl.seed_everything(0, verbose=False)
    stored = _fit(MLP(64, 10, hidden=(16,)), [fpf], _stream(batch_size=64))
    assert fpf.seen == 1438 and not fpf.phases
    for a, b in zip(plain.parameters(), stored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="num_groups"):
        FPF(num_groups=0)
    with pytest.raises(ValueError, match="lr"):
        FPF(lr=-0.1)
    with pytest.raises(ValueError, match="every_n_steps"):
        FPF(every_n_steps=0)
    with pytest.raises(ValueError, match="never fine-tunes"):
        FPF(at_fit_end=False)
    with pytest.raises(TypeError, match="modules"):
        FPF(modules="head")
    with pytest.raises(TypeError, match="replay"):
        FPF(replay="no")
    with pytest.raises(ValueError, match="momentum"):
        FPF(momentum=1.0)
    with pytest.raises(ValueError, match="modules .*'head'"):
        _fit(MLP(64, 10, hidden=(8,)), [FPF(modules=["head"])], _stream(batch_size=256))
    with pytest.raises(ValueError, match="num_groups=5"):
        _fit(MLP(64, 10, hidden=(8,)), [FPF(num_groups=5)], _stream(batch_size=256))
    with pytest.raises(ValueError, match="batch\\['task'\\]"):
        _fit(MLP(64, 10, hidden=(8,)), [FPF(at_task_end=True)], DigitsDataModule(batch_size=256))
