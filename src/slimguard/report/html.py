"""A self-contained HTML report of a run: the verdicts first, then the evidence for each.

The page is one file with inline CSS and plots as PNG data URIs (drawn with matplotlib, extra ``report``;
without it the page has its tables only), so it opens anywhere and fetches nothing. It reads top down:

1. **At a glance**: file size ratio, accuracy (or cosine) change in points, the speed verdict with its
   interval, and the budget as a green *met* or red *missed* badge;
2. **Budget**: each item with its value, limit and verdict;
3. **Metrics**: baseline and compressed side by side, with the change in words (``5.36x smaller``,
   ``-0.28 pts``); unpaired latencies are marked as such, never read as a speed claim;
4. **Speed**: the paired speed ratio, its 95% interval, spread and settings (from ``result["speed"]``);
5. **Plots**; 6. **Steps** (each step's options and its own result); 7. **Layers** (the artifact's
   per-tensor sparsity, codec, bits per weight and bytes, from ``result["layers"]``); 8. **Machine**.

Every text taken from the result is escaped. Sections whose data a result lacks (older results have no
``speed`` or ``layers``) say so instead of disappearing. The result's shape is ``metrics.json``'s,
documented in :mod:`slimguard.pipeline`.

Example:
    >>> page = render_html({"baseline": {"size_bytes": 200_000}, "compressed": {"size_bytes": 20_000}})
    >>> "10.00x smaller" in page
    True
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from slimguard.core.outputs import atomic_write
from slimguard.report import format as fmt
from slimguard.report.plots import plots

ROWS = [
    ("accuracy", "accuracy"), ("cosine mean", "cosine_mean"), ("cosine min", "cosine_min"),
    ("parameters", "params"), ("nonzero parameters", "nonzero_params"), ("file bytes", "size_bytes"),
    ("MACs / example", "macs"), ("latency p50 (ms)", "latency_ms_p50"), ("latency p95 (ms)", "latency_ms_p95"),
    ("throughput (examples/s)", "throughput_per_s"),
]
"""The metric table's rows: (label, key in ``baseline`` / ``compressed``)."""

MACHINE_ORDER = ("cpu", "cores", "logical_cpus", "usable_cpus", "threads", "cpu_capability", "avx2", "avx512_vnni",
                 "gpu", "torch")
"""The machine's fields in reading order (a ``metrics.json`` written with sorted keys loses it); others follow."""

SMALLER_IS_BETTER = {"params", "nonzero_params", "size_bytes", "macs"}
UNPAIRED = {"latency_ms_p50", "latency_ms_p95", "throughput_per_s"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:68rem;padding:0 1rem;
color:#222;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}code{background:#f3f3f3;padding:0 .25rem;border-radius:3px}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;
vertical-align:top;white-space:nowrap}th{background:#f6f6f6}td:first-child,th:first-child,.pairs td,
.left2 :is(td,th):nth-child(-n+2),.left4 :is(td,th):nth-child(-n+4){text-align:left}.left4{font-size:.9rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:8px;padding:.7rem 1rem;
min-width:13rem;flex:1}.card .k{color:#666;font-size:.85rem}.card .v{font-size:1.35rem;font-weight:600}
.card .d{color:#555;font-size:.85rem}
.badge{display:inline-block;padding:.1rem .6rem;border-radius:1rem;color:#fff;font-weight:600;font-size:.9rem}
.ok{background:#1e8449}.bad{background:#c0392b}.na{background:#888}
.opt{display:inline-block;margin:.1rem .3rem .1rem 0;font-family:ui-monospace,monospace;font-size:.85rem;
background:#f3f3f3;padding:0 .3rem;border-radius:3px}
.track{display:inline-block;width:3rem;height:.6rem;background:#e6e6e6;vertical-align:middle;margin-right:.4rem}
.bar{display:block;height:100%;background:#2a7ab9}
.note{color:#666;font-size:.85rem}figure{display:inline-block;margin:.3rem}figure img{width:330px}
.wrap{white-space:normal}.res{font-size:.88rem}.res div{margin:.1rem 0}
"""


def e(v: Any) -> str:
    """Escape text for HTML (quotes too, so it is safe in attributes)."""
    return html.escape(str(v), quote=True)


def _badge(ok: Any) -> str:
    if ok is None:
        return '<span class="badge na">n/a</span>'
    return '<span class="badge ok">met</span>' if ok else '<span class="badge bad">missed</span>'


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A table from already-escaped cells; its first ``left`` columns (1 to 4) are left-aligned, the rest
    (numbers) right-aligned."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="left{left}"><tr>{th}</tr>{body}</table>'


def _pairs(rows: list[list[str]]) -> str:
    """A two-column table of (name, value), both already escaped."""
    return '<table class="pairs">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


# ---- the numbers ----------------------------------------------------------------------------------------
def _cell(key: str, v: Any) -> str:
    if key == "accuracy":
        return fmt.pct(v)
    return fmt.sig(v)


def _change(key: str, b: Any, a: Any) -> str:
    """The change from baseline ``b`` to compressed ``a`` in words, or ``-``."""
    if not (fmt.is_number(a) and fmt.is_number(b)):
        return fmt.MISSING
    if key == "accuracy":
        return fmt.points(a - b)
    if key.startswith("cosine"):
        return f"{a - b:+.4f}"
    if key in UNPAIRED:
        if not a or not b:
            return fmt.MISSING
        more = "higher" if key == "throughput_per_s" else "longer"
        less = "lower" if key == "throughput_per_s" else "shorter"
        return (f"{fmt.ratio(a / b)} {more}" if a >= b else f"{fmt.ratio(b / a)} {less}") + " †"
    if key in SMALLER_IS_BETTER and a == b:
        return "same"
    if key in SMALLER_IS_BETTER and a and b:
        return f"{fmt.ratio(b / a)} smaller" if a <= b else f"{fmt.ratio(a / b)} larger"
    return fmt.MISSING


def _metrics(baseline: dict[str, Any], after: dict[str, Any], has_speed: bool) -> str:
    rows = [[e(label), e(_cell(key, baseline.get(key))), e(_cell(key, after.get(key))),
             e(_change(key, baseline.get(key), after.get(key)))]
            for label, key in ROWS if baseline.get(key) is not None or after.get(key) is not None]
    if not rows:
        return "<p>This result holds no metrics.</p>"
    where = ("the paired speed ratio is under Speed" if has_speed
             else "this result holds no paired speed measurement")
    note = (f'<p class="note">† latency and throughput come from single unpaired runs, one model after the other, '
            f"on a machine that may be shared: they are not a speed claim ({where}).</p>")
    return _table(["metric", "baseline", "compressed", "change"], rows) + note


def _budget_rows(budget: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, item in budget.items():
        if not isinstance(item, dict):
            continue
        name = key.removeprefix("max_").removeprefix("min_").replace("_", " ")
        sign = "≤" if key.startswith("max_") else "≥" if key.startswith("min_") else ""
        if key == "max_accuracy_drop":
            value = budget.get("accuracy_drop_points")
            shown = f"{value:.2f} pts" if fmt.is_number(value) else fmt.MISSING
            limit = f"{sign} {fmt.sig(item.get('limit'))} pts"
        else:
            shown, limit = fmt.sig(item.get("value")), f"{sign} {fmt.sig(item.get('limit'))}".strip()
        rows.append([e(name), e(shown), e(limit), _badge(item.get("ok"))])
    return rows


def _budget(budget: dict[str, Any]) -> str:
    if not budget:
        return "<p>This result holds no budget verdict.</p>"
    rows = _budget_rows(budget)
    split = budget.get("split")
    where = f" (judged on the {e(split)} split; the test split is only reported)" if split else ""
    head = f"<p>Budget {_badge(budget.get('ok', True))}{where}</p>"
    if not rows:
        return head + "<p>The recipe sets no budget items, so there is nothing to miss.</p>"
    return head + _table(["item", "value", "limit", "verdict"], rows)


def _speed(speed: dict[str, Any] | None) -> str:
    if not speed:
        return ("<p>Not measured: this result holds no paired speed measurement (results written before "
                "slimguard measured speed in paired rounds). The latencies under Metrics are single unpaired "
                "runs and say nothing reliable about which model is faster.</p>")
    spread = speed.get("spread")
    rows = [["verdict", e(fmt.text(speed.get("verdict")))],
            ["speed ratio", e(fmt.ratio(speed.get("ratio")))],
            ["95% interval", e(fmt.interval(speed.get("ci95")))],
            ["spread", e(fmt.interval(spread) if fmt.interval(spread) != fmt.MISSING else fmt.value(spread))]]
    labels = {"median_ms": "median ms per call", "per_round": "per-round ratios", "batch_size": "batch size",
              "threads": "threads", "rounds": "rounds", "calls_per_round": "calls per round",
              "warmup": "warm-up calls"}
    rows += [[e(label), e(fmt.value(speed.get(k), k))] for k, label in labels.items() if k in speed]
    shown = {"verdict", "ratio", "ci95", "spread", "machine", *labels}
    rows += [[e(k.replace("_", " ")), e(fmt.value(v, k))] for k, v in speed.items() if k not in shown]
    return (_pairs(rows) +
            '<p class="note">The speed ratio is baseline time / compressed time: above 1.00x the compressed '
            "model is faster. Both models ran in turn within each round, on the same inputs with the same pinned "
            "threads, after warm-up; the ratio is the median of the per-round ratios, with its 95% bootstrap "
            "interval, and the spread is the smallest and largest per-round ratio. An interval that contains "
            "1.00x means no measurable difference.</p>")


# ---- what the run did -----------------------------------------------------------------------------------
def _recipe_step(s: Any) -> dict[str, Any]:
    """A recipe's ``{STEP: {options}}`` (or bare ``STEP``) as a ``steps`` entry with no result."""
    if isinstance(s, dict) and len(s) == 1:
        (name, config), = s.items()
        return {"step": name, "config": config, "result": None}
    return {"step": s, "config": {}, "result": None}


def _steps(steps: list[Any], recipe_steps: list[Any]) -> str:
    if not steps and recipe_steps:  # an older result: the recipe's steps, without their results
        steps = [_recipe_step(s) for s in recipe_steps]
    if not steps:
        return "<p>This result holds no steps.</p>"
    rows = []
    for i, step in enumerate(steps, 1):
        step = step if isinstance(step, dict) else {"step": step}
        config = step.get("config")
        config = config if isinstance(config, dict) else {}
        options = " ".join(f'<span class="opt">{e(k)}={e(fmt.option(v))}</span>' for k, v in config.items())
        result = step.get("result")
        if isinstance(result, dict) and result:
            summary = "".join(f"<div><b>{e(k)}</b>: {e(fmt.value(v, str(k)))}</div>" for k, v in result.items())
        else:
            summary = '<span class="note">no result reported</span>'
        rows.append([str(i), f"<code>{e(step.get('step', '?'))}</code>",
                     f'<div class="wrap">{options or "(defaults)"}</div>', f'<div class="wrap res">{summary}</div>'])
    return _table(["#", "step", "options", "result"], rows, left=4)


def _layers(layers: dict[str, Any] | None) -> str:
    if not layers or not isinstance(layers.get("tensors"), list):
        return "<p>This result holds no per-layer view (results written before it was recorded).</p>"
    rows = []
    for t in (t for t in layers["tensors"] if isinstance(t, dict)):
        sp = t.get("sparsity")
        fill = f"{max(0.0, min(1.0, sp)) * 100:.1f}%" if fmt.is_number(sp) else "0%"
        bar = f'<span class="track"><span class="bar" style="width:{fill}"></span></span>'
        rows.append([f"<code>{e(t.get('tensor'))}</code>", e(fmt.text(t.get("module_type"))),
                     e(fmt.shape(t.get("shape"))), e(fmt.text(t.get("dtype"))), e(fmt.sig(t.get("params"))),
                     e(fmt.sig(t.get("nonzero"))), bar + e(fmt.pct(sp, 1)), e(fmt.text(t.get("codec"))),
                     e(fmt.sig(t.get("bits_per_weight"))), e(fmt.sig(t.get("stored_bytes")))])
    totals = layers.get("totals") or {}
    params, nonzero = totals.get("params"), totals.get("nonzero")
    stored = totals.get("stored_bytes")
    overall = bits = None
    if fmt.is_number(params) and params > 0:
        overall = 1 - nonzero / params if fmt.is_number(nonzero) else None
        bits = 8 * stored / params if fmt.is_number(stored) else None  # over every stored tensor
    rows.append(["<b>total</b>", "", "", "", e(fmt.sig(params)), e(fmt.sig(nonzero)), e(fmt.pct(overall, 1)), "",
                 e(fmt.sig(bits)), e(fmt.sig(stored))])
    note = ""
    if fmt.is_number(totals.get("file_bytes")):
        note = (f'<p class="note">The file is {e(fmt.nbytes(totals["file_bytes"]))}: the stored tensors above '
                "plus the manifest and archive headers.</p>")
    return _table(["tensor", "module", "shape", "dtype", "params", "nonzero", "sparsity", "codec",
                   "bits / weight", "stored bytes"], rows, left=4) + note


def _machine(speed: dict[str, Any] | None, after: dict[str, Any], baseline: dict[str, Any]) -> str:
    """Where the speed (or, failing that, the latency) was measured."""
    for source in (speed or {}, after, baseline):
        machine = source.get("machine")
        if isinstance(machine, dict) and machine:
            keys = [k for k in MACHINE_ORDER if k in machine] + [k for k in machine if k not in MACHINE_ORDER]
            return _pairs([[e(k.replace("_", " ")), e(fmt.value(machine[k], k))] for k in keys])
    return "<p>Not recorded in this result.</p>"


# ---- the page -------------------------------------------------------------------------------------------
def _glance(baseline: dict[str, Any], after: dict[str, Any], budget: dict[str, Any],
            speed: dict[str, Any] | None) -> str:
    cards = []
    b, a = baseline.get("size_bytes"), after.get("size_bytes")
    if fmt.is_number(b) and fmt.is_number(a) and a:
        cards.append(("file size", _change("size_bytes", b, a), f"{fmt.nbytes(b)} → {fmt.nbytes(a)}"))
    for key, name in (("accuracy", "accuracy"), ("cosine_mean", "cosine mean")):
        b, a = baseline.get(key), after.get(key)
        if fmt.is_number(b) and fmt.is_number(a):
            cards.append((name, _change(key, b, a), f"{_cell(key, b)} → {_cell(key, a)}"))
            break
    if speed:
        cards.append(("speed", fmt.text(speed.get("verdict")),
                      f"ratio {fmt.ratio(speed.get('ratio'))}, 95% interval {fmt.interval(speed.get('ci95'))}"))
    else:
        cards.append(("speed", "not measured", "no paired speed measurement in this result"))
    html_cards = "".join(f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}</div>'
                         f'<div class="d">{e(d)}</div></div>' for k, v, d in cards)
    items = [v for v in budget.values() if isinstance(v, dict)]
    missed = sum(1 for v in items if not v.get("ok", True))
    noun = "item" if len(items) == 1 else "items"
    detail = f"{missed} of {len(items)} {noun} missed" if missed else f"{len(items)} {noun}, all held"
    verdict = _badge(budget.get("ok", True)) if budget else _badge(None)
    return (f'<div class="cards">{html_cards}<div class="card"><div class="k">budget</div>'
            f'<div class="v">{verdict}</div><div class="d">{e(detail if budget else "not checked")}</div></div></div>')


def render_html(result: dict[str, Any], title: str = "slimguard report") -> str:
    """HTML for a result shaped like ``metrics.json`` (``baseline``, ``compressed``, ``budget``, ``steps``,
    and, when present, ``speed`` and ``layers``; see :mod:`slimguard.pipeline`). Missing sections say so."""
    baseline, after = result.get("baseline") or {}, result.get("compressed") or {}
    budget, recipe = result.get("budget") or {}, result.get("recipe") or {}
    speed = result.get("speed") if isinstance(result.get("speed"), dict) else None
    figures = "".join(f'<figure><img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                      f"</figure>" for alt, png in plots(baseline, after, speed))
    task = f" ({e(recipe['task'])})" if recipe.get("task") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head>
<body><h1>{e(title)}</h1>
<p class="sub">model <code>{e(recipe.get("model", "?"))}</code> on data <code>{e(recipe.get("data", "?"))}</code>{task};
metrics on the held-out test split.</p>
<h2>At a glance</h2>{_glance(baseline, after, budget, speed)}
<h2>Budget</h2>{_budget(budget)}
<h2>Metrics</h2>{_metrics(baseline, after, speed is not None)}
<h2>Speed</h2>{_speed(speed)}
<h2>Plots</h2>{figures or '<p class="note">(install slimguard[report] for plots)</p>'}
<h2>Steps</h2>{_steps(result.get("steps") or [], recipe.get("steps") or [])}
<h2>Layers</h2>{_layers(result.get("layers") if isinstance(result.get("layers"), dict) else None)}
<h2>Machine</h2>{_machine(speed, after, baseline)}
</body></html>
"""


def write_report(result: dict[str, Any], path: str | os.PathLike[str], title: str = "slimguard report") -> Path:
    """Write :func:`render_html` atomically to ``path`` (mode as any new file; see :mod:`slimguard.core.outputs`)."""
    text = render_html(result, title)
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)
