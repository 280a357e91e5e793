"""``recipes``, ``steps``, and the one-step shortcuts ``prune`` and ``quantize``.

``slimguard prune MODEL --method channel --ratio 0.5 --data digits32 --out DIR`` is the recipe
``steps: [{channel: {ratio: 0.5}}, {finetune: {...}}]`` run by ``compress``: the same evaluation, artifact,
budget check and files. ``--option KEY=VALUE`` (repeatable) sets any other option of the step, as
``slimguard steps`` lists them.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
from pathlib import Path
from typing import Any

import typer

from slimguard.cli.common import DATA_OPT, MODEL_ARG, THREADS_OPT, Commands, Session, print_table
from slimguard.core.errors import ConfigError

commands = Commands()
register = commands.register  # the CLI calls register(app)

# which steps each shortcut offers: those whose config lives in that technique's package
FAMILIES = {"prune": ("slimguard.prune.",), "quantize": ("slimguard.quantize.",)}


def _step_names(family: str | None = None) -> list[str]:
    from slimguard.core.config import CONFIGS

    names = sorted(CONFIGS.names())
    if family is None:
        return names
    return [n for n in names if CONFIGS.get(n).__module__.startswith(FAMILIES[family])]


def _summary(cls: type) -> str:
    doc = pyinspect.getdoc(cls) or ""
    first = doc.strip().split("\n\n", 1)[0].replace("\n", " ")
    return "" if first.startswith("Args:") else first


def step_options(name: str) -> list[dict[str, Any]]:
    """The options of step ``name``: field name, type, default (nested configs shown by their name)."""
    from slimguard.core.config import config_class

    cls = config_class(name)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            default = type(value).__name__ if dataclasses.is_dataclass(value) else value
        else:
            default = "(required)"
        if isinstance(default, bool) or default is None:
            default = str(default).lower() if default is not None else "none"
        rows.append({"option": f.name, "type": str(f.type).replace("typing.", ""), "default": default})
    return rows


@commands.add(loads_models=False)
def steps(s: Session, name: str | None = typer.Argument(None, help="One step, to list its options.")) -> None:
    """List every recipe step (or one step's options): the names a recipe's ``steps:`` uses."""
    from slimguard.core.config import config_class

    if name is not None:
        rows = step_options(name)
        s.emit({"step": name, "summary": _summary(config_class(name)), "options": rows},
               lambda: print_table(f"step {name}: {_summary(config_class(name))}", ["option", "type", "default"],
                                   [(r["option"], r["type"], r["default"]) for r in rows]))
        return
    listing = [{"step": n, "summary": _summary(config_class(n)),
                "options": [r["option"] for r in step_options(n)]} for n in _step_names()]
    s.emit(listing, lambda: print_table("recipe steps (slimguard steps NAME lists one step's options)",
                                        ["step", "what", "options"],
                                        [(r["step"], r["summary"], ", ".join(r["options"])) for r in listing]))


def builtin_recipes() -> list[dict[str, Any]]:
    """The recipes shipped in ``slimguard/recipes/``: name, description, model, data, budget, steps."""
    from importlib import resources

    from slimguard.core.recipe import load_yaml

    out = []
    for entry in sorted(resources.files("slimguard.recipes").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        raw = load_yaml(entry.read_text(encoding="utf-8"), entry.name)
        out.append({"name": entry.name[: -len(".yaml")], "description": raw.get("description", ""),
                    "model": raw.get("model"), "data": raw.get("data"), "budget": raw.get("budget", {}),
                    "steps": [next(iter(step)) for step in raw.get("steps", []) if isinstance(step, dict)]})
    return out


@commands.add(loads_models=False)
def recipes(s: Session) -> None:
    """List the built-in recipes; run one with ``slimguard compress --recipe NAME --out DIR``."""
    rows = builtin_recipes()
    def first_sentence(text: str) -> str:
        head = text.split(". ", 1)[0].split(": ", 1)[0]
        return head if len(head) <= 80 else head[:77] + "..."

    def steps_line(names: list[str]) -> str:
        distinct = list(dict.fromkeys(names))
        return ", ".join(distinct) + (f" ({len(names)} steps)" if len(names) > len(distinct) else "")

    s.emit(rows, lambda: print_table("built-in recipes (slimguard compress --recipe NAME --out DIR)",
                                     ["name", "model", "data", "steps", "what"],
                                     [(r["name"], r["model"], r["data"], steps_line(r["steps"]),
                                       first_sentence(r["description"])) for r in rows]))


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["ratio=0.5", "importance=l1"]`` as ``{"ratio": 0.5, "importance": "l1"}`` (values read as YAML)."""
    from slimguard.core.recipe import load_yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE; write for example --option ratio=0.5")
        try:
            out[key.strip()] = load_yaml(value, f"--option {key.strip()}") if value.strip() else ""
        except ConfigError:
            out[key.strip()] = value  # not YAML: the text as it is
    return out


def shortcut_recipe(family: str, model: str, method: str, data: str | None, options: dict[str, Any], *,
                    finetune_epochs: int, budget: float | None, seed: int) -> Any:
    """The one-step recipe a ``prune`` / ``quantize`` shortcut runs (validated like any recipe)."""
    from slimguard.core.recipe import parse

    allowed = _step_names(family)
    if method not in allowed:
        raise ConfigError(f"--method {method!r} is not a {family} step; allowed: {', '.join(allowed)}")
    if data is None:
        raise ConfigError(f"{family} needs --data (the data the model is evaluated and calibrated on), e.g. "
                          "--data digits32 or --data npz:FILE")
    steps: list[dict[str, Any]] = [{method: options}]
    if finetune_epochs > 0:
        steps.append({"finetune": {"epochs": finetune_epochs}})
    raw: dict[str, Any] = {"name": f"{family}-{method}", "model": model, "data": data, "seed": seed, "steps": steps}
    if budget is not None:
        raw["budget"] = {"max_accuracy_drop": budget}
    return parse(raw, where=f"slimguard {family}")


def _run_shortcut(s: Session, family: str, *, model: str, method: str, data: str | None, option: list[str],
                  budget: float | None, out: Path, seed: int, threads: int, ratio: float | None = None,
                  finetune_epochs: int = 0) -> None:
    from slimguard.cli.core_commands import _compressed as report_compressed
    from slimguard.core.config import config_class
    from slimguard.pipeline import check_compress_output
    from slimguard.pipeline import compress as run

    options = parse_options(option)
    if ratio is not None:
        if method not in _step_names(family):
            raise ConfigError(f"--method {method!r} is not a {family} step; allowed: "
                              f"{', '.join(_step_names(family))}")
        fields = {f.name for f in dataclasses.fields(config_class(method))}
        key = next((k for k in ("ratio", "sparsity") if k in fields), None)
        if key is None:
            raise ConfigError(f"step {method!r} has no ratio or sparsity option; set its options with --option "
                              f"KEY=VALUE (slimguard steps {method} lists them)")
        options.setdefault(key, ratio)
    recipe = shortcut_recipe(family, model, method, data, options, finetune_epochs=finetune_epochs, budget=budget,
                             seed=seed)
    check_compress_output(out)
    result = run(recipe, out, progress=s.show, policy=s.policy, threads=threads or None,
                 model_options=s.model_options)
    report_compressed(s, result, f"{family} --method {method}: {model} on {data}")


def _param(name: str, annotation: Any, default: Any) -> pyinspect.Parameter:
    return pyinspect.Parameter(name, pyinspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def _shortcut(family: str, method: Any, doc: str, *extra: pyinspect.Parameter) -> None:
    """Add the command ``family`` (``prune``, ``quantize``): a one-step recipe through compress, with the
    options every shortcut has and ``extra`` ones of its own."""
    budget_help = "Largest accuracy drop allowed, in percentage points; a miss writes model.rejected.slim, exits 1."
    params = [
        pyinspect.Parameter("s", pyinspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Session),
        _param("model", str, MODEL_ARG), _param("method", str, method), *extra,
        _param("data", str | None, DATA_OPT),
        _param("option", list[str], typer.Option([], "--option", "-O",
                                                 help="KEY=VALUE for any option of the step (repeatable).")),
        _param("budget", float | None, typer.Option(None, "--budget", min=0.0, help=budget_help)),
        _param("out", Path, typer.Option(..., "--out", "-o",
                                         help="Output folder: model.slim, metrics.json and report.html are "
                                              "written in it.")),
        _param("seed", int, typer.Option(0, "--seed", help="Seed of the data split and of every step.")),
        _param("threads", int, THREADS_OPT),
    ]

    def shortcut(s: Session, **options: Any) -> None:
        _run_shortcut(s, family, **options)

    shortcut.__name__ = shortcut.__qualname__ = family
    shortcut.__doc__ = doc
    shortcut.__signature__ = pyinspect.Signature(params)  # type: ignore[attr-defined]  # what the CLI reads
    commands.add(user_models=True)(shortcut)


_shortcut("prune", typer.Option("channel", "--method", "-m", help="A pruning step (slimguard steps lists them)."),
          "Prune a model in one step (a one-step recipe run by compress), then fine-tune.",
          _param("ratio", float | None, typer.Option(None, "--ratio", min=0.0, max=1.0,
                                                     help="Fraction to remove: the step's ratio (channel) or "
                                                          "sparsity (magnitude, agp).")),
          _param("finetune_epochs", int, typer.Option(3, "--finetune-epochs", min=0,
                                                      help="Fine-tune after pruning (0: no).")))
_shortcut("quantize", typer.Option("int8-static", "--method", "-m", help="A quantization step (slimguard steps)."),
          "Quantize a model in one step (a one-step recipe run by compress); calibration uses the data's calib "
          "split.")

