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
BUDGET_KEYS = {"max_accuracy_drop", "min_cosine_mean", "min_cosine_min"}


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
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("model", "data", "steps"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    for key in ("model", "data"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {raw[key]!r}")
    task = raw.get("task", "classification")
    if task not in ("classification", "embedding"):
        raise ConfigError(f"{where}.task: {task!r} is not allowed; allowed: classification, embedding")
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


def load(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {path}; check the path")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse(raw, where=p.name)
