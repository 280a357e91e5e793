"""The verbs: one per technique, each taking a config and changing the model in place.

Each verb looks up the handler registered for the config's type (:mod:`slimguard.core.registry`),
applies it, and records the step in the model's history (stored in the artifact's manifest).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.registry import apply
from slimguard.models.spec import record


def _run(verb: str, model: nn.Module, config: Config, **context: Any) -> Any:
    import slimguard.registry_index  # noqa: F401  (handlers register on import)

    result = apply(verb, model, config, **context)
    record(model, {"verb": verb, "config": config.to_dict()})
    return result


def prune_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Prune ``model`` in place. ``context`` may hold ``example_inputs``, ``data``, ``calib``."""
    return _run("prune", model, config, **context)


def quantize_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Quantize ``model`` in place. ``context`` may hold ``calib`` (a split) and ``data``."""
    return _run("quantize", model, config, **context)


def cluster_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Share weights (k-means clustering / hashing) in place."""
    return _run("cluster", model, config, **context)


def factorize_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Low-rank factorisation in place."""
    return _run("factorize", model, config, **context)


def fuse_(model: nn.Module, config: Config, **context: Any) -> Any:
    """Fuse layers (Conv+BN, Linear+BN) in place."""
    return _run("fuse", model, config, **context)
