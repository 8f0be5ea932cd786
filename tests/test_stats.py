"""Intervals and paired tests against independent slow computations."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchbench.reporting.stats import Z95, binomial_two_sided, mcnemar, wilson


def score_accepts(p: float, successes: int, n: int) -> bool:
    """The score test's acceptance region, which the Wilson interval inverts."""
    return (successes / n - p) ** 2 <= Z95**2 * p * (1 - p) / n


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_is_the_set_the_score_test_accepts(case):
    successes, n = case
    low, high = wilson(successes, n)
    assert 0 <= low <= successes / n <= high <= 1
    eps = 1e-9
    # inside the interval the score test accepts, just outside it rejects
    assert score_accepts(min(1.0, low + eps), successes, n)
    assert score_accepts(max(0.0, high - eps), successes, n)
    if low > eps:
        assert not score_accepts(low - 1e-6, successes, n)
    if high < 1 - eps:
        assert not score_accepts(high + 1e-6, successes, n)


def test_wilson_known_value():
    # 478 of 1000: a textbook case, about +-3.1 points
    low, high = wilson(478, 1000)
    assert low == pytest.approx(0.4471, abs=1e-4)
    assert high == pytest.approx(0.5090, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def exact_two_sided(k: int, n: int) -> float:
    """Sum of the probabilities no larger than P(X = k), in exact rationals."""
    probs = [Fraction(comb(n, i), 2**n) for i in range(n + 1)]
    return float(min(Fraction(1), sum(p for p in probs if p <= probs[k])))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 120).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_binomial_p_value_matches_exact_enumeration(case):
    k, n = case
    k = min(k, n - k)
    assert binomial_two_sided(k, n) == pytest.approx(exact_two_sided(k, n), rel=1e-9, abs=1e-12)


def test_mcnemar_counts_only_discordant_images():
    first = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    second = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    test = mcnemar(first, second)
    assert (test.n, test.only_first, test.only_second) == (10, 6, 1)
    assert test.p_value == pytest.approx(exact_two_sided(1, 7))
    assert not test.significant  # 6 vs 1 of 7 discordant: p = 0.125
    assert mcnemar(first, first).p_value == 1.0


def test_mcnemar_large_discordance_is_significant_without_underflow():
    rng = np.random.default_rng(0)
    first = rng.random(20000) < 0.6
    second = first & (rng.random(20000) < 0.9)
    test = mcnemar(first, second)
    assert test.only_second == 0 and test.significant and test.p_value >= 0
