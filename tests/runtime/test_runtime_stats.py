"""Intervals: Wilson for proportions, paired bootstrap deltas, Student-t means."""

from __future__ import annotations

import doctest
import math

import pytest

from slimguard.core.errors import ConfigError
from slimguard.runtime import stats
from slimguard.runtime.stats import mean_ci, paired_delta, wilson


def test_doctests() -> None:
    assert doctest.testmod(stats).failed == 0


def test_wilson_matches_the_closed_form_and_stays_in_range() -> None:
    lo, hi = wilson(98, 100)
    assert lo == pytest.approx(0.92999, abs=1e-4) and hi == pytest.approx(0.99449, abs=1e-4)
    assert wilson(0, 50)[0] == pytest.approx(0.0, abs=1e-12) and wilson(50, 50)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    # narrower with more data, always around the estimate
    assert wilson(500, 1000)[1] - wilson(500, 1000)[0] < wilson(5, 10)[1] - wilson(5, 10)[0]
    with pytest.raises(ConfigError):
        wilson(5, 3)


def test_paired_delta_counts_only_the_examples_that_changed() -> None:
    base = [1] * 90 + [0] * 10
    new = [1] * 88 + [0] * 2 + [1] * 2 + [0] * 8  # two lost, two gained: no net change
    d = paired_delta(base, new)
    assert d["delta_points"] == 0.0 and d["changed"] == 4 and d["n"] == 100
    assert d["ci95_points"][0] < 0 < d["ci95_points"][1]
    worse = paired_delta(base, [0] * 100)
    assert worse["delta_points"] == -90.0
    assert worse["ci95_points"][1] < -80  # every resample is far below zero
    with pytest.raises(ConfigError, match="same examples"):
        paired_delta([1, 0], [1])


def test_mean_ci_uses_student_t() -> None:
    r = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert r["mean"] == 2.0 and r["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-5)
    assert mean_ci([5.0])["ci95"] == [5.0, 5.0]
    with pytest.raises(ConfigError):
        mean_ci([])
