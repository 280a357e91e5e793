"""Running recipes: source -> baseline -> steps -> artifact -> evaluation -> metrics and report.

:func:`compress` reads straight down: it loads the data and the model, scores the baseline, applies each
step with the one step runner (:func:`slimguard.transforms.run_step`), saves the artifact, reloads and
scores it, checks the budget, and writes ``metrics.json`` and ``report.html``.

A run that misses its budget (or fails) never replaces the files of an earlier good run: its artifact,
metrics and report are written as ``model.rejected.slim``, ``metrics.rejected.json`` and
``report.rejected.html`` beside them, and the result says where (``accepted``, ``artifact``,
``metrics_file``, ``report``).

``metrics.json``
    One JSON object, the value :func:`compress` returns. It is written by :func:`compress` only (so by
    ``slimguard compress`` and ``slimguard demo`` alike), and their ``--json`` output is the same object.
    Its keys are :data:`METRICS_FIELDS`::

        {
          "recipe":     {"name", "model", "data", "task", "seed", "budget", "steps": [{STEP: {options}}]},
          "baseline":   SCORES,   # the model before any step, on the data's test split
          "compressed": SCORES,   # the saved artifact, reloaded, on the same split
          "speed":      {"ratio": float,        # median over rounds of baseline time / compressed time (>1: faster)
                         "ci95": [low, high],   # 95% bootstrap interval of that median (seeded)
                         "spread": [min, max],  # smallest and largest per-round ratio
                         "verdict": str,        # "1.80x faster [1.60, 2.00]", "1.40x slower [...]" or
                                                # "no measurable difference" (the interval contains 1)
                         "per_round": [float],  # every round's ratio
                         "median_ms": {"baseline": float, "compressed": float},  # one call, median over rounds
                         "batch_size": int, "threads": int, "rounds": int, "calls_per_round": int,
                         "warmup": int, "seed": int,
                         "machine": {"cpu", "cores", "logical_cpus", "usable_cpus", "threads", "torch",
                                     "cpu_capability", "avx2", "avx512_vnni", "gpu"}},
          "budget":     {"ok": bool,                       # every item below holds
                         "accuracy_drop_points": float,    # (baseline - compressed) accuracy x 100
                         "max_accuracy_drop": {"limit": float, "ok": bool},
                         "min_cosine_mean": {"limit": float, "value": float, "ok": bool},
                         "min_cosine_min":  {"limit": float, "value": float, "ok": bool}},
          "steps":      [{"step": NAME, "config": {options}, "result": {...} or null}],
          "layers":     {"tensors": [{"tensor", "module_type", "shape", "dtype", "params", "nonzero",
                                      "sparsity", "codec", "bits_per_weight", "stored_bytes", ...}],
                         "totals": {"params", "nonzero", "stored_bytes", "file_bytes"}},
          "accepted":   bool,     # the budget held, so the files took the names model.slim, metrics.json
          "artifact":   PATH, "metrics_file": PATH, "report": PATH
        }

    Only the budget items the recipe sets appear (accuracy items for classification, cosine items for
    embedding recipes). ``steps[i].result`` is what the step's handler reported (null when it reported
    nothing JSON-sized). ``SCORES`` is :func:`slimguard.evaluate.evaluate`'s result: ``accuracy``
    (classification) or ``cosine_mean`` and ``cosine_min`` (embedding: cosine similarity to the original
    model's embeddings), ``params``, ``nonzero_params``, ``size_bytes`` (bytes of the ``.slim`` file),
    ``macs`` (per example; null when it cannot be counted), ``latency_ms_p50``, ``latency_ms_p95``,
    ``throughput_per_s``, ``latency_batch`` (the batch size the latency was measured at), ``threads`` (torch
    threads, pinned while timing) and ``machine`` (as in ``speed``). Those latencies are each model's own,
    timed alone; whether the compressed model is faster is ``speed``'s to say.

    ``speed`` compares the model as loaded (kept in memory) with the reloaded artifact by
    :func:`slimguard.runtime.measure.compare_speed`: after an interleaved warm-up, :data:`SPEED_ROUNDS`
    rounds in which both run :data:`SPEED_CALLS` calls in turn (order alternating), on the same batch of
    ``speed_batch`` test examples (default :data:`SPEED_BATCH`; the whole test split when smaller), with
    torch's threads pinned (to ``threads``, by default :data:`~slimguard.runtime.measure.MEASURE_THREADS`:
    one). When the rounds would take longer than :data:`SPEED_BUDGET_S` seconds, fewer calls per round, and
    for slow models fewer rounds (down to :data:`~slimguard.runtime.measure.MIN_ROUNDS`).

    ``layers`` is :func:`slimguard.inspect.inspect_model` of the reloaded artifact: one row per stored tensor
    (tied tensors once) with its ``shape``, ``params``, ``nonzero``, ``sparsity`` (fraction of zeros),
    ``codec``, ``bits_per_weight`` and ``stored_bytes`` (plus a codec's own columns, such as Huffman's), and
    ``totals`` whose ``file_bytes`` is the ``.slim`` file's size (manifest and archive headers included).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from slimguard import data as sgdata
from slimguard.artifact import slim as artifact
from slimguard.core.outputs import check_output_dir, check_output_file, write_json_atomic
from slimguard.core.recipe import Recipe
from slimguard.evaluate import _check_fits, evaluate, timing_inputs
from slimguard.inspect import inspect_model
from slimguard.models import sources
from slimguard.report import write_report
from slimguard.runtime.measure import MEASURE_THREADS, compare_speed
from slimguard.transforms import run_step

OUTPUT_NAMES = {
    True: {"artifact": "model.slim", "metrics": "metrics.json", "report": "report.html"},
    False: {"artifact": "model.rejected.slim", "metrics": "metrics.rejected.json",
            "report": "report.rejected.html"},
}
"""File names in the output folder of a run that met its budget (``True``) or missed it (``False``)."""

METRICS_FIELDS = ("recipe", "baseline", "compressed", "speed", "budget", "steps", "layers", "accepted", "artifact",
                  "metrics_file", "report")
"""The keys of ``metrics.json`` (see the module docstring for what each holds)."""

SPEED_ROUNDS = 15
"""Paired rounds of the baseline-versus-compressed speed comparison (one ratio each)."""

SPEED_CALLS = 20
"""Calls of each model per round, at most (fewer when the rounds would exceed :data:`SPEED_BUDGET_S`)."""

SPEED_BUDGET_S = 4.0
"""About how many seconds the timed rounds of the speed comparison may take."""

SPEED_BATCH = 64
"""Examples per call in the speed comparison."""


def measure_speed(original: torch.nn.Module, compressed: torch.nn.Module, inputs: Any, *,
                  threads: int | None = MEASURE_THREADS, seed: int = 0) -> dict[str, Any]:
    """The ``speed`` block of ``metrics.json``: ``compressed`` against ``original`` on ``inputs``, in paired,
    interleaved rounds with threads pinned (:func:`~slimguard.runtime.measure.compare_speed`)."""
    comparison = compare_speed({"baseline": original, "compressed": compressed}, inputs, baseline="baseline",
                               rounds=SPEED_ROUNDS, calls_per_round=SPEED_CALLS, budget_s=SPEED_BUDGET_S,
                               threads=threads, seed=seed)
    return comparison.to_dict("compressed")


def budget_check(recipe_budget: dict[str, float], baseline: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Which budget items hold. Accuracy drop is in percentage points."""
    checks: dict[str, Any] = {}
    if "max_accuracy_drop" in recipe_budget and "accuracy" in baseline:
        drop = (baseline["accuracy"] - after["accuracy"]) * 100
        checks["accuracy_drop_points"] = drop
        checks["max_accuracy_drop"] = {"limit": recipe_budget["max_accuracy_drop"],
                                       "ok": drop <= recipe_budget["max_accuracy_drop"] + 1e-9}
    for key, metric in (("min_cosine_mean", "cosine_mean"), ("min_cosine_min", "cosine_min")):
        if key in recipe_budget and metric in after:
            checks[key] = {"limit": recipe_budget[key], "value": after[metric],
                           "ok": after[metric] >= recipe_budget[key]}
    checks["ok"] = all(v["ok"] for v in checks.values() if isinstance(v, dict))
    return checks


def budget_misses(checks: dict[str, Any]) -> list[str]:
    """The budget items a run missed, as short phrases (empty when the budget holds).

    Example:
        >>> budget_misses({"accuracy_drop_points": 3.2, "max_accuracy_drop": {"limit": 1.0, "ok": False}})
        ['accuracy drop 3.20 points > 1 allowed']
    """
    out = []
    for key, item in checks.items():
        if not isinstance(item, dict) or item.get("ok", True):
            continue
        if key == "max_accuracy_drop":
            out.append(f"accuracy drop {checks.get('accuracy_drop_points', float('nan')):.2f} points "
                       f"> {item['limit']:g} allowed")
        else:
            value = item.get("value", float("nan"))
            out.append(f"{key.removeprefix('min_')} {value:.4f} < {item['limit']:g} required")
    return out


def rejection_message(result: dict[str, Any]) -> str:
    """One line for a run that missed its budget: what missed, and where its files went instead.

    Example:
        budget missed (accuracy drop 3.20 points > 1 allowed); artifact written to out/model.rejected.slim,
        metrics to out/metrics.rejected.json; out/model.slim was not replaced
    """
    misses = "; ".join(budget_misses(result["budget"])) or "see the budget in the metrics"
    good = Path(result["artifact"]).with_name(OUTPUT_NAMES[True]["artifact"])
    return (f"budget missed ({misses}); artifact written to {result['artifact']}, metrics to "
            f"{result['metrics_file']}; {good} was not replaced")


def output_paths(out_dir: str | Path, accepted: bool) -> dict[str, Path]:
    """Where a run writes its artifact, metrics and report (see :data:`OUTPUT_NAMES`)."""
    return {kind: Path(out_dir) / name for kind, name in OUTPUT_NAMES[accepted].items()}


def check_compress_output(out_dir: str | Path) -> Path:
    """Refuse an output folder :func:`compress` could not write (a file, not writable, or a folder where
    one of its files goes) with an :class:`~slimguard.core.errors.OutputError`, before any work."""
    out = check_output_dir(out_dir)
    for accepted in (True, False):
        for path in output_paths(out, accepted).values():
            check_output_file(path)
    return out


def compress(recipe: Recipe, out_dir: str | Path, *, progress: bool = True, latency_batch: int = 1,
             speed_batch: int = SPEED_BATCH, threads: int | None = MEASURE_THREADS,
             policy: artifact.LoadPolicy | None = None) -> dict[str, Any]:
    """Run a recipe end to end and write its artifact, ``metrics.json`` and ``report.html`` to ``out_dir``.

    The output folder is checked before any work. The artifact is saved under a temporary name,
    reloaded and scored; only a run that meets ``recipe.budget`` takes the names ``model.slim``,
    ``metrics.json`` and ``report.html``. A run that misses it writes ``model.rejected.slim``,
    ``metrics.rejected.json`` and ``report.rejected.html`` instead, so an earlier good artifact is never
    replaced; a run that fails leaves the folder as it was.

    Args:
        latency_batch: batch size of each model's own latency (``baseline`` / ``compressed``; default 1).
        speed_batch: batch size of the paired speed comparison (``speed``; default :data:`SPEED_BATCH`, or
            the size of the test split when smaller).
        threads: torch threads, pinned and recorded while timing (default
            :data:`~slimguard.runtime.measure.MEASURE_THREADS`, 1; None: torch's current count).

    Returns:
        The object written to ``metrics.json`` (its shape is in the module docstring): ``recipe``,
        ``baseline``, ``compressed``, ``speed``, ``budget``, ``steps``, ``layers``, ``accepted`` (the budget
        held), and the paths ``artifact``, ``metrics_file`` and ``report``.

    ``policy`` says how a ``.slim`` named as the recipe's model is loaded (see
    :class:`~slimguard.artifact.LoadPolicy`).

    Raises:
        OutputError: ``out_dir`` cannot be written (before any work starts).
    """
    out = check_compress_output(out_dir)
    torch.manual_seed(recipe.seed)
    data = sgdata.load(recipe.data, seed=recipe.seed)
    model = sources.load_model(recipe.model, seed=recipe.seed, progress=progress, policy=policy)
    _check_fits(model, data.test)
    embedding = data.task == "embedding"
    # embedding models are scored by fidelity to the model as it was before the recipe
    baseline = evaluate(model, data.test, latency_batch=latency_batch, num_threads=threads,
                        reference=model if embedding else None)
    steps = []
    needs_original = embedding or any(getattr(step, "needs_original", False) for step in recipe.steps)
    original = copy.deepcopy(model)  # the model as loaded: a step's teacher, and the speed baseline
    for step in recipe.steps:
        result = run_step(model, step, data, progress=progress, original=original if needs_original else None)
        steps.append({"step": step.config_name, "config": step.to_dict()["_data"],
                      "result": result if isinstance(result, dict) and len(json.dumps(result, default=str)) < 20000
                      else None})
    # saved under a name no finished run uses; renamed once the budget is known
    pending = artifact.save(model, out / f".model.{os.getpid()}.pending.slim", recipe=recipe.to_dict())
    try:
        reloaded = artifact.load(pending, trust_code=artifact.code_file(model))  # a python model's own file
        after = evaluate(reloaded, data.test, latency_batch=latency_batch, num_threads=threads, measure_size=False,
                         reference=original if embedding else None)
        after["size_bytes"] = pending.stat().st_size
        layers = inspect_model(reloaded)  # the artifact's own per-tensor view: sparsity, codec, bytes
        layers["totals"]["file_bytes"] = after["size_bytes"]
        inputs = timing_inputs(data.test, min(speed_batch, len(data.test)), reference=original)
        speed = measure_speed(original, reloaded, inputs, threads=threads, seed=recipe.seed)
        budget = budget_check(recipe.budget, baseline, after)
        files = output_paths(out, bool(budget["ok"]))
        os.replace(pending, files["artifact"])
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    result = {"recipe": recipe.to_dict(), "baseline": baseline, "compressed": after, "speed": speed, "budget": budget,
              "steps": steps, "layers": layers, "accepted": bool(budget["ok"]), "artifact": str(files["artifact"]),
              "metrics_file": str(files["metrics"]), "report": str(files["report"])}
    write_json_atomic(files["metrics"], result)
    title = f"slimguard: {recipe.name or recipe.model}" + ("" if result["accepted"] else " (budget missed)")
    write_report(result, files["report"], title=title)
    return result
