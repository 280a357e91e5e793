"""README's table of measured numbers, rendered from ``benchmarks/results/*.json`` and checked against it.

    python benchmarks/summary.py            # print the table
    python benchmarks/summary.py --write    # put it into README.md between the results markers
    python benchmarks/summary.py --check    # exit 1 when README and the results disagree, or a file breaks the schema

Each results file's ``summary`` rows (see ``_schema.py``) become rows of the table, with their interval,
``n`` and the machine they were measured on; ``targets`` give the met / missed count per benchmark. A file
still in an older shape (no ``summary``: measured before this protocol) is not quoted: the table names it
as withdrawn until it is rerun, so no number measured the old way reaches README.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _schema import RESULTS, validate

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- results:begin (rendered by benchmarks/summary.py from benchmarks/results; do not edit) -->"
END = "<!-- results:end -->"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e4 or value == int(value) else f"{value:.4g}"
    return str(value)


def _value(row: Mapping[str, Any]) -> str:
    unit = str(row.get("unit", ""))
    text = _number(row["value"]) + (f" {unit}" if unit and unit not in ("x", "%") else unit)
    if row.get("ci95"):
        lo, hi = row["ci95"]
        if unit == "%":  # a t-interval of a mean of percentages can pass 100; a percentage cannot
            lo, hi = max(lo, 0), min(hi, 100)
        text += f" [{_number(lo)}, {_number(hi)}]"
    return text


def _machine(env: Mapping[str, Any]) -> str:
    cpu = str(env.get("cpu") or "unknown CPU")
    isa = " AVX-512 VNNI" if env.get("avx512_vnni") else (" AVX2" if env.get("avx2") else "")
    threads = env.get("threads")
    threads_text = "/".join(str(t) for t in threads) if isinstance(threads, list) else str(threads)
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    return f"{cpu}{isa}, {threads_text} thr{gpu}"


def load_results(folder: Path = RESULTS) -> list[dict[str, Any]]:
    """Every results file, sorted by benchmark name."""
    docs = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["_path"] = path
        docs.append(doc)
    return docs


def current(doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` was written under the current protocol (it has the schema's ``summary``)."""
    return isinstance(doc.get("summary"), list) and "benchmark" in doc


def render(docs: list[dict[str, Any]]) -> str:
    """The markdown table README shows: one row per headline number, then the withdrawn files."""
    lines = ["| benchmark | result | value [95% interval] | n | targets met | machine, threads |",
             "|---|---|---|---|---|---|"]
    withdrawn = [doc["_path"].stem for doc in docs if not current(doc)]
    for doc in filter(current, docs):
        targets = doc.get("targets", [])
        met = f"{sum(1 for t in targets if t.get('met'))}/{len(targets)}" if targets else "-"
        for i, row in enumerate(doc.get("summary", [])):
            lines.append(f"| `{doc['benchmark']}` | {row['claim']} | {_value(row)} | {row.get('n', '-')} | "
                         f"{met if i == 0 else ''} | {_machine(doc['env']) if i == 0 else ''} |")
    if withdrawn:
        lines += ["", "Withdrawn until rerun under this protocol (their earlier numbers are not quoted): "
                  + ", ".join(f"`{name}`" for name in withdrawn) + "."]
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    """What README has between the markers (None when the markers are missing)."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def check(docs: list[dict[str, Any]], readme: Path = README) -> list[str]:
    """Problems: schema breaks, and any difference between README's table and the rendered one."""
    problems = [f"{doc['_path'].name}: {p}" for doc in filter(current, docs) for p in validate(doc)]
    if problems:
        return problems
    block = readme_block(readme.read_text(encoding="utf-8"))
    if block is None:
        return [f"{readme.name} has no results markers; run benchmarks/summary.py --write"]
    want = render(docs)
    if block != want:
        diff = difflib.unified_diff(block.splitlines(), want.splitlines(), "README.md", "rendered", lineterm="")
        problems.append("README's results table differs from benchmarks/results (run benchmarks/summary.py "
                        "--write):\n" + "\n".join(diff))
    return problems


def write(docs: list[dict[str, Any]], readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8")
    if readme_block(text) is None:
        raise SystemExit(f"{readme} has no results markers ({BEGIN!r} ... {END!r}); add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{BEGIN}\n{render(docs)}\n{END}{tail}"
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when README and the results disagree")
    mode.add_argument("--write", action="store_true", help="write the table into README.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSON files")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    docs = load_results(args.results)
    if args.check:
        problems = check(docs, args.readme)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"README matches {len(docs)} results files")
        return 1 if problems else 0
    if args.write:
        write(docs, args.readme)
        print(f"wrote the table of {len(docs)} results files into {args.readme}")
        return 0
    print(render(docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
