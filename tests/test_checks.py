import math

import pytest

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
