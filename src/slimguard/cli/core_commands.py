"""``demo``, ``train``, ``evaluate``, ``inspect``, ``compress`` and ``sensitivity`` (which layers tolerate pruning)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import (
    DATA_OPT,
    MODEL_ARG,
    THREADS_OPT,
    Commands,
    Session,
    check_out_dir,
    print_table,
    ratio,
    resolve_data,
)

commands = Commands()
register = commands.register  # the CLI calls register(app)

METRIC_ROWS = [
    ("accuracy", "accuracy"), ("F1 (macro)", "f1_macro"), ("agreement", "agreement"), ("KL", "kl"),
    ("perplexity", "perplexity"), ("cosine mean", "cosine_mean"), ("cosine min", "cosine_min"), ("params", "params"),
    ("nonzero params", "nonzero_params"), ("file bytes", "size_bytes"), ("MACs / example", "macs"),
]


def before_after_table(title: str, baseline: dict[str, Any], after: dict[str, Any],
                       speed: dict[str, Any] | None = None) -> None:
    """Baseline against compressed, one row per metric; with ``speed`` (``metrics.json``'s block) a speed
    row (ms per call, median of the paired rounds) whose change is the verdict ("1.80x faster [1.60, 2.00]",
    or "no measurable difference"), and a line saying how and where it was measured."""
    rows = []
    for label, key in METRIC_ROWS:
        b, a = baseline.get(key), after.get(key)
        if b is None and a is None:
            continue
        if key in ("params", "nonzero_params", "size_bytes", "macs"):
            change = ratio(b, a)
        elif not (isinstance(a, float) and isinstance(b, float)):
            change = "-"
        elif key in ("perplexity", "kl"):  # not fractions: the plain difference
            change = f"{a - b:+.3g}"
        else:
            change = f"{(a - b) * 100:+.2f} pts"
        rows.append((label, b, a, change))
    if speed:
        ms = speed.get("median_ms", {})
        rows.append((f"ms / call, batch {speed['batch_size']}", ms.get("baseline"), ms.get("compressed"),
                     speed["verdict"]))
    print_table(title, ["metric", "baseline", "compressed", "change"], rows)
    if speed:
        from slimguard.runtime.measure import machine_line

        n = speed["threads"]
        typer.echo(f"speed: median of {speed['rounds']} paired rounds x {speed['calls_per_round']} calls, "
                   f"{n} thread{'s' if n != 1 else ''} pinned, ratio spread {speed['spread'][0]:.2f}-"
                   f"{speed['spread'][1]:.2f}; {machine_line(speed.get('machine', {}))}")


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "params", "nonzero_params", "size_bytes", "latency_ms_p50", "latency_ms_p95", "macs")
    return {k: metrics.get(k) for k in keys}


def _compressed(s: Session, result: dict[str, Any], title: str, note: str | None = None) -> None:
    """Print a compress result (JSON, or the before/after table, ``note`` and where the files went); exit 1
    when the budget was missed."""
    from slimguard.pipeline import rejection_message

    def show() -> None:
        before_after_table(title, result["baseline"], result["compressed"], result.get("speed"))
        if note:
            typer.echo(note)

    s.emit(result, show)
    if result["accepted"]:
        s.wrote(*(result[k] for k in ("artifact", "metrics_file", "report") if result.get(k)))
    else:  # not a user error: exit 1, one line saying where the files went
        if s.main:
            typer.echo(rejection_message(result), err=True)
        raise typer.Exit(code=1)


@commands.add(loads_models=False, distributed=True)
def demo(
    s: Session,
    out: Path = typer.Option(Path("demo-out"), "--out", "-o",
                             help="Output folder: model.slim, metrics.json and report.html are written in it."),
    threads: int = THREADS_OPT,
) -> None:
    """Compress LeNet-5 on digits end to end: evaluate, prune 80% + fine-tune, int8, save, reload, evaluate.

    Speed is compared in paired, interleaved rounds (median ratio with its 95% interval). Writes model.slim,
    metrics.json and report.html (the shape of metrics.json is documented in slimguard.pipeline); --json
    prints the metrics.json object.
    """
    from slimguard.core.recipe import loads
    from slimguard.pipeline import check_compress_output, compress

    check_compress_output(out)  # before any work
    recipe = loads(resources.files("slimguard.recipes").joinpath("demo.yaml").read_text(), "demo.yaml")
    result = compress(recipe, out, progress=s.show, threads=threads or None)
    _compressed(s, result, "slimguard demo: digits-lenet5 on digits32 (test split)")


@commands.add(loads_models=False)
def train(
    s: Session,
    model: str = typer.Argument(..., help="Zoo model name, e.g. digits-lenet5."),
    seed: int = typer.Option(0, help="Seed of data split and training."),
    retrain: bool = typer.Option(False, "--retrain/--no-retrain", help="Train again even when cached."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Also save the trained model to this folder, as model.slim."),
) -> None:
    """Train a zoo model on its built-in data (cached for later use); with --out, save it as OUT/model.slim."""
    from slimguard import data as sgdata
    from slimguard.artifact import save
    from slimguard.evaluate import evaluate
    from slimguard.models import zoo

    check_out_dir(out, "model.slim")  # before training
    name = model.removeprefix("zoo:")
    m = zoo.load(name, seed=seed, retrain=retrain, progress=s.show)
    data = sgdata.load(zoo.ZOO.get(name).data, seed=seed)
    metrics = evaluate(m, data.test)
    artifact = None if out is None else save(m, out / "model.slim", metrics=metrics)
    summary = _summary(metrics)
    result: dict[str, Any] = {"model": name, "data": data.name, "test": summary}
    if artifact is not None:
        result["artifact"] = str(artifact)
    s.emit(result, lambda: print_table(f"{name} on {data.name} (test split)", ["metric", "value"],
                                       list(summary.items())))
    if artifact is not None:
        s.wrote(artifact)


@commands.add(user_models=True)
def evaluate(
    s: Session,
    model: str = MODEL_ARG,
    data: str | None = DATA_OPT,
    split: str = typer.Option("test", help="Split to score: train, val, test."),
    latency_batch: int = typer.Option(1, help="Batch size of the latency measurement."),
    threads: int = THREADS_OPT,
    against: str | None = typer.Option(None, help="The original model: agreement and KL (or cosine) to it "
                                                  "(default: the model itself)."),
) -> None:
    """The task's score (accuracy and F1, agreement and KL, cosine, or perplexity), parameters, nonzeros,
    file bytes, MACs and latency of a model."""
    from slimguard.evaluate import evaluate as run_eval

    m = s.load(model)
    ref = s.load(against, main_model=False) if against else None
    bundle, name = resolve_data(m, data, text_default="docs-text")
    metrics = run_eval(m, bundle.split(split), reference=ref, latency_batch=latency_batch,
                       num_threads=threads or None)
    s.emit(metrics, lambda: _metrics_table(f"{model} on {name} ({split})", metrics))


@commands.add()
def inspect(
    s: Session,
    model: str = typer.Argument(..., help="A .slim file or a model source."),
) -> None:
    """Layers, shapes, parameters, sparsity, codec, bits per weight and stored bytes."""
    from slimguard.inspect import inspect_model

    report = inspect_model(model, policy=s.policy)
    s.emit(report, lambda: _inspect_tables(model, report))


@commands.add(user_models=True, distributed=True)
def compress(
    s: Session,
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML file."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Output folder: model.slim, metrics.json and report.html are written in it."),
    threads: int = THREADS_OPT,
) -> None:
    """Run a recipe: baseline, ordered steps, evaluation, artifact, budget check."""
    from slimguard.core.recipe import load as load_recipe
    from slimguard.pipeline import check_compress_output
    from slimguard.pipeline import compress as run

    r = load_recipe(recipe)  # validated completely before any work starts
    options = s.model_options  # checked before any work, like the recipe
    check_compress_output(out)  # so is the output folder
    result = run(r, out, progress=s.show, policy=s.policy, threads=threads or None, model_options=options)
    _compressed(s, result, f"{r.name or recipe.name}: {r.model} on {r.data}")


def _metrics_table(title: str, metrics: dict[str, Any]) -> None:
    """One row per metric; the machine record as one line."""
    from slimguard.runtime.measure import machine_line

    rows = [(k, machine_line(v) if k == "machine" else v) for k, v in metrics.items()]
    print_table(title, ["metric", "value"], rows)


def _inspect_tables(model: str, report: dict[str, Any]) -> None:
    rows = [(r["tensor"], r["module_type"], "x".join(map(str, r["shape"])), r["params"], r["nonzero"],
             f"{r['sparsity'] * 100:.1f}%", r["codec"], r["bits_per_weight"], r["stored_bytes"])
            for r in report["tensors"]]
    columns = ["tensor", "module", "shape", "params", "nonzero", "sparsity", "codec", "bits/weight", "bytes"]
    if any("kept_percent" in r for r in report["tensors"]):  # coded tensors: the Deep Compression columns
        rows = [(*row, *(("-",) * 5 if "kept_percent" not in r else (
            f"{r['kept_percent']}%", r["bits"], r["index_bits_per_weight"], r["position_bits_per_weight"],
            f"{r['compression']}x"))) for row, r in zip(rows, report["tensors"], strict=True)]
        columns += ["kept", "cluster bits", "index bits/kept", "position bits/kept", "compression"]
    print_table(f"{model}", columns, rows)
    t = report["totals"]
    typer.echo(f"total: {t['params']:,} params, {t['nonzero']:,} nonzero, {t['stored_bytes']:,} tensor bytes"
               + (f", file {t['file_bytes']:,} bytes" if t.get("file_bytes") else ""))


@commands.add(distributed=True)
def sensitivity(
    s: Session,
    model: str = MODEL_ARG,
    data: str | None = typer.Option(None, help="Data set (default: the model's own; docs-text for minilm)."),
    method: str = typer.Option("magnitude", help="magnitude (unstructured, per layer) or channel (structured)."),
    sparsities: list[float] = typer.Option([0.25, 0.5, 0.75, 0.9], "--sparsity",
                                           help="A sparsity to try, in [0, 1); repeat for several."),
    max_examples: int = typer.Option(512, min=1, help="Validation examples scored per trial."),
    max_drop: float = typer.Option(1.0, min=0.0, help="Allowed score drop for the suggested per-layer ratios, in "
                                                      "points (1.0 = one accuracy point, or 0.01 cosine)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the result to this folder, as "
                                                             "sensitivity.json."),
) -> None:
    """Prune each layer alone at each sparsity and score it (accuracy, or cosine fidelity for embedders)."""
    from slimguard.core.outputs import write_json_atomic
    from slimguard.prune.sensitivity import ratios_from_sensitivity
    from slimguard.prune.sensitivity import sensitivity as run

    values = list(dict.fromkeys(sparsities))  # in the order given, once each
    check_out_dir(out, "sensitivity.json")  # before any work
    m = s.load(model)
    bundle, name = resolve_data(m, data, text_default="docs-text")
    result = run(m, bundle, sparsities=values, method=method,  # type: ignore[arg-type]
                 max_examples=max_examples, progress=s.show)
    result["model"], result["data"], result["max_drop_points"] = model, name, max_drop
    result["suggested_ratios"] = ratios_from_sensitivity(result, max_drop / 100)  # the library takes a fraction
    written = None
    if out is not None and s.main:
        written = write_json_atomic(out / "sensitivity.json", result)

    def show() -> None:
        keys = [f"{v:g}" for v in values]
        rows = [(layer, rec["params"], *(rec["scores"][k] for k in keys))
                for layer, rec in result["layers"].items()]
        print_table(f"{model} on {name}: {result['metric']} (baseline {result['baseline']:.4f}), {method}",
                    ["layer", "params", *keys], rows)
        typer.echo(f"suggested ratios (drop <= {max_drop:g} points): {result['suggested_ratios']}")

    s.emit(result, show)
    if written is not None:
        s.wrote(written)
