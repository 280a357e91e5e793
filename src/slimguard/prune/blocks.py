"""Transformer blocks pruned from the inside: attention heads and feed-forward neurons.

A transformer block keeps its hidden width (residual stream, LayerNorms, embeddings); what can go
are whole attention heads (rows of query/key/value and the matching columns of the attention output
projection) and feed-forward neurons (rows of the first FFN layer(s) and columns of the second). The
dependency graph treats a registered block as one leaf whose input and output channels are fixed, and
:meth:`BlockRule.prune_block` cuts it. Blocks nest: each rule cuts only its own parts (a
``TransformerEncoderLayer`` its FFN, the ``MultiheadAttention`` inside it its heads).

Each block type is a :class:`BlockRule` in the layer-rule table (:mod:`slimguard.prune.rules`):

* Hugging Face BERT-family layers (``BertLayer``, RoBERTa, MiniLM, ...), matched by structure (a
  predicate, as their classes differ per model): any module with ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and ``output.dense``. Heads and FFN neurons.
  ``num_attention_heads`` and ``all_head_size`` of the self-attention are updated (the artifact stores
  them, so pruned models load back).
* ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``: FFN neurons (``linear1``/``linear2``);
  their ``nn.MultiheadAttention`` loses heads by its own rule (:mod:`slimguard.prune.mha`).
* Llama, GPT-2, ViT, DistilBERT attention and MLP modules: :mod:`slimguard.prune.attention`.

A new block type is a :class:`BlockRule` subclass registered with
:func:`~slimguard.prune.rules.register_rule` under its class (or a predicate). A rule that finds a
module it cannot cut raises :class:`Skip`; structured pruning reports the module by name and goes on.

Paper: Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019 (head pruning).
"""

from __future__ import annotations

import abc
from typing import Any, Protocol, cast

import torch
import torch.nn as nn

from slimguard.prune.importance import Importance, get_importance
from slimguard.prune.rules import (
    LINEAR,
    Call,
    ChannelRule,
    LabelGraph,
    Labels,
    LayerRule,
    ModuleT,
    register_rule,
    rule_for,
)
from slimguard.prune.surgery import complement, keep_count, lowest


class Skip(Exception):
    """Raised by :meth:`BlockRule.prune_block` (or :meth:`BlockRule.convert`) for a module it cannot cut;
    the message says why. Structured pruning reports the module by name with it and leaves it whole."""


class BlockRule(LayerRule[ModuleT]):
    """A transformer block: one leaf of the dependency graph whose outer channels stay fixed (the
    residual stream keeps its width), pruned from the inside by :meth:`prune_block`."""

    def trace(self, graph: LabelGraph, call: Call[ModuleT]) -> Labels | None:
        for labels in call.inputs:
            graph.fix(labels)
        return None

    def convert(self, block: ModuleT) -> nn.Module:
        """The module to prune in place of ``block`` (default: ``block``). A rule whose module cannot lose
        heads as it is (``nn.MultiheadAttention`` packs them at full width) returns a replacement with
        the same outputs; the caller puts it where ``block`` was."""
        return block

    def config_sizes(self, block: ModuleT) -> list[dict[str, int]]:
        """Groups of Hugging Face config keys that describe the block's sizes now (default: none). After
        pruning, a group is written to the model's config only whole (every key exists there) and only when
        every block of the model agrees on it, so ``from_pretrained`` builds the pruned shapes."""
        return []

    @abc.abstractmethod
    def prune_block(self, block: ModuleT, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        """Remove ``head_ratio`` of the attention heads and ``ffn_ratio`` of the FFN neurons in place.

        Returns:
            what the block holds, ``{"heads": [before, after]}`` and/or ``{"ffn": [before, after]}``
            (empty: nothing of its own to cut). Raises :class:`Skip` when it cannot cut the block.
        """


def is_block(m: nn.Module) -> bool:
    """Whether ``m`` is a transformer block with a :class:`BlockRule`."""
    return isinstance(rule_for(m), BlockRule)


def _channel(imp: Importance, mods: list[tuple[nn.Module, int]], n: int) -> torch.Tensor:
    """Sum of channel scores over (module, dim) pairs; L1 magnitude if the importance says nothing.

    ``mods`` ends with the output-side projection. A data-driven importance (``wanda``, ``taylor``) scores
    a head or neuron only by what it writes into the residual stream (that projection's columns times
    the measured activations), which is what removing it takes away; weight-only importances also count
    the input-side rows.
    """
    if imp.needs_data:
        mods = mods[-1:]
    total = torch.zeros(n)
    said = False
    for mod, dim in mods:
        s = imp.channel_score(mod, dim)
        if s is not None:
            total += s.float().cpu()
            said = True
    if not said:
        return _channel(get_importance("l1"), mods, n)
    return total


def projection_rule(module: nn.Module, where: str) -> ChannelRule:
    """The channel rule (Linear, Hugging Face ``Conv1D``, ...) that scores and cuts a projection."""
    rule = rule_for(module)
    if not isinstance(rule, ChannelRule):
        raise Skip(f"{where} is a {type(module).__name__}, which has no channel rule")
    return rule


def neuron_scores(imp: Importance, parts: list[tuple[nn.Module, str, int]], n: int) -> torch.Tensor:
    """Per-position scores summed over ``parts``: (projection, role ``out``/``in``, offset of the first of
    the ``n`` positions in that role). The last part is the output-side projection; a data-driven
    importance scores by it alone (see :func:`_channel`); L1 magnitude if the importance says nothing."""
    if imp.needs_data:
        parts = parts[-1:]
    total = torch.zeros(n, dtype=torch.float64)
    said = False
    for mod, role, offset in parts:
        rule = projection_rule(mod, type(mod).__name__)
        s = imp.channel_score(mod, rule.weight_dims[role])
        if s is not None:
            total += s.detach().double().cpu()[offset : offset + n]
            said = True
    if not said:
        return neuron_scores(get_importance("l1"), parts, n)
    return total


def prune_neurons(firsts: list[nn.Module], second: nn.Module, ratio: float, imp: Importance, round_to: int,
                  where: str) -> tuple[int, int]:
    """Remove ``ratio`` of the hidden neurons between ``firsts`` (their outputs, e.g. gate and up
    projections of a gated MLP) and ``second`` (its inputs). Returns (before, after)."""
    n = projection_rule(second, where).in_channels(second)
    if ratio <= 0:
        return n, n
    keep_n = keep_count(n, ratio, round_to, f"the feed-forward layer of {where}")
    parts = [(f, "out", 0) for f in firsts] + [(second, "in", 0)]
    keep = complement(n, lowest(neuron_scores(imp, parts, n), n - keep_n))
    for f in firsts:
        projection_rule(f, where).prune_out(f, keep)
    projection_rule(second, where).prune_in(second, keep)
    return n, len(keep)


def _prune_ffn(first: nn.Linear, second: nn.Linear, ratio: float, imp: Importance, round_to: int,
               where: str) -> tuple[int, int]:
    return prune_neurons([first], second, ratio, imp, round_to, where)


class _BertSelfAttention(Protocol):
    """What :func:`_is_bert_layer` checks a BERT self-attention has (and what head pruning updates)."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    num_attention_heads: int
    attention_head_size: int
    all_head_size: int


def _is_bert_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    sa = getattr(att, "self", None)
    return (all(isinstance(getattr(sa, k, None), nn.Linear) for k in ("query", "key", "value"))
            and isinstance(getattr(getattr(att, "output", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)
            and hasattr(sa, "num_attention_heads") and hasattr(sa, "attention_head_size"))


class BertLayerRule(BlockRule[nn.Module]):
    """Hugging Face BERT-family layer: attention heads and FFN neurons."""

    def prune_block(self, block: nn.Module, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        # the rule is registered under _is_bert_layer, which checked these submodules
        sa = cast(_BertSelfAttention, block.get_submodule("attention.self"))
        out = cast(nn.Linear, block.get_submodule("attention.output.dense"))
        heads, d = int(sa.num_attention_heads), int(sa.attention_head_size)
        kept_heads = heads
        if head_ratio > 0:
            keep_h = keep_count(heads, head_ratio, 1, "the attention heads of a block")
            per_row = _channel(importance, [(sa.query, 0), (sa.key, 0), (sa.value, 0), (out, 1)], heads * d)
            head_scores = per_row.view(heads, d).sum(1)
            kept = complement(heads, lowest(head_scores, heads - keep_h))
            rows = (kept[:, None] * d + torch.arange(d)[None, :]).flatten()
            for lin in (sa.query, sa.key, sa.value):
                LINEAR.prune_out(lin, rows)
            LINEAR.prune_in(out, rows)
            sa.num_attention_heads = len(kept)
            sa.all_head_size = len(rows)
            kept_heads = len(kept)
            pruned = getattr(block.attention, "pruned_heads", None)
            if isinstance(pruned, set):
                pruned.update(set(range(heads)) - set(kept.tolist()))
        before, after = _prune_ffn(cast(nn.Linear, block.get_submodule("intermediate.dense")),
                                   cast(nn.Linear, block.get_submodule("output.dense")), ffn_ratio, importance,
                                   round_to, "a BERT layer")
        return {"heads": [heads, kept_heads], "ffn": [before, after]}

    def config_sizes(self, block: nn.Module) -> list[dict[str, int]]:
        # heads are not in the config: BERT derives the head width from hidden_size / num_attention_heads
        return [{"intermediate_size": cast(nn.Linear, block.get_submodule("intermediate.dense")).out_features}]


TorchLayer = nn.TransformerEncoderLayer | nn.TransformerDecoderLayer  # the modules TorchLayerRule handles


class TorchLayerRule(BlockRule[TorchLayer]):
    """``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: FFN neurons (``linear1``/``linear2``).
    Their ``nn.MultiheadAttention`` modules lose heads by their own rule (:mod:`slimguard.prune.mha`)."""

    def prune_block(self, block: TorchLayer, head_ratio: float, ffn_ratio: float,
                    importance: Importance, round_to: int = 1) -> dict[str, Any]:
        before, after = _prune_ffn(block.linear1, block.linear2, ffn_ratio, importance, round_to,
                                   f"a {type(block).__name__}")
        return {"ffn": [before, after]}


register_rule(_is_bert_layer)(BertLayerRule())
register_rule(nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)(TorchLayerRule())
