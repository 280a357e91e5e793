"""Running recipes: baseline -> steps -> evaluation -> artifact -> metrics, with the budget checked."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.recipe import Recipe
from slimguard.core.registry import apply, verb_of
from slimguard.data.core import DataBundle
from slimguard.models.spec import record


def run_step(model: nn.Module, step: Config, data: DataBundle, *, progress: bool = True, **context: Any) -> Any:
    """Apply one recipe step (prune, quantize, train, ...) with the data as context.

    Extra ``context`` goes to the handler too (``compress`` passes ``original``, the model as it was at
    the start of the recipe, to steps whose config sets ``needs_original``, such as ``distill``).
    """
    verb = verb_of(step)
    result = apply(verb, model, step, data=data, example_inputs=data.example, calib=data.calib, progress=progress,
                   **context)
    record(model, {"verb": verb, "config": step.to_dict()})
    return result


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def compress(recipe: Recipe, out_dir: str | Path, *, progress: bool = True,
             latency_batch: int = 1) -> dict[str, Any]:
    """Run a recipe end to end; write ``model.slim`` and ``metrics.json`` to ``out_dir``."""
    from slimguard import data as sgdata
    from slimguard.core.artifact import load as load_artifact
    from slimguard.core.artifact import save
    from slimguard.evaluate import _check_fits, evaluate
    from slimguard.models.sources import load_model

    torch.manual_seed(recipe.seed)
    data = sgdata.load(recipe.data, seed=recipe.seed)
    model = load_model(recipe.model, seed=recipe.seed, progress=progress)
    _check_fits(model, data.test)
    embedding = data.task == "embedding"
    # embedding models are scored by fidelity to the model as it was before the recipe
    baseline = evaluate(model, data.test, latency_batch=latency_batch, reference=model if embedding else None)
    steps = []
    needs_original = embedding or any(getattr(step, "needs_original", False) for step in recipe.steps)
    original = copy.deepcopy(model) if needs_original else None
    for step in recipe.steps:
        result = run_step(model, step, data, progress=progress, original=original)
        steps.append({"step": step.config_name, "config": step.to_dict()["_data"],
                      "result": result if isinstance(result, dict) and len(json.dumps(result, default=str)) < 20000
                      else None})
    out = Path(out_dir)
    path = save(model, out / "model.slim", recipe=recipe.to_dict())
    reloaded = load_artifact(path)
    after = evaluate(reloaded, data.test, latency_batch=latency_batch, measure_size=False,
                     reference=original if embedding else None)
    after["size_bytes"] = path.stat().st_size
    result = {"recipe": recipe.to_dict(), "baseline": baseline, "compressed": after,
              "budget": budget_check(recipe.budget, baseline, after), "steps": steps,
              "artifact": str(path)}
    write_json_atomic(out / "metrics.json", result)
    from slimguard.report import write_report

    write_report(result, out / "report.html", title=f"slimguard: {recipe.name or recipe.model}")
    result["report"] = str(out / "report.html")
    return result
