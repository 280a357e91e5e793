"""Config base: validated dataclasses, serialisable without pickle.

Each technique is a ``@dataclass`` deriving from :class:`Config`. Subclasses check their own fields in
``validate()`` (called from ``__post_init__``) and raise :class:`~slimguard.core.errors.ConfigError`
naming the field, the value and what is allowed. Configs round-trip through plain dicts
(``{"_type": name, "_version": 1, "_data": {...}}``); only registered classes can be rebuilt, so a
recipe or manifest can never name arbitrary code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

from slimguard.core.errors import ConfigError
from slimguard.core.registry import Registry

C = TypeVar("C", bound="Config")

CONFIGS: Registry[type[Config]] = Registry("step")
"""Config name -> class, for recipes and manifests (filled by the techniques' modules as they import)."""


def register_config(name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: make a config class known under ``name`` (used by recipes and manifests).

    Registering a second class under the same name is refused (ValueError).
    """

    def deco(cls: type[C]) -> type[C]:
        CONFIGS.register(name, cls)
        cls.config_name = name
        return cls

    return deco


def config_class(name: str) -> type[Config]:
    """The config class registered under ``name``; ConfigError naming the registered steps otherwise."""
    return CONFIGS.get(name)


@dataclasses.dataclass
class Config:
    """Base of every technique config. Subclasses are dataclasses and override :meth:`validate`."""

    config_name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field values; raise ConfigError naming the field and what is allowed."""

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            data[f.name] = _to_plain(getattr(self, f.name))
        return {"_type": self.config_name or type(self).__name__, "_version": self.version, "_data": data}

    @classmethod
    def from_dict(cls: type[C], payload: dict[str, Any]) -> C:
        """Rebuild from :meth:`to_dict`'s form (the class its ``_type`` names, which must be a ``cls``), or
        from plain fields of ``cls``."""
        if "_type" in payload:
            built = config_class(payload["_type"]).from_fields(payload.get("_data", {}), where=payload["_type"])
            if not isinstance(built, cls):
                raise ConfigError(f"{payload['_type']}: expected a {cls.__name__}, got a {type(built).__name__}")
            return built
        return cls.from_fields(payload, where=cls.config_name or cls.__name__)

    @classmethod
    def from_fields(cls: type[C], fields: dict[str, Any], where: str = "") -> C:
        """Build from a plain mapping, checking keys and types; errors name ``where.key``."""
        where = where or cls.config_name or cls.__name__
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: expected a mapping of options, got {type(fields).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known)) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in fields.items():
            values[key] = _coerce(value, hints.get(key, Any), f"{where}.{key}")
        try:
            return cls(**values)
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def build(cls: type[C], config: C | None = None, options: dict[str, Any] | None = None,
              where: str = "") -> C:
        """The config an object was given: ``config`` itself, or one built from keyword ``options``.

        Classes that take a config also take its options as keywords through this one door, so options
        are checked in one place: ``PGD(eps=0.1)`` is ``PGD(PGDConfig(eps=0.1))``, and an unknown keyword
        is named with the allowed ones (see :meth:`from_fields`). Giving both, or another class's config,
        is refused.
        """
        where = where or cls.config_name or cls.__name__
        if config is None:
            return cls.from_fields(dict(options or {}), where=where)
        if options:
            raise ConfigError(f"{where}: give a {cls.__name__} or keyword options ({', '.join(options)}), "
                              "not both")
        if not isinstance(config, cls):
            raise ConfigError(f"{where}: expected a {cls.__name__}, got {type(config).__name__}")
        return config


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert list->tuple and int->float where safe."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
    if origin in (list, tuple, Sequence, Iterable) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict) and "_type" in value:  # a stored config: it must be one of this kind
            if not issubclass(config_class(value["_type"]), tp):
                raise ConfigError(f"{key}: expected a {tp.__name__}, got a stored {value['_type']!r} config")
            return tp.from_dict(value)
        if isinstance(value, dict):
            return tp.from_fields(value, where=key)
        raise ConfigError(f"{key}: expected a mapping of {tp.__name__} options, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


# ---- small checks used by validate() -------------------------------------------------------------
def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (bounds optional, inclusivity chosen)."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
        hi = "" if high is None else f"{high}" + ("]" if high_inclusive else ")")
        allowed = (
            f"{lo}, {hi}" if low is not None and high is not None
            else (f">= {low}" if low_inclusive else f"> {low}") if low is not None
            else (f"<= {high}" if high_inclusive else f"< {high}")
        )
        raise ConfigError(f"{name}: {value!r} is out of range; allowed: {allowed}")


def check_ranges(
    config: Any,
    names: Iterable[str],
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """:func:`check_range` on each field of ``config`` in ``names``, all with the same bounds, in order.

    Example:
        >>> check_ranges(self, ("steps", "restarts"), 1)   # both counts must be >= 1
    """
    for name in names:
        check_range(name, getattr(config, name), low, high, low_inclusive=low_inclusive,
                    high_inclusive=high_inclusive)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
