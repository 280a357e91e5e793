"""Depth pruning: keep a chosen subset of a transformer's layers (the recipe step ``drop-layers``).

The kept layers keep their weights, and the model's config (``num_hidden_layers``) and slimguard spec
record the new depth, so the saved artifact rebuilds the smaller architecture. Usually followed by a
``distill`` step that recovers the dropped layers' function from the original model (DistilBERT, Sanh et
al. 2019, initialises its student this way).

Example:
    >>> student = drop_layers_(copy.deepcopy(sg.load_model("minilm")), [0, 2, 4])
    >>> sg.prune_(model, sg.DropLayersConfig(keep=[0, 2, 4]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from slimguard.core.config import Config, register_config
from slimguard.core.errors import ConfigError, ModelError
from slimguard.core.registry import register_handler
from slimguard.models.spec import maybe_info


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer's list of layers: ``(parent, attribute, ModuleList)``.

    Looks for ``encoder.layer`` (BERT family), ``layers`` or ``layer`` ModuleLists whose entries all
    have one type; the longest one wins.
    """
    best: tuple[nn.Module, str, nn.ModuleList] | None = None
    for module in model.modules():
        for attr in ("layer", "layers", "h", "block"):
            stack = getattr(module, attr, None)
            if isinstance(stack, nn.ModuleList) and len(stack) > 1 and len({type(m) for m in stack}) == 1:
                if best is None or len(stack) > len(best[2]):
                    best = (module, attr, stack)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of transformer layers to drop from")
    return best


def _config_objects(model: nn.Module) -> list[Any]:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def drop_layers_(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the layers at indices ``keep`` (in that order), in place.

    The kept layers keep the teacher's weights; the model's config (``num_hidden_layers``) and its
    slimguard spec are updated so the saved artifact rebuilds with the new depth.

    Args:
        keep: layer indices, e.g. ``[0, 2, 4]`` keeps 3 of 6 layers. Negative indices count from the end.

    Example:
        >>> student = drop_layers_(copy.deepcopy(sg.load_model("minilm")), [0, 2, 4])
    """
    parent, attr, stack = layer_stack(model)
    n = len(stack)
    idx = []
    for k in keep:
        if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n:
            raise ConfigError(f"keep: layer index {k!r} is out of range; the model has layers 0..{n - 1}")
        idx.append(k % n)
    if not idx or len(set(idx)) != len(idx):
        raise ConfigError(f"keep: {list(keep)} must name at least one layer, each at most once")
    layers = [stack[i] for i in idx]
    for new, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                # torch's stub types Module.__setattr__ values as Tensor | Module; any value is accepted
                sub.layer_idx = new  # type: ignore[assignment]
    setattr(parent, attr, nn.ModuleList(layers))
    for cfg in _config_objects(model):
        cfg.num_hidden_layers = len(layers)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in idx]
    mi = maybe_info(model)
    if mi is not None and isinstance(mi.source.get("config"), dict):
        mi.source["config"]["num_hidden_layers"] = len(layers)
        if isinstance(mi.source["config"].get("layer_types"), list):
            mi.source["config"]["layer_types"] = [mi.source["config"]["layer_types"][i] for i in idx]
    return model


@register_config("drop-layers")
@dataclasses.dataclass
class DropLayersConfig(Config):
    """Recipe step: keep a subset of a transformer's layers (then usually a ``distill`` step).

    Args:
        keep: the layer indices to keep, e.g. ``[0, 2, 4]``.
    """

    keep: list[int] = dataclasses.field(default_factory=lambda: [0, 2, 4])

    def validate(self) -> None:
        if not self.keep:
            raise ConfigError("keep: name at least one layer index, e.g. [0, 2, 4]")


@register_handler("prune", DropLayersConfig)
def _drop_layers_step(model: nn.Module, config: DropLayersConfig, **_: Any) -> dict[str, Any]:
    before = len(layer_stack(model)[2])
    drop_layers_(model, config.keep)
    return {"layers_before": before, "layers_after": len(config.keep), "kept": list(config.keep)}
