"""Statistics against numpy and exact binomial arithmetic on known samples."""
from __future__ import annotations

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from edgeprune.errors import ParameterError
from edgeprune.runners.stats import detect_drift, median_ci_ranks, rank_correlation, speedup, summarize


def _exact_coverage(n: int, lo: int, hi: int) -> Fraction:
    """P(lo + 1 <= B <= hi), B ~ Binomial(n, 1/2), in exact rational arithmetic."""
    return Fraction(sum(comb(n, i) for i in range(lo + 1, hi + 1)), 2**n)


def test_summary_equals_numpy():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0, 6.0, 9.0, 8.0, 100.0]
    s = summarize(samples)
    arr = np.array(samples)
    assert s.n == 11 and s.min == 1.0 and s.median == 6.0 and s.mean == pytest.approx(arr.mean())
    assert s.p90 == pytest.approx(np.percentile(arr, 90)) and s.p99 == pytest.approx(np.percentile(arr, 99))
    assert s.std == pytest.approx(arr.std(ddof=1))
    assert summarize([2.0, 4.0]).median == 3.0 and summarize([7.5]).std == 0.0


@pytest.mark.parametrize("n", [6, 7, 10, 20, 51, 200])
def test_median_ci_is_the_narrowest_symmetric_95_interval(n):
    lo, hi, coverage = median_ci_ranks(n)
    exact = _exact_coverage(n, lo, hi)
    assert float(exact) == pytest.approx(coverage, rel=1e-9) and exact >= Fraction(95, 100)
    assert lo + hi in (n - 1, n)                               # symmetric around the middle
    assert _exact_coverage(n, lo + 1, hi - 1) < Fraction(95, 100)   # one step narrower falls short


def test_median_ci_small_n_reports_lower_coverage():
    lo, hi, coverage = median_ci_ranks(5)
    assert (lo, hi) == (0, 4) and coverage == pytest.approx(1 - 2 / 32)
    s = summarize([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (s.ci_low, s.ci_high) == (1.0, 5.0) and s.ci_level < 0.95


def test_median_ci_contains_the_median_and_is_order_statistics():
    rng = np.random.default_rng(3)
    samples = rng.lognormal(0.0, 0.3, size=301)
    s = summarize(samples)
    ordered = np.sort(samples)
    assert s.ci_low <= s.median <= s.ci_high
    assert s.ci_low in ordered and s.ci_high in ordered
    assert s.ci_low > ordered[0] and s.ci_high < ordered[-1]   # n=301 gives a real interval


def test_median_ci_covers_true_median_in_repeated_experiments():
    rng = np.random.default_rng(0)
    hits = sum(s.ci_low <= 1.0 <= s.ci_high
               for s in (summarize(rng.lognormal(0.0, 0.5, size=40)) for _ in range(400)))
    assert hits / 400 >= 0.92      # nominal >= 95 %; a wrong interval (e.g. mean +- sd/sqrt(n) misuse) fails


def test_speedup_of_a_four_times_slower_baseline():
    rng = np.random.default_rng(1)
    noise = rng.lognormal(0.0, 0.05, size=200)
    fast = 1.0 * noise
    slow = 4.0 * rng.lognormal(0.0, 0.05, size=200)
    sp = speedup(slow, fast, name="fast", baseline_name="slow")
    assert sp.paired and sp.ratio == pytest.approx(np.median(slow) / np.median(fast))
    assert sp.ci_low <= sp.ratio <= sp.ci_high and sp.ci_low > 3.5 and sp.ci_high < 4.5
    same = speedup(fast, fast * rng.lognormal(0.0, 0.05, size=200))
    assert same.ci_low < 1.0 < same.ci_high


def test_paired_bootstrap_cancels_shared_drift():
    """Interleaved samples share the board's slow phases; pairing must narrow the interval."""
    rng = np.random.default_rng(2)
    phase = np.repeat([1.0, 1.6, 1.0, 1.3], 50)              # board speed over time
    base = 2.0 * phase * rng.lognormal(0, 0.01, 200)
    other = 1.0 * phase * rng.lognormal(0, 0.01, 200)
    paired = speedup(base, other, paired=True)
    unpaired = speedup(base, other, paired=False)
    assert paired.ci_high - paired.ci_low < unpaired.ci_high - unpaired.ci_low
    assert paired.ci_low < 2.0 < paired.ci_high
    assert not speedup(base, other[:150]).paired
    with pytest.raises(ParameterError):
        speedup(base, other[:150], paired=True)


def test_rank_correlation_matches_numpy_on_ranks():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 4.0])
    ranks = np.array([4.0, 1.0, 2.5, 2.5, 6.0, 5.0])          # ties averaged by hand
    assert rank_correlation(x) == pytest.approx(np.corrcoef(ranks, np.arange(6))[0, 1])
    assert rank_correlation(np.arange(10.0)) == pytest.approx(1.0)


def test_drift_detects_monotone_slowdown_and_speedup():
    rng = np.random.default_rng(4)
    jitter = rng.normal(0, 0.01, 90)
    slower = detect_drift(10.0 + np.linspace(0, 2, 90) + jitter)    # 20 % slower by the end
    assert slower.direction == "slower" and slower.change > 0.1 and slower.rank_correlation > 0.9
    assert "slower" in slower.message("m")
    faster = detect_drift(12.0 - np.linspace(0, 2, 90) + jitter)
    assert faster.direction == "faster" and "warmup" in faster.message("m")


def test_drift_ignores_noise_and_small_runs():
    rng = np.random.default_rng(5)
    assert detect_drift(rng.lognormal(0, 0.2, 300)).direction is None
    assert detect_drift([1, 2, 3, 4, 5, 6, 7, 8.0]).direction is None      # < 9 samples
    slight = detect_drift(10.0 + np.linspace(0, 0.2, 90))                  # 2 %: below min_change
    assert slight.direction is None and slight.change > 0


def test_empty_samples_are_a_parameter_error():
    with pytest.raises(ParameterError):
        summarize([])
