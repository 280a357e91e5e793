"""The end of a search: the Pareto front, its one look at the test split, and the files in ``--out``.

:func:`finalize` reads the study's completed trials, keeps those within the budget on validation, and
takes the non-dominated ones (:mod:`slimguard.search.pareto`). Only these points are scored on the test
split, once each, after the search, so no choice ever saw test data. It writes:

``pareto.json``
    ``{"study", "storage", "objectives", "budget_points", "target", "baseline": {"val_accuracy",
    "test_accuracy", "bytes"}, "trials": {"finished", "complete", "pruned", "failed", "feasible"},
    "hypervolume", "hypervolume_reference", "chosen": INDEX, "points": [POINT, ...], "warm_start": {"enabled",
    "enqueued": [{"recipe", "params", "options"}], "skipped": [{"recipe", "why"}]}, "local_moves": {"enabled",
    "every", "cap", "rounds": [{"after", "queued": [{"from", "stage", "step"}]}], "trials": [{"trial", "from",
    "stage", "step", "state"}]}}`` where each ``POINT``
    is ``{"trial", "steps", "params", "objectives": {name: value}, "val_accuracy", "val_accuracy_drop_points",
    "test_accuracy", "test_accuracy_drop_points", "test_n", "bytes", "size_ratio", "speed_ratio",
    "speed_ci95", "speed_verdict"}`` and ``"warm_start": RECIPE`` when it is a queued shipped recipe
    and ``"local_move": {"from", "stage", "step"}`` when it extends an earlier point by one stage
    (:mod:`slimguard.search.localmoves`) (``size_ratio``: candidate bytes / original bytes; ``speed_ratio``:
    original time / candidate time on the target runtime, with its 95% paired-bootstrap interval). With the
    ``robustness`` objective, points also hold ``val_robust_accuracy`` and ``val_robust_error``, the baseline
    ``val_robust_accuracy``, and ``"robustness"`` records the attack (``eps``, ``steps``, ``max_examples``).
    For an embedder the "accuracy" keys hold its metric, the mean cosine to the original's embeddings (the
    baseline's is 1), the drops are ``(1 - mean cosine) x 100`` cosine points, and points also hold
    ``val_cosine_mean``/``val_cosine_min`` and ``test_cosine_mean``/``test_cosine_min``.
``best.yaml``
    The chosen point as a recipe (model, data, seed, budget, steps): ``slimguard compress --recipe best.yaml
    --out DIR`` reruns it. Its first line and its description name the target runtime the point was
    measured on (``target: ort``: export the artifact with ``slimguard export`` to run it as measured).
``model.slim``
    The chosen point's artifact.
``report.html``
    The front as an inline SVG scatter (size ratio against speed ratio, every trial, the front and the
    chosen point marked, each point's details on hover) and a table of the front. The page is one offline
    file: no Plotly or Vega-Lite library ships with slimguard, so it draws SVG itself.

The chosen point is the front's best in the first objective of ``--objectives`` (ties: the next ones).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimguard.core.errors import UserError
from slimguard.core.outputs import atomic_write, write_json_atomic, write_text_atomic
from slimguard.search.localmoves import REPEAT, TRIAL_MOVE, feasible_front
from slimguard.search.localmoves import stored as stored_moves
from slimguard.search.objectives import OBJECTIVES, test_scores
from slimguard.search.pareto import choose, hypervolume
from slimguard.search.warmstart import TRIAL_RECIPE
from slimguard.search.warmstart import stored as stored_plan

if TYPE_CHECKING:
    import torch.nn as nn

    from slimguard.search.study import Session

OUTPUT_FILES = ("pareto.json", "best.yaml", "model.slim", "report.html")
"""The files :func:`finalize` writes in the output folder."""

POINT_KEYS = ("val_accuracy", "val_accuracy_drop_points", "bytes", "size_ratio", "speed_ratio", "speed_ci95",
              "speed_verdict")
ROBUST_KEYS = ("val_robust_accuracy", "val_robust_error")
"""Keys a point has when robustness is an objective."""
COSINE_KEYS = ("val_cosine_mean", "val_cosine_min")
"""What an embedder's points also hold: the mean and min cosine to the original's validation embeddings."""


class NothingFeasible(UserError):
    """No finished trial kept the validation accuracy within the budget."""


def reference_point(objectives: tuple[str, ...], budget: float) -> list[float]:
    """The hypervolume's reference: the original model (size and time ratios 1) and the budget's drop."""
    return [budget if name == "accuracy" else 1.0 for name in objectives]


def front(session: Session) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``(feasible completed trials, the non-dominated ones among them, counts by state)``: the counts are of
    distinct pipelines measured; ``repeats`` counts the draws that replayed one (not measured again), and
    ``exhausted`` is present when the search stopped because the sampler only drew repeats."""
    import optuna

    settings = session.settings
    trials = session.study.get_trials(deepcopy=False)
    counts: dict[str, Any] = {"finished": 0, "complete": 0, "pruned": 0, "failed": 0, "feasible": 0, "repeats": 0}
    for t in trials:
        state = t.state.name.lower()
        if REPEAT in t.user_attrs:
            counts["repeats"] += 1
        elif t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                         optuna.trial.TrialState.FAIL):
            counts["finished"] += 1
            counts["failed" if state == "fail" else state] += 1
    # a pipeline with no steps is the original model: a reference, not a candidate
    feasible, best = feasible_front(trials, settings.budget)
    counts["feasible"] = len(feasible)
    if "exhausted" in session.study.user_attrs:
        counts["exhausted"] = session.study.user_attrs["exhausted"]
    return feasible, best, counts


def _model_of(session: Session, trial: Any) -> nn.Module:
    """The trial's artifact when this machine has it, else the trial's pipeline rebuilt (seeded)."""
    from slimguard.artifact import slim as artifact
    from slimguard.core.recipe import parse
    from slimguard.search.study import trial_artifact

    path = trial_artifact(session.settings.out, trial.number)
    if path.is_file():
        return artifact.load(path)
    steps = trial.user_attrs["steps"]
    if not steps:
        return session.evaluator.build([])
    configs = parse({"model": session.settings.model, "data": session.settings.data, "steps": steps}).steps
    return session.evaluator.build(configs)


TARGET_NOTES = {
    "torch": "latency measured in PyTorch",
    "ort": "accuracy and latency measured in ONNX Runtime after `slimguard export`; export model.slim to deploy it",
}
"""How ``best.yaml`` says which runtime its point was measured on (a recipe has no runtime key of its own)."""


def recipe_of(session: Session, trial: Any) -> dict[str, Any]:
    """The chosen trial as a recipe mapping (``best.yaml``); its description names the target runtime."""
    s = session.settings
    names = " -> ".join(next(iter(step)) for step in trial.user_attrs["steps"]) or "no steps"
    task = session.evaluator.data.task
    budget: dict[str, float] = ({"min_cosine_mean": s.min_cosine} if task == "embedding"
                                else {"max_accuracy_drop": s.budget})
    said = (f"mean cosine >= {s.min_cosine:g}" if task == "embedding" else f"budget {s.budget:g} points")
    return {"name": f"optimize-{s.study_name}-trial-{trial.number}",
            "description": f"found by slimguard optimize (objectives {','.join(s.objectives)}, {said} "
                           f"on validation, target {s.target}: {TARGET_NOTES[s.target]}): {names}",
            "model": s.model, "data": s.data, "task": task, "seed": s.seed,
            "budget": budget, "steps": trial.user_attrs["steps"]}


def finalize(session: Session) -> dict[str, Any]:
    """Score the front on the test split (once per point), write the output files, return ``pareto.json``'s
    object with ``chosen_point`` (the chosen point itself) and ``files`` added.

    Raises:
        NothingFeasible: no completed trial met the budget on validation.
    """
    import yaml

    from slimguard.artifact import slim as artifact

    settings, evaluator = session.settings, session.evaluator
    _, best, counts = front(session)
    if not best:
        raise NothingFeasible(
            f"none of the study's {counts['finished']} finished trials kept the validation accuracy drop within "
            f"{settings.budget:g} points ({counts['pruned']} pruned, {counts['failed']} failed); raise --budget, "
            f"run more --trials, or restrict the space to gentler steps with a search: block")
    points = []
    models = []
    for t in best:
        model = _model_of(session, t)
        models.append(model)
        point: dict[str, Any] = {"trial": t.number, "steps": t.user_attrs["steps"], "params": dict(t.params),
                                 "objectives": dict(zip(settings.objectives, t.values, strict=True))}
        point.update({k: t.user_attrs.get(k) for k in POINT_KEYS})
        point.update({k: t.user_attrs[k] for k in (*ROBUST_KEYS, *COSINE_KEYS) if k in t.user_attrs})
        if TRIAL_RECIPE in t.user_attrs:
            point["warm_start"] = t.user_attrs[TRIAL_RECIPE]  # the shipped recipe this trial ran
        if TRIAL_MOVE in t.user_attrs:
            point["local_move"] = t.user_attrs[TRIAL_MOVE]  # the point it extends, and the stage it adds
        point.update(test_scores(evaluator, model))
        points.append(point)
    chosen = choose([[p["objectives"][name] for name in settings.objectives] for p in points])
    reference = reference_point(settings.objectives, settings.budget)
    result: dict[str, Any] = {
        "study": settings.study_name, "storage": settings.storage_url, "objectives": list(settings.objectives),
        "objective_keys": {name: OBJECTIVES[name][0] for name in settings.objectives},
        "budget_points": settings.budget, "seed": settings.seed, "model": settings.model, "data": settings.data,
        "target": settings.target,
        "baseline": {"val_accuracy": evaluator.base_val_accuracy, "test_accuracy": evaluator.base_test_accuracy,
                     "bytes": evaluator.base_bytes},
        "trials": counts,
        "hypervolume": hypervolume([[p["objectives"][n] for n in settings.objectives] for p in points], reference),
        "hypervolume_reference": reference, "chosen": chosen, "points": points,
        "warm_start": stored_plan(session.study), "local_moves": stored_moves(session.study),
    }
    if evaluator.robustness is not None:
        result["robustness"] = {"attack": "pgd-linf", **dataclasses.asdict(evaluator.robustness),
                                "split": "val", "objective_key": "val_robust_error"}
        result["baseline"]["val_robust_accuracy"] = evaluator.base_robust_accuracy
    out = settings.out
    recipe = recipe_of(session, best[chosen])
    write_json_atomic(out / "pareto.json", result)
    write_text_atomic(out / "best.yaml", f"# target: {settings.target} ({TARGET_NOTES[settings.target]})\n"
                      "# slimguard compress --recipe best.yaml --out DIR reruns this point\n"
                      + yaml.safe_dump(recipe, sort_keys=False))
    artifact.save(models[chosen], out / "model.slim", recipe=recipe)
    write_pareto_report(result, session, out / "report.html")
    result["chosen_point"] = points[chosen]
    result["files"] = {name: str(out / name) for name in OUTPUT_FILES}
    return result


def changed_options(step: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of a stored step that differ from its config's defaults (what the search chose)."""
    from slimguard.core.config import config_class

    try:
        defaults = config_class(step)().to_dict()["_data"]
    except (UserError, TypeError):  # a config without defaults for every option: show them all
        return options
    return {k: v for k, v in options.items() if defaults.get(k) != v}


# ---- the report ---------------------------------------------------------------------------------------------
W, H, PAD = 640, 420, 56


def _scale(values: list[float], lo_px: float, hi_px: float, log: bool) -> tuple[float, float, Any]:
    vals = [math.log10(v) if log else v for v in values]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def f(v: float) -> float:
        x = math.log10(v) if log else v
        return lo_px + (x - lo) / (hi - lo) * (hi_px - lo_px)

    return lo, hi, f


def svg_scatter(rows: list[dict[str, Any]]) -> str:
    """An SVG scatter of ``rows`` (``size_ratio``, ``speed_ratio``, ``kind`` in {other, infeasible, front,
    chosen}, ``label``): size ratio on a log x axis, speed ratio on y, details in each point's tooltip."""
    from slimguard.report.html import e

    xs = [r["size_ratio"] for r in rows] + [1.0]
    ys = [r["speed_ratio"] for r in rows] + [1.0]
    xlo, xhi, fx = _scale(xs, PAD, W - 16, log=True)
    ylo, yhi, fy = _scale(ys, H - PAD, 16, log=False)
    style = {"infeasible": ('#bbb', 4), "other": ('#6b9bd1', 5), "front": ('#c0392b', 7), "chosen": ('#1e8449', 10)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
             f'aria-label="Pareto front: file size ratio against speed ratio">',
             f'<rect x="{PAD}" y="16" width="{W - 16 - PAD}" height="{H - 16 - PAD}" fill="#fafafa" stroke="#ccc"/>']
    for v, label in ((1.0, "original"),):
        x, y = fx(v), fy(v)
        parts.append(f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{H - PAD}" stroke="#999" stroke-dasharray="4 3"/>')
        parts.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 16}" y2="{y:.1f}" stroke="#999" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x - 4:.1f}" y="28" font-size="11" fill="#666" text-anchor="end">{label}</text>')
    for i in range(5):
        xv = 10 ** (xlo + (xhi - xlo) * i / 4)
        yv = ylo + (yhi - ylo) * i / 4
        parts.append(f'<text x="{fx(xv):.1f}" y="{H - PAD + 16}" font-size="11" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{PAD - 6}" y="{fy(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.2f}</text>')
    parts.append(f'<text x="{(W + PAD) / 2:.0f}" y="{H - 12}" font-size="12" text-anchor="middle">file size / '
                 f'original (log scale; left is smaller)</text>')
    parts.append(f'<text x="14" y="{H / 2:.0f}" font-size="12" text-anchor="middle" transform="rotate(-90 14 '
                 f'{H / 2:.0f})">speed ratio (up is faster)</text>')
    for kind in ("infeasible", "other", "front", "chosen"):
        color, radius = style[kind]
        for r in rows:
            if r["kind"] == kind:
                parts.append(f'<circle cx="{fx(r["size_ratio"]):.1f}" cy="{fy(r["speed_ratio"]):.1f}" r="{radius}" '
                             f'fill="{color}" fill-opacity="0.85"><title>{e(r["label"])}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def write_pareto_report(result: dict[str, Any], session: Session, path: Path) -> Path:
    """Write ``report.html``: the scatter of every completed trial and a table of the front."""
    import optuna

    from slimguard.report import format as fmt
    from slimguard.report.html import CSS, e

    budget = session.settings.budget
    on_front = {p["trial"]: i for i, p in enumerate(result["points"])}
    rows = []
    for t in session.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "size_ratio" not in t.user_attrs:
            continue
        drop = t.user_attrs["val_accuracy_drop_points"]
        kind = ("chosen" if on_front.get(t.number) == result["chosen"] else "front" if t.number in on_front
                else "infeasible" if drop > budget + 1e-9 else "other")
        steps = " -> ".join(next(iter(s)) for s in t.user_attrs["steps"]) or "no steps"
        rows.append({"size_ratio": t.user_attrs["size_ratio"], "speed_ratio": t.user_attrs["speed_ratio"],
                     "kind": kind, "label": f"trial {t.number}: {steps}; size {fmt.ratio(t.user_attrs['size_ratio'])}, "
                                           f"speed {fmt.ratio(t.user_attrs['speed_ratio'])}, val drop {drop:.2f} pts"})
    table = ["<table class=\"left2\"><tr><th>trial</th><th>steps</th><th>val drop (pts)</th><th>test drop (pts)</th>"
             "<th>file</th><th>size ratio</th><th>speed ratio [95% CI]</th></tr>"]
    for i, p in enumerate(result["points"]):
        mark = " (chosen)" if i == result["chosen"] else ""
        steps = "".join(f'<span class="opt">{e(name)}: {e(fmt.option(changed_options(name, options)))}</span>'
                        for step in p["steps"] for name, options in step.items()) or "no steps"
        table.append(f"<tr><td>{p['trial']}{mark}</td><td class=\"wrap\">{steps}</td>"
                     f"<td>{p['val_accuracy_drop_points']:.2f}</td><td>{p['test_accuracy_drop_points']:.2f} "
                     f"(n={p['test_n']})</td><td>{e(fmt.nbytes(p['bytes']))}</td><td>{e(fmt.ratio(p['size_ratio']))}"
                     f"</td><td>{e(fmt.ratio(p['speed_ratio']))} [{e(fmt.interval(p['speed_ci95']))}]</td></tr>")
    table.append("</table>")
    t = result["trials"]
    title = f"slimguard optimize: {result['model']} on {result['data']}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head>
<body><h1>{e(title)}</h1>
<p class="sub">objectives {e(', '.join(result['objectives']))} (minimized) on target {e(result['target'])},
budget {budget:g} accuracy points on the validation split; {t['finished']} finished trials ({t['complete']}
complete, {t['pruned']} pruned early, {t['failed']} failed), {t['feasible']} within the budget. Hypervolume
{result['hypervolume']:.4g} against
{e(result['hypervolume_reference'])}. Test accuracy was scored once, for the front only.</p>
<h2>Pareto front</h2>
<p class="note">Hover a point for its pipeline. Green: chosen; red: the front; blue: other trials within the
budget; grey: over the budget.</p>
{svg_scatter(rows)}
<h2>Points on the front</h2>{''.join(table)}
<p class="note">Baseline: validation accuracy {fmt.pct(result['baseline']['val_accuracy'])}, test accuracy
{fmt.pct(result['baseline']['test_accuracy'])}, {e(fmt.nbytes(result['baseline']['bytes']))}. Speed ratios are
paired, interleaved rounds against the original model (median and 95% bootstrap interval).</p>
</body></html>
"""
    with atomic_write(path) as fh:
        fh.write(page)
    return path
