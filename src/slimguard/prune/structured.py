"""Structured pruning that removes the work: channels, attention heads and FFN neurons go for real.

``ChannelPruning`` scores coupled channel groups found by :class:`~slimguard.prune.graph.DependencyGraph`
and physically shrinks every module they touch (Conv, BatchNorm, Linear, LayerNorm, GroupNorm,
grouped/depthwise convolutions, and any layer type with a registered rule), and cuts attention heads and
FFN neurons inside transformer blocks (:mod:`slimguard.prune.blocks`: BERT-family layers, torch's
``nn.MultiheadAttention`` and transformer layers; :mod:`slimguard.prune.attention`: Llama with grouped-query
attention, GPT-2, ViT, DistilBERT). Each module is scored and cut by the same layer rule
(:mod:`slimguard.prune.rules`) that traced it. Output shapes never change. The model keeps its module
classes (but ``nn.MultiheadAttention``, which becomes an allowlisted ``PrunedMultiheadAttention``), so an
artifact stores only the new sizes and loads back.

What it cannot cut (an attention module without a rule, a block whose ratio removes none of its heads) is
reported by name under ``"skipped"``. A run that removes nothing at all is a ConfigError, naming what was
skipped, unless ``allow_empty=True``: a pruning step that silently leaves the model as it was is a bug.

Example:
    >>> model = sg.zoo.load("digits32-resnet")
    >>> sg.prune_(model, sg.ChannelPruningConfig(ratio=0.5, round_to=8), example_inputs=torch.rand(1, 1, 32, 32))
    >>> sg.finetune(model, sg.data.load("digits32"), sg.FinetuneConfig(epochs=5))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.modules import set_submodule
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import matches
from slimguard.prune.blocks import BlockRule, Skip
from slimguard.prune.graph import DependencyGraph, Group, is_hf_model, is_opaque
from slimguard.prune.importance import Importance, get_importance, importance_names, prepare_importance
from slimguard.prune.rules import ChannelRule, LayerRule, rule_for
from slimguard.prune.surgery import complement, keep_count
from slimguard.runtime.measure import count_params


@register_config("channel")
@dataclasses.dataclass
class ChannelPruningConfig(Config):
    """Remove whole channels (and transformer heads / FFN neurons), shrinking the modules.

    Args:
        ratio: fraction of the channels of every prunable group to remove, in [0, 1) (default 0.5).
        importance: channel score: ``l1`` (filter norm, default), ``l2``, ``taylor`` (needs data),
            ``bn`` (BatchNorm scale, network slimming), ``random``.
        round_to: kept channel counts are rounded to a multiple of this (default 1; 8 suits SIMD/GPUs).
        ignore: qualified names of modules to keep whole (their channels are fixed).
        ratios: per-module ratio ``{name: ratio}``: a Conv/Linear name sets the ratio of the group of its
            output channels; a transformer block name sets its head and FFN ratios. Typically from
            :func:`slimguard.prune.sensitivity.ratios_from_sensitivity`.
        head_ratio: fraction of attention heads to remove per block (default: ``ratio``).
        ffn_ratio: fraction of FFN neurons to remove per block (default: ``ratio``).
        allow_empty: accept a run that removes nothing (default False: that is a ConfigError).

    Context: ``example_inputs`` (a batch for tracing; the recipe passes the data's example) and, for
    ``taylor``, ``data``.
    """

    ratio: float = 0.5
    importance: str = "l1"
    round_to: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    allow_empty: bool = False

    def validate(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, high_inclusive=False)
        check_range("round_to", self.round_to, 1, 4096)
        for name, r in self.ratios.items():
            check_range(f"ratios.{name}", r, 0.0, 1.0, high_inclusive=False)
        for key in ("head_ratio", "ffn_ratio"):
            v = getattr(self, key)
            if v is not None:
                check_range(key, v, 0.0, 1.0, high_inclusive=False)
        if self.importance not in importance_names():
            raise ConfigError(f"importance: {self.importance!r} is not allowed; "
                              f"allowed: {', '.join(importance_names())}")


def _unit_scores(model: nn.Module, group: Group, rules: dict[str, LayerRule],
                 imp: Importance) -> tuple[list[int], torch.Tensor]:
    cache: dict[tuple[str, str], torch.Tensor | None] = {}

    def channel(module: str, role: str, importance: Importance) -> torch.Tensor | None:
        key = (module, role + importance.name)
        if key not in cache:
            cache[key] = rules[module].score(model.get_submodule(module), role, importance)
        return cache[key]

    units = list(group.units)
    by_key: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for i, u in enumerate(units):
        for t in group.units[u]:
            pos, idx = by_key.setdefault((t.module, t.role), ([], []))
            pos.append(t.position)
            idx.append(i)

    def total(importance: Importance) -> tuple[torch.Tensor, bool]:
        out = torch.zeros(len(units), dtype=torch.float64)
        said = False
        for (module, role), (pos, idx) in by_key.items():
            s = channel(module, role, importance)
            if s is not None:
                out.index_add_(0, torch.tensor(idx), s.detach().double().cpu()[torch.tensor(pos)])
                said = True
        return out, said

    scores, said = total(imp)
    if not said:
        scores, _ = total(get_importance("l1"))
    return units, scores


@torch.no_grad()
def _cut(model: nn.Module, rules: dict[str, LayerRule], removed: dict[tuple[str, str], set[int]]) -> None:
    """Shrink each touched module with its rule, given the positions to remove per (module, role)."""
    by_module: dict[str, dict[str, set[int]]] = {}
    for (name, role), pos in removed.items():
        by_module.setdefault(name, {})[role] = pos
    for name, roles in by_module.items():
        m, rule = model.get_submodule(name), rules[name]
        keep = {role: complement(rule.size(m, role), torch.tensor(sorted(pos), dtype=torch.long))
                for role, pos in roles.items()}
        rule.prune(m, keep, name)


def _select(group: Group, units: list[int], scores: torch.Tensor, remove: int, model: nn.Module,
            rules: dict[str, LayerRule]) -> list[int]:
    """The ``remove`` lowest-scoring units, skipping any whose removal would empty a module's output."""
    left = {name: rules[name].size(model.get_submodule(name), "out") for name in group.modules}
    chosen: list[int] = []
    order = torch.argsort(scores, stable=True).tolist() if remove else []
    for idx in order:
        if len(chosen) == remove:
            break
        hits: dict[str, int] = {}
        for t in group.units[units[idx]]:
            if t.role == "out":
                hits[t.module] = hits.get(t.module, 0) + 1
        if any(left[n] - k < 1 for n, k in hits.items()):
            continue
        for n, k in hits.items():
            left[n] -= k
        chosen.append(units[idx])
    return chosen


#: words in the class name of a module that holds heads or neurons: one without a rule is reported by name
_TRANSFORMER_PARTS = ("Attention", "MLP", "FFN", "FeedForward")


def _unhandled(model: nn.Module, covered: list[str]) -> dict[str, str]:
    """Attention / MLP modules of Hugging Face models that no rule covers (neither they, an enclosing block
    nor a part of them). Elsewhere the dependency graph follows every layer or refuses it by name."""
    roots = [""] if is_hf_model(model) else [n for n, m in model.named_modules() if n and is_hf_model(m)]
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or not any(not r or matches(name, [r]) for r in roots):
            continue
        if matches(name, covered) or any(c.startswith(name + ".") for c in covered):
            continue
        if any(word in type(m).__name__ for word in _TRANSFORMER_PARTS) and any(True for _ in m.parameters()):
            out[name] = f"no pruning rule for {type(m).__name__}"
            covered.append(name)
    return out


def _sync_configs(model: nn.Module) -> dict[str, dict[str, int]]:
    """Write the pruned sizes into the config of each Hugging Face model inside ``model`` (see
    :meth:`BlockRule.config_sizes`); returns ``{model name: {key: value}}`` of what was written."""
    written: dict[str, dict[str, int]] = {}
    mods = list(model.named_modules())
    hf_names = [n for n, m in mods if is_hf_model(m)]
    for root, hf in mods:
        if root not in hf_names or any(o != root and (not o or root.startswith(o + ".")) for o in hf_names):
            continue  # an HF model inside another one (BertModel in BertForSequenceClassification) shares its config
        seen: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
        readable = True
        for name, m in mods:
            rule = rule_for(m)
            if not isinstance(rule, BlockRule) or (root and not matches(name, [root])):
                continue
            try:
                groups = rule.config_sizes(m)
            except Skip:  # a block whose sizes cannot be read: the config cannot speak for it
                readable = False
                break
            for group in groups:
                seen.setdefault(tuple(group), set()).add(tuple(group.values()))
        cfg = getattr(hf, "config", None)
        for keys, values in seen.items() if readable else ():
            if len(values) == 1 and all(hasattr(cfg, k) for k in keys):
                for k, v in zip(keys, next(iter(values)), strict=True):
                    if getattr(cfg, k) != v:
                        setattr(cfg, k, v)
                        written.setdefault(root, {})[k] = v
    return written


def _prune_blocks(model: nn.Module, config: ChannelPruningConfig, imp: Importance, names: dict[str, nn.Module],
                  used: set[str], skipped: dict[str, str]) -> dict[str, Any]:
    """Cut heads and neurons inside every transformer block; returns ``{name: what changed}``."""
    blocks: dict[str, Any] = {}
    for name, m in list(names.items()):
        rule = rule_for(m)
        if matches(name, config.ignore) or not isinstance(rule, BlockRule):
            continue
        r = config.ratios.get(name)
        used.add(name) if r is not None else None
        hr = r if r is not None else (config.head_ratio if config.head_ratio is not None else config.ratio)
        fr = r if r is not None else (config.ffn_ratio if config.ffn_ratio is not None else config.ratio)
        try:
            if hr > 0:
                new = rule.convert(m)
                if new is not m and not name:
                    raise Skip(f"the model itself is a {type(m).__name__}, which must be replaced to lose heads; "
                               "wrap it in a module")
                if new is not m:
                    set_submodule(model, name, new)
                    m = new
            result = rule.prune_block(m, hr, fr, imp, config.round_to)
        except Skip as why:
            skipped[name] = str(why)
            continue
        if result:
            blocks[name] = result
            asked = {k: v for k, v in result.items() if (hr if k == "heads" else fr) > 0}
            if asked and all(before == after for before, after in asked.values()):
                what = " / ".join(f"{v[0]} {'heads' if k == 'heads' else 'FFN neurons'}" for k, v in asked.items())
                skipped[name] = f"the ratio removes none of its {what}"
    return blocks


def prune_channels(model: nn.Module, config: ChannelPruningConfig, example_inputs: Any = None,
                   importance: Importance | None = None) -> dict[str, Any]:
    """Apply :class:`ChannelPruning` in place; returns what changed.

    Args:
        model: a plain module or a Hugging Face model as ``transformers`` builds it.
        config: ratios and options.
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors (``input_ids``,
            ``attention_mask``, ``pixel_values``), for tracing the dependency graph. A Hugging Face model
            is pruned block by block and needs none.
        importance: an importance object (default: from ``config.importance``).

    Returns:
        ``{"params_before", "params_after", "groups": [{"modules", "channels": [before, after]}],
        "blocks": {name: {"heads": [before, after]} and/or {"ffn": [before, after]}},
        "skipped": {name: why it was left whole}, "config": {HF model name: {config key: new size}}}``:
        Hugging Face configs get the pruned sizes they can express when every layer agrees
        (``intermediate_size``; Llama's head counts), so ``from_pretrained`` rebuilds the pruned shapes.

    Raises:
        ConfigError: bad names, a ratio that empties a layer, or (unless ``allow_empty``) nothing removed.
    """
    imp = importance or get_importance(config.importance)
    names = dict(model.named_modules())
    for key in (*config.ignore, *config.ratios):
        if key not in names:
            raise ConfigError(f"{key!r} names no module; modules are e.g. {', '.join(list(names)[1:6])}")
    params_before = count_params(model)
    used: set[str] = set()
    skipped: dict[str, str] = {}
    blocks = _prune_blocks(model, config, imp, names, used, skipped)
    names = dict(model.named_modules())  # blocks may have been replaced
    written = _sync_configs(model) if blocks else {}
    skipped.update(_unhandled(model, [*config.ignore, *blocks, *skipped]))
    groups_out: list[dict[str, Any]] = []
    whole = [*config.ignore, *blocks, *(n for n, m in names.items() if n and is_opaque(m))]
    graph_needed = not is_opaque(model) and any(isinstance(rule_for(m), ChannelRule) and not matches(n, whole)
                                                for n, m in names.items())
    if graph_needed and (config.ratio > 0 or set(config.ratios) - used):
        if example_inputs is None:
            raise ConfigError("ChannelPruning needs example_inputs (a batch for tracing the model)")
        graph = DependencyGraph(model, example_inputs, ignore=list(config.ignore))
        removed: dict[tuple[str, str], set[int]] = {}
        for group in graph.groups:
            named = [config.ratios[n] for n in group.modules if n in config.ratios]
            used.update(n for n in group.modules if n in config.ratios)
            ratio = max(named) if named else config.ratio
            n_free = len(group.units)
            total = n_free + group.fixed
            if n_free == 0 or ratio <= 0:
                continue
            keep_total = keep_count(total, ratio, config.round_to, f"the group of {group.modules[0]!r}")
            remove = min(n_free, total - keep_total)
            units, scores = _unit_scores(model, group, graph.rules, imp)
            chosen = _select(group, units, scores, remove, model, graph.rules)
            for u in chosen:
                for t in group.units[u]:
                    removed.setdefault((t.module, t.role), set()).add(t.position)
            groups_out.append({"modules": group.modules, "channels": [total, total - len(chosen)]})
        _cut(model, graph.rules, removed)
    unused = sorted(set(config.ratios) - used)
    if unused:
        raise ConfigError(f"ratios: {unused[0]!r} is not a prunable layer or transformer block "
                          "(its channels are fixed or it is ignored); remove it from ratios")
    params_after = count_params(model)
    if params_after == params_before and not config.allow_empty:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:4]) or "no prunable channels, heads or neurons"
        more = f" (and {len(skipped) - 4} more)" if len(skipped) > 4 else ""
        raise ConfigError(f"channel pruning removed nothing ({why}{more}); raise ratio, or set allow_empty=True "
                          "to accept an unchanged model")
    return {"params_before": params_before, "params_after": params_after, "groups": groups_out,
            "blocks": blocks, "skipped": skipped, "config": written}


@register_handler("prune", ChannelPruningConfig)
def _channel(model: nn.Module, config: ChannelPruningConfig, *, example_inputs: Any = None,
             **context: Any) -> dict[str, Any]:
    imp = get_importance(config.importance)
    prepare_importance(imp, model, context)
    return prune_channels(model, config, example_inputs, imp)
