"""Latency statistics that stay honest on a noisy board.

* :func:`summarize`: min, median, mean, p90, p99, std and a distribution-free confidence
  interval of the median (order statistics; no normality assumption, latency is skewed).
* :func:`speedup`: ratio of medians baseline / model with a bootstrap interval; when the
  samples were taken interleaved, resampling is paired (the same repeat indices for both
  models) so slow phases of the board hit both sides alike.
* :func:`detect_drift`: compares the medians of the first and last third of a run; drift is
  reported only when their confidence intervals do not overlap and the change is larger
  than ``min_change``, i.e. larger than the noise.

Percentiles use numpy's default (linear interpolation), so they equal ``np.percentile``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeprune.errors import ParameterError

DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one model's timed runs, in milliseconds.

    ``ci_level`` is the coverage the median interval actually has: with fewer than 6 samples
    no order-statistic interval reaches 95 %, and [min, max] with its lower coverage is given.
    """

    n: int
    min: float
    median: float
    mean: float
    p90: float
    p99: float
    std: float            # sample standard deviation (ddof=1; 0 for one sample)
    ci_low: float
    ci_high: float
    ci_level: float


@dataclass(frozen=True)
class Speedup:
    """How much faster ``name`` is than ``baseline``: median(baseline) / median(name)."""

    name: str
    baseline: str
    ratio: float
    ci_low: float
    ci_high: float
    level: float
    paired: bool          # True: bootstrap over paired interleaved repeats


@dataclass(frozen=True)
class DriftCheck:
    """First third vs last third of a run, in run order."""

    n: int
    first_median: float
    last_median: float
    change: float               # last / first - 1
    rank_correlation: float     # Spearman rho of latency vs repeat index
    direction: str | None       # "slower", "faster" or None when within the noise

    @property
    def drifting(self) -> bool:
        return self.direction is not None

    def message(self, name: str) -> str:
        """One line for the log; empty when there is no drift."""
        if self.direction == "slower":
            return (f"{name}: later repeats are {self.change:+.1%} slower than the first ones "
                    f"(median {self.first_median:.3f} -> {self.last_median:.3f} ms, rho {self.rank_correlation:+.2f}); "
                    "the board may be throttling: cool it, pin big cores, or add pauses")
        if self.direction == "faster":
            return (f"{name}: later repeats are {-self.change:.1%} faster than the first ones "
                    f"(median {self.first_median:.3f} -> {self.last_median:.3f} ms); increase --warmup")
        return ""


def _as_array(samples: Sequence[float], what: str = "samples") -> np.ndarray:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ParameterError(f"{what} must be a non-empty list of latencies, got shape {arr.shape}")
    return arr


def _binom_half_pmf(n: int) -> np.ndarray:
    """P(B = i) for B ~ Binomial(n, 1/2), i = 0..n, computed in log space (no underflow)."""
    i = np.arange(n + 1)
    log_c = math.lgamma(n + 1) - np.array([math.lgamma(k + 1) + math.lgamma(n - k + 1) for k in i])
    return np.exp(log_c - n * math.log(2.0))


def median_ci_ranks(n: int, level: float = DEFAULT_LEVEL) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the sorted samples bracketing the median, and the coverage.

    P(x[lo] <= median <= x[hi]) = P(lo + 1 <= B <= hi) with B ~ Binomial(n, 1/2), the number
    of samples below the true median. Grows symmetrically from the middle until ``level``.
    """
    if n < 1:
        raise ParameterError(f"need at least one sample for a median interval, got {n}")
    pmf = _binom_half_pmf(n)
    lo, hi = (n - 1) // 2, n // 2
    coverage = float(pmf[lo + 1:hi + 1].sum())
    while coverage < level and (lo > 0 or hi < n - 1):
        lo, hi = max(lo - 1, 0), min(hi + 1, n - 1)
        coverage = float(pmf[lo + 1:hi + 1].sum())
    return lo, hi, coverage


def summarize(samples: Sequence[float], level: float = DEFAULT_LEVEL) -> LatencyStats:
    """Statistics of one model's latencies (ms)."""
    arr = _as_array(samples)
    ordered = np.sort(arr)
    lo, hi, coverage = median_ci_ranks(arr.size, level)
    return LatencyStats(
        n=int(arr.size), min=float(ordered[0]), median=float(np.median(arr)), mean=float(arr.mean()),
        p90=float(np.percentile(arr, 90)), p99=float(np.percentile(arr, 99)),
        std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        ci_low=float(ordered[lo]), ci_high=float(ordered[hi]), ci_level=coverage,
    )


def _bootstrap_ratio(base: np.ndarray, other: np.ndarray, paired: bool, resamples: int,
                     seed: int) -> np.ndarray:
    """``resamples`` bootstrap replicates of median(base) / median(other)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(base.size, other.size))
    out = []
    done = 0
    while done < resamples:
        c = min(chunk, resamples - done)
        idx_b = rng.integers(0, base.size, size=(c, base.size))
        idx_o = idx_b if paired else rng.integers(0, other.size, size=(c, other.size))
        out.append(np.median(base[idx_b], axis=1) / np.median(other[idx_o], axis=1))
        done += c
    return np.concatenate(out)


def speedup(baseline: Sequence[float], samples: Sequence[float], *, name: str = "model",
            baseline_name: str = "baseline", paired: bool | None = None, level: float = DEFAULT_LEVEL,
            resamples: int = 2000, seed: int = 0) -> Speedup:
    """Speedup of ``samples`` over ``baseline`` (ratio of medians) with a percentile bootstrap CI.

    ``paired=None`` pairs the samples when both have the same count (interleaved runs do);
    pass ``paired=False`` for runs taken one after the other.
    """
    base, other = _as_array(baseline, "baseline samples"), _as_array(samples, f"{name} samples")
    if paired is None:
        paired = base.size == other.size
    if paired and base.size != other.size:
        raise ParameterError(f"paired speedup needs equal sample counts, got {base.size} and {other.size}")
    reps = _bootstrap_ratio(base, other, paired, resamples, seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return Speedup(name=name, baseline=baseline_name, ratio=float(np.median(base) / np.median(other)),
                   ci_low=float(low), ci_high=float(high), level=level, paired=paired)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of their ranks (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def rank_correlation(samples: Sequence[float]) -> float:
    """Spearman's rho between latency and repeat index (+1: monotonically slower)."""
    arr = _as_array(samples)
    if arr.size < 2:
        return 0.0
    ranks = _average_ranks(arr)
    index = np.arange(1, arr.size + 1, dtype=np.float64)
    if np.all(ranks == ranks[0]):
        return 0.0
    return float(np.corrcoef(ranks, index)[0, 1])


def detect_drift(samples: Sequence[float], *, level: float = DEFAULT_LEVEL,
                 min_change: float = 0.05, min_samples: int = 9) -> DriftCheck:
    """Did the latency move between the first and the last third of the run (in run order)?

    Reported when the two thirds' median intervals do not overlap and the medians differ by
    more than ``min_change`` (relative). Fewer than ``min_samples`` samples: never reported.
    """
    arr = _as_array(samples)
    third = arr.size // 3
    if arr.size < min_samples or third < 1:
        med = float(np.median(arr))
        return DriftCheck(int(arr.size), med, med, 0.0, rank_correlation(arr), None)
    first, last = summarize(arr[:third], level), summarize(arr[-third:], level)
    change = last.median / first.median - 1.0
    direction = None
    if abs(change) > min_change:
        if last.ci_low > first.ci_high:
            direction = "slower"
        elif last.ci_high < first.ci_low:
            direction = "faster"
    return DriftCheck(int(arr.size), first.median, last.median, float(change), rank_correlation(arr), direction)
