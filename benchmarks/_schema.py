"""The one results schema every benchmark writes, and the helpers that fill it.

A results file is ``benchmarks/results/<benchmark>.json``::

    {
      "benchmark": "prune_resnet",
      "env": {"cpu", "cores", "threads", "torch", "onnxruntime", "python", "date", "git_commit", ...},
      "protocol": "how it was measured, in one or two sentences",
      "cases": [ {...one measured case...}, ... ],
      "targets": [ {"name", "want", "got", "met", "n"?, "ci95"?, "unit"?}, ... ],
      "summary": [ {"claim", "value", "ci95"?, "n"?, "unit"?}, ... ]   # the numbers README quotes
    }

``targets`` are the goals the benchmark checks (BENCHMARKS.md); ``summary`` rows are the headline numbers
that ``benchmarks/summary.py`` renders into README (and checks with ``--check``). Every number in
``summary`` carries its ``n`` or its interval where it has one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
REQUIRED = ("benchmark", "env", "cases", "targets", "summary")
ENV_KEYS = ("cpu", "cores", "threads", "torch", "onnxruntime", "python", "date", "git_commit")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except OSError:
        return ""


def environment(threads: int | Sequence[int], *, seed: int | Sequence[int] | None = None,
                **extra: Any) -> dict[str, Any]:
    """Where and how a benchmark ran: CPU (model, cores, AVX2 / AVX-512 VNNI), threads, versions, date, commit,
    and the 1-minute load average at the start (the machine is often shared)."""
    import torch

    from slimguard.runtime.measure import machine

    info = machine()
    try:
        import onnxruntime

        ort: str | None = onnxruntime.__version__
    except ImportError:
        ort = None
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env = {
        "cpu": info["cpu"], "cores": info["cores"], "logical_cpus": info["logical_cpus"],
        "threads": list(threads) if isinstance(threads, Sequence) else threads,
        "cpu_capability": info["cpu_capability"], "avx2": info["avx2"], "avx512_vnni": info["avx512_vnni"],
        "gpu": info["gpu"], "torch": torch.__version__, "onnxruntime": ort, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if seed is not None:
        env["seed"] = list(seed) if isinstance(seed, Sequence) else seed
    env.update(extra)
    return env


def target(name: str, want: str, got: Any, met: bool, **extra: Any) -> dict[str, Any]:
    """One goal: what was wanted (in words, e.g. ``">= 1.8x, lower CI bound"``), what was got, and whether met."""
    return {"name": name, "want": want, "got": got, "met": bool(met), **extra}


def claim(claim: str, value: float | int | str, *, unit: str = "", ci95: Sequence[float] | None = None,
          n: int | None = None, digits: int = 2) -> dict[str, Any]:
    """One headline number for README: rounded to ``digits``, with its interval and ``n`` when it has them."""
    row: dict[str, Any] = {"claim": claim, "value": round(value, digits) if isinstance(value, float) else value,
                           "unit": unit}
    if ci95 is not None:
        row["ci95"] = [round(float(v), digits) for v in ci95]
    if n is not None:
        row["n"] = int(n)
    return row


def validate(doc: Mapping[str, Any]) -> list[str]:
    """The ways ``doc`` breaks the schema (empty when it follows it)."""
    problems = [f"missing key {k!r}" for k in REQUIRED if k not in doc]
    env = doc.get("env", {})
    problems += [f"env lacks {k!r}" for k in ENV_KEYS if k not in env]
    for i, t in enumerate(doc.get("targets", [])):
        problems += [f"targets[{i}] lacks {k!r}" for k in ("name", "want", "got", "met") if k not in t]
    for i, row in enumerate(doc.get("summary", [])):
        problems += [f"summary[{i}] lacks {k!r}" for k in ("claim", "value") if k not in row]
    return problems


def write_results(name: str, *, env: Mapping[str, Any], cases: Sequence[Any], targets: Sequence[Mapping[str, Any]],
                  summary: Sequence[Mapping[str, Any]], protocol: str = "", **extra: Any) -> Path:
    """Write ``results/<name>.json`` atomically (temporary file, then rename) after checking the schema."""
    doc = {"benchmark": name, "env": dict(env), "protocol": protocol, "cases": list(cases),
           "targets": list(targets), "summary": list(summary), **extra}
    problems = validate(doc)
    if problems:
        raise ValueError(f"{name}: results do not follow the schema: {'; '.join(problems)}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def print_targets(targets: Sequence[Mapping[str, Any]], stream: Any = sys.stdout) -> None:
    """The targets as a short table: met or MISSED, name, want, got."""
    for t in targets:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['name']}: want {t['want']}, got {t['got']}", file=stream)


def correct(model: Any, split: Any, batch_size: int = 512) -> list[bool]:
    """Whether ``model`` gets each example of ``split`` right (the per-example scores that paired deltas need)."""
    from slimguard.evaluate import predict

    pred = predict(model, split.x, batch_size=batch_size).argmax(-1)
    return [bool(v) for v in (pred == split.y).tolist()]


def accuracy_row(name: str, hits: Sequence[bool]) -> dict[str, Any]:
    """Accuracy of one model on one split with its Wilson 95% interval, in percent."""
    from slimguard.runtime.stats import wilson

    k, n = sum(hits), len(hits)
    lo, hi = wilson(k, n)
    return {"model": name, "accuracy": round(100 * k / n, 3), "ci95": [round(100 * lo, 3), round(100 * hi, 3)],
            "n": n}


def over_seeds(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Mean over seeds (or folds) with a Student-t 95% interval, rounded."""
    from slimguard.runtime.stats import mean_ci

    r = mean_ci(values)
    return {"mean": round(r["mean"], digits), "ci95": [round(v, digits) for v in r["ci95"]],
            "sd": round(r["sd"], digits), "n": r["n"], "values": [round(float(v), digits) for v in values]}
