import math
import random
import statistics

import pytest

from moekit.analysis.significance import paired_diff, t_quantile, verdict


def t_density(x: float, df: int) -> float:
    return (math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
            * (1 + x * x / df) ** (-(df + 1) / 2))


def t_quantile_by_integration(df: int, confidence: float = 0.95) -> float:
    """Reference: integrate the Student-t density (Simpson, fine grid) until the central mass reaches
    ``confidence``; independent of the closed-form CDF the library uses."""
    h, x, mass = 2e-3, 0.0, 0.0
    while True:
        step = h / 6 * (t_density(x, df) + 4 * t_density(x + h / 2, df) + t_density(x + h, df))
        if 2 * (mass + step) >= confidence:  # linear interpolation inside the last sub-interval
            return x + h * (confidence / 2 - mass) / step
        mass += step
        x += h


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8])
def test_t_quantile_matches_the_integrated_density(df):
    assert t_quantile(df) == pytest.approx(t_quantile_by_integration(df), rel=1e-4)


def test_t_quantile_closed_form_for_two_degrees_of_freedom():
    # df=2 has a closed-form quantile: t_p = (2p - 1) / sqrt(2 p (1 - p)) for the one-sided level p
    for conf in (0.8, 0.9, 0.95, 0.99):
        p = (1 + conf) / 2
        assert t_quantile(2, conf) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_paired_interval_is_the_textbook_one():
    rng = random.Random(0)
    a = [rng.gauss(3.0, 0.1) for _ in range(5)]
    b = [x - 0.05 + rng.gauss(0, 0.02) for x in a]
    d = [x - y for x, y in zip(a, b)]
    half = t_quantile_by_integration(4) * statistics.stdev(d) / math.sqrt(5)
    got = paired_diff(a, b)
    assert got.mean == pytest.approx(statistics.mean(d))
    assert (got.lo, got.hi) == pytest.approx((statistics.mean(d) - half, statistics.mean(d) + half), rel=1e-4)
    assert got.sd == pytest.approx(statistics.stdev(d))
    assert got.significant  # a 0.05 shift with 0.02 noise over 5 seeds


def test_verdict_says_no_significant_difference_when_the_interval_crosses_zero():
    crossing = paired_diff([1.0, 1.1, 0.9], [1.05, 1.0, 0.95])
    assert crossing.lo < 0 < crossing.hi
    assert verdict(crossing, "A", "B").startswith("no significant difference")
    # verdict(worse-minus-better diff, better, worse): B has the lower losses here
    assert verdict(paired_diff([1.2, 1.21, 1.19], [1.0, 1.0, 1.01]), "B", "A").startswith("B beats A by 0.19")
    assert verdict(paired_diff([1.0, 1.0, 1.01], [1.2, 1.21, 1.19]), "B", "A").startswith("A beats B by 0.19")


def test_one_seed_has_no_interval():
    d = paired_diff([1.0], [0.9])
    assert d.lo is None and not d.significant and "no interval" in verdict(d, "A", "B")
    with pytest.raises(ValueError):
        paired_diff([1.0, 2.0], [1.0])
