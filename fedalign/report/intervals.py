"""Intervals over seeds: what a benchmark table may claim.

One run is one draw: its partition, initial model, sampling and shuffling all follow its seed, so
two strategies a point apart after one seed each may differ by noise alone. A benchmark suite
therefore runs every cell over several seeds and reports, per summary value, the mean with a 95%
confidence interval from Student's t on the per-seed values (n - 1 degrees of freedom: the
interval of the mean of a normal sample with unknown variance). A comparison against a baseline
is paired: the same seed gives both strategies the same partition, initial model and client
sampling, so the per-seed difference removes what the seed shares, and its mean gets the paired-t
interval and the two-sided paired t-test's p-value (``scipy.stats.ttest_rel``'s definitions).
With one seed there is no interval (``low`` and ``high`` are ``None``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` per-seed values, their sample standard deviation (0 for one value) and
    the bounds of the t interval around the mean (``None`` for one value)."""

    mean: float
    std: float
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean


@dataclass(frozen=True)
class Paired:
    """The per-seed differences ``value - baseline`` over the seeds both have: their interval,
    and the two-sided p-value of "the mean difference is 0" (``None`` for one pair; with no
    spread, 1 for all-zero differences and 0 otherwise, the limits of the test)."""

    difference: Interval
    p_value: float | None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t ``confidence`` interval of ``values`` (one value per seed)."""
    if not values:
        raise ValueError("an interval needs at least one value")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, 0.0, 1, None, None)
    std = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half)


def paired(
    values: Mapping[int, float],
    baseline: Mapping[int, float],
    confidence: float = CONFIDENCE,
) -> Paired | None:
    """The paired comparison of ``values`` with ``baseline`` (both keyed by seed) over the seeds
    they share; ``None`` when they share none."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    difference = t_interval([values[s] - baseline[s] for s in seeds], confidence)
    if difference.n == 1:
        return Paired(difference, None)
    if difference.std == 0:
        return Paired(difference, 1.0 if difference.mean == 0 else 0.0)
    t = difference.mean / (difference.std / math.sqrt(difference.n))
    return Paired(difference, float(2 * stats.t.sf(abs(t), difference.n - 1)))
