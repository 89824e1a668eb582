"""The one timing harness every benchmark (and the experiments report) uses: round-robin, warm-up, median and spread.

    times = round_robin({"dense": f, "moe": g}, reps=7)      # {name: Timing}
    times["moe"].median, times["moe"].spread                 # seconds, (max - min) / median
    ratio(times, "moe", "dense")                             # Timing of the per-round ratios

Why round-robin: on a shared machine load drifts over seconds. Timing case A seven times and then case B
seven times lets the drift land on one of them; one call of every case per round makes the drift hit all
cases alike, and a ratio taken within each round (the same seconds of machine time) cancels most of it.
Why the median and not the minimum: the minimum rewards the one lucky round; the median is what a user
sees, and the spread says how much to trust it.
The first ``warmup`` rounds are not recorded (first-call allocations, thread-pool start, lazy init).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Samples of one case (seconds, or a dimensionless ratio)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median over the recorded rounds."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median else float("nan")

    def ms(self) -> str:
        return f"{self.median * 1e3:.1f} ms ±{self.spread / 2:.0%}"

    def x(self) -> str:
        return f"{self.median:.2f}x ±{self.spread / 2:.0%}"


def round_robin(cases: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every case once per round, ``warmup`` unrecorded rounds then ``reps`` recorded ones."""
    if reps < 1:
        raise ValueError(f"reps={reps}: need at least 1 recorded round")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for rnd in range(warmup + reps):
        for name, fn in cases.items():
            t0 = clock()
            fn()
            if rnd >= warmup:
                samples[name].append(clock() - t0)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def ratio(times: dict[str, Timing], case: str, base: str) -> Timing:
    """Per-round ratio case / base (both timed in the same round, so shared load mostly cancels)."""
    return Timing(tuple(a / b for a, b in zip(times[case].samples, times[base].samples)))


def best(times: dict[str, Timing], names: list[str]) -> str:
    """The fastest of ``names`` by median."""
    return min(names, key=lambda n: times[n].median)


def barrier_clock() -> float:
    """``time.perf_counter`` read after a ``torch.distributed`` barrier: as ``round_robin``'s clock in
    multi-process benchmarks it times each case barrier to barrier, so a case ends when its slowest rank does."""
    import torch.distributed as dist  # only the distributed benchmarks need it

    dist.barrier()
    return time.perf_counter()
