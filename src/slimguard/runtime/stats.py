"""Intervals for the numbers slimguard reports, so that every figure says how sure it is.

* :func:`wilson`: a 95% interval for a proportion (accuracy, detection rate) from ``k`` of ``n``. Unlike
  ``p ± 1.96·sqrt(p(1-p)/n)`` it stays inside [0, 1] and is honest at 0 or ``n`` successes.
* :func:`bootstrap_ci`: a seeded percentile bootstrap interval of any statistic (speed ratios use it).
* :func:`paired_delta`: the difference in accuracy between two models scored **on the same examples**,
  with a paired bootstrap interval (examples are resampled together, so the shared difficulty cancels).
* :func:`mean_ci`: the mean over a few seeds or folds with a Student-t interval.

Example:
    >>> lo, hi = wilson(98, 100)
    >>> round(lo, 3), round(hi, 3)
    (0.93, 0.994)
    >>> d = paired_delta([1, 1, 0, 1], [1, 0, 0, 1])
    >>> d["delta_points"]
    -25.0
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from slimguard.core.errors import ConfigError

BOOTSTRAP_RESAMPLES = 2000
Z95 = 1.959964

# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; above 30 the normal 1.96 is within 4%
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% for the default ``z``).

    Returns ``(0.0, 1.0)`` when ``n`` is 0: nothing was observed.

    Example:
        >>> wilson(0, 10)[0], round(wilson(0, 10)[1], 3)
        (0.0, 0.278)
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ConfigError(f"wilson: successes={successes}, n={n}; need 0 <= successes <= n")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolated linearly between neighbours; nan when empty."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def bootstrap_ci(values: Sequence[float], *, statistic: Callable[[list[float]], float] = statistics.median,
                 resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)`` (Efron & Tibshirani 1993, ch. 13).

    Draws ``resamples`` samples of ``len(values)`` with replacement (seeded: the same inputs give the same
    interval), computes the statistic of each, and returns the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of those.

    Example:
        >>> bootstrap_ci([2.0, 2.0, 2.0])
        (2.0, 2.0)
        >>> bootstrap_ci([1.0, 3.0])  # resampled medians are 1, 2 or 3 with chances 1/4, 1/2, 1/4
        (1.0, 3.0)
    """
    if not values:
        raise ConfigError("bootstrap_ci: values is empty; pass at least one value")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigError(f"bootstrap_ci: resamples={resamples}, level={level}; need resamples >= 1 and 0 < level < 1")
    rng = random.Random(seed)
    pool = [float(v) for v in values]
    stats = [float(statistic(rng.choices(pool, k=len(pool)))) for _ in range(resamples)]
    tail = (1 - level) / 2
    return percentile(stats, tail), percentile(stats, 1 - tail)


def paired_delta(base_correct: Sequence[bool | int | float], new_correct: Sequence[bool | int | float], *,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Accuracy of ``new`` minus accuracy of ``base`` on the same examples, in points, with a paired
    bootstrap 95% interval.

    ``base_correct[i]`` and ``new_correct[i]`` say whether each model got example ``i`` right (or any
    per-example score). Resampling picks examples, keeping each pair together.

    Returns:
        ``delta_points``, ``ci95_points`` (low, high), ``n``, and ``changed`` (examples where the two
        models disagree on correctness: the only ones that move the delta).
    """
    if len(base_correct) != len(new_correct):
        raise ConfigError(f"paired_delta: {len(base_correct)} and {len(new_correct)} examples; score both models "
                          "on the same examples")
    if not base_correct:
        raise ConfigError("paired_delta: no examples; pass at least one scored example per model")
    diffs = [float(b) - float(a) for a, b in zip(base_correct, new_correct, strict=True)]
    lo, hi = bootstrap_ci(diffs, statistic=statistics.fmean, resamples=resamples, seed=seed)
    return {"delta_points": round(100 * statistics.fmean(diffs), 4), "ci95_points": [round(100 * lo, 4),
            round(100 * hi, 4)], "n": len(diffs), "changed": sum(1 for d in diffs if d != 0)}


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean of a few runs (seeds or folds) with a 95% Student-t interval and the sample standard deviation.

    One value gives an interval of ``(value, value)`` with ``sd`` 0 and ``n`` 1: report it as a single run.

    Example:
        >>> r = mean_ci([98.0, 99.0, 98.5, 98.5, 99.0])
        >>> r["mean"], [round(v, 2) for v in r["ci95"]]
        (98.6, [98.08, 99.12])
    """
    if not values:
        raise ConfigError("mean_ci: values is empty; pass one value per seed or fold")
    vals = [float(v) for v in values]
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return {"mean": mean, "ci95": [mean, mean], "sd": 0.0, "n": 1}
    sd = statistics.stdev(vals)
    t = _T975[len(vals) - 2] if len(vals) - 1 <= len(_T975) else Z95
    half = t * sd / math.sqrt(len(vals))
    return {"mean": round(mean, 6), "ci95": [round(mean - half, 6), round(mean + half, 6)], "sd": round(sd, 6),
            "n": len(vals)}
