"""``robustness``: the robustness scorecard of a model, optionally side by side with its original."""

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
from slimguard.core.errors import ConfigError


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: {text!r} is not a comma-separated list of numbers, e.g. 0.03,0.1,0.2") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def robustness(
        model: str = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory, hf:DIR, minilm."),
        against: str | None = typer.Option(None, help="The original model to compare with (same sources)."),
        data: str | None = typer.Option(None, help="Data set (default: the model's own)."),
        eps: str = typer.Option("0.03,0.1,0.2", help="Epsilon grid, fractions of the input range."),
        attacks: str = typer.Option("fgsm,pgd,apgd", help="Attacks run over the grid: fgsm, pgd, apgd."),
        corruptions: str | None = typer.Option(None, help="Corruptions (default: all for the data's kind)."),
        examples: int = typer.Option(500, help="Test examples attacked (seeded subset; 0 = all)."),
        pgd_steps: int = typer.Option(10, help="PGD iterations."),
        apgd_steps: int = typer.Option(20, help="APGD iterations."),
        seed: int = typer.Option(0, help="Seed of subsets, random starts and corruptions."),
        out: Path | None = typer.Option(None, help="Also write the scorecard JSON to this file."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Clean accuracy, accuracy under FGSM/PGD/APGD over an eps grid, and under corruptions by severity.

        Quantized models are attacked through their fake-quant twin; both numbers are shown.
        """
        from slimguard import data as sgdata
        from slimguard.core.outputs import check_output_file
        from slimguard.models.spec import maybe_info
        from slimguard.robust.scorecard import scorecard

        set_output(json_out, quiet)
        if out is not None:
            check_output_file(out, "--out")  # before any work
        show = not (json_out or quiet)
        policy = load_policy(trust_code, require_signature, key_env)
        m = load_source(model, policy, progress=show)
        ref = load_source(against, policy, progress=show) if against else None
        mi = maybe_info(m)
        name = data or (mi.data.get("name") if mi is not None and mi.data else None)
        if not name:
            raise ConfigError("this model records no data set; pass --data")
        bundle = sgdata.load(name)
        card = scorecard(m, bundle, against=ref, attacks=_names(attacks) or [], eps=_floats(eps, "eps"),
                         corruptions=_names(corruptions), attack_examples=examples, pgd_steps=pgd_steps,
                         apgd_steps=apgd_steps, seed=seed, progress=show)
        result = card.to_dict()
        result["settings"].update({"model": model, "against": against})
        if out is not None:
            card.save(out)
        if json_out:
            print_json(result)
        elif not quiet:
            title = f"robustness of {model}" + (f" vs {against}" if against else "") + f" on {name} (test split)"
            print_table(title, card.columns(), card.rows())
            s = card.settings
            typer.echo(f"seed {s['seed']}; {s.get('attack_examples', '-')} examples attacked; eps as fractions "
                       f"of the input range" + (f"; scorecard: {out}" if out else ""))
