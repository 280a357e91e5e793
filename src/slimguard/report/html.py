"""A self-contained HTML report of a run: before/after table, plots, budget, steps.

Plots are drawn with matplotlib (extra ``report``) and embedded as PNG data URIs, so the page is one
file that opens anywhere. Without matplotlib the page has the tables only.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from slimguard.core.outputs import atomic_write

ROWS = [
    ("accuracy", "accuracy"), ("cosine mean", "cosine_mean"), ("cosine min", "cosine_min"),
    ("parameters", "params"), ("nonzero parameters", "nonzero_params"), ("file bytes", "size_bytes"),
    ("MACs / example", "macs"), ("latency p50 (ms)", "latency_ms_p50"), ("latency p95 (ms)", "latency_ms_p95"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _plots(baseline: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    for title, key in (("file bytes", "size_bytes"), ("latency p50 (ms)", "latency_ms_p50"),
                       ("accuracy", "accuracy"), ("cosine mean", "cosine_mean")):
        b, a = baseline.get(key), after.get(key)
        if not isinstance(b, (int, float)) or not isinstance(a, (int, float)):
            continue
        fig, ax = plt.subplots(figsize=(3.2, 2.4), dpi=100)
        bars = ax.bar(["baseline", "compressed"], [b, a], color=["#8c8c8c", "#2a7ab9"])
        ax.bar_label(bars, labels=[_fmt(b), _fmt(a)], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append((title, base64.b64encode(buf.getvalue()).decode()))
    return out


def render_html(result: dict[str, Any], title: str = "slimguard report") -> str:
    """HTML for a result with ``baseline`` and ``compressed`` metric dicts (as ``compress`` returns)."""
    baseline, after = result.get("baseline", {}), result.get("compressed", {})
    rows = []
    for label, key in ROWS:
        b, a = baseline.get(key), after.get(key)
        if b is None and a is None:
            continue
        change = "-"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if key in ("accuracy", "cosine_mean", "cosine_min"):
                change = f"{(a - b) * 100:+.2f} pts"
            elif a:
                change = f"{b / a:.2f}x"
        rows.append(f"<tr><td>{label}</td><td>{_fmt(b)}</td><td>{_fmt(a)}</td><td>{change}</td></tr>")
    budget = result.get("budget", {})
    budget_html = ""
    if budget:
        status = "met" if budget.get("ok", True) else "MISSED"
        items = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in budget.items() if k != "ok")
        budget_html = f"<h2>Budget: {status}</h2><ul>{items}</ul>"
    steps = result.get("recipe", {}).get("steps", [])
    steps_html = "".join(f"<li><code>{html.escape(str(s))}</code></li>" for s in steps)
    plots = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"></figure>'
                    for t, b64 in _plots(baseline, after))
    recipe = result.get("recipe", {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5rem}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>model <code>{html.escape(str(recipe.get("model", "")))}</code> on data
<code>{html.escape(str(recipe.get("data", "")))}</code>; metrics on the held-out test split.</p>
<table><tr><th>metric</th><th>baseline</th><th>compressed</th><th>change (baseline / compressed)</th></tr>
{"".join(rows)}</table>
{budget_html}<h2>Plots</h2>{plots or "<p>(install slimguard[report] for plots)</p>"}
<h2>Steps</h2><ol>{steps_html}</ol></body></html>
"""


def write_report(result: dict[str, Any], path: str | os.PathLike[str], title: str = "slimguard report") -> Path:
    """Write :func:`render_html` atomically to ``path`` (mode as any new file; see :mod:`slimguard.core.outputs`)."""
    text = render_html(result, title)
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)
