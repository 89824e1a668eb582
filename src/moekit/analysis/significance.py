"""Seed statistics for the experiment reports: mean ± sample std, and the paired difference between two
configurations trained on the same seeds with its 95% Student-t interval.

Paired design: seed s fixes the initialisation and the batch order of both configurations, so the
per-seed difference d_s = a_s - b_s removes most of the seed-to-seed variation that the two share.
Interval: mean(d) ± t_{0.975, n-1} * std(d) / sqrt(n)  (Student 1908; any statistics textbook).
The t quantile is found by bisection on the exact CDF for integer degrees of freedom
(Abramowitz & Stegun 1964, eq. 26.7.3-26.7.4), so no scipy is needed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (A&S 26.7.3 odd df, 26.7.4 even df)."""
    if df < 1:
        raise ValueError(f"df={df}: Student's t needs >= 1 degree of freedom (>= 2 seeds)")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, math.cos(theta)  # cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)
        for j in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + math.sin(theta) * series)
    series, term = 0.0, 1.0  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)
    for j in range(1, df // 2 + 1):
        series += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * series


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """t such that P(|T| <= t) = ``confidence`` (e.g. 12.706 for df=1, 4.303 for df=2)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedDiff:
    """mean of a_s - b_s over n paired seeds, its sample std and 95% interval [lo, hi] (None with one seed)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None = None

    @property
    def significant(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def interval(self) -> str:
        """'+mean [95% CI +lo, +hi]' (signed, 4 decimals); needs >= 2 seeds."""
        return f"{self.mean:+.4f} [95% CI {self.lo:+.4f}, {self.hi:+.4f}]"

    def __str__(self) -> str:
        if self.lo is None:
            return f"{self.mean:+.4f} (1 seed: no interval)"
        return f"{self.interval()}, n={self.n}"


def paired_diff(a: list[float], b: list[float], confidence: float = 0.95) -> PairedDiff:
    """Paired difference a - b over seeds (a[i] and b[i] share seed i) with its t-interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_diff needs two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return PairedDiff(m, None, None, 1)
    sd = statistics.stdev(d)
    half = t_quantile(len(d) - 1, confidence) * sd / math.sqrt(len(d))
    return PairedDiff(m, m - half, m + half, len(d), sd)


def mean_std(xs: list[float], fmt: str = ".4f") -> str:
    """'mean ± sample std' (just the value for one seed)."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def verdict(diff: PairedDiff, better: str, worse: str, unit: str = "nats") -> str:
    """One sentence: '<better> beats <worse> by x unit (interval)' or 'no significant difference'.
    ``diff`` is worse-minus-better loss, so positive means ``better`` really is better."""
    if diff.lo is None:
        return (f"{better} minus {worse}: {-diff.mean:+.4f} {unit} on 1 seed (no interval; see the report for the "
                "seed spread)")
    if not diff.significant:
        return (f"no significant difference between {better} and {worse}: {diff.mean:+.4f} {unit} "
                f"[95% CI {diff.lo:+.4f}, {diff.hi:+.4f}] crosses 0 (n={diff.n} seeds)")
    who, by = (better, diff) if diff.mean > 0 else (worse, PairedDiff(-diff.mean, -diff.hi, -diff.lo, diff.n, diff.sd))
    other = worse if who == better else better
    return f"{who} beats {other} by {by.mean:.4f} {unit} [95% CI {by.lo:.4f}, {by.hi:.4f}] (n={by.n} seeds)"
