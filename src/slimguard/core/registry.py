"""Registries keyed by config type: a new method is a new config plus a handler, never an ``if`` chain.

A *verb* (``prune``, ``quantize``, ``cluster``, ``factorize``, ``fuse``, ...) maps each config class to
the function that applies it::

    @register_handler("prune", MagnitudePruning)
    def _magnitude(model, config, **context): ...

``apply("prune", model, config, **context)`` finds the handler by the config's type (walking its MRO)
and calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.errors import ConfigError

Handler = Callable[..., Any]
_HANDLERS: dict[str, dict[type, Handler]] = {}


def register_handler(verb: str, config_type: type[Config]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        table = _HANDLERS.setdefault(verb, {})
        if config_type in table:
            raise ValueError(f"a {verb!r} handler for {config_type.__name__} is already registered")
        table[config_type] = fn
        return fn

    return deco


def handler_for(verb: str, config: Config) -> Handler:
    table = _HANDLERS.get(verb, {})
    for cls in type(config).__mro__:
        if cls in table:
            return table[cls]
    allowed = ", ".join(sorted(c.__name__ for c in table)) or "(none registered)"
    raise ConfigError(f"{type(config).__name__} is not a {verb} config; {verb} takes: {allowed}")


def apply(verb: str, model: nn.Module, config: Config, **context: Any) -> Any:
    return handler_for(verb, config)(model, config, **context)


def verb_of(config: Config) -> str:
    """The verb whose registry holds a handler for this config's type."""
    import slimguard.registry_index  # noqa: F401

    for verb, table in _HANDLERS.items():
        if any(cls in table for cls in type(config).__mro__):
            return verb
    raise ConfigError(f"{type(config).__name__} has no registered handler")


def verbs() -> dict[str, list[str]]:
    return {v: sorted(c.__name__ for c in t) for v, t in _HANDLERS.items()}
