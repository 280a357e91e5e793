"""One generic registry for every kind of plugin, and the handler table keyed by config type.

A :class:`Registry` maps names (or types) to objects, refuses duplicates, lists its names, and its
errors name the allowed set::

    DETECTORS: Registry[type[Detector]] = Registry("OOD detector")

    @DETECTORS.register("energy")
    class Energy(Detector): ...

    DETECTORS.get("energy")          # -> Energy
    DETECTORS.get("nope")            # ConfigError: unknown OOD detector 'nope'; allowed: energy, ...

Registries keyed by type (handlers by config type, pruning rules by layer type) look a key up along
the class's MRO with :meth:`Registry.for_type`. Plugins register when their module is imported; the
one plugin index (:mod:`slimguard.plugins`) imports them all and is imported by the entry points only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from slimguard.core.errors import ConfigError, UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names (or types) -> objects.

    Args:
        kind: what is registered, for error messages ("OOD detector", "codec").
        error: the :class:`UserError` subclass raised for an unknown name (default ConfigError).
    """

    def __init__(self, kind: str, *, error: type[UserError] = ConfigError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[Hashable, T] = {}

    def register(self, key: Hashable, obj: T | None = None) -> Any:
        """Register ``obj`` under ``key``; without ``obj``, return a decorator that registers its argument.

        Registering a different object under a taken key raises ValueError (a programming error).
        """
        if obj is not None:
            self._add(key, obj)
            return obj

        def deco(o: T) -> T:
            self._add(key, o)
            return o

        return deco

    def _add(self, key: Hashable, obj: T) -> None:
        existing = self._items.get(key)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} {_label(key)!r} is already registered ({_label(existing)})")
        self._items[key] = obj

    def unregister(self, key: Hashable) -> T:
        """Remove and return the object under ``key`` (a plugin made for one test, for example); the
        registry's error when there is none."""
        found = self.get(key)
        del self._items[key]
        return found

    def get(self, key: Hashable) -> T:
        """The object under ``key``; the registry's error (naming the allowed keys) when there is none."""
        try:
            return self._items[key]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {_label(key)!r}; allowed: {self.allowed()}") from None

    def for_type(self, cls: type) -> T | None:
        """The object registered for ``cls`` or its nearest base class (None when there is none)."""
        for base in cls.__mro__:
            if base in self._items:
                return self._items[base]
        return None

    def names(self) -> list[str]:
        """Sorted keys, as text (type keys by class name)."""
        return sorted(_label(k) for k in self._items)

    def allowed(self) -> str:
        return ", ".join(self.names()) or "(none registered)"

    def items(self) -> list[tuple[Hashable, T]]:
        return list(self._items.items())

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


def _label(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else getattr(obj, "__qualname__", None) or str(obj)


Factory = Callable[..., Any]


# ---- handlers: config type -> (verb, function) ---------------------------------------------------------
Handler = Callable[..., Any]
HANDLERS: Registry[tuple[str, Handler]] = Registry("handler")


def register_handler(verb: str, config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``fn(model, config, **context)`` applies configs of ``config_type`` under ``verb``.

    A new method is a new config plus a handler, never an ``if`` chain::

        @register_handler("prune", MagnitudePruning)
        def _magnitude(model, config, **context): ...
    """

    def deco(fn: Handler) -> Handler:
        HANDLERS.register(config_type, (verb, fn))
        return fn

    return deco


def _entry(config: Any) -> tuple[str, Handler]:
    found = HANDLERS.for_type(type(config))
    if found is None:
        raise ConfigError(f"{type(config).__name__} has no registered handler; registered: {HANDLERS.allowed()}")
    return found


def verb_of(config: Any) -> str:
    """The verb (``prune``, ``quantize``, ``train``, ...) whose handler applies this config."""
    return _entry(config)[0]


def handler_for(verb: str, config: Any) -> Handler:
    """The function that applies ``config`` under ``verb``; ConfigError naming the verb's configs otherwise."""
    found = HANDLERS.for_type(type(config))
    if found is None or found[0] != verb:
        allowed = ", ".join(sorted(_label(k) for k, (v, _) in HANDLERS.items() if v == verb)) or "(none registered)"
        raise ConfigError(f"{type(config).__name__} is not a {verb} config; {verb} takes: {allowed}")
    return found[1]


def apply(verb: str, model: Any, config: Any, **context: Any) -> Any:
    return handler_for(verb, config)(model, config, **context)
