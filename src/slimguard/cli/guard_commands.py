"""Fault tolerance: ``ood`` (OOD detectors: AUROC, FPR at 95% TPR), ``faults`` (bit-flip campaigns, range
restriction) and ``robustness`` (the robustness scorecard, optionally beside the original model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import DATA_OPT, MODEL_ARG, Commands, Session, check_out_dir, print_table, resolve_data
from slimguard.core.errors import ConfigError

commands = Commands()
register = commands.register  # the CLI calls register(app)

GUARD_MODEL_ARG = typer.Argument(..., help="zoo:NAME, a .slim file, python:FILE.py:factory (with --weights).")


@commands.add(user_models=True)
def ood(
    s: Session,
    model: str = GUARD_MODEL_ARG,
    data: str | None = typer.Option(None, help="In-distribution data (default: the model's own)."),
    ood_sets: list[str] = typer.Option(None, "--ood", help="OOD data set(s); default DATA-ood and DATA-ood-near."),
    detectors: list[str] | None = typer.Option(None, "--detector",
                                               help="A detector to run; repeat for several (default: all)."),
    tpr: float = typer.Option(0.95, help="In-distribution acceptance rate the threshold is set for."),
) -> None:
    """OOD detection: fit on train, calibrate on val, report AUROC and FPR at 95% TPR on test."""
    from slimguard import data as sgdata
    from slimguard.core.config import check_range
    from slimguard.evaluate import _check_fits
    from slimguard.guard.ood import detector_names, evaluate_detectors

    check_range("tpr", tpr, 0.0, 1.0, low_inclusive=False)
    names = list(detectors) if detectors else None
    for n in names or []:
        if n not in detector_names():
            raise ConfigError(f"--detector: unknown detector {n!r}; allowed: {', '.join(detector_names())}")
    m = s.load(model)
    bundle, dname = resolve_data(m, data)
    _check_fits(m, bundle.test)
    if not ood_sets:
        ood_sets = [x for x in (f"{dname}-ood", f"{dname}-ood-near") if x in sgdata.available()]
        if not ood_sets:
            raise ConfigError(f"no built-in OOD set for {dname!r}; pass --ood DATA")
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


@commands.add(user_models=True)
def faults(
    s: Session,
    model: str = GUARD_MODEL_ARG,
    data: str | None = typer.Option(
        None, help="Inputs drawn from this data set's test split (default: the model's)."),
    trials: int = typer.Option(1000, help="Number of faults (one input each)."),
    target: str = typer.Option("weights", help="weights or activations."),
    bits: list[str] = typer.Option(["all"], "--bit", help="Bits flipped: all, sign, exponent, mantissa, magnitude, or "
                                                          "a bit position (e.g. 30); repeat for several positions."),
    layers: list[str] | None = typer.Option(None, "--layer", help="A tensor prefix or module name to flip bits "
                                                                  "in; repeat for several (default: all)."),
    protect: str = typer.Option("none", help="none, or range: also run with range restriction and compare."),
    seed: int = typer.Option(0, help="Seed of the fault draws."),
) -> None:
    """Bit-flip campaign: silent-corruption rate (top-1 changes) with 95% intervals, by bit field and layer."""
    from slimguard.core.config import check_choice
    from slimguard.guard.faults import FaultCampaignConfig, run_campaign
    from slimguard.guard.protect import RangeRestriction

    check_choice("protect", protect, ("none", "range"))
    bit_spec: Any = bits[0] if len(bits) == 1 and not bits[0].lstrip("-").isdigit() else None
    if bit_spec is None:  # bit positions
        try:
            bit_spec = [int(b) for b in bits]
        except ValueError:
            raise ConfigError(f"--bit: {' '.join(bits)!r} mixes names and positions; give one name (all, sign, "
                              "exponent, mantissa, magnitude) or one --bit per position, e.g. --bit 30 --bit 29"
                              ) from None
    cfg = FaultCampaignConfig(trials=trials, target=target, bits=bit_spec, layers=list(layers or []), seed=seed)
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
        print_table(f"bit flips in {target} of {model} ({', '.join(bits)} bits)",
                    ["run", "trials", "SDC", "rate", "95% CI"], rows)
        first = runs["unprotected"]
        for what, label in (("by_field", "bit field"), ("by_layer", "layer")):
            print_table(f"by {label} (unprotected)", [label.split()[-1], "trials", "SDC", "rate"],
                        [(k, v["trials"], v["sdc"], v["rate"]) for k, v in first[what].items()])

    s.emit({"model": model, "data": dname, **runs}, show)


@commands.add(user_models=True)
def robustness(
    s: Session,
    model: str = MODEL_ARG,
    against: str | None = typer.Option(None, help="The original model to compare with (same sources)."),
    data: str | None = DATA_OPT,
    eps: list[float] = typer.Option([0.03, 0.1, 0.2], "--eps",
                                    help="An attack strength, as a fraction of the input range; repeat for a grid."),
    attacks: list[str] = typer.Option(["fgsm", "pgd", "apgd"], "--attack",
                                      help="An attack run over the eps grid: fgsm, pgd or apgd; repeat for several."),
    corruptions: list[str] | None = typer.Option(None, "--corruption", help="A corruption to apply; repeat for "
                                                                            "several (default: all for the data's "
                                                                            "kind)."),
    max_examples: int = typer.Option(500, min=0, help="Test examples attacked (seeded subset; 0 = all)."),
    pgd_steps: int = typer.Option(10, help="PGD iterations."),
    apgd_steps: int = typer.Option(20, help="APGD iterations."),
    seed: int = typer.Option(0, help="Seed of subsets, random starts and corruptions."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the scorecard to this folder, as "
                                                             "scorecard.json."),
) -> None:
    """Clean accuracy, accuracy under FGSM/PGD/APGD over an eps grid, and under corruptions by severity.

    Quantized models are attacked through their fake-quant twin; both numbers are shown.
    """
    from slimguard.robust.scorecard import scorecard

    check_out_dir(out, "scorecard.json")  # before any work
    m = s.load(model)
    ref = s.load(against, main_model=False) if against else None
    bundle, name = resolve_data(m, data)
    card = scorecard(m, bundle, against=ref, attacks=list(attacks), eps=list(eps),
                     corruptions=list(corruptions) if corruptions else None, attack_examples=max_examples,
                     pgd_steps=pgd_steps, apgd_steps=apgd_steps, seed=seed, progress=s.show)
    result = card.to_dict()
    result["settings"].update({"model": model, "against": against})
    written = None if out is None else card.save(out / "scorecard.json")

    def show() -> None:
        title = f"robustness of {model}" + (f" vs {against}" if against else "") + f" on {name} (test split)"
        print_table(title, card.columns(), card.rows())
        st = card.settings
        typer.echo(f"seed {st['seed']}; {st.get('attack_examples', '-')} examples attacked; eps as fractions "
                   "of the input range")

    s.emit(result, show)
    if written is not None:
        s.wrote(written)
