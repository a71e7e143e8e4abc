"""Paired statistics over rows: is a change in quality more than the noise of a few prompts?

The gate compares a run with its baseline row by row (the same prompts, matched by row index):
the per-row differences of a metric (sentence BLEU, ROUGE-L, BERTScore F1) get a percentile
bootstrap confidence interval of their mean. A quality change fails the gate only when that
interval excludes zero *and* its size exceeds the tolerance. Deterministic: a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float  # mean of the paired differences (candidate − baseline)
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{LEVEL:.0%} CI {self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_mean(deltas: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of the mean of ``deltas`` (paired differences, one per row)."""
    import numpy as np

    d = np.asarray([float(x) for x in deltas], dtype=np.float64)
    n = len(d)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n == 1 or float(d.std()) == 0.0:
        return Interval(mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n)


def detectable_effect(sd: float, n: int) -> float:
    """The smallest mean change a paired comparison of ``n`` rows detects about 80 % of the time
    at the 5 % level, for per-row differences of standard deviation ``sd``: (1.96 + 0.84) · sd/√n."""
    return (1.96 + 0.84) * sd / math.sqrt(n) if n > 0 else math.inf
