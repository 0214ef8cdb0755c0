import math

import pytest
import torch

from lit_tricks.core.checks import check_number


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_even_without_bounds(bad):
    with pytest.raises(ValueError, match=r"x must be a finite number, got"):
        check_number("x", bad)


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (-0.1, {"at_least": 0.0}, r"in \[0.0, inf\), got -0.1"),
        (0.0, {"above": 0.0}, r"in \(0.0, inf\), got 0.0"),
        (1.0, {"at_least": 0.0, "below": 1.0}, r"in \[0.0, 1.0\), got 1.0"),
        (2, {"at_most": 1}, r"in \(-inf, 1\], got 2"),
        (math.nan, {"at_least": 0.0, "below": 1.0}, r"in \[0.0, 1.0\), got nan"),
    ],
)
def test_out_of_range_values_name_the_parameter_and_the_range(value, bounds, message):
    with pytest.raises(ValueError, match=f"x must be a finite number {message}"):
        check_number("x", value, **bounds)


@pytest.mark.parametrize("value", [0.0, 0.5, 1e-9])
def test_values_inside_pass(value):
    check_number("x", value, at_least=0.0, below=1.0)


def test_integers_and_types():
    check_number("n", 3, at_least=1, integer=True)
    with pytest.raises(TypeError, match=r"n must be an integer in \[1, inf\), got 2.5 \(float\)"):
        check_number("n", 2.5, at_least=1, integer=True)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, inf\), got 0\. use a positive"):
        check_number("n", 0, at_least=1, integer=True, hint="use a positive")
    for not_a_number in (True, "0.1", None):
        with pytest.raises(TypeError, match="x must be a finite number"):
            check_number("x", not_a_number)


NAN, INF = float("nan"), float("inf")


def _builders():
    """Each numeric argument the stress test found training silently to NaN (or freezing) with NaN or inf."""
    from torch import nn

    from lit_tricks import (
        ELR,
        ConceptBottleneckModel,
        ConsistencyModel,
        ContinualEvaluation,
        DataDietScores,
        EMATeacher,
        Mixup,
        PostHocCBM,
        SampleReweighting,
        SelfDistill,
    )
    from lit_tricks.modules.tta import AdaNPC
    from lit_tricks.nets import MLP, TimeMLP

    def adanpc(**kwargs):
        return AdaNPC(MLP(4, 2), torch.randn(6, 256), torch.tensor([0, 1] * 3), **kwargs)

    return {
        "SelfDistill temperature": lambda v: SelfDistill("ema", temperature=v),
        "SelfDistill weight": lambda v: SelfDistill("ema", weight=v),
        "SelfDistill total_epochs": lambda v: SelfDistill(total_epochs=v),
        "Mixup alpha": lambda v: Mixup(alpha=v),
        "ELR lam": lambda v: ELR(lam=v),
        "SampleReweighting temperature": lambda v: SampleReweighting(temperature=v),
        "SampleReweighting delta": lambda v: SampleReweighting(delta=v),
        "ConsistencyModel sigma_data": lambda v: ConsistencyModel(TimeMLP(2), data_shape=[2], sigma_data=v),
        "ConsistencyModel c": lambda v: ConsistencyModel(TimeMLP(2), data_shape=[2], c=v),
        "ConceptBottleneckModel concept_loss_weight": lambda v: ConceptBottleneckModel(
            nn.Linear(2, 2), nn.Linear(2, 2), 2, concept_loss_weight=v
        ),
        "PostHocCBM lr": lambda v: PostHocCBM(torch.randn(3, 4), 2, lr=v),
        "EMATeacher half_life": lambda v: EMATeacher(half_life=v),
        "EMATeacher warmup_gamma": lambda v: EMATeacher(warmup_gamma=v),
        "DataDietScores epoch": lambda v: DataDietScores(epoch=v),
        "ContinualEvaluation every_n_steps": lambda v: ContinualEvaluation(every_n_steps=v),
        "AdaNPC temperature": lambda v: adanpc(temperature=v),
    }


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("argument", list(_builders()))
def test_every_constructor_refuses_nan_and_inf(argument, value):
    name = argument.split()[-1]
    with pytest.raises((ValueError, TypeError), match=f"{name} must be"):
        _builders()[argument](value)
