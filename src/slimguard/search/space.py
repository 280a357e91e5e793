"""The search space of ``slimguard optimize``, built from the registered steps' configs.

A candidate is a pipeline of at most one step per *stage*, in an order that makes sense: remove structure
first, then single weights, factorize, recover accuracy by training, and store in fewer bits last
(:data:`STAGES`). A stage may hold any registered step (:data:`slimguard.core.config.CONFIGS`) whose
handler's verb is one of the stage's verbs; ``none`` skips the stage. A step's options are searched where
the space gives them a range or choices; every other option keeps its config's default. Values are
checked by building the config itself, so a range the step would refuse is a one-line ``ConfigError``
before any trial runs.

The space is written as a ``search:`` block of YAML; :data:`DEFAULT_SEARCH` is the one used when the user
gives none, and a user's block overrides it stage by stage and option by option::

    search:
      structured: [none, channel]        # which registered steps each stage may use; "none" skips it
      sparsify: [none]
      factorize: [none]
      train: [finetune, distill]         # distill: the original model is the teacher
      quantize: [int8-dynamic, weight-only, half]
      params:                            # STEP.OPTION (nested: STEP.finetune.epochs)
        channel.ratio: [0.2, 0.6]        # [low, high]: a number in that range (integers stay integers)
        weight-only.bits: {choices: [4, 8]}
        int8-static.calibration: all     # every value a Literal or boolean option allows
        half.dtype: fp16                 # a plain value: fixed, not searched
      groups: true                       # per layer group: channel ratios shaped by sensitivity, and
                                         # quantization that may keep the first and last layers in float

With ``groups``, two more choices appear: ``channel.per_group`` (instead of one ratio everywhere, the ratio of
each layer group is ``channel.group_scale`` times the ratio that group tolerates alone within the budget, from
:func:`slimguard.prune.sensitivity.sensitivity` on validation data; groups that tolerate none keep their
channels) and ``<quantize step>.keep_ends`` (the
first and last weight layers stay in float, through the step's ``ignore`` option).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from slimguard.core.config import Config, config_class
from slimguard.core.errors import ConfigError
from slimguard.core.registry import verb_of

NONE = "none"
"""The choice that skips a stage."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One place in the pipeline: its name in the ``search:`` block and the verbs its steps may have."""

    name: str
    verbs: tuple[str, ...]
    purpose: str


STAGES: tuple[Stage, ...] = (
    Stage("structured", ("prune",), "remove channels or blocks (smaller and faster)"),
    Stage("sparsify", ("prune",), "zero single weights (smaller once stored sparse)"),
    Stage("factorize", ("factorize",), "low-rank factorization of weight layers"),
    Stage("train", ("train", "distill"), "recover accuracy: fine-tune, or distill from the original model"),
    Stage("quantize", ("quantize", "cluster"), "store weights in fewer bits (int8, 4-bit, fp16, shared)"),
)
"""The stages, in pipeline order. Only ``train`` recovers accuracy; the budget can be judged after it."""

RECOVERING_STAGES = ("train",)

EPOCH_CHOICES = (1, 3, 6, 12)
"""Fine-tuning lengths searched by default, up to the shipped pruning recipes' 12 epochs. A few lengths
rather than every integer, so the sampler learns from few trials which length pays; a long run that cannot
reach the budget is stopped after a few epochs (see :mod:`slimguard.search.study`)."""

DEFAULT_SEARCH: dict[str, Any] = {
    "structured": [NONE, "channel"],
    "sparsify": [NONE, "magnitude"],
    "factorize": [NONE, "lowrank"],
    "train": [NONE, "finetune", "distill"],
    "quantize": [NONE, "int8-static", "int8-dynamic", "weight-only", "half", "weight-sharing"],
    "params": {
        "channel.ratio": [0.1, 0.6],
        "magnitude.sparsity": [0.3, 0.95],
        "lowrank.energy": [0.8, 0.99],
        "finetune.epochs": {"choices": list(EPOCH_CHOICES)},
        "distill.finetune.epochs": {"choices": list(EPOCH_CHOICES)},
        "weight-only.bits": {"choices": [4, 8]},
        "weight-only.conv": True,
        "weight-sharing.bits": [3, 6],
        "half.dtype": "fp16",
    },
    "groups": True,
}
"""The space searched when the user gives no ``search:`` block (and what a partial block is merged over)."""

SEARCH_KEYS = {*(s.name for s in STAGES), "params", "groups"}
GROUP_SCALE = (0.5, 1.5)
"""Range of ``channel.group_scale``: per-group ratios are this times the ratio each group tolerates alone."""
MAX_GROUP_RATIO = 0.9
Value = None | bool | int | float | str


@dataclasses.dataclass(frozen=True)
class Param:
    """How one option is searched: a range (``low``/``high``), ``choices``, or a ``fixed`` value."""

    name: str                       # "channel.ratio", "distill.finetune.epochs"
    low: float | None = None
    high: float | None = None
    integer: bool = False
    choices: tuple[Value, ...] = ()
    fixed: Any = None
    is_fixed: bool = False

    def suggest(self, trial: Any) -> Any:
        """The value for this trial (an Optuna ``Trial``), or the fixed value."""
        if self.is_fixed:
            return copy.deepcopy(self.fixed)
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, float(self.low), float(self.high))


@dataclasses.dataclass(frozen=True)
class Proxies:
    """What the cheap proxies found before the search: the ratio each channel group tolerates alone within
    the budget (sensitivity on validation data), and the first and last weight layers."""

    tolerated: dict[str, float] = dataclasses.field(default_factory=dict)
    ends: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"tolerated": dict(self.tolerated), "ends": list(self.ends)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Proxies:
        return cls({str(k): float(v) for k, v in dict(d.get("tolerated", {})).items()},
                   tuple(str(n) for n in d.get("ends", ())))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Stages with their allowed steps, and how each step's options are searched.

    Build one with :func:`build_space` (which validates everything); :meth:`suggest` draws a pipeline for
    an Optuna trial, :meth:`steps` turns a trial's parameters back into configs (so a finished trial, a
    Pareto point or ``best.yaml`` are rebuilt from the same values).
    """

    stages: dict[str, tuple[str, ...]]
    params: dict[str, dict[str, Param]]       # step -> option path -> Param
    groups: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The space as a ``search:`` block (stored with the study, so a resumed study can be checked)."""
        out: dict[str, Any] = {name: list(choices) for name, choices in self.stages.items()}
        flat: dict[str, Any] = {}
        for step in sorted(self.params):
            for p in self.params[step].values():
                flat[p.name] = (p.fixed if p.is_fixed else {"choices": list(p.choices)} if p.choices
                                else [p.low, p.high])
        out["params"] = flat
        out["groups"] = self.groups
        return out

    def suggest(self, trial: Any, proxies: Proxies, options: Mapping[str, Mapping[str, Any]] | None = None
                ) -> list[Config]:
        """Draw one pipeline for ``trial``: a step (or none) per stage, then that step's searched options
        (``options``: see :meth:`steps`)."""
        for stage in STAGES:
            choices = self.stages.get(stage.name, (NONE,))
            step = choices[0] if len(choices) == 1 else trial.suggest_categorical(stage.name, list(choices))
            if step == NONE:
                continue
            for param in self.params.get(step, {}).values():
                param.suggest(trial)
            if self.groups:
                for name, choices_ in self.group_params(step, proxies).items():
                    trial.suggest_categorical(name, choices_)
                if step == "channel" and proxies.tolerated and trial.params.get("channel.per_group"):
                    trial.suggest_float("channel.group_scale", *GROUP_SCALE)
        return self.steps({**trial.params}, proxies, options)

    def group_params(self, step: str, proxies: Proxies) -> dict[str, list[Any]]:
        """The per-group choices ``step`` adds when ``groups`` is on (``channel.per_group``,
        ``<quantize step>.keep_ends``), with their values."""
        out: dict[str, list[Any]] = {}
        if step == "channel" and proxies.tolerated:
            out["channel.per_group"] = [False, True]
        fields = {f.name for f in dataclasses.fields(config_class(step))}
        if verb_of_step(step) in ("quantize", "cluster") and "ignore" in fields and proxies.ends:
            out[f"{step}.keep_ends"] = [False, True]
        return out

    def steps(self, values: Mapping[str, Any], proxies: Proxies,
              options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Config]:
        """The pipeline a trial's parameters name, as configs in stage order.

        Args:
            values: Optuna parameters (``{"structured": "channel", "channel.ratio": 0.4, ...}``); options
                not among them take the space's fixed value or the config's default.
            proxies: the per-group tolerated ratios and end layers the group choices refer to.
            options: ``{step: {option: value}}`` set last, over the searched and default values: the options a
                warm-start trial carries so that it runs a shipped recipe exactly
                (:mod:`slimguard.search.warmstart`).
        """
        out: list[Config] = []
        for stage in STAGES:
            choices = self.stages.get(stage.name, (NONE,))
            step = values.get(stage.name, choices[0])
            if step == NONE:
                continue
            step_options: dict[str, Any] = {}
            for path, param in self.params.get(step, {}).items():
                value = param.fixed if param.is_fixed else values.get(param.name)
                if value is not None or param.is_fixed:
                    _set_path(step_options, path, copy.deepcopy(value))
            if step == "channel" and values.get("channel.per_group") and proxies.tolerated:
                scale = float(values.get("channel.group_scale", 1.0))
                step_options["ratio"] = 0.0  # groups that tolerate no pruning alone keep every channel
                step_options["ratios"] = {name: round(min(MAX_GROUP_RATIO, scale * r), 4)
                                          for name, r in sorted(proxies.tolerated.items())}
            if values.get(f"{step}.keep_ends") and proxies.ends:
                step_options["ignore"] = sorted({*step_options.get("ignore", []), *proxies.ends})
            step_options.update(copy.deepcopy(dict((options or {}).get(step, {}))))
            out.append(config_class(step).from_fields(step_options, where=f"search: {step}"))
        return out


def verb_of_step(step: str) -> str:
    """The verb of a registered step name (``channel`` -> ``prune``)."""
    cls = config_class(step)
    return verb_of(_example(cls))


def _example(cls: type[Config]) -> Config:
    """An instance of ``cls`` with default options, or a bare one for configs whose options have no defaults
    (only its type matters to the handler table)."""
    try:
        return cls()
    except (ConfigError, TypeError):
        return cls.__new__(cls)


def stage_steps(stage: Stage) -> list[str]:
    """Every registered step a stage may hold (its handler's verb is one of the stage's verbs)."""
    from slimguard.core.config import CONFIGS

    return sorted(name for name in CONFIGS.names() if verb_of_step(name) in stage.verbs)


def _set_path(options: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        options = options.setdefault(key, {})
    options[keys[-1]] = value


def _field_type(cls: type[Config], path: Sequence[str], where: str) -> Any:
    """The annotation of ``cls``'s option at ``path`` (nested configs followed); ConfigError naming the
    allowed options when there is no such option."""
    tp: Any = cls
    for i, key in enumerate(path):
        if not (isinstance(tp, type) and issubclass(tp, Config)):
            raise ConfigError(f"{where}: {'.'.join(path[:i])} is not a nested config; remove {'.'.join(path[i:])}")
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        if key not in names:
            raise ConfigError(f"{where}: {tp.config_name or tp.__name__} has no option {key!r}; "
                              f"allowed: {', '.join(sorted(names))}")
        tp = typing.get_type_hints(tp)[key]
    return tp


def _all_values(tp: Any, where: str) -> tuple[Value, ...]:
    if tp is bool:
        return (False, True)
    if typing.get_origin(tp) is typing.Literal:
        return tuple(typing.get_args(tp))
    raise ConfigError(f"{where}: 'all' needs a Literal or boolean option; give [low, high] or {{choices: [...]}}")


def _param(step: str, path: str, raw: Any) -> Param:
    """Parse one ``params`` entry and check every value it can take by building the step's config."""
    where = f"search.params.{step}.{path}"
    cls = config_class(step)
    tp = _field_type(cls, path.split("."), where)
    name = f"{step}.{path}"
    if isinstance(raw, str) and raw == "all":
        param = Param(name, choices=_all_values(tp, where))
    elif isinstance(raw, dict):
        if set(raw) != {"choices"} or not isinstance(raw["choices"], list) or not raw["choices"]:
            raise ConfigError(f"{where}: expected {{choices: [v1, v2, ...]}} with at least one value")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in raw["choices"]):
            raise ConfigError(f"{where}: choices must be plain numbers, strings or booleans")
        param = Param(name, choices=tuple(raw["choices"]))
    elif isinstance(raw, list):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        if len(raw) != 2 or not numbers or raw[0] > raw[1]:
            raise ConfigError(f"{where}: a range is [low, high] with low <= high; for a list of values write "
                              f"{{choices: {raw!r}}}")
        integer = tp is int
        if integer and not all(isinstance(v, int) for v in raw):
            raise ConfigError(f"{where}: {step}.{path} is an integer option; give an integer range")
        if tp not in (int, float):
            raise ConfigError(f"{where}: {step}.{path} is not a number; give {{choices: [...]}} or a value")
        param = Param(name, low=raw[0], high=raw[1], integer=integer)
    else:
        param = Param(name, fixed=raw, is_fixed=True)
    values: list[Any] = ([param.fixed] if param.is_fixed else list(param.choices) if param.choices
                         else [param.low, param.high])
    for value in values:  # every value the search can take must make a valid step
        options: dict[str, Any] = {}
        _set_path(options, path, value)
        cls.from_fields(options, where=f"search: {step}")
    return param


def build_space(search: Mapping[str, Any] | None = None) -> SearchSpace:
    """Validate a ``search:`` block and merge it over :data:`DEFAULT_SEARCH`.

    Args:
        search: the block's mapping (``None`` or empty: the default space). Stages it names replace the
            default lists; ``params`` entries replace the default entry of the same option (a step's other
            defaults stay); ``groups`` switches the per-group choices.

    Raises:
        ConfigError: an unknown stage or key, a step that is not registered or does not belong to the stage,
            a step in two stages, or an option or value the step's config refuses.
    """
    search = dict(search or {})
    unknown = sorted(set(search) - SEARCH_KEYS, key=str)
    if unknown:
        raise ConfigError(f"search: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SEARCH_KEYS))}")
    stages: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for stage in STAGES:
        raw = search.get(stage.name, DEFAULT_SEARCH[stage.name])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw or not all(isinstance(v, str) for v in raw):
            raise ConfigError(f"search.{stage.name}: expected a list of step names (or none), got {raw!r}")
        for step in raw:
            if step == NONE:
                continue
            config_class(step)  # unknown step: ConfigError naming the registered ones
            if verb_of_step(step) not in stage.verbs:
                raise ConfigError(f"search.{stage.name}: {step!r} is not a {'/'.join(stage.verbs)} step; "
                                  f"allowed: {NONE}, {', '.join(stage_steps(stage))}")
            if step in seen and seen[step] != stage.name:
                raise ConfigError(f"search.{stage.name}: {step!r} is already in stage {seen[step]!r}; "
                                  "a step may appear in one stage only")
            seen[step] = stage.name
        stages[stage.name] = tuple(dict.fromkeys(raw))
    user_params = search.get("params") or {}
    if not isinstance(user_params, dict):
        raise ConfigError(f"search.params: expected a mapping of STEP.OPTION: range, got {user_params!r}")
    merged = {**DEFAULT_SEARCH["params"], **user_params}
    params: dict[str, dict[str, Param]] = {}
    for key, raw in merged.items():
        step, dot, path = str(key).partition(".")
        if not dot or not path:
            raise ConfigError(f"search.params: {key!r} is not STEP.OPTION (for example channel.ratio)")
        if step not in seen:
            if key in user_params:
                raise ConfigError(f"search.params: {key!r} names step {step!r}, which no stage uses; "
                                  f"add it to a stage or remove the entry")
            continue
        params.setdefault(step, {})[path] = _param(step, path, raw)
    groups = search.get("groups", DEFAULT_SEARCH["groups"])
    if not isinstance(groups, bool):
        raise ConfigError(f"search.groups: expected true or false, got {groups!r}")
    return SearchSpace(stages=stages, params=params, groups=groups)


def read_search_file(path: str) -> dict[str, Any]:
    """The ``search:`` block of a YAML file (read safely, at most 1 MiB); ConfigError when it has none."""
    from slimguard.core.recipe import MAX_RECIPE_BYTES, read_yaml_file

    raw = read_yaml_file(path, "search space", MAX_RECIPE_BYTES)
    if not isinstance(raw, dict) or not isinstance(raw.get("search"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'search:' block; see `slimguard optimize --help`")
    block: dict[str, Any] = raw["search"]
    return block
