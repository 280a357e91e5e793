"""Automatic search (``slimguard optimize``) at a fixed trial budget, against single-technique recipes and peers.

Case ``digits32-resnet`` (objectives: file size and latency, budget 1 accuracy point on validation):

* the search runs ``--trials`` trials (default 16, seed 0) over the default space (every registered step the
  default ``search:`` block names, fine-tuning and distillation for 1, 3, 6 or 12 epochs, long runs that cannot
  reach the budget stopped after a few epochs), one process, 1 pinned thread for timing; with the warm start
  (default; ``--no-warm-start`` turns it off) its first trials are the shipped recipes the space expresses
  exactly (here ``prune-resnet``), and they count against ``--trials``; with local moves (default;
  ``--no-local-moves`` turns them off) the feasible front points are then extended by one more stage
  (:mod:`slimguard.search.localmoves`), also within ``--trials``;
* the references are measured with the search's own protocol (:class:`slimguard.search.objectives.Evaluator`:
  validation accuracy drop, ``.slim`` bytes over the original's, paired interleaved speed ratio against the
  original with a 95% bootstrap interval): the shipped recipe for this model (``recipes/prune-resnet.yaml``,
  channel pruning 50% + 12 epochs of fine-tuning), each quantization technique alone (int8-static,
  int8-dynamic, fp16, weight-only 8-bit), and the peers' best points: torch.ao ``quantize_dynamic`` (Linear
  layers; file = its state dict saved by torch) and stock ONNX Runtime ``quantize_dynamic`` (file = the .onnx);
* reported: the front (every point with its recipe, val and test drop, size ratio, speed ratio and
  interval), its hypervolume against the original model (size ratio 1, time ratio 1), the wall time of the
  search and the time at which the front first reached its final hypervolume, and, for each reference within
  the budget, whether a front point dominates it (no larger and no slower, on the medians, and better in one;
  the warm-start trial that ran the reference recipe itself does not count for that recipe, since it is the
  same pipeline and could "dominate" only by timing noise); the trial log (each
  trial's pipeline, training length, the epoch it was stopped at, its measurements and seconds).

Case ``all-MiniLM-L6-v2`` (objectives latency, then size; constraint: mean cosine >= 0.99 to the original's
embeddings on the ``docs-text`` validation texts):

* the search runs ``--minilm-trials`` trials (default 8, seed 0) on ``--target torch`` (the ``minilm-fast``
  recipe's ``ort-int8`` step runs ONNX Runtime inside the artifact, so that is where the recipe's speed shows)
  over the embedder space less low-rank and weight sharing (:data:`MINILM_SPACE`); the warm start runs
  ``minilm-fast`` first;
* the references, measured with the same protocol (validation cosine, bytes, paired speed vs the original):
  the shipped embedder recipe ``minilm-fast`` and the peers torch.ao ``quantize_dynamic`` (Linear layers) and
  stock ONNX Runtime ``quantize_dynamic`` of the exported encoder (pooling in torch). A reference whose
  validation mean cosine is below 0.99 is reported infeasible, not dominated; a front point that runs the very
  pipeline of the reference recipe does not count as dominating it (``same_pipeline_on_front``). A front point
  dominates a reference beyond noise (:func:`dominates_within_noise`): no larger, not measurably slower (speed
  intervals overlap or it is faster), and measurably better in one (1% fewer bytes, or a speed interval wholly
  above); ``dominated_on_medians_by_trials`` adds the digits case's rule (the medians alone) for comparison.

Run: ``nice python benchmarks/optimize.py [--case all|digits32-resnet|minilm] [--trials 16] [--out DIR]``
(``--case`` runs one case and keeps the other, with the env of its run, from the results file; with ``--out``,
a rerun resumes the study and only finalizes it when it already holds the trials; the search's wall time
comes from the trials' own timestamps).
Writes ``benchmarks/results/optimize.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard  # noqa: E402
from _schema import claim, environment, print_targets, target, write_results  # noqa: E402
from slimguard.core.config import config_class  # noqa: E402
from slimguard.core.recipe import load as load_recipe  # noqa: E402
from slimguard.runtime.measure import compare_speed  # noqa: E402
from slimguard.search import Settings, optimize  # noqa: E402
from slimguard.search.objectives import SPEED_CALLS, SPEED_ROUNDS, Evaluator  # noqa: E402
from slimguard.search.pareto import dominates, hypervolume, pareto_indices  # noqa: E402

MODEL, DATA, BUDGET, THREADS = "zoo:digits32-resnet", "digits32", 1.0, 1
RECIPE = "prune-resnet"
SINGLE = {"int8-static": {}, "int8-dynamic": {}, "half": {"dtype": "fp16"}, "weight-only": {"bits": 8, "conv": True}}


def measure_steps(ev: Evaluator, steps: list[Any], where: Path) -> dict[str, Any]:
    r = ev.run(steps, where)
    return {k: r[k] for k in ("val_accuracy_drop_points", "bytes", "size_ratio", "speed_ratio", "speed_ci95")}


def measure_module(ev: Evaluator, model: torch.nn.Module, nbytes: int) -> dict[str, Any]:
    """A peer's model (not a .slim): its validation drop, its own file's bytes and the paired speed ratio."""
    with torch.no_grad():
        logits = torch.cat([model(ev.data.val.x[i:i + 256]) for i in range(0, len(ev.data.val), 256)])
    acc = float((logits.argmax(-1) == ev.data.val.y).float().mean())
    cmp = compare_speed({"baseline": ev.model, "candidate": model}, ev.inputs, baseline="baseline",
                        rounds=SPEED_ROUNDS, calls_per_round=SPEED_CALLS, budget_s=ev.speed_budget_s,
                        threads=THREADS, seed=0).to_dict("candidate")
    return {"val_accuracy_drop_points": (ev.base_val_accuracy - acc) * 100, "bytes": nbytes,
            "size_ratio": nbytes / ev.base_bytes, "speed_ratio": cmp["ratio"], "speed_ci95": cmp["ci95"]}


def torch_ao_peer(ev: Evaluator, tmp: Path) -> dict[str, Any]:
    model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ev.model).eval(), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    path = tmp / "torch_ao.pt"
    torch.save(model.state_dict(), path)
    return measure_module(ev, model, path.stat().st_size)


def ort_peer(ev: Evaluator, tmp: Path) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    from slimguard.runtime.onnx import OrtModel, export_onnx

    fp32 = export_onnx(ev.model, ev.data.val.x[:1], tmp / "fp32.onnx")
    quantize_dynamic(str(fp32), str(tmp / "int8.onnx"))  # stock settings
    model = OrtModel(tmp / "int8.onnx", num_threads=THREADS)
    return measure_module(ev, model, (tmp / "int8.onnx").stat().st_size)


def references(ev: Evaluator, tmp: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    recipe = load_recipe(ROOT / "src" / "slimguard" / "recipes" / f"{RECIPE}.yaml")
    out[f"recipe {RECIPE}.yaml"] = measure_steps(ev, recipe.steps, tmp / "prune.slim")
    for name, options in SINGLE.items():
        out[f"{name} alone"] = measure_steps(ev, [config_class(name).from_fields(options)], tmp / f"{name}.slim")
    for name, fn in (("peer torch.ao quantize_dynamic", torch_ao_peer), ("peer ORT stock quantize_dynamic", ort_peer)):
        try:
            out[name] = fn(ev, tmp)
        except Exception as exc:  # a peer that cannot run here is reported, not dropped
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def time_to_final_hv(study: Any, reference: list[float], budget: float, final: float) -> float | None:
    """Seconds from the study's first trial start until the feasible front first reached ``final``."""
    done = sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state.name == "COMPLETE" and t.user_attrs.get("steps")), key=lambda t: t.datetime_complete)
    if not done:
        return None
    start = min(t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start)
    seen: list[list[float]] = []
    for t in done:
        if t.user_attrs["val_accuracy_drop_points"] <= budget + 1e-9:
            seen.append(list(t.values))
            front = [seen[i] for i in pareto_indices(seen)]
            if hypervolume(front, reference) >= final - 1e-12:
                return (t.datetime_complete - start).total_seconds()
    return None


def trial_log(study: Any) -> list[dict[str, Any]]:
    """Every finished trial: pipeline, training length, where it was stopped, what it measured, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        a = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "warm_start": a.get("warm_start"),
                     "local_move": a.get("local_move"),
                     "steps": [next(iter(s)) for s in a.get("steps", [])],
                     "epochs": next((v for k, v in t.params.items() if k.endswith("epochs")), None),
                     "pruned_at_epoch": a.get("pruned_at_epoch"), "train_curve": a.get("train_curve"),
                     "val_accuracy_drop_points": a.get("val_accuracy_drop_points"),
                     "size_ratio": a.get("size_ratio"), "speed_ratio": a.get("speed_ratio"),
                     "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-budget", type=float, default=1.0)
    ap.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                    help="queue the shipped recipes the space expresses as the first trials (default: on)")
    ap.add_argument("--local-moves", action=argparse.BooleanOptionalAction, default=True,
                    help="extend the feasible front points by one more stage between trials (default: on)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--case", choices=("all", "digits32-resnet", "minilm"), default="all",
                    help="run one case and keep the other from the results file already written (default: all)")
    ap.add_argument("--minilm-trials", type=int, default=MINILM_TRIALS)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    env = environment(THREADS, seed=args.seed)
    kept = kept_cases(args.case)
    cases, targets, summary = [], [], []
    for name, run in (("digits32-resnet", run_digits), ("minilm", run_minilm)):
        if args.case in ("all", name):
            case, t, s = run(args)
        else:
            case, t, s = kept[name]
        cases.append(case)
        targets += t
        summary += s
    path = write_results("optimize", env=env, cases=cases, targets=targets, summary=summary,
                         protocol="Every point measured on validation with the search's protocol (paired "
                                  "interleaved speed rounds vs the original, 1 thread; .slim bytes); test split "
                                  "scored once for the front. Dominance on medians. A case kept from an earlier "
                                  "run (--case) carries that run's env under 'env'.")
    print_targets(targets)
    print(f"wrote {path}")


def kept_cases(running: str) -> dict[str, tuple[dict[str, Any], list[Any], list[Any]]]:
    """The cases not run now (``--case``), with their targets and summary lines, from the results file already
    written, each case carrying the environment of the run that measured it."""
    import json

    if running == "all":
        return {}
    path = ROOT / "benchmarks" / "results" / "optimize.json"
    if not path.is_file():
        raise SystemExit(f"--case {running}: {path} does not exist; run --case all first")
    doc = json.loads(path.read_text())
    out: dict[str, tuple[dict[str, Any], list[Any], list[Any]]] = {}
    for case in doc["cases"]:
        name = "minilm" if "MiniLM" in case["case"] else case["case"]
        mine = (lambda n: "MiniLM" in n) if name == "minilm" else (lambda n: "MiniLM" not in n)
        out[name] = ({**case, "env": case.get("env", doc["env"])},
                     [t for t in doc["targets"] if mine(t["name"])], [c for c in doc["summary"] if mine(c["claim"])])
    missing = {"digits32-resnet", "minilm"} - {running} - set(out)
    if missing:
        raise SystemExit(f"--case {running}: {path} has no {sorted(missing)[0]} case; run --case all")
    return out


MINILM, MINILM_DATA, MIN_COSINE, MINILM_TRIALS = "minilm", "docs-text", 0.99, 8
MINILM_RECIPE = "minilm-fast"
MINILM_SPACE = {"sparsify": ["none", "magnitude"], "factorize": ["none"],
                "quantize": ["none", "int8-dynamic", "ort-int8", "half"], "params": {"magnitude.sparsity": [0.05, 0.4]}}
"""The MiniLM case's space: the embedder default (no training, no channel pruning, no calibrated int8) less
low-rank factorization and weight sharing, to fit the trial budget on a shared 2-core machine."""


def dominates_within_noise(p: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Front point ``p`` dominates reference ``ref`` on (latency, size) beyond measurement noise: no larger (bytes
    within 0.1%, metadata), not measurably slower (its speed interval reaches the reference's), and better in one
    beyond noise (at least 1% fewer bytes, or its whole speed interval above the reference's). Two points with
    the same graph time within noise of each other, so the medians alone would call either one faster by chance."""
    no_larger = p["bytes"] <= ref["bytes"] * 1.001
    not_slower = p["speed_ci95"][1] >= ref["speed_ci95"][0]
    better = p["bytes"] <= ref["bytes"] * 0.99 or p["speed_ci95"][0] > ref["speed_ci95"][1]
    return no_larger and not_slower and better


def embed_module(ev: Evaluator, model: torch.nn.Module, nbytes: int) -> dict[str, Any]:
    """A peer embedder (not a .slim): its validation cosine to the original, its own file's bytes, paired speed."""
    cos = ev.fidelity(model, ev.data.val)
    cmp = compare_speed({"baseline": ev.model, "candidate": model}, ev.inputs, baseline="baseline",
                        rounds=SPEED_ROUNDS, calls_per_round=SPEED_CALLS, budget_s=ev.speed_budget_s,
                        threads=THREADS, seed=0).to_dict("candidate")
    return {"val_cosine_mean": cos["cosine_mean"], "val_cosine_min": cos["cosine_min"], "bytes": nbytes,
            "size_ratio": nbytes / ev.base_bytes, "speed_ratio": cmp["ratio"], "speed_ci95": cmp["ci95"]}


def recipe_steps(name: str) -> list[dict[str, Any]]:
    """A shipped recipe's steps as trials record theirs (``[{step: options}]``, every option spelled out)."""
    recipe = load_recipe(ROOT / "src" / "slimguard" / "recipes" / f"{name}.yaml")
    return [{c.config_name: c.to_dict()["_data"]} for c in recipe.steps]


def minilm_references(ev: Evaluator, tmp: Path) -> dict[str, dict[str, Any]]:
    """The shipped embedder recipe and the peers (torch.ao dynamic int8, stock ORT dynamic int8 of the encoder),
    all measured with the search's protocol."""
    from onnxruntime.quantization import quantize_dynamic

    from encoder_cpu import MAX_LEN, ort_embedder
    from slimguard.runtime.ort_transformer import export_encoder

    out: dict[str, dict[str, Any]] = {}
    recipe = load_recipe(ROOT / "src" / "slimguard" / "recipes" / f"{MINILM_RECIPE}.yaml")
    r = ev.run(recipe.steps, tmp / "minilm-fast.slim")
    out[f"recipe {MINILM_RECIPE}.yaml"] = {k: r[k] for k in ("val_cosine_mean", "val_cosine_min", "bytes",
                                                              "size_ratio", "speed_ratio", "speed_ci95")}

    def torch_ao() -> dict[str, Any]:
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ev.model).eval(), {torch.nn.Linear},
                                                       dtype=torch.qint8)
        torch.save(model.state_dict(), tmp / "torch_ao.pt")
        return embed_module(ev, model, (tmp / "torch_ao.pt").stat().st_size)

    def ort_stock() -> dict[str, Any]:
        fp32 = export_encoder(ev.model, tmp / "fp32.onnx", max_length=MAX_LEN)
        quantize_dynamic(str(fp32), str(tmp / "int8.onnx"))  # stock settings
        width = int(getattr(ev.model, "encoder").config.hidden_size)  # noqa: B009  (a Module attribute: Any)
        return embed_module(ev, ort_embedder(ev.model, tmp / "int8.onnx", width), (tmp / "int8.onnx").stat().st_size)

    for name, fn in (("peer torch.ao quantize_dynamic", torch_ao), ("peer ORT stock quantize_dynamic", ort_stock)):
        try:
            out[name] = fn()
        except Exception as exc:  # a peer that cannot run here is reported, not dropped
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def run_minilm(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """Case all-MiniLM-L6-v2: latency and size at mean cosine >= 0.99 to the original on validation texts."""
    objectives = ("latency", "size")
    with tempfile.TemporaryDirectory(prefix="slimguard-opt-minilm-") as tmpdir:
        out = (args.out / "minilm") if args.out else Path(tmpdir) / "search"
        settings = Settings(model=MINILM, data=MINILM_DATA, out=out, min_cosine=MIN_COSINE, objectives=objectives,
                            trials=args.minilm_trials, seed=args.seed, speed_budget_s=args.speed_budget,
                            threads=THREADS, track=False, search=MINILM_SPACE,
                            study_name=f"bench-minilm-{args.seed}-{args.minilm_trials}",
                            warm_start=args.warm_start, local_moves=args.local_moves)
        t0 = time.perf_counter()
        result = optimize(settings, progress=False)
        wall = time.perf_counter() - t0
        load_end = os.getloadavg()
        import optuna

        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage_url)
        started = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
        completed = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
        search_s = (max(completed) - min(started)).total_seconds()
        reach = time_to_final_hv(study, result["hypervolume_reference"], settings.budget, result["hypervolume"])
        log = trial_log(study)
        for row, t in zip(log, [t for t in study.get_trials(deepcopy=False) if t.datetime_complete], strict=True):
            row["val_cosine_mean"] = t.user_attrs.get("val_cosine_mean")
        ev = Evaluator(slimguard.models.load_model(MINILM).eval(), slimguard.data.load(MINILM_DATA, seed=args.seed),
                       settings.budget, seed=args.seed, speed_budget_s=args.speed_budget, threads=THREADS)
        refs = minilm_references(ev, Path(tmpdir))
    rows = []
    for name, ref in refs.items():
        if "error" in ref:
            rows.append({"reference": name, **ref, "feasible": None, "dominated_by_front": None})
            continue
        point = [1 / ref["speed_ratio"], ref["size_ratio"]]
        feasible = ref["val_cosine_mean"] >= MIN_COSINE
        # a front point running the very pipeline of the reference (the warm-start trial, or the sampler drawing
        # the same steps with the same options) is the same model measured twice: it "dominates" only by timing
        # noise and bytes of metadata, so it does not count
        same = recipe_steps(MINILM_RECIPE) if name == f"recipe {MINILM_RECIPE}.yaml" else None
        others = [p for p in result["points"] if p["steps"] != same]
        by = [p["trial"] for p in others if dominates([1 / p["speed_ratio"], p["size_ratio"]], point)]
        by_noise = [p["trial"] for p in others if dominates_within_noise(p, ref)]
        rows.append({"reference": name, **ref, "feasible": feasible,
                     "dominated_by_front": bool(by_noise) if feasible else None,
                     "dominated_by_trials": by_noise, "dominated_on_medians_by_trials": by,
                     "same_pipeline_on_front": ([p["trial"] for p in result["points"] if p["steps"] == same]
                                                if same is not None else None),
                     "note": None if feasible else f"infeasible: validation mean cosine below {MIN_COSINE}"})
    competing = [r for r in rows if r["feasible"]]
    beaten = sum(bool(r["dominated_by_front"]) for r in competing)
    case = {"case": "all-MiniLM-L6-v2", "model": MINILM, "data": MINILM_DATA, "objectives": list(objectives),
            "min_cosine_mean": MIN_COSINE, "budget_points": settings.budget, "target": settings.target,
            "space": MINILM_SPACE, "trials": result["trials"], "seed": args.seed,
            "search_wall_s": round(search_s, 1), "this_run_wall_s": round(wall, 1),
            "seconds_to_final_hypervolume": reach, "hypervolume": result["hypervolume"],
            "hypervolume_reference": result["hypervolume_reference"], "baseline": result["baseline"],
            "front": [{**{k: p[k] for k in ("trial", "steps", "val_cosine_mean", "val_cosine_min", "test_cosine_mean",
                                            "test_cosine_min", "test_n", "bytes", "size_ratio", "speed_ratio",
                                            "speed_ci95")},
                       "warm_start": p.get("warm_start"), "local_move": p.get("local_move")}
                      for p in result["points"]],
            "chosen": result["chosen"], "references": rows, "warm_start": result["warm_start"],
            "loadavg_1_5_15m_after_search": [round(v, 2) for v in load_end], "trial_log": log}
    targets = [target("MiniLM: front dominates every feasible shipped embedder recipe and peer point",
                      "all", f"{beaten} of {len(competing)} feasible ({len(rows) - len(competing)} infeasible or "
                             f"not run)", beaten == len(competing) and bool(competing))]
    chosen = result["chosen_point"]
    summary = [claim("optimize MiniLM: hypervolume (time x size, ref 1,1)", result["hypervolume"], digits=3),
               claim("optimize MiniLM: chosen speed ratio", chosen["speed_ratio"], unit="x", ci95=chosen["speed_ci95"]),
               claim("optimize MiniLM: chosen test mean cosine", chosen["test_cosine_mean"], digits=4,
                     n=chosen["test_n"]),
               claim("optimize MiniLM: search wall time", round(search_s, 1), unit="s")]
    print(f"{MINILM}: {result['trials']['finished']} trials in {search_s:.0f} s; hypervolume "
          f"{result['hypervolume']:.3f}")
    for p in case["front"]:
        steps = " > ".join(next(iter(s)) for s in p["steps"])
        print(f"  front trial {p['trial']:3d}: {steps:30s} size {p['size_ratio']:.3f}  speed {p['speed_ratio']:.2f}x "
              f"val cos {p['val_cosine_mean']:.4f}  test cos {p['test_cosine_mean']:.4f}")
    for r in rows:
        print(f"  {r['reference']}: " + (r["error"] if "error" in r else
              f"size {r['size_ratio']:.3f} speed {r['speed_ratio']:.2f}x val cos {r['val_cosine_mean']:.4f} "
              f"feasible {r['feasible']} dominated {r['dominated_by_front']} {r['dominated_by_trials']} "
              f"(on medians {r['dominated_on_medians_by_trials']})"))
    return case, targets, summary


def run_digits(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """Case digits32-resnet: the search, the references, the dominance check."""
    with tempfile.TemporaryDirectory(prefix="slimguard-opt-") as tmpdir:
        out = args.out or Path(tmpdir) / "search"
        settings = Settings(model=MODEL, data=DATA, out=out, budget=BUDGET, objectives=("size", "latency"),
                            trials=args.trials, seed=args.seed, speed_budget_s=args.speed_budget, threads=THREADS,
                            track=False, study_name=f"bench-{args.seed}-{args.trials}", warm_start=args.warm_start,
                            local_moves=args.local_moves)
        t0 = time.perf_counter()
        result = optimize(settings, progress=False)
        wall = time.perf_counter() - t0
        load_end = os.getloadavg()  # the search's load (the references are measured after it)
        import optuna

        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage_url)
        started = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
        completed = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
        search_s = (max(completed) - min(started)).total_seconds()  # also right for a resumed study
        reach = time_to_final_hv(study, result["hypervolume_reference"], BUDGET, result["hypervolume"])
        log = trial_log(study)
        ev = Evaluator(copy.deepcopy(slimguard.zoo.load("digits32-resnet", seed=args.seed, progress=False)),
                       slimguard.data.load(DATA, seed=args.seed), BUDGET, seed=args.seed,
                       speed_budget_s=args.speed_budget, threads=THREADS)
        refs = references(ev, Path(tmpdir))
    rows = []
    for name, ref in refs.items():
        if "error" in ref:
            rows.append({"reference": name, **ref, "within_budget": None, "dominated_by_front": None})
            continue
        point = [ref["size_ratio"], 1 / ref["speed_ratio"]]
        within = ref["val_accuracy_drop_points"] <= BUDGET + 1e-9
        # a front point that ran this very recipe (a warm-start trial) is the same pipeline measured twice: it
        # "dominates" the reference only by timing noise, so it does not count
        own = f"recipe {RECIPE}.yaml" == name
        by = [p["trial"] for p in result["points"]
              if not (own and p.get("warm_start") == RECIPE)
              and dominates([p["size_ratio"], 1 / p["speed_ratio"]], point)]
        rows.append({"reference": name, **ref, "within_budget": within, "dominated_by_front": bool(by),
                     "dominated_by_trials": by,
                     "its_own_warm_start_trial_on_front": (any(p.get("warm_start") == RECIPE for p in result["points"])
                                                           if own else None)})
    competing = [r for r in rows if r["within_budget"]]
    beaten = sum(bool(r["dominated_by_front"]) for r in competing)
    case = {"case": "digits32-resnet", "model": MODEL, "data": DATA, "objectives": ["size", "latency"],
            "budget_points": BUDGET, "trials": result["trials"], "seed": args.seed, "search_wall_s": round(search_s, 1),
            "this_run_wall_s": round(wall, 1),
            "seconds_to_final_hypervolume": reach, "hypervolume": result["hypervolume"],
            "hypervolume_reference": result["hypervolume_reference"], "baseline": result["baseline"],
            "front": [{**{k: p[k] for k in ("trial", "steps", "val_accuracy_drop_points", "test_accuracy_drop_points",
                                            "test_n", "bytes", "size_ratio", "speed_ratio", "speed_ci95")},
                       "warm_start": p.get("warm_start"), "local_move": p.get("local_move")}
                      for p in result["points"]],
            "chosen": result["chosen"], "references": rows, "warm_start": result["warm_start"],
            "local_moves": result["local_moves"],
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "loadavg_1_5_15m_after_search": [round(v, 2) for v in load_end],
            "stopped_mid_training": sum(r["pruned_at_epoch"] is not None for r in log), "trial_log": log}
    targets = [target("digits32-resnet: front dominates every single-technique recipe and peer point within the "
                      "budget", "all", f"{beaten} of {len(competing)}", beaten == len(competing) and bool(competing))]
    chosen = result["chosen_point"]
    summary = [claim("optimize digits32-resnet: hypervolume (size x time, ref 1,1)", result["hypervolume"], digits=3),
               claim("optimize digits32-resnet: chosen size ratio", chosen["size_ratio"], digits=3),
               claim("optimize digits32-resnet: chosen speed ratio", chosen["speed_ratio"], unit="x",
                     ci95=chosen["speed_ci95"]),
               claim("optimize digits32-resnet: chosen test accuracy drop", chosen["test_accuracy_drop_points"],
                     unit="points", n=chosen["test_n"]),
               claim("optimize digits32-resnet: search wall time (first trial start to last trial end)",
                     round(search_s, 1), unit="s")]
    print(f"{MODEL}: {result['trials']['finished']} trials in {search_s:.0f} s; "
          f"hypervolume {result['hypervolume']:.3f} (reached after {reach if reach is None else round(reach)} s)")
    for p in case["front"]:
        steps = " > ".join(next(iter(s)) for s in p["steps"])
        print(f"  front trial {p['trial']:3d}: {steps:45s} size {p['size_ratio']:.3f}  speed {p['speed_ratio']:.2f}x "
              f"[{p['speed_ci95'][0]:.2f}, {p['speed_ci95'][1]:.2f}]  val drop {p['val_accuracy_drop_points']:.2f}  "
              f"test drop {p['test_accuracy_drop_points']:.2f}")
    for r in rows:
        if "error" in r:
            print(f"  {r['reference']}: {r['error']}")
        else:
            print(f"  {r['reference']:34s} size {r['size_ratio']:.3f}  speed {r['speed_ratio']:.2f}x  val drop "
                  f"{r['val_accuracy_drop_points']:.2f}  within budget {r['within_budget']}  dominated "
                  f"{r['dominated_by_front']} {r['dominated_by_trials']}"
                  + (f"  own warm-start trial on front {r['its_own_warm_start_trial_on_front']}"
                     if r["its_own_warm_start_trial_on_front"] is not None else ""))
    print(f"  {case['stopped_mid_training']} trials stopped mid-training; load average {case['loadavg_1m_at_end']}")
    return case, targets, summary


if __name__ == "__main__":
    main()
