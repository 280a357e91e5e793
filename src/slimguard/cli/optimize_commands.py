"""``optimize``: an accuracy-aware, multi-objective search across techniques (see :mod:`slimguard.search`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import MODEL_ARG, Commands, Session

commands = Commands()
register = commands.register  # the CLI calls register(app)


def _objectives(values: list[str]) -> tuple[str, ...]:
    """``--objectives size,latency`` or ``--objectives size --objectives latency`` (both forms)."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def dashboard_hint(storage_url: str) -> str:
    """How to watch the study live with optuna-dashboard."""
    import importlib.util

    installed = importlib.util.find_spec("optuna_dashboard") is not None
    how = "" if installed else "pip install optuna-dashboard, then "
    return f"dashboard: {how}run  optuna-dashboard {storage_url}  and open http://127.0.0.1:8080"


@commands.add(loads_models=False)
def optimize(
    s: Session,
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., help="Output folder: pareto.json, best.yaml, model.slim, report.html, the "
                                       "trials' artifacts, and the study's SQLite file unless --storage is given."),
    data: str | None = typer.Option(None, help="Data set (default: the model's own); trials score its "
                                               "validation split, the Pareto points its test split once."),
    budget: float | None = typer.Option(None, help="Allowed validation accuracy drop, in points (a constraint; "
                                                  "classification data; default 1)."),
    min_cosine: float | None = typer.Option(None, help="Embedding data only: least mean cosine to the original's "
                                                "embeddings on the validation texts (the constraint instead of "
                                                "--budget; default 0.99)."),
    objectives: list[str] = typer.Option(
        ["size,latency"], help="What to minimize, most important first: size, latency, accuracy, robustness "
                               "(repeat the flag or separate with commas)."),
    trials: int = typer.Option(20, help="Finished trials the study should hold (a resumed study runs the rest)."),
    target: str = typer.Option("torch", help="Runtime candidates are scored and timed on: torch, or ort (ONNX "
                                             "Runtime, after slimguard's ONNX export; same threads)."),
    space: Path | None = typer.Option(None, help="YAML file with a search: block restricting the space."),
    storage: str | None = typer.Option(None, help="Optuna storage: sqlite:///FILE, postgresql://USER@HOST/DB or "
                                                  "journal:FILE (default: sqlite in --out)."),
    study_name: str = typer.Option("slimguard", help="The study's name in the storage (resumed when it exists)."),
    seed: int = typer.Option(0, help="Seeds the data split, every pipeline and the sampler."),
    workers: int = typer.Option(1, help="Local worker processes sharing the study."),
    sampler: str = typer.Option("tpe", help="tpe (multi-objective TPE) or nsga2 (NSGA-II); both constrained."),
    prune: bool = typer.Option(True, "--prune/--no-prune",
                               help="Stop trials whose validation drop misses the budget after training."),
    speed_budget: float = typer.Option(1.0, help="Seconds each trial's paired speed comparison may take."),
    threads: int = typer.Option(1, min=0, help="Torch threads, pinned while timing (0: torch's default count)."),
    robust_eps: float = typer.Option(0.1, help="robustness objective: L-inf PGD radius, in raw input units."),
    robust_steps: int = typer.Option(10, help="robustness objective: PGD steps."),
    max_examples: int = typer.Option(128, help="robustness objective: validation examples attacked per trial."),
    warm_start: bool = typer.Option(True, "--warm-start/--no-warm-start",
                                    help="A new study first runs the shipped recipes the space can express "
                                         "(they count against --trials); skipped ones are listed with why."),
    local_moves: bool = typer.Option(True, "--local-moves/--no-local-moves",
                                     help="After the warm start, and every 4 finished trials, queue the feasible "
                                          "Pareto points extended by one more stage (at most half of --trials)."),
    track: bool = typer.Option(True, "--track/--no-track",
                               help="Log trials to TensorBoard (OUT/tensorboard) and MLflow when set up."),
    dashboard: bool = typer.Option(False, "--dashboard/--no-dashboard",
                                   help="Only print how to open optuna-dashboard on the study, then exit."),
) -> None:
    """Search pipelines of pruning, factorization, training and quantization for the Pareto front of the
    objectives within an accuracy budget (embedders: a least mean cosine to the original, --min-cosine); write
    the front and the chosen point."""
    from slimguard.search import Settings, read_search_file
    from slimguard.search import optimize as run

    search = read_search_file(str(space)) if space is not None else {}
    name = data or _model_data(model)
    given = tuple(k for k, v in (("budget", budget), ("min_cosine", min_cosine)) if v is not None)
    settings = Settings(model=model, data=name, out=out, budget=1.0 if budget is None else budget,
                        objectives=_objectives(objectives),
                        trials=trials, seed=seed, storage=storage, study_name=study_name, search=search,
                        sampler=sampler, workers=workers, prune=prune, speed_budget_s=speed_budget,
                        threads=threads or None, track=track, target=target, warm_start=warm_start,
                        local_moves=local_moves, robust_eps=robust_eps, robust_steps=robust_steps,
                        max_examples=max_examples, min_cosine=0.99 if min_cosine is None else min_cosine,
                        given=given)
    if dashboard:
        typer.echo(dashboard_hint(settings.storage_url))
        return
    try:
        result = run(settings, progress=s.show)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the study {study_name!r} in {settings.storage_url} keeps its finished trials; "
                   "run the same command to resume it", err=True)
        raise typer.Exit(code=130) from None
    point = result["chosen_point"]
    chosen = {**point, "files": result["files"], "hypervolume": result["hypervolume"], "trials": result["trials"],
              "baseline": result["baseline"], "storage": result["storage"], "study": result["study"],
              "target": result["target"]}
    s.emit(chosen, lambda: _show(result, settings.storage_url))


def _model_data(model: str) -> str:
    """The data set a model records (``--data`` not given)."""
    from slimguard.cli.common import load_policy, load_source, resolve_data

    m = load_source(model, load_policy(None, False, None), progress=False)
    return resolve_data(m, None)[1]


def _show(result: dict[str, Any], storage_url: str) -> None:
    from slimguard.cli.common import print_table

    rows = []
    for i, p in enumerate(result["points"]):
        steps = " > ".join(next(iter(step)) for step in p["steps"])
        ci = p["speed_ci95"]
        speed = f"{p['speed_ratio']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"
        robust = [p["val_robust_accuracy"]] if "robustness" in result else []
        rows.append((f"{p['trial']}{' *' if i == result['chosen'] else ''}", steps, p["val_accuracy_drop_points"],
                     p["test_accuracy_drop_points"], p["size_ratio"], speed, *robust))
    t = result["trials"]
    extra = ["val robust acc"] if "robustness" in result else []
    print_table(f"Pareto front ({t['feasible']} of {t['finished']} trials within {result['budget_points']:g} pts; "
                f"target {result['target']}; * chosen)",
                ["trial", "steps", "val drop", "test drop", "size ratio", "speed [95% CI]", *extra], rows)
    typer.echo(f"hypervolume {result['hypervolume']:.4g} (reference {result['hypervolume_reference']})")
    for name, path in result["files"].items():
        typer.echo(f"wrote {path}" + ("  (rerun: slimguard compress --recipe " + path + " --out DIR)"
                                      if name == "best.yaml" else ""))
    typer.echo(dashboard_hint(storage_url))
