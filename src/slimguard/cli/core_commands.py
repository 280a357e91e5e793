"""``demo``, ``train``, ``evaluate``, ``inspect`` and ``compress``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import (
    JSON_OPT,
    KEY_ENV_OPT,
    QUIET_OPT,
    REQUIRE_SIGNATURE_OPT,
    TRUST_CODE_OPT,
    handle_errors,
    load_policy,
    load_source,
    print_json,
    print_table,
    ratio,
    set_output,
)

METRIC_ROWS = [
    ("accuracy", "accuracy"), ("params", "params"), ("nonzero params", "nonzero_params"),
    ("file bytes", "size_bytes"), ("MACs / example", "macs"), ("latency p50 (ms)", "latency_ms_p50"),
]


def before_after_table(title: str, baseline: dict[str, Any], after: dict[str, Any]) -> None:
    rows = []
    for label, key in METRIC_ROWS:
        b, a = baseline.get(key), after.get(key)
        change = ratio(b, a) if key in ("params", "nonzero_params", "size_bytes", "macs", "latency_ms_p50") else (
            f"{(a - b) * 100:+.2f} pts" if isinstance(a, float) and isinstance(b, float) else "-")
        rows.append((label, b, a, change))
    print_table(title, ["metric", "baseline", "compressed", "change"], rows)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "params", "nonzero_params", "size_bytes", "latency_ms_p50", "latency_ms_p95", "macs")
    return {k: metrics.get(k) for k in keys}


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def demo(
        out: Path = typer.Option(Path("demo-out"), help="Directory for model.slim and metrics.json."),
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Compress LeNet-5 on digits end to end: evaluate, prune 80% + fine-tune, int8, save, reload, evaluate.

        Writes model.slim, metrics.json and report.html (the shape of metrics.json is documented in
        slimguard.pipeline); --json prints the metrics.json object.
        """
        from slimguard.core.recipe import loads
        from slimguard.pipeline import check_compress_output, compress, rejection_message

        set_output(json_out, quiet)
        check_compress_output(out)  # before any work
        recipe = loads(resources.files("slimguard.recipes").joinpath("demo.yaml").read_text(), "demo.yaml")
        result = compress(recipe, out, progress=not (json_out or quiet))
        if json_out:
            print_json(result)
        elif not quiet:
            before_after_table("slimguard demo: digits-lenet5 on digits32 (test split)", result["baseline"],
                               result["compressed"])
            typer.echo(f"artifact: {result['artifact']}  metrics: {result['metrics_file']}  "
                       f"report: {result['report']}")
        if not result["accepted"]:
            typer.echo(rejection_message(result), err=True)
            raise typer.Exit(code=1)

    @app.command()
    @handle_errors
    def train(
        model: str = typer.Argument(..., help="Zoo model name, e.g. digits-lenet5."),
        seed: int = typer.Option(0, help="Seed of data split and training."),
        retrain: bool = typer.Option(False, help="Train again even when cached."),
        out: Path | None = typer.Option(None, help="Also save the trained model to this .slim file."),
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Train a zoo model on its built-in data (cached for later use)."""
        from slimguard import data as sgdata
        from slimguard.artifact import save
        from slimguard.core.outputs import check_output_file
        from slimguard.evaluate import evaluate
        from slimguard.models import zoo

        set_output(json_out, quiet)
        if out is not None:
            check_output_file(out, "--out")  # before training
        name = model.removeprefix("zoo:")
        m = zoo.load(name, seed=seed, retrain=retrain, progress=not (json_out or quiet))
        data = sgdata.load(zoo.ZOO.get(name).data, seed=seed)
        metrics = evaluate(m, data.test)
        if out is not None:
            save(m, out, metrics=metrics)
        summary = _summary(metrics)
        result = {"model": name, "data": data.name, "test": summary}
        if json_out:
            print_json(result)
        elif not quiet:
            print_table(f"{name} on {data.name} (test split)", ["metric", "value"],
                        [(k, v) for k, v in summary.items()])

    @app.command()
    @handle_errors
    def evaluate(
        model: str = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory, hf:DIR, minilm."),
        data: str | None = typer.Option(None, help="Data set (default: the model's own)."),
        split: str = typer.Option("test", help="Split to score: train, val, test."),
        latency_batch: int = typer.Option(1, help="Batch size of the latency measurement."),
        threads: int | None = typer.Option(None, help="Torch threads during the latency measurement."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Accuracy, parameters, nonzeros, file bytes, MACs and latency of a model."""
        from slimguard import data as sgdata
        from slimguard.evaluate import evaluate as run_eval
        from slimguard.models.spec import info

        set_output(json_out, quiet)
        policy = load_policy(trust_code, require_signature, key_env)
        m = load_source(model, policy, progress=not (json_out or quiet))
        name = data or info(m).data.get("name")
        if not name:
            raise typer.BadParameter("this model records no data set; pass --data")
        bundle = sgdata.load(name)
        metrics = run_eval(m, bundle.split(split), latency_batch=latency_batch, num_threads=threads)
        if json_out:
            print_json(metrics)
        elif not quiet:
            print_table(f"{model} on {name} ({split})", ["metric", "value"], list(metrics.items()))

    @app.command()
    @handle_errors
    def inspect(
        model: str = typer.Argument(..., help="A .slim file or a model source."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Layers, shapes, parameters, sparsity, codec, bits per weight and stored bytes."""
        from slimguard.inspect import inspect_model

        set_output(json_out, quiet)
        report = inspect_model(model, policy=load_policy(trust_code, require_signature, key_env))
        if json_out:
            print_json(report)
            return
        if quiet:
            return
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

    @app.command()
    @handle_errors
    def compress(
        recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML file."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (model.slim, metrics.json)."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Run a recipe: baseline, ordered steps, evaluation, artifact, budget check."""
        from slimguard.core.recipe import load as load_recipe
        from slimguard.pipeline import check_compress_output, rejection_message
        from slimguard.pipeline import compress as run

        set_output(json_out, quiet)
        r = load_recipe(recipe)  # validated completely before any work starts
        check_compress_output(out)  # so is the output folder
        result = run(r, out, progress=not (json_out or quiet),
                     policy=load_policy(trust_code, require_signature, key_env))
        if json_out:
            print_json(result)
        elif not quiet:
            before_after_table(f"{r.name or recipe.name}: {r.model} on {r.data}", result["baseline"],
                               result["compressed"])
        if not result["accepted"]:  # not a user error: exit 1, one line saying where the files went
            typer.echo(rejection_message(result), err=True)
            raise typer.Exit(code=1)
