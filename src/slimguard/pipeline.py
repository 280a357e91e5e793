"""Running recipes: source -> baseline -> steps -> artifact -> evaluation -> metrics and report.

:func:`compress` reads straight down: it loads the data and the model, scores the baseline, applies each
step with the one step runner (:func:`slimguard.transforms.run_step`), saves the artifact, reloads and
scores it, checks the budget, and writes ``metrics.json`` and ``report.html``.

A run that misses its budget (or fails) never replaces the files of an earlier good run: its artifact,
metrics and report are written as ``model.rejected.slim``, ``metrics.rejected.json`` and
``report.rejected.html`` beside them, and the result says where (``accepted``, ``artifact``,
``metrics_file``, ``report``).

Under ``torchrun`` (``torchrun --nproc_per_node N -m slimguard compress ...``) every rank loads the data and the
model (one process per machine first, so that it fills the zoo cache) and runs the steps data-parallel; the
ranks' models are then compared by hash (a RuntimeError when they differ). Rank 0 alone evaluates, saves the
artifact and writes the metrics and the report; it then sends the result to the others, so every rank returns
the same object.

``metrics.json``
    One JSON object, the value :func:`compress` returns. It is written by :func:`compress` only (so by
    ``slimguard compress`` and ``slimguard demo`` alike), and their ``--json`` output is the same object.
    Its keys are :data:`METRICS_FIELDS`::

        {
          "recipe":     {"name", "model", "data", "task", "seed", "budget", "steps": [{STEP: {options}}]},
          "baseline":   SCORES,   # the model before any step, on the data's test split (reported, never selected on)
          "compressed": SCORES,   # the saved artifact, reloaded, on the same split
          "validation": {"split": "val", "n": int,       # the budget is judged here, never on test
                         "baseline": METRIC, "compressed": METRIC},
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
          "budget":     {"ok": bool,                       # every item below holds, on the validation split
                         "split": "val",                   # or "test (no validation split)"
                         "accuracy_drop_points": float,    # (baseline - compressed) accuracy x 100
                         "max_accuracy_drop": {"limit": float, "ok": bool},
                         "min_cosine_mean": {"limit": float, "value": float, "ok": bool},
                         "min_cosine_min":  {"limit": float, "value": float, "ok": bool},
                         "max_perplexity_ratio": {"limit": float, "value": float, "ok": bool}},  # causal LMs
          "steps":      [{"step": NAME, "config": {options}, "result": {...} or null}],
          "layers":     {"tensors": [{"tensor", "module_type", "shape", "dtype", "params", "nonzero",
                                      "sparsity", "codec", "bits_per_weight", "stored_bytes", ...}],
                         "totals": {"params", "nonzero", "stored_bytes", "file_bytes"}},
          "distributed": {"world_size": int,    # ranks of a torchrun launch (1: one process)
                          "backend": str | None, # "gloo"; "cpu:gloo,cuda:nccl" with CUDA; null: one process
                          "rank_model_sha256": [str]},  # each rank's model after the steps (all equal)
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
    threads, pinned while timing) and ``machine`` (as in ``speed``), plus ``n`` (test examples) and, for
    accuracy, ``accuracy_ci95`` (95% Wilson interval). Those latencies are each model's own, timed alone;
    whether the compressed model is faster is ``speed``'s to say. ``METRIC`` is the task metric alone
    (``accuracy``/``f1_macro``, ``agreement``/``kl``, ``cosine_mean``/``cosine_min`` or ``perplexity``).

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
import torch.nn as nn

from slimguard import data as sgdata
from slimguard.artifact import slim as artifact
from slimguard.core.outputs import check_output_dir, check_output_file, write_json_atomic
from slimguard.core.recipe import Recipe
from slimguard.evaluate import _check_fits, evaluate, timing_inputs
from slimguard.inspect import inspect_model
from slimguard.models import sources
from slimguard.models.spec import maybe_info
from slimguard.report import write_report
from slimguard.runtime.measure import MEASURE_THREADS, compare_speed
from slimguard.runtime.stats import wilson
from slimguard.train import distributed
from slimguard.transforms import run_step

OUTPUT_NAMES = {
    True: {"artifact": "model.slim", "metrics": "metrics.json", "report": "report.html"},
    False: {"artifact": "model.rejected.slim", "metrics": "metrics.rejected.json",
            "report": "report.rejected.html"},
}
"""File names in the output folder of a run that met its budget (``True``) or missed it (``False``)."""

METRICS_FIELDS = ("recipe", "baseline", "compressed", "validation", "speed", "budget", "steps", "layers",
                  "distributed", "accepted", "artifact", "metrics_file", "report")
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


METRIC_KEYS = ("accuracy", "f1_macro", "agreement", "kl", "cosine_mean", "cosine_min", "perplexity")


def validation_scores(before: nn.Module, after: nn.Module, data: Any, reference: nn.Module | None) -> dict[str, Any]:
    """The task metric of the model before the steps and of the reloaded artifact on the validation split,
    which the budget is judged on (the test split is only reported). A data set without a validation split
    falls back to test, and says so in ``split``."""
    split = data.val if len(data.val) else data.test
    name = "val" if len(data.val) else "test (no validation split)"

    def score(model: nn.Module) -> dict[str, Any]:
        full = evaluate(model, split, reference=reference, measure_latency=False, measure_size=False)
        return {k: v for k, v in full.items() if k in METRIC_KEYS}

    return {"split": name, "n": len(split), "baseline": score(before), "compressed": score(after)}


def add_interval(scores: dict[str, Any], n: int) -> None:
    """Add the test split's size ``n`` and, for accuracy, its 95% Wilson interval (``accuracy_ci95``)."""
    scores["n"] = n
    if isinstance(scores.get("accuracy"), float):
        scores["accuracy_ci95"] = list(wilson(round(scores["accuracy"] * n), n))


def budget_check(recipe_budget: dict[str, float], baseline: dict[str, Any], after: dict[str, Any],
                 split: str = "val") -> dict[str, Any]:
    """Which budget items hold, judged on ``split`` (the validation split: a recipe's acceptance is a
    selection, so it never looks at test). Accuracy drop is in percentage points."""
    checks: dict[str, Any] = {"split": split}
    if "max_accuracy_drop" in recipe_budget and "accuracy" in baseline:
        drop = (baseline["accuracy"] - after["accuracy"]) * 100
        checks["accuracy_drop_points"] = drop
        checks["max_accuracy_drop"] = {"limit": recipe_budget["max_accuracy_drop"],
                                       "ok": drop <= recipe_budget["max_accuracy_drop"] + 1e-9}
    for key, metric in (("min_cosine_mean", "cosine_mean"), ("min_cosine_min", "cosine_min")):
        if key in recipe_budget and metric in after:
            checks[key] = {"limit": recipe_budget[key], "value": after[metric],
                           "ok": after[metric] >= recipe_budget[key]}
    if "max_perplexity_ratio" in recipe_budget and "perplexity" in baseline and "perplexity" in after:
        ratio = after["perplexity"] / baseline["perplexity"]
        checks["max_perplexity_ratio"] = {"limit": recipe_budget["max_perplexity_ratio"], "value": ratio,
                                          "ok": ratio <= recipe_budget["max_perplexity_ratio"] + 1e-12}
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
             policy: artifact.LoadPolicy | None = None, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
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
    :class:`~slimguard.artifact.LoadPolicy`); ``model_options`` are more keyword arguments of
    :func:`slimguard.models.sources.load_model` (``weights``, ``input_shape``, ``task``).

    Raises:
        OutputError: ``out_dir`` cannot be written (before any work starts).
    """
    out = check_compress_output(out_dir)
    torch.manual_seed(recipe.seed)
    with distributed.main_first():  # one process per machine fills the caches (zoo models) the others read
        data = sgdata.load(recipe.data, seed=recipe.seed)
        model = sources.load_model(recipe.model, seed=recipe.seed, progress=progress, policy=policy,
                               **(model_options or {}))
    _check_fits(model, data.test)
    mi = maybe_info(model)
    if mi is not None and mi.source.get("kind") == "python" and "name" not in mi.data:
        mi.data = {**data.meta.to_dict(), **mi.data}  # a user's model records the data it was compressed on
    embedding = data.task == "embedding"
    # embedding models are scored by fidelity to the model as it was before the recipe (by rank 0 alone)
    baseline = evaluate(model, data.test, latency_batch=latency_batch, num_threads=threads,
                        reference=model if embedding else None) if distributed.is_main() else {}
    steps = []
    needs_original = embedding or any(getattr(step, "needs_original", False) for step in recipe.steps)
    original = copy.deepcopy(model)  # the model as loaded: a step's teacher, and the speed baseline
    model_before = original
    for step in recipe.steps:
        result = run_step(model, step, data, progress=progress, original=original if needs_original else None)
        steps.append({"step": step.config_name, "config": step.to_dict()["_data"],
                      "result": result if isinstance(result, dict) and len(json.dumps(result, default=str)) < 20000
                      else None})
    hashes = distributed.rank_hashes(model)
    if len(set(hashes)) > 1:
        short = ", ".join(h[:12] for h in hashes)
        raise RuntimeError(f"the ranks hold different models after the steps (sha256 {short}); a step does not "
                           "reduce its statistics across ranks: run the recipe in one process")
    if not distributed.is_main():  # rank 0 evaluates and writes; the others take its result
        return dict(distributed.broadcast_json(None))
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
        validation = validation_scores(model_before, reloaded, data, original if embedding else None)
        budget = budget_check(recipe.budget, validation["baseline"], validation["compressed"],
                              split=validation["split"])
        files = output_paths(out, bool(budget["ok"]))
        os.replace(pending, files["artifact"])
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    for scores in (baseline, after):
        add_interval(scores, len(data.test))
    result = {"recipe": recipe.to_dict(), "baseline": baseline, "compressed": after, "validation": validation,
              "speed": speed, "budget": budget,
              "steps": steps, "layers": layers, "distributed": {**distributed.info(), "rank_model_sha256": hashes},
              "accepted": bool(budget["ok"]), "artifact": str(files["artifact"]), "metrics_file": str(files["metrics"]),
              "report": str(files["report"])}
    write_json_atomic(files["metrics"], result)
    title = f"slimguard: {recipe.name or recipe.model}" + ("" if result["accepted"] else " (budget missed)")
    write_report(result, files["report"], title=title)
    return distributed.broadcast_json(result)  # the same on every rank (returned as it is outside torchrun)
