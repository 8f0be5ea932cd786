"""Uncertainty of accuracies measured on a finite test set, and paired comparisons.

An accuracy over ``n`` images is a binomial proportion: the report gives every one a 95%
Wilson score interval (it stays inside [0, 1] and is close to nominal coverage even for small
``n`` or accuracies near 0 or 1, where the normal interval is not). Two configurations
measured on the same images are compared with the exact McNemar test on their per-image
flags: only the images on which they disagree carry information, and under "no difference"
each such image is equally likely to favour either side, so the discordant counts are
Binomial(b + c, 1/2). A finding ranks two configurations only when that test rejects at
``ALPHA``; otherwise it calls them tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
ALPHA = 0.05  # the level at which a paired difference counts as significant
INTERVAL = "95% Wilson score interval"  # how the report names its intervals


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion, as fractions; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at p = 0 or 1 the bound is exactly 0 or 1; rounding must not move it past
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def half_width(accuracy: float, n: int) -> float:
    """Half the width of the Wilson interval of an accuracy over ``n`` images, in the same
    unit as the interval (fractions); the error bar of a figure."""
    if n <= 0 or math.isnan(accuracy):
        return math.nan
    low, high = wilson(round(accuracy * n), n)
    return (high - low) / 2


@dataclass(frozen=True)
class Paired:
    """The exact McNemar test of two per-image flag vectors on the same images."""

    n: int  # images compared
    only_first: int  # images where the first is right and the second is not (b)
    only_second: int  # and the other way round (c)
    p_value: float  # two-sided

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def difference(self) -> float:
        """First minus second, as a fraction of the images."""
        return (self.only_first - self.only_second) / self.n if self.n else math.nan


def mcnemar(first: np.ndarray, second: np.ndarray) -> Paired:
    """Exact two-sided McNemar test of two boolean vectors over the same images."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"flags of {first.shape} and {second.shape} images")
    b = int((first & ~second).sum())
    c = int((~first & second).sum())
    return Paired(int(first.size), b, c, binomial_two_sided(min(b, c), b + c))


def binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n / 2: the exact two-sided
    p-value of ``k`` against a fair coin (1 when there is nothing to compare)."""
    if n == 0:
        return 1.0
    if 2 * k >= n:
        return 1.0
    # log-space so that tens of thousands of discordant images do not underflow
    log_half = n * math.log(0.5)
    tail = sum(math.exp(log_choose(n, i) + log_half) for i in range(k + 1))
    return min(1.0, 2 * tail)


def log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
