"""The verbs, one per technique, and the one step runner behind them and behind recipes.

Each verb (``prune_``, ``quantize_``, ...) takes a config and changes the model in place. All of them,
and every step of a recipe (:func:`slimguard.pipeline.compress`), go through :func:`run_step`: it looks
up the handler registered for the config's type (:mod:`slimguard.core.registry`), applies it, and
records the step in the model's history (stored in the artifact's manifest). Handlers are registered by
the technique packages, which the plugin index imports; this module imports none of them.

Example:
    >>> sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8))          # one verb
    >>> run_step(model, sg.FinetuneConfig(epochs=3), data=bundle)     # one recipe step, data as context
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.registry import apply, verb_of
from slimguard.data.core import DataBundle
from slimguard.models.spec import record


def run_step(model: nn.Module, step: Config, data: DataBundle | None = None, /, *, verb: str | None = None,
             **context: Any) -> Any:
    """Apply one step (prune, quantize, train, ...) to ``model`` in place and record it in its history.

    Args:
        model: the model; a model carrying slimguard info records ``{"verb", "config"}`` in its history.
        step: the step's config; its type names the handler.
        data: a data bundle (positional); given, the handler gets ``data``, ``example_inputs`` (one train
            example) and ``calib`` (the calibration split) as context. A verb passes what its caller gave
            (a ``data=`` keyword among them) as ``context`` unchanged.
        verb: the verb the step must belong to (a verb function passes its own); default the config's.
        **context: more context for the handler (``progress``, ``original``, ``example_inputs``, ...);
            it overrides what ``data`` supplies.

    Returns:
        What the handler returns (usually a dict describing what changed).

    Raises:
        ConfigError: no handler is registered for the config, or it belongs to another verb.
    """
    verb = verb or verb_of(step)
    if data is not None:
        context = {"data": data, "example_inputs": data.example, "calib": data.calib, **context}
    result = apply(verb, model, step, **context)
    record(model, {"verb": verb, "config": step.to_dict()})
    return result


def prune_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Prune ``model`` in place. ``context`` may hold ``example_inputs``, ``data``, ``calib``."""
    return run_step(model, config, verb="prune", **context)


def quantize_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Quantize ``model`` in place. ``context`` may hold ``calib`` (a split) and ``data``."""
    return run_step(model, config, verb="quantize", **context)


def cluster_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Share weights (k-means clustering / hashing) in place."""
    return run_step(model, config, verb="cluster", **context)


def factorize_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Low-rank factorisation in place."""
    return run_step(model, config, verb="factorize", **context)


def fuse_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Fuse layers (Conv+BN, Linear+BN) in place."""
    return run_step(model, config, verb="fuse", **context)
