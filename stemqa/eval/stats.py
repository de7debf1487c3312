"""Accuracy with confidence intervals: Wilson score intervals and the paired bootstrap difference of two models.

Every quality claim here is an accuracy with n and a 95% interval, and a difference between two models is
measured on the *same* questions (paired): resampling questions keeps each question's pair of outcomes
together, so the interval reflects how much the two models disagree, not only how many questions there are.
scipy/statsmodels have Wilson intervals, but not for a paired difference of accuracies on shared items; a
dozen lines of numpy do both the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    """k right of n, with the Wilson 95% interval."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else 0.0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def wilson(k: int, n: int, z: float = Z95) -> Accuracy:
    """Wilson score interval for k successes in n trials (good at small n and near 0 or 1, unlike k/n +- z*se)."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} is not within 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Accuracy(k, n, max(0.0, centre - half), min(1.0, centre + half))


def accuracy_of(correct: Sequence[bool]) -> Accuracy:
    return wilson(int(sum(bool(c) for c in correct)), len(correct))


@dataclass(frozen=True)
class Difference:
    """Accuracy of A minus accuracy of B on the same questions, with a paired bootstrap 95% interval."""

    delta: float
    low: float
    high: float
    n: int
    resamples: int

    @property
    def above_zero(self) -> bool:
        """The whole interval is above 0: A is better than B beyond resampling noise."""
        return self.low > 0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.delta:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Difference:
    """Percentile bootstrap of mean(a) - mean(b), resampling question indices (pairs stay together)."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} vs {len(b)} outcomes; pair them on the same questions")
    n = len(a)
    if n == 0:
        raise ValueError("paired_bootstrap: no questions")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # in blocks: 10k x n indices at once is large for big sets
        m = min(1000, resamples - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    tail = (1 - level) / 2
    return Difference(float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), n,
                      resamples)


def paired_outcomes(a: dict[str, bool], b: dict[str, bool]) -> tuple[list[bool], list[bool]]:
    """Outcomes of two models keyed by question id -> two aligned lists; the ids must be the same."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"the two prediction sets cover different questions (e.g. {missing})")
    ids = sorted(a)
    return [a[i] for i in ids], [b[i] for i in ids]
