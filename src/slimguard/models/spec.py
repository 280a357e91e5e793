"""A model's *info*: how to rebuild its architecture, its task and its data's metadata.

Every model slimguard loads carries a :class:`ModelInfo` as the attribute ``_slimguard_info`` of its
root module. Transforms change the model in place and keep it; the artifact stores it so that a model
can be rebuilt **without pickle**: the architecture comes from the spec (a zoo name, a python factory,
a Hugging Face config), then changed modules and shapes are restored from the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from slimguard.core.errors import ModelError
from slimguard.core.registry import Registry

ATTR = "_slimguard_info"


@dataclasses.dataclass
class ModelInfo:
    """Attributes:
    source: how to rebuild the architecture: ``{"kind": "zoo", "name": ..., "kwargs": {...}}``,
        ``{"kind": "python", "file": ..., "factory": ..., "kwargs": {...}, "sha256": ...}`` or
        ``{"kind": "hf", "config": {...}, "task": ..., "pooling": "mean", "tokenizer": {FILE: base64},
        "image": {"mean": [...], "std": [...]}}`` (see :mod:`slimguard.models.hf`). A python source runs
        user code: an artifact rebuilds it only from a file its caller names
        (``sg.load(path, trust_code=FILE)``), whose sha256 must match the recorded one; see
        :mod:`slimguard.artifact.slim`.
    task: ``classification`` (zoo and python models), or a Hugging Face task: ``sequence-classification``,
        ``image-classification``, ``causal-lm``, ``embedding``.
    data: the training data's :class:`~slimguard.data.DataMeta` as a dict (may be empty); a python model
        given ``--input-shape`` records ``input_shape`` there.
    history: the transforms applied so far (config dicts), for the manifest and reports.
    """

    source: dict[str, Any]
    task: str = "classification"
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**{k: d[k] for k in ("source", "task", "data", "history") if k in d})


def info(model: nn.Module) -> ModelInfo:
    """The model's :class:`ModelInfo`; raises ModelError when the model was not loaded by slimguard."""
    got = getattr(model, ATTR, None)
    if got is None:
        raise ModelError(
            "this model carries no slimguard info; load it with sg.zoo.load / sg.models.load_model, "
            "or attach one with sg.models.set_info(model, ModelInfo(source=...))"
        )
    return got


def maybe_info(model: nn.Module) -> ModelInfo | None:
    return getattr(model, ATTR, None)


def set_info(model: nn.Module, model_info: ModelInfo) -> nn.Module:
    object.__setattr__(model, ATTR, model_info)
    return model


def record(model: nn.Module, step: dict[str, Any]) -> None:
    """Append a transform to the model's history (no-op for models without info)."""
    mi = maybe_info(model)
    if mi is not None:
        mi.history.append(step)


Builder = Callable[[dict[str, Any]], nn.Module]
BUILDERS: Registry[Builder] = Registry("model source kind", error=ModelError)
"""Source kind (``zoo``, ``python``, ``hf``) -> ``fn(source) -> nn.Module`` building the architecture."""


def register_builder(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: ``fn(source)`` builds untrained architectures of sources of ``kind``."""
    return BUILDERS.register(kind)


def build(source: dict[str, Any]) -> nn.Module:
    """Build an untrained architecture from a source spec (weights come from elsewhere)."""
    return BUILDERS.get(source.get("kind"))(source)
