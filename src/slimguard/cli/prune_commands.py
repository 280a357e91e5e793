"""``sensitivity``: per-layer score against pruning sparsity, as a table and JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from slimguard.cli.common import MODEL_ARG, Commands, Session, check_outputs, print_table, resolve_data

commands = Commands()
register = commands.register  # the CLI calls register(app)


def _parse_sparsities(text: str) -> list[float]:
    from slimguard.core.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sparsities: {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.75") from None
    if not values:
        raise ConfigError("--sparsities: give at least one value, e.g. 0.5,0.75") from None
    return values


@commands.add()
def sensitivity(
    s: Session,
    model: str = MODEL_ARG,
    data: str | None = typer.Option(None, help="Data set (default: the model's own; docs-text for minilm)."),
    method: str = typer.Option("magnitude", help="magnitude (unstructured, per layer) or channel (structured)."),
    sparsities: str = typer.Option("0.25,0.5,0.75,0.9", help="Comma-separated sparsities to try, each in [0, 1)."),
    max_examples: int = typer.Option(512, help="Validation examples scored per trial."),
    max_drop: float = typer.Option(0.01, help="Allowed score drop for the suggested per-layer ratios."),
    out: Path | None = typer.Option(None, help="Also write the result JSON here."),
) -> None:
    """Prune each layer alone at each sparsity and score it (accuracy, or cosine fidelity for embedders)."""
    from slimguard.core.outputs import write_json_atomic
    from slimguard.prune.sensitivity import ratios_from_sensitivity
    from slimguard.prune.sensitivity import sensitivity as run

    values = _parse_sparsities(sparsities)
    check_outputs(out=out)  # before any work
    m = s.load(model)
    bundle, name = resolve_data(m, data, text_default="docs-text")
    result = run(m, bundle, sparsities=values, method=method,  # type: ignore[arg-type]
                 max_examples=max_examples, progress=s.show)
    result["model"], result["data"] = model, name
    result["suggested_ratios"] = ratios_from_sensitivity(result, max_drop)
    if out is not None:
        write_json_atomic(out, result)

    def show() -> None:
        keys = [f"{v:g}" for v in values]
        rows = [(layer, rec["params"], *(rec["scores"][k] for k in keys))
                for layer, rec in result["layers"].items()]
        print_table(f"{model} on {name}: {result['metric']} (baseline {result['baseline']:.4f}), {method}",
                    ["layer", "params", *keys], rows)
        typer.echo(f"suggested ratios (drop <= {max_drop}): {result['suggested_ratios']}")

    s.emit(result, show)
