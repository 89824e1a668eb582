import pytest

from moekit.analysis.timing import Timing, best, ratio, round_robin


class FakeClock:
    """Each case advances the clock by its own scripted durations: no real timing in tests."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_round_robin_interleaves_discards_warmup_and_keeps_rounds_paired():
    clock, calls = FakeClock(), []
    durations = {"a": iter([100.0, 1.0, 3.0, 2.0]), "b": iter([100.0, 2.0, 6.0, 4.0])}

    def case(name):
        def fn():
            calls.append(name)
            clock.now += next(durations[name])
        return fn

    times = round_robin({"a": case("a"), "b": case("b")}, reps=3, warmup=1, clock=clock)
    assert calls == ["a", "b"] * 4  # one call of every case per round
    assert times["a"].samples == (1.0, 3.0, 2.0)  # the 100 s warm-up round is not recorded
    assert times["a"].median == 2.0 and times["a"].spread == pytest.approx((3.0 - 1.0) / 2.0)
    assert ratio(times, "b", "a").samples == (2.0, 2.0, 2.0)  # per-round ratios: the drift cancels
    assert best(times, ["a", "b"]) == "a"


def test_timing_formats_median_and_half_spread():
    t = Timing((0.010, 0.012, 0.011))
    assert t.ms() == "11.0 ms ±9%" and Timing((1.0, 1.2, 1.1)).x() == "1.10x ±9%"
    with pytest.raises(ValueError):
        round_robin({"a": lambda: None}, reps=0)
