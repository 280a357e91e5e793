"""``ood`` (OOD detectors: AUROC, FPR at 95% TPR) and ``faults`` (bit-flip campaigns, range restriction)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from slimguard.artifact import LoadPolicy


def _model_and_data(model: str, data: str | None, quiet: bool, policy: LoadPolicy) -> tuple[Any, Any, str]:
    from slimguard import data as sgdata
    from slimguard.core.errors import DataError
    from slimguard.models.spec import maybe_info

    m = load_source(model, policy, progress=not quiet)
    mi = maybe_info(m)
    name = data or (mi.data.get("name") if mi is not None else None)
    if not name:
        raise DataError("this model records no data set; pass --data")
    return m, sgdata.load(name), name


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def ood(
        model: str = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory."),
        data: str | None = typer.Option(None, help="In-distribution data (default: the model's own)."),
        ood_sets: list[str] = typer.Option(None, "--ood", help="OOD data set(s); default DATA-ood and DATA-ood-near."),
        detectors: str | None = typer.Option(None, help="Comma-separated detectors (default all)."),
        tpr: float = typer.Option(0.95, help="In-distribution acceptance rate the threshold is set for."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """OOD detection: fit on train, calibrate on val, report AUROC and FPR at 95% TPR on test."""
        from slimguard import data as sgdata
        from slimguard.core.config import check_range
        from slimguard.evaluate import _check_fits
        from slimguard.guard.ood import detector_names, evaluate_detectors

        set_output(json_out, quiet)
        check_range("tpr", tpr, 0.0, 1.0, low_inclusive=False)
        names = _split_list(detectors)
        for n in names or []:
            if n not in detector_names():
                raise typer.BadParameter(f"unknown detector {n!r}; allowed: {', '.join(detector_names())}")
        policy = load_policy(trust_code, require_signature, key_env)
        m, bundle, dname = _model_and_data(model, data, json_out or quiet, policy)
        _check_fits(m, bundle.test)
        if not ood_sets:
            ood_sets = [s for s in (f"{dname}-ood", f"{dname}-ood-near") if s in sgdata.available()]
            if not ood_sets:
                raise typer.BadParameter(f"no built-in OOD set for {dname!r}; pass --ood DATA")
        ood_splits = {}
        for s in ood_sets:
            split = sgdata.load(s).test
            _check_fits(m, split)
            ood_splits[s] = split
        result = evaluate_detectors(m, bundle.train, bundle.val, bundle.test, ood_splits, names, tpr=tpr)
        out = {"model": model, "data": dname, "tpr": tpr, "detectors": result}
        if json_out:
            print_json(out)
        elif not quiet:
            cols = ["detector"] + [f"{s} {k}" for s in ood_splits for k in ("AUROC", "FPR95")]
            rows = [[det] + [r[s][k] for s in ood_splits for k in ("auroc", "fpr95")] for det, r in result.items()]
            print_table(f"OOD detection: {model} on {dname} (test) vs {', '.join(ood_splits)}", cols, rows)

    @app.command()
    @handle_errors
    def faults(
        model: str = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory."),
        data: str | None = typer.Option(
            None, help="Inputs drawn from this data set's test split (default: the model's)."),
        trials: int = typer.Option(1000, help="Number of faults (one input each)."),
        target: str = typer.Option("weights", help="weights or activations."),
        bits: str = typer.Option("all", help="all, sign, exponent, mantissa, magnitude, or positions like 30,29."),
        layers: str | None = typer.Option(None, help="Comma-separated tensor prefixes / module names (default all)."),
        protect: str = typer.Option("none", help="none, or range: also run with range restriction and compare."),
        seed: int = typer.Option(0, help="Seed of the fault draws."),
        trust_code: Path | None = TRUST_CODE_OPT,
        require_signature: bool = REQUIRE_SIGNATURE_OPT,
        key_env: str | None = KEY_ENV_OPT,
        json_out: bool = JSON_OPT,
        quiet: bool = QUIET_OPT,
    ) -> None:
        """Bit-flip campaign: silent-corruption rate (top-1 changes) with 95% intervals, by bit field and layer."""
        from slimguard.core.config import check_choice
        from slimguard.guard.faults import FaultCampaignConfig, run_campaign
        from slimguard.guard.protect import RangeRestriction

        set_output(json_out, quiet)
        check_choice("protect", protect, ("none", "range"))
        bit_spec: Any = bits
        if bits and bits[0].isdigit():
            try:
                bit_spec = [int(b) for b in bits.split(",")]
            except ValueError:
                raise typer.BadParameter(f"bits: {bits!r} is not a list of integers") from None
        cfg = FaultCampaignConfig(trials=trials, target=target, bits=bit_spec, layers=_split_list(layers) or [],
                                  seed=seed)
        policy = load_policy(trust_code, require_signature, key_env)
        m, bundle, dname = _model_and_data(model, data, json_out or quiet, policy)
        x = bundle.test.x
        runs = {"unprotected": run_campaign(m, x, cfg, progress=not (json_out or quiet)).to_dict()}
        if protect == "range":
            rr = RangeRestriction().profile(m, bundle.train.x).attach(m)
            try:
                runs["range_restriction"] = run_campaign(m, x, cfg, progress=not (json_out or quiet)).to_dict()
            finally:
                rr.detach()
        out = {"model": model, "data": dname, **runs}
        if json_out:
            print_json(out)
            return
        if quiet:
            return
        rows = [(name, r["trials"], r["sdc"], r["sdc_rate"], f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")
                for name, r in runs.items()]
        print_table(f"bit flips in {target} of {model} ({bits} bits)", ["run", "trials", "SDC", "rate", "95% CI"], rows)
        first = runs["unprotected"]
        print_table("by bit field (unprotected)", ["field", "trials", "SDC", "rate"],
                    [(k, v["trials"], v["sdc"], v["rate"]) for k, v in first["by_field"].items()])
        print_table("by layer (unprotected)", ["layer", "trials", "SDC", "rate"],
                    [(k, v["trials"], v["sdc"], v["rate"]) for k, v in first["by_layer"].items()])
