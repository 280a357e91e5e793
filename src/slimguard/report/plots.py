"""The report's plots, drawn with matplotlib (extra ``report``) and returned as PNG bytes.

Each plot is drawn so it cannot mislead at a glance:

* **size**: bars from zero (a size is a quantity), each labelled in bytes, the title giving the ratio;
* **quality** (accuracy, or cosine similarity for embedding models): two points on an axis zoomed to the
  values with a margin, the title giving the change in points and the axis saying it does not start at 0,
  so a 6-point drop is visible and a 0.3-point one is not inflated into a cliff;
* **speed**: the paired speed ratio with its 95% interval against the line of no difference at 1; for
  older results without a paired ratio, the unpaired latencies as bars, titled as single runs.

Without matplotlib :func:`plots` returns nothing and the page shows its tables only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from slimguard.report import format as fmt

GREY, BLUE, RED = "#8c8c8c", "#2a7ab9", "#d62728"  # RED differs from the page's "missed" badge


def plots(baseline: dict[str, Any], after: dict[str, Any], speed: dict[str, Any] | None) -> list[tuple[str, bytes]]:
    """``(alt text, PNG bytes)`` for each plot the data allows: size, quality, speed (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out: list[tuple[str, bytes]] = []
    drawers = (_size, _quality, _speed_ratio if speed is not None and _has_ratio(speed) else _latency)
    for draw in drawers:
        fig, ax = plt.subplots(figsize=(3.3, 2.5), dpi=150)  # shown 330 px wide: sharp on dense screens
        try:
            alt = draw(ax, baseline, after, speed)
            if alt is None:
                continue
            ax.spines[["top", "right"]].set_visible(False)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            out.append((alt, buf.getvalue()))
        finally:
            plt.close(fig)
    return out


def zoomed_limits(*values: float, share: float = 0.6, least: float = 0.5) -> tuple[float, float]:
    """Axis limits around ``values``: their range widened on each side by ``share`` of it, at least ``least``.

    An axis from 0 to 100% draws 97.8% and 91.7% as two bars of almost the same height; zoomed to
    (88.0, 101.4) the 6-point drop fills the plot, and a change of 0.3 points still spans under a third of it.

    Example:
        >>> zoomed_limits(97.78, 91.67)
        (88.004, 101.446)
        >>> zoomed_limits(97.0, 97.0)  # no change: a 1-point window, not a zero-height axis
        (96.5, 97.5)
    """
    lo, hi = min(values), max(values)
    margin = max((hi - lo) * share, least)
    return round(lo - margin, 6), round(hi + margin, 6)


def _has_ratio(speed: dict[str, Any]) -> bool:
    return fmt.is_number(speed.get("ratio")) and fmt.interval(speed.get("ci95")) != fmt.MISSING


def _both(baseline: dict[str, Any], after: dict[str, Any], key: str) -> tuple[float, float] | None:
    b, a = baseline.get(key), after.get(key)
    return (float(b), float(a)) if fmt.is_number(b) and fmt.is_number(a) else None


def _two_bars(ax: Any, baseline: dict[str, Any], after: dict[str, Any], key: str, label: Callable[[float], str],
              ylabel: str, title: Callable[[float, float], str], headroom: float) -> str | None:
    """Baseline and compressed ``key`` as two bars from zero, each labelled ``label(value)``, titled
    ``title(baseline, compressed)``; returns the title, or None (nothing drawn) unless both values are numbers."""
    pair = _both(baseline, after, key)
    if pair is None:
        return None
    b, a = pair
    bars = ax.bar(["baseline", "compressed"], [b, a], color=[GREY, BLUE])
    ax.bar_label(bars, labels=[label(b), label(a)], fontsize=8)
    ax.set_ylim(0, max(b, a) * headroom)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
    text = title(b, a)
    ax.set_title(text, fontsize=10)
    return text


def _size_title(b: float, a: float) -> str:
    return f"file size: {fmt.ratio(b / a)} smaller" if a > 0 else "file size"


def _size(ax: Any, baseline: dict[str, Any], after: dict[str, Any], speed: Any) -> str | None:
    title = _two_bars(ax, baseline, after, "size_bytes", fmt.nbytes, "bytes of the file", _size_title, 1.18)
    if title is not None:
        ax.yaxis.set_major_formatter("{x:,.0f}")
    return title


def _quality(ax: Any, baseline: dict[str, Any], after: dict[str, Any], speed: Any) -> str | None:
    key, name = ("accuracy", "accuracy") if _both(baseline, after, "accuracy") else ("cosine_mean", "cosine mean")
    pair = _both(baseline, after, key)
    if pair is None:
        return None
    b, a = (v * 100 for v in pair)  # percent, so the change reads in points
    ax.set_ylim(*zoomed_limits(b, a))
    ax.plot([0, 1], [b, a], color=GREY, linewidth=1, zorder=1)
    ax.scatter([0, 1], [b, a], color=[GREY, RED if a < b else BLUE], s=50, zorder=2)
    for x, v, dx, ha in ((0, b, -8, "right"), (1, a, 8, "left")):  # beside the points, clear of the line
        ax.annotate(f"{v:.2f}%", (x, v), textcoords="offset points", xytext=(dx, 0), ha=ha, va="center", fontsize=8)
    ax.set_xticks([0, 1], ["baseline", "compressed"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel(f"{name} (%), axis zoomed", fontsize=8)
    ax.tick_params(labelsize=8)
    title = f"{name}: {fmt.points((a - b) / 100)}"
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.02, "axis does not start at 0", transform=ax.transAxes, ha="center", fontsize=7, color=GREY)
    return title


def _speed_ratio(ax: Any, baseline: Any, after: Any, speed: Any) -> str:
    r, (lo, hi) = float(speed["ratio"]), (float(c) for c in speed["ci95"])
    ax.errorbar([r], [0], xerr=[[r - lo], [hi - r]], fmt="o", color=BLUE, capsize=5)
    ax.axvline(1.0, color=GREY, linestyle="--", linewidth=1)
    ax.annotate("no difference", (1.0, 0.8), textcoords="offset points", xytext=(4, 0), ha="left", fontsize=7,
                color=GREY)
    span = max(hi, 1.0) - min(lo, 1.0)
    pad = max(span * 0.3, 0.05)
    ax.set_xlim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
    ax.set_ylim(-1, 1)
    ax.set_yticks([])
    ax.spines[["left"]].set_visible(False)
    ax.set_xlabel("baseline time / compressed time\n(paired rounds; above 1: faster)", fontsize=8)
    ax.tick_params(labelsize=8)
    title = f"speed: {fmt.ratio(r)} ({fmt.interval(speed['ci95'])})"
    ax.set_title(title, fontsize=10)
    return title


def _latency(ax: Any, baseline: dict[str, Any], after: dict[str, Any], speed: Any) -> str | None:
    title = _two_bars(ax, baseline, after, "latency_ms_p50", lambda v: f"{fmt.sig(v)} ms", "latency p50 (ms)",
                      lambda b, a: "latency p50: single unpaired runs", 1.25)
    if title is not None:
        ax.text(0.5, 0.92, "no interval: not a speed claim", transform=ax.transAxes, ha="center", fontsize=7,
                color=GREY)
    return title
