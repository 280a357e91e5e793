"""The HTML report: verdicts first, every number formatted, every section present or saying why not, escaped.

``full_result`` (``conftest.py``) is a realistic ``metrics.json`` with speed, layers and a missed budget;
the older-result cases take sections away and check the page says so instead of breaking.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimguard.report import write_report
from slimguard.report.html import render_html
from slimguard.report.plots import plots, zoomed_limits

Result = dict[str, Any]  # a metrics.json object (the ``full_result`` fixture)
Text = Callable[[str], str]  # the ``page_text`` fixture: a page's visible text


def test_the_verdicts_come_first_with_formatted_numbers(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result, title="slimguard: small (budget missed)"))
    glance = text[text.index("At a glance"):text.index("Budget missed")]
    assert "file size 5.36x smaller 188,497 B → 35,167 B" in glance  # 188,497 / 35,167 = 5.360
    assert "accuracy -6.11 pts 97.78% → 91.67%" in glance
    assert "speed no measurable difference ratio 0.97x, 95% interval 0.93x–1.02x" in glance
    assert "budget missed 1 of 1 item missed" in glance
    # no raw floats anywhere (the old page printed 0.27777552604675293 from a raw dict)
    assert re.search(r"\d\.\d{6,}", text) is None, re.search(r".{40}\d\.\d{6,}.{20}", text)
    assert "{'" not in text and "['" not in text and "True" not in text  # no Python dict or list reprs


def test_budget_items_show_value_limit_and_a_styled_verdict(full_result: Result, page_text: Text) -> None:
    page = render_html(full_result)
    assert '<p>Budget <span class="badge bad">missed</span></p>' in page
    assert "accuracy drop 6.11 pts ≤ 1 pts missed" in page_text(page)
    met = {"ok": True, "min_cosine_mean": {"limit": 0.99, "value": 0.99612345, "ok": True}}
    page = render_html({**full_result, "budget": met})
    assert '<p>Budget <span class="badge ok">met</span></p>' in page and "badge bad" not in page
    assert "cosine mean 0.9961 ≥ 0.99 met" in page_text(page)
    assert "The recipe sets no budget items" in render_html({**full_result, "budget": {"ok": True}})


def test_metric_changes_in_words_and_unpaired_latency_is_marked(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result))
    assert "file bytes 188,497 35,167 5.36x smaller" in text
    assert "parameters 50,610 50,610 same" in text and "nonzero parameters 50,610 25,510 1.98x smaller" in text
    assert "latency p50 (ms) 0.03747 0.3707 9.89x longer †" in text  # 4 significant digits, marked unpaired
    assert "they are not a speed claim (the paired speed ratio is under Speed)" in text


def test_speed_section_shows_ratio_interval_spread_and_settings(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result))
    speed = text[text.index("Speed verdict"):text.index("Plots")]
    for want in ("verdict no measurable difference", "speed ratio 0.97x", "95% interval 0.93x–1.02x",
                 "spread 0.88x–1.07x", "median ms per call baseline=0.4127, compressed=0.4249",
                 "batch size 64", "threads 1", "rounds 15", "calls per round 20", "baseline time / compressed time"):
        assert want in speed, want
    full_result["speed"].update(ratio=1.8, ci95=[1.6, 2.0], verdict="1.80x faster [1.60, 2.00]")
    faster = "speed 1.80x faster [1.60, 2.00] ratio 1.80x, 95% interval 1.60x–2.00x"
    assert faster in page_text(render_html(full_result))


def test_steps_are_a_table_of_options_and_results(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result))
    steps = text[text.index("Steps # step"):text.index("Layers")]
    assert "1 magnitude sparsity=0.5 scope=global ignore=[] overrides={} importance=l1" in steps  # as YAML says
    assert "sparsity_by_layer: 2=33.73%, 4=60.95%, 6=33.90%" in steps
    assert "restore_best=true" in steps
    assert "epochs: 1 entry; last: epoch=0, train_loss=0.03669, val_score=0.9694" in steps
    assert "3 int8-dynamic ignore=[] min_features=0 quantized: 2, 4, 6 kept_float: none" in steps
    full_result["steps"][2]["result"] = None
    assert "min_features=0 no result reported" in page_text(render_html(full_result))


def test_layers_show_sparsity_codec_bits_and_bytes(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result))
    layers = text[text.index("Layers tensor"):text.index("Machine")]
    assert "4.weight_int8 DynamicInt8Linear 100×300 int8 30,000 11,716 60.9% sparse 4.124 15,466" in layers
    assert "total 51,022 25,922 49.2% 5.435 34,663" in layers  # 8 * 34,663 / 51,022 = 5.435 bits per weight
    assert "The file is 35,167 B" in layers


def test_machine_is_shown_from_speed_or_else_from_the_latency(full_result: Result, page_text: Text) -> None:
    text = page_text(render_html(full_result))
    assert "cpu AMD EPYC 7B13 64-Core Processor cores 2" in text and "avx2 yes avx512 vnni no gpu -" in text
    machine = full_result.pop("speed")["machine"]
    full_result["compressed"]["machine"] = {**machine, "cpu": "Intel Xeon Platinum 8481C"}
    assert "cpu Intel Xeon Platinum 8481C" in page_text(render_html(full_result))


def test_an_older_result_says_what_it_lacks(full_result: Result, page_text: Text) -> None:
    old = {k: full_result[k] for k in ("recipe", "baseline", "compressed", "budget")}  # no speed, steps, layers
    text = page_text(render_html(old))
    assert "speed not measured no paired speed measurement in this result" in text
    assert "this result holds no paired speed measurement" in text  # the † note under Metrics
    assert "no per-layer view" in text and "Machine Not recorded in this result." in text
    assert "1 magnitude sparsity=0.5" in text and "no result reported" in text  # steps from the recipe
    assert "9.89x longer †" in text


def test_text_from_the_result_is_escaped(full_result: Result) -> None:
    full_result["steps"][0]["step"] = "<script>alert(1)</script>"
    full_result["speed"]["machine"]["cpu"] = '<img src=x onerror="alert(2)">'
    full_result["layers"]["tensors"][0]["tensor"] = "a<b>&c"
    page = render_html(full_result, title="run <1>")
    assert "<title>run &lt;1&gt;</title>" in page
    assert "<script" not in page and "<img src=x" not in page and "a<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a&lt;b&gt;&amp;c" in page


def test_plots_are_inline_pngs_with_the_ratio_the_delta_and_the_interval(full_result: Result) -> None:
    pytest.importorskip("matplotlib")
    drawn = plots(full_result["baseline"], full_result["compressed"], full_result["speed"])
    assert [alt for alt, _ in drawn] == ["file size: 5.36x smaller", "accuracy: -6.11 pts",
                                         "speed: 0.97x (0.93x–1.02x)"]
    assert all(png.startswith(b"\x89PNG") and len(png) > 5000 for _, png in drawn)
    page = render_html(full_result)
    assert page.count('src="data:image/png;base64,') == 3 and "http://" not in page and "https://" not in page
    old = plots(full_result["baseline"], full_result["compressed"], None)
    assert old[2][0] == "latency p50: single unpaired runs"


def test_the_accuracy_axis_is_zoomed_not_from_zero(full_result: Result) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    from slimguard.report.plots import _quality

    fig, ax = plt.subplots()
    try:
        assert _quality(ax, full_result["baseline"], full_result["compressed"], None) == "accuracy: -6.11 pts"
        drawn = ax.get_ylim()
    finally:
        plt.close(fig)
    lo, hi = zoomed_limits(97.78, 91.67)
    assert drawn == pytest.approx((lo, hi), abs=0.01)
    assert 85 < lo < 91.67 and 97.78 < hi < 102  # the drop spans most of the axis
    assert (97.78 - 91.67) / (hi - lo) == pytest.approx(1 / 2.2)  # range + 0.6 of it on each side
    lo, hi = zoomed_limits(97.0, 97.3)
    assert (lo, hi) == (96.5, 97.8)  # a small change keeps a 0.5-point margin: not blown up into a cliff


def test_without_matplotlib_the_page_has_its_tables(full_result: Result,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    page = render_html(full_result)
    assert "data:image/png" not in page and "install slimguard[report] for plots" in page
    assert "5.36x smaller" in page


def test_write_report_replaces_atomically_with_umask_mode(tmp_path: Path, full_result: Result) -> None:
    out = tmp_path / "r" / "report.html"
    out.parent.mkdir()
    out.write_text("old")
    old = os.umask(0o022)
    try:
        path = write_report(full_result, out)
    finally:
        os.umask(old)
    assert path == out and 'class="badge bad">missed' in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left behind
