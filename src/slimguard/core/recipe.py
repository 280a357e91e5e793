"""Recipes: a YAML file naming the model, data, task, an accuracy budget and ordered steps.

    model: zoo:digits-lenet5
    data: digits32
    task: classification
    seed: 0
    budget:
      max_accuracy_drop: 1.0       # percentage points (classification)
    steps:
      - magnitude: {sparsity: 0.8}
      - finetune: {epochs: 3}
      - int8-dynamic: {}

Each step is a one-key mapping from a registered config name to its options. The whole recipe is
validated (keys, types, ranges, step names) before any work starts; errors name the step and key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from slimguard.core.config import Config, check_range, config_class
from slimguard.core.errors import ConfigError

TOP_KEYS = {"model", "data", "task", "seed", "budget", "steps", "name", "description"}
BUDGET_KEYS = {"max_accuracy_drop", "min_cosine_mean", "min_cosine_min", "max_perplexity_ratio"}
TASKS = ("classification", "embedding", "causal-lm")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB leaves room for comments


@dataclasses.dataclass
class Recipe:
    model: str
    data: str
    steps: list[Config]
    task: str = "classification"
    seed: int = 0
    budget: dict[str, float] = dataclasses.field(default_factory=dict)
    name: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "data": self.data, "task": self.task, "seed": self.seed,
                "budget": self.budget, "steps": [{s.config_name: s.to_dict()["_data"]} for s in self.steps]}


def parse(raw: Any, where: str = "recipe") -> Recipe:
    """Validate a recipe given as a parsed mapping; raise ConfigError naming the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys model, data, steps")
    unknown = sorted(set(raw) - TOP_KEYS, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("model", "data", "steps"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    for key in ("model", "data"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {raw[key]!r}")
    task = raw.get("task", "classification")
    if task not in TASKS:
        raise ConfigError(f"{where}.task: {task!r} is not allowed; allowed: {', '.join(TASKS)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError(f"{where}.budget: expected a mapping, got {budget!r}")
    for k, v in budget.items():
        if k not in BUDGET_KEYS:
            raise ConfigError(f"{where}.budget: unknown key {k!r}; allowed: {', '.join(sorted(BUDGET_KEYS))}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.budget.{k}: expected a number, got {v!r}")
        if k == "max_accuracy_drop":
            check_range(f"{where}.budget.{k}", v, 0.0, 100.0)
        elif k == "max_perplexity_ratio":
            check_range(f"{where}.budget.{k}", v, 1.0, 1e6)
        else:
            check_range(f"{where}.budget.{k}", v, -1.0, 1.0)
    steps_raw = raw["steps"]
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ConfigError(f"{where}.steps: expected a non-empty list of steps")
    steps: list[Config] = []
    for i, step in enumerate(steps_raw):
        at = f"{where}.steps[{i}]"
        if isinstance(step, str):
            step = {step: {}}
        if not isinstance(step, dict) or len(step) != 1:
            raise ConfigError(f"{at}: each step is a one-key mapping like {{magnitude: {{sparsity: 0.8}}}}")
        (name, options), = step.items()
        cls = _step_class(name, at)
        steps.append(cls.from_fields(options or {}, where=f"{at}.{name}"))
    return Recipe(model=raw["model"], data=raw["data"], steps=steps, task=task, seed=seed,
                  budget={k: float(v) for k, v in budget.items()}, name=str(raw.get("name", "")),
                  description=str(raw.get("description", "")))


def _step_class(name: str, at: str) -> type[Config]:
    try:
        return config_class(name)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: Any) -> None:
        super().__init__("anchor or alias")
        self.mark = mark


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors (``&name``) and aliases (``*name``): a few nested aliases
    in a kilobyte of YAML can expand to gigabytes, and no recipe or contract needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _AliasRefused(event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML text safely (plain data only, no anchors or aliases); raise a one-line ConfigError.

    Args:
        text: the YAML document.
        where: what to name in errors (a file name).
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: plain data only
    except _AliasRefused as exc:
        raise ConfigError(f"{where}: YAML anchors and aliases (&name, *name) are not allowed "
                          f"(line {exc.mark.line + 1}); write the values out") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}") from None
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        # PyYAML's scalar constructors (e.g. an explicit ``!!int`` tag on a non-number) raise these
        raise ConfigError(f"{where}: not valid YAML ({type(exc).__name__}: {str(exc)[:80]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; "
                          "recipes and contracts are a few levels deep") from None


def read_yaml_file(path: str | Path, what: str, max_bytes: int) -> Any:
    """Read and parse a small YAML file: it must exist, be at most ``max_bytes`` and be UTF-8 text.

    Raises:
        ConfigError: one line naming the file and the problem.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {path}; check the path")
    with open(p, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ConfigError(f"{path}: more than {max_bytes:,} bytes is too large for a {what} file; "
                          "check that this is the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); "
                          f"a {what} is a YAML text file") from None
    return load_yaml(text, str(path))


def loads(text: str, where: str = "recipe") -> Recipe:
    """Parse and validate a recipe given as YAML text."""
    return parse(load_yaml(text, where), where=where)


def builtin_recipe(name: str) -> Path | None:
    """The path of the recipe shipped with slimguard under ``name`` (``minilm-fast``), or None."""
    from importlib import resources

    if not name or not name.replace("-", "a").isalnum():
        return None
    found = resources.files("slimguard.recipes").joinpath(f"{name}.yaml")
    return Path(str(found)) if found.is_file() else None


def load(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file (UTF-8 YAML, at most :data:`MAX_RECIPE_BYTES`); a bare name
    that is not a file (``minilm-fast``) names a recipe shipped in ``slimguard/recipes/``."""
    if not Path(path).exists():
        path = builtin_recipe(str(path)) or path
    return parse(read_yaml_file(path, "recipe", MAX_RECIPE_BYTES), where=Path(path).name)
