"""The HTML report: what a run's metrics say, escaped, with the budget verdict, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from slimguard.report import write_report
from slimguard.report.html import render_html

RESULT = {
    "recipe": {"model": "zoo:digits-mlp", "data": "digits", "steps": [{"magnitude": {"sparsity": 0.8}}]},
    "baseline": {"accuracy": 0.98, "size_bytes": 200_000, "params": 1000},
    "compressed": {"accuracy": 0.95, "size_bytes": 20_000, "params": 1000},
    "budget": {"ok": False, "accuracy_drop_points": 3.0, "max_accuracy_drop": {"limit": 1.0, "ok": False}},
}


def test_report_shows_metrics_changes_and_the_verdict() -> None:
    page = render_html(RESULT, title="run <1>")
    assert "<title>run &lt;1&gt;</title>" in page  # escaped, never raw markup from a recipe
    assert "zoo:digits-mlp" in page and "magnitude" in page
    assert "-3.00 pts" in page  # accuracy change in points
    assert "10.00x" in page  # file bytes 200,000 -> 20,000
    assert "MISSED" in page


def test_a_met_budget_says_met() -> None:
    page = render_html({**RESULT, "budget": {"ok": True}})
    assert "Budget: met" in page and "MISSED" not in page


def test_write_report_replaces_atomically_with_umask_mode(tmp_path: Path) -> None:
    out = tmp_path / "r" / "report.html"
    out.parent.mkdir()
    out.write_text("old")
    old = os.umask(0o022)
    try:
        path = write_report(RESULT, out)
    finally:
        os.umask(old)
    assert path == out and "MISSED" in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left behind
