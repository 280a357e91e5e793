"""Unstructured pruning with a global (or per-layer) threshold on an importance score.

Paper: Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015.

Example:
    >>> sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8))
    >>> sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.9, scope="layer", importance="taylor"), data=data)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.masks import get_mask, set_mask
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import select_modules
from slimguard.prune.importance import Importance, check_weight_importance, get_importance, prepare_importance

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PrunableLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # a module of one of the PRUNABLE types


@register_config("magnitude")
@dataclasses.dataclass
class MagnitudePruningConfig(Config):
    """Zero the smallest-magnitude weights of Linear and Conv layers.

    Args:
        sparsity: fraction of weights to zero, in [0, 1) (default 0.5).
        scope: ``global`` (one threshold over all layers, the default) or ``layer`` (each layer alone).
        ignore: qualified names of modules to leave dense.
        overrides: per-layer sparsity ``{module_name: sparsity}`` (layers named here are pruned alone).
        importance: how weights are ranked: ``l1`` (magnitude, default), ``l2``, ``taylor`` (needs data),
            ``wanda`` (needs data), ``random``; not ``bn``, which scores only channels. See
            :mod:`slimguard.prune.importance`.

    Already-pruned weights stay pruned (their masks only grow).
    """

    sparsity: float = 0.5
    scope: Literal["global", "layer"] = "global"
    ignore: list[str] = dataclasses.field(default_factory=list)
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    importance: str = "l1"

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_inclusive=False)
        check_weight_importance(self.importance)
        for name, s in self.overrides.items():
            check_range(f"overrides.{name}", s, 0.0, 1.0, high_inclusive=False)


def prunable_layers(model: nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> dict[str, PrunableLayer]:
    """Linear/Conv modules by qualified name, those under an ``ignore`` entry left out; every ``ignore``
    entry must name a module."""
    return select_modules(model, PRUNABLE, ignore)  # type: ignore[return-value]  # PRUNABLE are PrunableLayer


def _scores(module: PrunableLayer, imp: Importance | None = None) -> torch.Tensor:
    w = module.weight.detach().abs().float() if imp is None else imp.score(module, "weight")
    old = get_mask(module, "weight")
    return w if old is None else w.masked_fill(~old, -1.0)  # already-pruned stay pruned


def _layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * score.numel())
    if k >= score.numel():
        raise ConfigError(f"sparsity {sparsity} would empty a layer of {score.numel()} weights; lower it")
    if k == 0:
        return score >= 0
    threshold = score.flatten().kthvalue(k).values
    mask = score > threshold
    # ties at the threshold: keep exactly numel - k entries
    deficit = (score.numel() - k) - int(mask.sum())
    if deficit > 0:
        ties = ((score == threshold) & ~mask).flatten().nonzero().flatten()[:deficit]
        mask.view(-1)[ties] = True
    return mask


@register_handler("prune", MagnitudePruningConfig)
def _magnitude(model: nn.Module, config: MagnitudePruningConfig, **context: Any) -> dict[str, Any]:
    imp = get_importance(config.importance)
    prepare_importance(imp, model, context)
    return prune_unstructured(model, config, imp)


def prune_unstructured(model: nn.Module, config: MagnitudePruningConfig,
                       imp: Importance | None = None) -> dict[str, Any]:
    """Apply ``config`` with a ready importance (default L1); returns ``{"sparsity_by_layer": ...}``."""
    imp = imp or get_importance("l1")
    layers = prunable_layers(model, config.ignore)
    for name in config.overrides:
        if name not in layers:
            raise ConfigError(f"overrides: {name!r} is not a prunable Linear/Conv layer")
    result: dict[str, float] = {}
    per_layer = {n: m for n, m in layers.items() if config.scope == "layer" or n in config.overrides}
    global_layers = {n: m for n, m in layers.items() if n not in per_layer}
    for name, m in per_layer.items():
        s = config.overrides.get(name, config.sparsity)
        set_mask(m, "weight", _layer_mask(_scores(m, imp), s))
    if global_layers:
        scores = {n: _scores(m, imp) for n, m in global_layers.items()}
        flat = torch.cat([s.flatten() for s in scores.values()])
        gmask = _layer_mask(flat, config.sparsity)
        offset = 0
        for n, score in scores.items():
            mask = gmask[offset : offset + score.numel()].view_as(score)
            offset += score.numel()
            if not mask.any():
                raise ConfigError(f"sparsity {config.sparsity} would empty layer {n!r}; lower it or use scope: layer")
            set_mask(global_layers[n], "weight", mask)
    for name, m in layers.items():
        result[name] = float((m.weight == 0).float().mean())
    return {"sparsity_by_layer": result}
