"""Students built from a teacher: fewer transformer layers, a narrower zoo model, or a pruned copy.

* :func:`~slimguard.prune.depth.drop_layers_` (depth pruning, re-exported here) keeps a chosen subset of a
  transformer's layers, initialised from the teacher's weights as in DistilBERT (Sanh et al. 2019).
* :func:`width_student` builds the same zoo architecture with every width multiplied (untrained).
* :func:`pruned_student` copies the teacher and applies any pruning config to the copy
  (for example structured channel pruning), so the student starts from the teacher's weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.errors import ConfigError, ModelError
from slimguard.models.spec import info
from slimguard.prune.depth import DropLayersConfig, drop_layers_

__all__ = ["DropLayersConfig", "drop_layers_", "pruned_student", "width_student"]

_WIDTH_KWARGS = {
    "lenet5": lambda kw, m: {"width": float(kw.get("width", 1.0)) * m},
    "resnet": lambda kw, m: {"widths": tuple(max(1, round(w * m)) for w in kw.get("widths", (32, 64, 128)))},
    "digits_mlp": lambda kw, m: {"hidden": tuple(max(1, round(h * m)) for h in kw.get("hidden", (300, 100)))},
    "tabular_mlp": lambda kw, m: {"hidden": tuple(max(1, round(h * m)) for h in kw.get("hidden", (64, 32)))},
}


def width_student(teacher: nn.Module | str, width: float = 0.5, seed: int = 0) -> nn.Module:
    """An untrained zoo model like ``teacher`` with every layer width multiplied by ``width``.

    Args:
        teacher: a zoo model (or a zoo name, e.g. ``digits32-resnet``).
        width: the multiplier in (0, 4] (default 0.5, about 4x fewer parameters for conv nets).

    Example:
        >>> student = width_student("digits32-resnet", 0.5)   # widths (16, 32, 64)
    """
    from slimguard.models import zoo

    if not 0 < width <= 4:
        raise ConfigError(f"width: {width!r} is out of range; allowed: (0, 4]")
    if isinstance(teacher, str):
        name = teacher.removeprefix("zoo:")
        entry = zoo.ZOO.get(name)
        kwargs, factory = dict(entry.kwargs), zoo._factory_name(entry.factory)
    else:
        src = info(teacher).source
        if src.get("kind") != "zoo":
            raise ModelError("width_student needs a zoo model; for other models build the student yourself")
        name, kwargs, factory = src["name"], dict(src.get("kwargs", {})), src["factory"]
    if factory not in _WIDTH_KWARGS:
        raise ModelError(f"zoo factory {factory!r} has no width option; allowed: {', '.join(_WIDTH_KWARGS)}")
    overrides = _WIDTH_KWARGS[factory](kwargs, width)
    return zoo.create(name, seed=seed, **overrides)


def pruned_student(teacher: nn.Module, prune_config: Config, **context: Any) -> nn.Module:
    """A copy of ``teacher`` pruned by ``prune_config`` (e.g. structured channel pruning); the teacher is
    left as it is. ``context`` (``example_inputs``, ``data``, ...) is passed to the pruning handler.

    Example:
        >>> student = pruned_student(teacher, sg.ChannelPruningConfig(ratio=0.5), example_inputs=data.example)
    """
    from slimguard.transforms import prune_

    student = copy.deepcopy(teacher)
    prune_(student, prune_config, **context)
    return student
