"""Warm start: the study's first trials are the shipped recipes, translated into the space's parameters.

A search that starts from random pipelines may spend its whole trial budget without drawing what a shipped
recipe already knows works (for example 50% channel pruning with 12 epochs of fine-tuning). So when a study is
created, every recipe shipped in ``slimguard/recipes/`` for the data's task is translated into the values of
the space's parameters and queued with Optuna's ``enqueue_trial``: those trials run first, and the sampler
(TPE or NSGA-II) then explores around them, e.g. adding weight sharing or quantization after them.

A recipe is *expressible* when the space can rebuild its steps exactly:

- at most one step per stage, in stage order (``structured > sparsify > factorize > train > quantize``),
  each a step its stage allows, and every stage it leaves out allows ``none``;
- every option the space searches has a value the space can draw (inside the range, or among the choices),
  and every option the space fixes has the recipe's value;
- options the space neither searches nor fixes (``channel.round_to``, ``finetune.weight_decay``) are carried
  by that trial alone (its ``warm_start_options`` user attribute), so the trial runs the recipe exactly; the
  sampler's own trials keep the defaults.

The translation is checked by rebuilding the steps (:meth:`SearchSpace.steps`) and comparing them with the
recipe's. Recipes that fail any test are *skipped* with the reason, and so are the expressible ones beyond
``--trials`` (queued trials count against it). The plan is stored in the study (``warm_start`` user
attribute) when the study is created, so a resumed study, or a second worker, never queues them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from slimguard.core.config import Config
from slimguard.search.space import NONE, STAGES, Param, Proxies, SearchSpace

ATTR = "warm_start"
"""The study's user attribute holding the plan: ``{"enabled", "enqueued": [...], "skipped": [...]}``."""
TRIAL_RECIPE = "warm_start"
"""A queued trial's user attribute: the name of the recipe it runs."""
TRIAL_OPTIONS = "warm_start_options"
"""A queued trial's user attribute: ``{step: {option: value}}`` the space does not search (carried as is)."""


class NotExpressible(Exception):
    """A recipe the space cannot rebuild exactly; the message says why (shown to the user as the skip reason)."""


@dataclasses.dataclass(frozen=True)
class Seed:
    """One recipe as a trial: the Optuna parameters and the options carried for that trial alone."""

    recipe: str
    params: dict[str, Any]
    options: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "params": dict(self.params), "options": dict(self.options)}


def shipped_recipes() -> list[tuple[str, Any]]:
    """``(name, Recipe)`` for every recipe shipped in ``slimguard/recipes/``, sorted by name."""
    from importlib import resources

    from slimguard.core.recipe import load

    out = []
    for entry in sorted(resources.files("slimguard.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml") and entry.is_file():
            out.append((entry.name.removesuffix(".yaml"), load(str(entry))))
    return out


def _value_at(config: Config, path: str) -> Any:
    value: Any = config
    for key in path.split("."):
        value = getattr(value, key)
    return value


def _draws(param: Param, value: Any) -> bool:
    """Whether the space can give ``param`` the value ``value``."""
    if param.is_fixed:
        return _same(value, param.fixed)
    if param.choices:
        return any(_same(value, c) for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    assert param.low is not None and param.high is not None
    if param.integer and value != int(value):
        return False
    return param.low <= value <= param.high


def _same(a: Any, b: Any) -> bool:
    """Equal, with booleans never equal to numbers (``True`` is not ``1`` here)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _data(config: Config) -> dict[str, Any]:
    data: dict[str, Any] = config.to_dict()["_data"]
    return data


def translate(name: str, steps: list[Config], space: SearchSpace, proxies: Proxies) -> Seed:
    """The trial that runs ``steps`` in ``space`` exactly.

    Raises:
        NotExpressible: a step no stage allows, two steps for one stage or out of order, a stage left out that
            cannot be skipped, a searched option outside the space, or a fixed option with another value.
    """
    stage_index = {stage.name: i for i, stage in enumerate(STAGES)}
    chosen: dict[str, Config] = {}
    last = -1
    for config in steps:
        step = config.config_name
        where = next((s for s, allowed in space.stages.items() if step in allowed), None)
        if where is None:
            raise NotExpressible(f"its step {step!r} is not in the search space")
        if where in chosen:
            raise NotExpressible(f"it has two {where} steps ({chosen[where].config_name}, {step}); the space "
                                 "holds one step per stage")
        if stage_index[where] < last:
            raise NotExpressible(f"its step {step!r} comes after a later stage; the space's order is "
                                 + " > ".join(s.name for s in STAGES))
        last = stage_index[where]
        chosen[where] = config
    params: dict[str, Any] = {}
    for stage in STAGES:
        allowed = space.stages.get(stage.name, (NONE,))
        step = chosen[stage.name].config_name if stage.name in chosen else NONE
        if step not in allowed:
            raise NotExpressible(f"the space's {stage.name} stage must hold one of {', '.join(allowed)}")
        if len(allowed) > 1:
            params[stage.name] = step
        if step == NONE:
            continue
        config = chosen[stage.name]
        for path, param in space.params.get(step, {}).items():
            value = _value_at(config, path)
            if not _draws(param, value):
                where = (f"fixed at {param.fixed!r}" if param.is_fixed else
                         f"among {list(param.choices)}" if param.choices else f"in [{param.low}, {param.high}]")
                raise NotExpressible(f"its {param.name} is {value!r}; the space draws it {where}")
            if not param.is_fixed:
                params[param.name] = value
        if space.groups:
            for group_param in space.group_params(step, proxies):
                params[group_param] = False  # the recipe's own ratios / ignore lists are carried below
    plain = space.steps(params, proxies)
    options: dict[str, dict[str, Any]] = {}
    for built, config in zip(plain, steps, strict=True):
        have, want = _data(built), _data(config)
        changed = {key: want[key] for key in want if have.get(key) != want[key]}
        if changed:
            options[config.config_name] = changed
    rebuilt = space.steps(params, proxies, options)
    if [_data(c) for c in rebuilt] != [_data(c) for c in steps]:
        raise NotExpressible("its steps cannot be rebuilt exactly from the space's parameters")
    return Seed(name, params, options)


def plan(space: SearchSpace, proxies: Proxies, *, task: str, trials: int,
         recipes: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Which recipes to queue and which to skip (with the reason), in recipe-name order.

    Args:
        space, proxies: the study's space and cheap proxies (the per-group choices depend on them).
        task: the data's task; recipes for another task are skipped.
        trials: the study's trial count; expressible recipes beyond it are skipped.
        recipes: ``(name, Recipe)`` pairs (default: :func:`shipped_recipes`).
    """
    enqueued: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for name, recipe in shipped_recipes() if recipes is None else recipes:
        if recipe.task != task:
            skipped.append({"recipe": name, "why": f"its task is {recipe.task}, the search's is {task}"})
            continue
        try:
            seed = translate(name, list(recipe.steps), space, proxies)
        except NotExpressible as exc:
            skipped.append({"recipe": name, "why": str(exc)})
            continue
        if len(enqueued) >= trials:
            skipped.append({"recipe": name, "why": f"--trials {trials} leaves no room for it"})
            continue
        enqueued.append(seed.to_dict())
    return {"enabled": True, "enqueued": enqueued, "skipped": skipped}


def warm_start(study: Any, space: SearchSpace, proxies: Proxies, *, task: str, trials: int, enabled: bool
               ) -> dict[str, Any] | None:
    """Queue the plan's trials in a new study and store the plan; ``None`` when the study already had one
    (resumed, or another worker made it) or already holds trials (made before warm starts existed)."""
    if ATTR in study.user_attrs or study.get_trials(deepcopy=False):
        return None
    made: dict[str, Any] = (plan(space, proxies, task=task, trials=trials) if enabled
            else {"enabled": False, "enqueued": [], "skipped": []})
    for seed in made["enqueued"]:
        study.enqueue_trial(seed["params"], user_attrs={TRIAL_RECIPE: seed["recipe"], TRIAL_OPTIONS: seed["options"]},
                            skip_if_exists=True)
    study.set_user_attr(ATTR, made)
    return made


def stored(study: Any) -> dict[str, Any]:
    """The study's plan (what ``pareto.json`` reports as ``warm_start``)."""
    made: Mapping[str, Any] | None = study.user_attrs.get(ATTR)
    return dict(made) if made is not None else {"enabled": False, "enqueued": [], "skipped": []}


def describe(made: Mapping[str, Any]) -> list[str]:
    """Lines for the progress output: what was queued and what was skipped, and why."""
    if not made.get("enabled"):
        return ["warm start: off (--no-warm-start)"]
    lines = [f"warm start: {len(made['enqueued'])} shipped recipe(s) queued as the first trials: "
             + (", ".join(s["recipe"] for s in made["enqueued"]) or "none")]
    lines += [f"warm start: skipped {s['recipe']}: {s['why']}" for s in made["skipped"]]
    return lines
