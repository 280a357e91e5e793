"""Sensitivity analysis: how much each layer alone can be pruned before the score falls.

For every prunable layer (unstructured: each Linear/Conv; structured: each coupled channel group and
each transformer block) and every sparsity, a copy of the model is pruned at that one place and scored
on the validation split: accuracy for classifiers, cosine fidelity to the unpruned model for embedding
models. The result is plain JSON; :func:`ratios_from_sensitivity` turns it into per-layer ratios for
``ChannelPruningConfig(ratios=...)`` or ``MagnitudePruningConfig(overrides=...)``, and automatic search reuses it.
In a data-parallel run the trials are shared between the ranks and their scores gathered, so every rank gets
the same result.

Paper: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (per-layer sensitivity scans).

Example:
    >>> result = sg.sensitivity(model, sg.data.load("digits32"), method="channel")
    >>> ratios = sg.ratios_from_sensitivity(result, max_drop=0.01)
    >>> sg.prune_(model, sg.ChannelPruningConfig(ratio=0.0, ratios=ratios), example_inputs=data.example)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError
from slimguard.core.masks import set_mask
from slimguard.core.torch_utils import eval_mode
from slimguard.data.core import DataBundle, Split
from slimguard.prune.magnitude import _layer_mask, prunable_layers
from slimguard.train.distributed import all_reduce_, shard_range
from slimguard.ui import progress as progress_bar


def _scorer(model: nn.Module, split: Split, max_examples: int) -> tuple[str, Callable[[nn.Module], float]]:
    sub = split.subset(max_examples) if len(split) > max_examples else split
    if isinstance(sub.x, list):
        from slimguard.evaluate import embedding_fidelity

        if not hasattr(model, "tokenize"):
            raise DataError("text data needs an embedding model with a tokenizer (e.g. minilm)")
        texts = list(sub.x)
        ref = model

        def fidelity(m: nn.Module) -> float:
            return embedding_fidelity(m, ref, texts)["cosine_mean"]

        return "cosine_mean", fidelity
    if sub.y is None:
        raise DataError(f"split {split.name!r} has no labels; sensitivity needs labelled data or text")
    from slimguard.train.loop import accuracy

    return "accuracy", lambda m: accuracy(m, sub)


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` of a prunable layer or a channel-group member (TypeError when it is not a tensor)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def _example(model: nn.Module, data: DataBundle) -> Any:
    if isinstance(data.train.x, list):
        return model.tokenize(list(data.train.x[:1]))  # type: ignore[operator]
    return data.example


def _candidates(model: nn.Module, method: str, example: Any, ignore: Sequence[str]) -> dict[str, int]:
    """Layer (or group / block) name -> parameters it holds."""
    if method == "magnitude":
        return {n: m.weight.numel() for n, m in prunable_layers(model, list(ignore)).items()}
    from slimguard.prune.blocks import is_block
    from slimguard.prune.graph import DependencyGraph, is_opaque

    out = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()
           if n and is_block(m) and n not in ignore}
    if not is_opaque(model):
        try:
            graph = DependencyGraph(model, example, ignore=list(ignore))
        except ConfigError:
            raise
        for group in graph.groups:
            if group.units:
                name = group.modules[0]
                out[name] = sum(_weight(model.get_submodule(m)).numel() for m in group.modules)
    return out


@torch.no_grad()
def _prune_one(model: nn.Module, method: str, name: str, sparsity: float, example: Any) -> None:
    if method == "magnitude":
        m = model.get_submodule(name)
        set_mask(m, "weight", _layer_mask(_weight(m).detach().abs(), sparsity))
        return
    from slimguard.prune.structured import ChannelPruningConfig, prune_channels

    prune_channels(model, ChannelPruningConfig(ratio=0.0, ratios={name: sparsity}, allow_empty=True), example)


def sensitivity(
    model: nn.Module,
    data: DataBundle,
    *,
    sparsities: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    method: Literal["magnitude", "channel"] = "magnitude",
    layers: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    max_examples: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the model with each layer pruned alone at each sparsity.

    Args:
        model: the model (not modified; copies are pruned).
        data: scored on ``data.val`` (at most ``max_examples`` examples).
        sparsities: fractions in [0, 1) to try (weights for ``magnitude``, channels for ``channel``).
        method: ``magnitude`` (unstructured, per Linear/Conv) or ``channel`` (structured, per channel group
            and per transformer block).
        layers: restrict to these names (default: every candidate).
        ignore: modules to leave alone.

    Returns:
        ``{"metric", "method", "baseline", "sparsities", "layers": {name: {"params", "scores":
        {"0.5": score, ...}}}}`` (JSON-able).
    """
    if method not in ("magnitude", "channel"):
        raise ConfigError(f"method: {method!r} is not allowed; allowed: magnitude, channel")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"sparsities: {s!r} is out of range; allowed: [0, 1)")
    metric, score = _scorer(model, data.val if len(data.val) else data.test, max_examples)
    example = _example(model, data)
    cands = _candidates(model, method, example, ignore)
    if layers:
        unknown = [n for n in layers if n not in cands]
        if unknown:
            raise ConfigError(f"layers: {unknown[0]!r} is not a prunable {method} candidate; "
                              f"candidates: {', '.join(list(cands)[:8])}")
        cands = {n: cands[n] for n in layers}
    result: dict[str, Any] = {"metric": metric, "method": method, "sparsities": list(sparsities), "layers": {}}
    trials = [(name, s) for name in cands for s in sparsities]
    # in a data-parallel run each rank scores every world_size-th trial; a sum gathers them (NaN: refused)
    found = torch.zeros(len(trials), dtype=torch.float64)
    mine = shard_range(len(trials)).tolist()
    with eval_mode(model):
        result["baseline"] = score(model)
        with progress_bar(len(mine), "sensitivity", enabled=progress) as bar:
            for i in mine:
                name, s = trials[i]
                trial = copy.deepcopy(model)
                try:
                    _prune_one(trial, method, name, s, example)
                    found[i] = score(trial)
                except ConfigError:  # e.g. a ratio that would empty the layer
                    found[i] = math.nan
                bar.advance(1, info=name)
    values = all_reduce_(found, "sum").tolist()
    for name, params in cands.items():
        result["layers"][name] = {"params": params, "scores": {}}
    for (name, s), v in zip(trials, values, strict=True):
        result["layers"][name]["scores"][f"{s:g}"] = None if math.isnan(v) else v
    return result


def ratios_from_sensitivity(result: dict[str, Any], max_drop: float = 0.01) -> dict[str, float]:
    """Per layer, the largest tried sparsity whose score stays within ``max_drop`` of the baseline.

    ``max_drop`` is in the metric's units (0.01 = one accuracy point or 0.01 cosine). Layers that
    tolerate no tried sparsity are left out.
    """
    out: dict[str, float] = {}
    floor = result["baseline"] - max_drop
    for name, rec in result["layers"].items():
        ok = [float(s) for s, v in rec["scores"].items() if v is not None and v >= floor and float(s) > 0]
        if ok:
            out[name] = max(ok)
    return out
