"""lit_tricks.optim: Lion and AdaBelief against their update rules written out by hand, in fits, from YAML, resumed."""

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT

from lit_tricks import Classifier
from lit_tricks.cli import LitTricksCLI
from lit_tricks.data import DigitsDataModule
from lit_tricks.nets import MLP
from lit_tricks.optim import AdaBelief, Lion
from lit_tricks.optim.adabelief import rectification


# ---------------------------------------------------------------- the update rules, written out
def lion_reference(p, g, m, lr, beta1, beta2, weight_decay):
    """google/automl lion/lion_pytorch.py's update of one parameter."""
    p.mul_(1 - lr * weight_decay)
    p.add_(torch.sign(beta1 * m + (1 - beta1) * g), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


def adabelief_reference(p, g, state, t, lr, betas, eps, weight_decay, weight_decouple=True, fixed_decay=False,
                        rectify=True, degenerated_to_sgd=True, amsgrad=False):  # fmt: skip
    """adabelief-pytorch 0.2.1's update of one parameter at step t (for amsgrad, without rectification)."""
    beta1, beta2 = betas
    if weight_decouple:
        p.mul_(1 - (weight_decay if fixed_decay else lr * weight_decay))
    else:
        g = g + weight_decay * p
    m, s = state["m"], state["s"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    s.mul_(beta2).add_((1 - beta2) * (g - m) ** 2).add_(eps)
    if amsgrad:
        torch.maximum(state["max"], s, out=state["max"])
        s = state["max"]
    if not rectify:
        p.sub_(lr / (1 - beta1**t) * m / (s.sqrt() / math.sqrt(1 - beta2**t) + eps))
        return
    rho_max = 2 / (1 - beta2) - 1
    rho = rho_max - 2 * t * beta2**t / (1 - beta2**t)
    if rho >= 5:
        r = math.sqrt((1 - beta2**t) * (rho - 4) / (rho_max - 4) * (rho - 2) / rho * rho_max / (rho_max - 2))
        p.sub_(lr * r / (1 - beta1**t) * m / (s.sqrt() + eps))
    elif degenerated_to_sgd:
        p.sub_(lr / (1 - beta1**t) * m)


def gradient_stream(shapes, steps, seed=0, skip=None):
    """Fixed float64 gradients per step; ``skip(step, i)`` leaves parameter i without a gradient."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            None if skip and skip(t, i) else torch.randn(s, generator=gen, dtype=torch.float64)
            for i, s in enumerate(shapes)
        ]
        for t in range(steps)
    ]


SHAPES = [(3, 2), (2,), (4,)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def run_ours(optimizer, params, stream):
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()


# ---------------------------------------------------------------- Lion
def test_lion_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -0.3], dtype=torch.float64)
    opt.step()  # p (1 - 0.05) - 0.1 sign(0.1 g)
    torch.testing.assert_close(p.detach(), torch.tensor([0.85, -1.8], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.003], dtype=torch.float64))
    p.grad = torch.tensor([-0.01, 0.02], dtype=torch.float64)
    opt.step()  # c = 0.9 m + 0.1 g = [0.0035, -0.0007]: the momentum keeps the sign the new gradient flips
    torch.testing.assert_close(p.detach(), torch.tensor([0.85 * 0.95 - 0.1, -1.8 * 0.95 + 0.1], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.00485, -0.00277], dtype=torch.float64))
    assert list(opt.state[p]) == ["exp_avg"]  # one state tensor per parameter


def test_lion_equals_the_reference_rule_over_steps_and_param_groups():
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "betas": (0.8, 0.9), "weight_decay": 0.0}]
    opt = Lion(groups, lr=0.01, weight_decay=0.2)
    ref = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in ref]
    stream = gradient_stream(SHAPES, 25, skip=lambda t, i: i == 1 and t % 4 == 2)
    run_ours(opt, params, stream)
    for grads in stream:
        for i, (p, g, m) in enumerate(zip(ref, grads, moments, strict=True)):
            if g is not None:
                lion_reference(p, g, m, *((0.01, 0.9, 0.99, 0.2) if i < 2 else (0.03, 0.8, 0.9, 0.0)))
    for ours, theirs in zip(params, ref, strict=True):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- AdaBelief
def test_adabelief_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdaBelief([p], lr=0.1, eps=0.0, rectify=False)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()  # m = 0.05, s = 0.001 * 0.45^2; 0.1 / 0.1 * 0.05 / sqrt(s / 0.001) = 0.05 / 0.45
    torch.testing.assert_close(p.detach(), torch.tensor([1 - 1 / 9], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg_var"], torch.tensor([0.001 * 0.45**2], dtype=torch.float64))
    assert opt.state[p]["step"] == 1


def test_rectification_starts_at_step_six_and_matches_radam():
    assert [t for t in range(1, 10) if rectification(t, 0.9, 0.999, True)[0] >= 5][0] == 6
    assert rectification(1, 0.9, 0.999, True)[1] == pytest.approx(10.0)  # SGD step: 1 / (1 - beta1)
    assert rectification(1, 0.9, 0.999, False)[1] == 0.0  # no step
    rho, r = rectification(10**6, 0.9, 0.999, True)
    assert rho == pytest.approx(1999) and r == pytest.approx(1.0)  # late steps: Adam's step size


VARIANTS = {
    "defaults": {},
    "decoupled_decay": {"weight_decay": 0.1},
    "fixed_decay": {"weight_decay": 0.1, "fixed_decay": True},
    "l2_decay": {"weight_decay": 0.1, "weight_decouple": False},
    "no_rectify": {"rectify": False},
    "amsgrad": {"rectify": False, "amsgrad": True},
    "no_sgd_steps": {"degenerated_to_sgd": False, "eps": 1e-8, "betas": (0.8, 0.99)},
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS)
def test_adabelief_equals_the_authors_rule_over_steps_and_param_groups(options):
    config = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0, **options}
    params = make_params()
    opt = AdaBelief([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2}], **config)
    # 20 steps cross the rectification's threshold (step 6); parameter 1 misses some steps, so it runs behind
    stream = gradient_stream(SHAPES, 20, skip=lambda t, i: i == 1 and t % 4 == 2)
    run_ours(opt, params, stream)
    ref = [p.detach().clone() for p in make_params()]
    states = [{"m": torch.zeros_like(p), "s": torch.zeros_like(p), "max": torch.zeros_like(p), "t": 0} for p in ref]
    for grads in stream:
        for i, (p, g, state) in enumerate(zip(ref, grads, states, strict=True)):
            if g is not None:
                state["t"] += 1
                adabelief_reference(p, g, state, state["t"], **{**config, "lr": 1e-2 if i < 2 else 3e-2})
    assert [opt.state[p]["step"] for p in params] == [20, 15, 20]
    for p, theirs, state in zip(params, ref, states, strict=True):
        torch.testing.assert_close(p.detach(), theirs, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg_var"], state["s"], rtol=1e-12, atol=1e-20)


def test_mixed_dtypes_and_missing_gradients():
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    frozen = torch.nn.Parameter(torch.ones(2))
    for optimizer in (Lion([a, b, frozen], lr=0.1), AdaBelief([a, b, frozen], lr=0.1)):
        a.grad, b.grad = torch.full((3,), 2.0, dtype=torch.float64), torch.full((2,), 2.0)
        optimizer.step()
        assert torch.allclose(a.detach().float()[:2], b.detach()) and frozen.tolist() == [1.0, 1.0]
        assert frozen not in optimizer.state


@pytest.mark.parametrize("optimizer", [Lion, AdaBelief])
def test_param_groups_from_generators_keep_their_parameters(optimizer):
    net = torch.nn.Linear(2, 2)
    opt = optimizer([{"params": (p for p in net.parameters()), "lr": 0.5}])
    assert len(opt.param_groups[0]["params"]) == 2 and opt.param_groups[0]["lr"] == 0.5
    opt.add_param_group({"params": iter([torch.nn.Parameter(torch.ones(1))])})
    assert len(opt.param_groups[1]["params"]) == 1


def test_state_dict_resume_is_bit_exact():
    for make in (lambda p: Lion(p, lr=1e-2, weight_decay=0.1), lambda p: AdaBelief(p, lr=1e-2, weight_decay=0.1)):
        stream = gradient_stream(SHAPES, 12)
        full = make_params()
        run_ours(make(full), full, stream)
        first = make_params()
        opt = make(first)
        run_ours(opt, first, stream[:7])
        saved = opt.state_dict()
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
        opt = make(resumed)
        opt.load_state_dict(saved)
        run_ours(opt, resumed, stream[7:])
        assert all(torch.equal(x, y) for x, y in zip(full, resumed, strict=True))


# ---------------------------------------------------------------- bad input
BAD = [
    ({"lr": 0.0}, ValueError, "lr must be"),
    ({"lr": -1e-3}, ValueError, "lr must be"),
    ({"lr": float("nan")}, ValueError, "lr must be"),
    ({"lr": "fast"}, TypeError, "lr must be"),
    ({"betas": (1.0, 0.9)}, ValueError, r"betas\[0\] must be"),
    ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be"),
    ({"betas": (0.9,)}, TypeError, "betas must be a pair"),
    ({"betas": 0.9}, TypeError, "betas must be a pair"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be"),
]


@pytest.mark.parametrize("optimizer", [Lion, AdaBelief])
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_hyperparameters_are_clear_errors(optimizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        optimizer([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_adabelief_specific_bad_input():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="eps must be"):
        AdaBelief(params, eps=-1e-8)
    with pytest.raises(TypeError, match="rectify must be True or False"):
        AdaBelief(params, rectify="yes")


@pytest.mark.parametrize("optimizer", [Lion, AdaBelief])
def test_bad_param_groups_sparse_gradients_and_complex_parameters(optimizer):
    with pytest.raises(ValueError, match=r"lr \(param group 1\) must be"):
        optimizer(
            [{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0}]
        )
    with pytest.raises(TypeError, match="complex parameters"):
        optimizer([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer([p]).step()


# ---------------------------------------------------------------- in Lightning
@pytest.mark.parametrize(
    "make", [lambda p: Lion(p, lr=3e-3, weight_decay=0.1), lambda p: AdaBelief(p, lr=1e-2)], ids=["Lion", "AdaBelief"]
)
def test_fit_a_classifier_on_digits(make, quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10, optimizer=make)
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=3, **quiet_trainer_kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.global_step == 63 and trainer.callback_metrics["val/acc"] > 0.7  # chance: 0.1


def test_adabelief_fit_resume_is_bit_exact(tmp_path):
    """Two epochs in one fit == one epoch, then a resume from its checkpoint (the int step counts included)."""

    def fit(max_epochs, root, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10, optimizer=lambda p: AdaBelief(p, lr=1e-2))
        trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=0, accelerator="cpu",
                             default_root_dir=root, logger=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return model.state_dict(), trainer.optimizers[0].state_dict()

    full = fit(2, tmp_path / "full")
    fit(1, tmp_path / "half")
    checkpoint = next((tmp_path / "half").rglob("*.ckpt"))
    resumed = fit(2, tmp_path / "resumed", ckpt_path=checkpoint)
    assert all(torch.equal(full[0][k], resumed[0][k]) for k in full[0])
    for key, state in full[1]["state"].items():
        assert state["step"] == resumed[1]["state"][key]["step"] == 8
        assert all(torch.equal(state[k], resumed[1]["state"][key][k]) for k in ("exp_avg", "exp_avg_var"))


@pytest.mark.parametrize(
    ("recipe", "cls", "expected"),
    [
        ("lion.yaml", Lion, {"lr": 3e-4, "betas": (0.9, 0.99), "weight_decay": 0.03}),
        ("adabelief.yaml", AdaBelief, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.01}),
    ],
)
def test_yaml_snippets_build_the_optimizer_with_its_own_defaults(recipe, cls, expected):
    """Stacked on the quickstart (AdamW), the snippets give betas / eps explicitly: jsonargparse would otherwise keep
    AdamW's values of the same-named arguments."""
    configs = [ROOT / "configs/quickstart.yaml", ROOT / "configs/optim" / recipe]
    cli = LitTricksCLI(args=[arg for path in configs for arg in ("--config", str(path))], run=False)
    optimizer = cli.model.optimizer([torch.nn.Parameter(torch.ones(1))])
    assert type(optimizer) is cls
    assert {k: optimizer.defaults[k] for k in expected} == expected
