"""README's table of measured numbers is rendered from benchmarks/results and checked against it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "benchmarks" / "summary.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _schema  # noqa: E402
import summary  # noqa: E402


def test_readme_agrees_with_the_results() -> None:
    run = subprocess.run([sys.executable, str(SUMMARY), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_every_current_results_file_follows_the_schema_and_old_ones_are_withdrawn() -> None:
    docs = summary.load_results()
    assert any(summary.current(d) for d in docs), "no results file under the current protocol"
    for doc in filter(summary.current, docs):
        assert _schema.validate(doc) == [], doc["_path"].name
    table = summary.render(docs)
    for doc in docs:
        if not summary.current(doc):
            assert f"`{doc['_path'].stem}`" in table.split("Withdrawn", 1)[1]


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    return results, readme


def test_check_fails_when_a_result_changes(tmp_path: Path) -> None:
    results, readme = _copy(tmp_path)
    path = next(p for p in sorted(results.glob("*.json")) if summary.current(json.loads(p.read_text())))
    doc = json.loads(path.read_text())
    value = doc["summary"][0]["value"]
    doc["summary"][0]["value"] = value + 1 if isinstance(value, (int, float)) else f"{value}!"
    path.write_text(json.dumps(doc))
    run = subprocess.run([sys.executable, str(SUMMARY), "--check", "--results", str(results), "--readme",
                          str(readme)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "differs" in run.stderr


def test_check_fails_when_readme_is_edited_by_hand(tmp_path: Path) -> None:
    results, readme = _copy(tmp_path)
    block = summary.readme_block(readme.read_text())
    assert block
    edited = block.replace("|", "| 99x |", 1)
    readme.write_text(readme.read_text().replace(block, edited))
    assert summary.check(summary.load_results(results), readme)


@pytest.mark.parametrize("key", ["env", "targets", "cases"])
def test_check_fails_when_a_file_breaks_the_schema(tmp_path: Path, key: str) -> None:
    results, readme = _copy(tmp_path)
    path = next(p for p in sorted(results.glob("*.json")) if summary.current(json.loads(p.read_text())))
    doc = json.loads(path.read_text())
    del doc[key]
    path.write_text(json.dumps(doc))
    problems = summary.check(summary.load_results(results), readme)
    assert any(f"missing key {key!r}" in p for p in problems)
