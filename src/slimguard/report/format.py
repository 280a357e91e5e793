"""Numbers and values as a reader wants them: 4 significant digits, percentages, bytes, ratios, options.

Every function returns plain text (not markup); :mod:`slimguard.report.html` escapes it. Booleans are
checked before numbers because ``True`` is an ``int`` in Python.

Example:
    >>> sig(0.27777552604675293), sig(188497.0), pct(0.9777777791023254), nbytes(188497)
    ('0.2778', '188,497', '97.78%', '188,497 B')
    >>> points(-0.06), ratio(5.3601), interval([0.951, 1.02])
    ('-6.00 pts', '5.36x', '0.95x–1.02x')
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

MISSING = "-"
"""What a value the result does not hold reads as."""


def is_number(v: Any) -> TypeGuard[int | float]:
    """True for a finite or infinite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sig(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits and thousands separators (``188,497``, ``0.2778``).

    Integers are shown whole; floats of ``10**digits`` or more are rounded to whole numbers, so no
    exponent appears for sizes and counts. Non-numbers go through :func:`text`.
    """
    if not is_number(v):
        return text(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 10**digits:
        return f"{v:,.0f}"
    return f"{v:,.{digits}g}"


def pct(fraction: Any, decimals: int = 2) -> str:
    """A fraction in [0, 1] as a percentage: ``pct(0.9778) == '97.78%'``."""
    return f"{fraction * 100:.{decimals}f}%" if is_number(fraction) else MISSING


def points(delta_fraction: Any) -> str:
    """A change of a fraction in percentage points, signed: ``points(-0.06) == '-6.00 pts'``."""
    return f"{delta_fraction * 100:+.2f} pts" if is_number(delta_fraction) else MISSING


def nbytes(n: Any) -> str:
    """A byte count with thousands separators: ``nbytes(35167) == '35,167 B'``."""
    return f"{int(n):,} B" if is_number(n) and math.isfinite(n) else MISSING


def ratio(x: Any) -> str:
    """A ratio with two decimals and an ``x``: ``ratio(10) == '10.00x'``."""
    return f"{x:.2f}x" if is_number(x) and math.isfinite(x) else MISSING


def interval(ci: Any) -> str:
    """A ``[lo, hi]`` interval of ratios: ``'0.95x–1.02x'`` (``-`` when it is not two numbers)."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci):
        return f"{ratio(ci[0])}–{ratio(ci[1])}"
    return MISSING


def text(v: Any, limit: int = 120) -> str:
    """Any scalar as short text: ``None`` as ``-``, booleans as ``yes``/``no``, long strings cut with ``…``."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if is_number(v):
        return sig(v)
    s = str(v)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def value(v: Any, key: str = "", depth: int = 0, limit: int = 8) -> str:
    """A value of a step's options or result, compact and readable.

    Numbers under a key that names a sparsity are percentages; lists show their first ``limit`` items
    and a count of the rest; a list of records shows how many there are and the last one; nested dicts
    are shown two levels deep.

    Example:
        >>> value({"2": 0.3373, "4": 0.6095}, key="sparsity_by_layer")
        '2=33.73%, 4=60.95%'
        >>> value([{"epoch": 0, "val_score": 0.96936}, {"epoch": 1, "val_score": 0.97214}], key="epochs")
        '2 entries; last: epoch=1, val_score=0.9721'
    """
    if is_number(v) and "sparsity" in key.lower():
        return pct(v)
    if isinstance(v, dict):
        if not v:
            return "none"
        if depth >= 2:
            return f"{{{len(v)} keys}}"
        items = [f"{k}={value(x, str(k) if 'sparsity' not in key.lower() else key, depth + 1)}"
                 for k, x in list(v.items())[:limit]]
        return ", ".join(items) + (f" (+{len(v) - limit} more)" if len(v) > limit else "")
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if all(isinstance(x, dict) for x in v):
            noun = "entry" if len(v) == 1 else "entries"
            return f"{len(v)} {noun}; last: {value(v[-1], key, depth + 1)}"
        shown = ", ".join(value(x, key, depth + 1) for x in v[:limit])
        return shown + (f" (+{len(v) - limit} more)" if len(v) > limit else "")
    return text(v)


def option(v: Any) -> str:
    """A step option as a recipe spells it in YAML: ``0.5``, ``true``, ``[]``, ``{2: 0.94}``, ``l1``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(option(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {option(x)}" for k, x in v.items()) + "}"
    return "null" if v is None else sig(v) if is_number(v) else text(v)


def shape(dims: Any) -> str:
    """A tensor shape as ``300×64`` (``scalar`` for no dimensions)."""
    if isinstance(dims, (list, tuple)):
        return "×".join(str(d) for d in dims) if dims else "scalar"
    return text(dims)
