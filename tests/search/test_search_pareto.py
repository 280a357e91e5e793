"""Pareto dominance, the front, its exact hypervolume and the chosen point, on small hand-checked cases."""

from __future__ import annotations

import itertools
import random

import pytest

from slimguard.search.pareto import choose, dominates, hypervolume, pareto_indices


def test_dominance_needs_one_strict_improvement():
    assert dominates([1, 2], [2, 2]) and not dominates([2, 2], [2, 2]) and not dominates([1, 3], [2, 2])


def test_front_keeps_non_dominated_points_and_one_of_equal_points():
    assert pareto_indices([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2]]) == [0, 1, 2]
    assert pareto_indices([]) == []


@pytest.mark.parametrize(("points", "reference", "want"), [
    ([[0.5, 0.5]], [1, 1], 0.25),
    ([[0.2, 0.6], [0.6, 0.2]], [1, 1], 0.8 * 0.4 + 0.4 * 0.8 - 0.4 * 0.4),   # two rectangles minus overlap
    ([[0.5, 0.5], [2.0, 0.1]], [1, 1], 0.25),                                  # outside the reference: nothing
    ([[0.5, 0.5, 0.5]], [1, 1, 1], 0.125),
    ([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]], [1, 1, 1], 0.25 + 0.25 - 0.125),
])
def test_hypervolume_exact(points, reference, want):
    assert hypervolume(points, reference) == pytest.approx(want, abs=1e-12)


def test_hypervolume_matches_a_grid_count():
    """Against brute force on a 40^2 grid of cells (exact for points on the grid)."""
    rng = random.Random(0)
    pts = [[rng.randrange(40) / 40, rng.randrange(40) / 40] for _ in range(12)]
    cells = sum(1 for i, j in itertools.product(range(40), range(40))
                if any(p[0] <= i / 40 and p[1] <= j / 40 for p in pts))
    assert hypervolume(pts, [1, 1]) == pytest.approx(cells / 40**2, abs=1e-12)


def test_choose_prefers_the_first_objective_then_the_next():
    assert choose([[0.3, 0.9], [0.2, 1.5], [0.2, 1.1]]) == 2
    with pytest.raises(ValueError):
        choose([])
