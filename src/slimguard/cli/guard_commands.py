"""``ood`` (OOD detectors: AUROC, FPR at 95% TPR) and ``faults`` (bit-flip campaigns, range restriction)."""

from __future__ import annotations

from typing import Any

import typer

from slimguard.cli.common import Commands, Session, print_table, resolve_data

commands = Commands()
register = commands.register  # the CLI calls register(app)

GUARD_MODEL_ARG = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory.")


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@commands.add()
def ood(
    s: Session,
    model: str = GUARD_MODEL_ARG,
    data: str | None = typer.Option(None, help="In-distribution data (default: the model's own)."),
    ood_sets: list[str] = typer.Option(None, "--ood", help="OOD data set(s); default DATA-ood and DATA-ood-near."),
    detectors: str | None = typer.Option(None, help="Comma-separated detectors (default all)."),
    tpr: float = typer.Option(0.95, help="In-distribution acceptance rate the threshold is set for."),
) -> None:
    """OOD detection: fit on train, calibrate on val, report AUROC and FPR at 95% TPR on test."""
    from slimguard import data as sgdata
    from slimguard.core.config import check_range
    from slimguard.evaluate import _check_fits
    from slimguard.guard.ood import detector_names, evaluate_detectors

    check_range("tpr", tpr, 0.0, 1.0, low_inclusive=False)
    names = _split_list(detectors)
    for n in names or []:
        if n not in detector_names():
            raise typer.BadParameter(f"unknown detector {n!r}; allowed: {', '.join(detector_names())}")
    m = s.load(model)
    bundle, dname = resolve_data(m, data)
    _check_fits(m, bundle.test)
    if not ood_sets:
        ood_sets = [x for x in (f"{dname}-ood", f"{dname}-ood-near") if x in sgdata.available()]
        if not ood_sets:
            raise typer.BadParameter(f"no built-in OOD set for {dname!r}; pass --ood DATA")
    ood_splits = {}
    for name in ood_sets:
        split = sgdata.load(name).test
        _check_fits(m, split)
        ood_splits[name] = split
    result = evaluate_detectors(m, bundle.train, bundle.val, bundle.test, ood_splits, names, tpr=tpr)

    def show() -> None:
        cols = ["detector"] + [f"{x} {k}" for x in ood_splits for k in ("AUROC", "FPR95")]
        rows = [[det] + [r[x][k] for x in ood_splits for k in ("auroc", "fpr95")] for det, r in result.items()]
        print_table(f"OOD detection: {model} on {dname} (test) vs {', '.join(ood_splits)}", cols, rows)

    s.emit({"model": model, "data": dname, "tpr": tpr, "detectors": result}, show)


@commands.add()
def faults(
    s: Session,
    model: str = GUARD_MODEL_ARG,
    data: str | None = typer.Option(
        None, help="Inputs drawn from this data set's test split (default: the model's)."),
    trials: int = typer.Option(1000, help="Number of faults (one input each)."),
    target: str = typer.Option("weights", help="weights or activations."),
    bits: str = typer.Option("all", help="all, sign, exponent, mantissa, magnitude, or positions like 30,29."),
    layers: str | None = typer.Option(None, help="Comma-separated tensor prefixes / module names (default all)."),
    protect: str = typer.Option("none", help="none, or range: also run with range restriction and compare."),
    seed: int = typer.Option(0, help="Seed of the fault draws."),
) -> None:
    """Bit-flip campaign: silent-corruption rate (top-1 changes) with 95% intervals, by bit field and layer."""
    from slimguard.core.config import check_choice
    from slimguard.guard.faults import FaultCampaignConfig, run_campaign
    from slimguard.guard.protect import RangeRestriction

    check_choice("protect", protect, ("none", "range"))
    bit_spec: Any = bits
    if bits and bits[0].isdigit():
        try:
            bit_spec = [int(b) for b in bits.split(",")]
        except ValueError:
            raise typer.BadParameter(f"bits: {bits!r} is not a list of integers") from None
    cfg = FaultCampaignConfig(trials=trials, target=target, bits=bit_spec, layers=_split_list(layers) or [],
                              seed=seed)
    m = s.load(model)
    bundle, dname = resolve_data(m, data)
    x = bundle.test.x
    runs = {"unprotected": run_campaign(m, x, cfg, progress=s.show).to_dict()}
    if protect == "range":
        rr = RangeRestriction().profile(m, bundle.train.x).attach(m)
        try:
            runs["range_restriction"] = run_campaign(m, x, cfg, progress=s.show).to_dict()
        finally:
            rr.detach()

    def show() -> None:
        rows = [(name, r["trials"], r["sdc"], r["sdc_rate"], f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")
                for name, r in runs.items()]
        print_table(f"bit flips in {target} of {model} ({bits} bits)", ["run", "trials", "SDC", "rate", "95% CI"],
                    rows)
        first = runs["unprotected"]
        for what, label in (("by_field", "bit field"), ("by_layer", "layer")):
            print_table(f"by {label} (unprotected)", [label.split()[-1], "trials", "SDC", "rate"],
                        [(k, v["trials"], v["sdc"], v["rate"]) for k, v in first[what].items()])

    s.emit({"model": model, "data": dname, **runs}, show)
