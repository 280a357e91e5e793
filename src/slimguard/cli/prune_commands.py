"""``sensitivity``: per-layer score against pruning sparsity, as a table and JSON."""

from __future__ import annotations

from pathlib import Path

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
    set_output,
)


def _parse_sparsities(text: str) -> list[float]:
    from slimguard.core.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sparsities: {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.75") from None
    if not values:
        raise ConfigError("--sparsities: give at least one value, e.g. 0.5,0.75") from None
    return values


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def sensitivity(
        model: str = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory, hf:DIR, minilm."),
        data: str | None = typer.Option(None, help="Data set (default: the model's own; docs-text for minilm)."),
        method: str = typer.Option("magnitude", help="magnitude (unstructured, per layer) or channel (structured)."),
        sparsities: str = typer.Option("0.25,0.5,0.75,0.9", help="Comma-separated sparsities to try, each in [0, 1)."),
        max_examples: int = typer.Option(512, help="Validation examples scored per trial."),
        max_drop: float = typer.Option(0.01, help="Allowed score drop for the suggested per-layer ratios."),
        out: Path | None = typer.Option(None, help="Also write the result JSON here."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Prune each layer alone at each sparsity and score it (accuracy, or cosine fidelity for embedders)."""
        from slimguard import data as sgdata
        from slimguard.core.outputs import check_output_file, write_json_atomic
        from slimguard.models.spec import info
        from slimguard.prune.sensitivity import ratios_from_sensitivity
        from slimguard.prune.sensitivity import sensitivity as run

        set_output(json_out, quiet)
        values = _parse_sparsities(sparsities)
        if out is not None:
            check_output_file(out, "--out")  # before any work
        policy = load_policy(trust_code, require_signature, key_env)
        m = load_source(model, policy, progress=not (json_out or quiet))
        mi = info(m)
        name = data or mi.data.get("name") or ("docs-text" if mi.task == "embedding" else None)
        if not name:
            raise typer.BadParameter("this model records no data set; pass --data")
        bundle = sgdata.load(name)
        result = run(m, bundle, sparsities=values, method=method,  # type: ignore[arg-type]
                     max_examples=max_examples, progress=not (json_out or quiet))
        result["model"], result["data"] = model, name
        result["suggested_ratios"] = ratios_from_sensitivity(result, max_drop)
        if out is not None:
            write_json_atomic(out, result)
        if json_out:
            print_json(result)
        elif not quiet:
            keys = [f"{s:g}" for s in values]
            rows = [(layer, rec["params"], *(rec["scores"][k] for k in keys))
                    for layer, rec in result["layers"].items()]
            print_table(f"{model} on {name}: {result['metric']} (baseline {result['baseline']:.4f}), {method}",
                        ["layer", "params", *keys], rows)
            typer.echo(f"suggested ratios (drop <= {max_drop}): {result['suggested_ratios']}")
