"""``robustness``: the robustness scorecard of a model, optionally side by side with its original."""

from __future__ import annotations

from pathlib import Path

import typer

from slimguard.cli.common import DATA_OPT, MODEL_ARG, Commands, Session, check_outputs, print_table, resolve_data
from slimguard.core.errors import ConfigError

commands = Commands()
register = commands.register  # the CLI calls register(app)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: {text!r} is not a comma-separated list of numbers, e.g. 0.03,0.1,0.2") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


@commands.add()
def robustness(
    s: Session,
    model: str = MODEL_ARG,
    against: str | None = typer.Option(None, help="The original model to compare with (same sources)."),
    data: str | None = DATA_OPT,
    eps: str = typer.Option("0.03,0.1,0.2", help="Epsilon grid, fractions of the input range."),
    attacks: str = typer.Option("fgsm,pgd,apgd", help="Attacks run over the grid: fgsm, pgd, apgd."),
    corruptions: str | None = typer.Option(None, help="Corruptions (default: all for the data's kind)."),
    examples: int = typer.Option(500, help="Test examples attacked (seeded subset; 0 = all)."),
    pgd_steps: int = typer.Option(10, help="PGD iterations."),
    apgd_steps: int = typer.Option(20, help="APGD iterations."),
    seed: int = typer.Option(0, help="Seed of subsets, random starts and corruptions."),
    out: Path | None = typer.Option(None, help="Also write the scorecard JSON to this file."),
) -> None:
    """Clean accuracy, accuracy under FGSM/PGD/APGD over an eps grid, and under corruptions by severity.

    Quantized models are attacked through their fake-quant twin; both numbers are shown.
    """
    from slimguard.robust.scorecard import scorecard

    check_outputs(out=out)  # before any work
    m = s.load(model)
    ref = s.load(against) if against else None
    bundle, name = resolve_data(m, data)
    card = scorecard(m, bundle, against=ref, attacks=_names(attacks) or [], eps=_floats(eps, "eps"),
                     corruptions=_names(corruptions), attack_examples=examples, pgd_steps=pgd_steps,
                     apgd_steps=apgd_steps, seed=seed, progress=s.show)
    result = card.to_dict()
    result["settings"].update({"model": model, "against": against})
    if out is not None:
        card.save(out)

    def show() -> None:
        title = f"robustness of {model}" + (f" vs {against}" if against else "") + f" on {name} (test split)"
        print_table(title, card.columns(), card.rows())
        st = card.settings
        typer.echo(f"seed {st['seed']}; {st.get('attack_examples', '-')} examples attacked; eps as fractions "
                   f"of the input range" + (f"; scorecard: {out}" if out else ""))

    s.emit(result, show)
