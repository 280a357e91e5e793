"""Pareto fronts of minimized objectives: dominance, the front, its hypervolume, and the chosen point.

Every objective here is minimized (sizes and time ratios relative to the original model, accuracy drop in
points). A point *dominates* another when it is no worse in every objective and better in one.

Example:
    >>> pareto_indices([[1, 3], [2, 2], [3, 1], [3, 3]])
    [0, 1, 2]
    >>> hypervolume([[0.5, 0.5]], reference=[1, 1])
    0.25
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every (minimized) objective and strictly better in at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, in input order (of equal points, the first is kept)."""
    out = []
    for i, p in enumerate(points):
        if any(dominates(q, p) or (list(q) == list(p) and j < i) for j, q in enumerate(points) if j != i):
            continue
        out.append(i)
    return out


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (minimization; points not better than
    the reference in every objective add nothing). Exact, by slicing along the first objective (fine for
    the few dozen points of a search).
    """
    pts = [list(map(float, p)) for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    if not pts:
        return 0.0
    if len(reference) == 1:
        return float(reference[0]) - min(p[0] for p in pts)
    pts.sort(key=lambda p: p[0])
    volume = 0.0
    for i, p in enumerate(pts):
        upper = pts[i + 1][0] if i + 1 < len(pts) else float(reference[0])
        if upper <= p[0]:
            continue
        slab = [q[1:] for q in pts[: i + 1]]
        volume += (upper - p[0]) * hypervolume(slab, reference[1:])
    return volume


def choose(points: Sequence[Sequence[float]]) -> int:
    """The index of the chosen point: best in the first objective, ties broken by the next ones (so the
    order of ``--objectives`` says what matters most)."""
    if not points:
        raise ValueError("choose: no points")
    return min(range(len(points)), key=lambda i: (list(points[i]), i))
