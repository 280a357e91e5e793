"""Transformer blocks pruned from the inside: attention heads and feed-forward neurons.

A transformer block keeps its hidden width (residual stream, LayerNorms, embeddings); what can go
are whole attention heads (rows of query/key/value and the matching columns of the attention output
projection) and feed-forward neurons (rows of the first FFN layer and columns of the second). The
dependency graph treats a registered block as one leaf whose input and output channels are fixed, and
:func:`prune_block` cuts it.

Registered blocks (a registry keyed by a predicate, first match wins):

* Hugging Face BERT-family layers (``BertLayer``, RoBERTa, MiniLM, ...): any module with
  ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense`` and
  ``output.dense``. Heads and FFN neurons. ``num_attention_heads`` and ``all_head_size`` of the
  self-attention are updated (the artifact stores them, so pruned models load back).
* ``torch.nn.TransformerEncoderLayer``: FFN neurons (``linear1``/``linear2``). Its
  ``nn.MultiheadAttention`` packs all heads into one fused projection whose width must equal the
  model width, so heads stay (documented limitation).

Paper: Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019 (head pruning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from slimguard.prune.importance import Importance, get_importance
from slimguard.prune.surgery import complement, keep_count, keep_slices, lowest

Predicate = Callable[[nn.Module], bool]
BlockPruner = Callable[[nn.Module, float, float, Importance, int], dict[str, Any]]
_BLOCKS: list[tuple[str, Predicate, BlockPruner]] = []


def register_block(name: str, predicate: Predicate) -> Callable[[BlockPruner], BlockPruner]:
    """Register ``fn(block, head_ratio, ffn_ratio, importance, round_to) -> info`` for modules matching
    ``predicate``."""

    def deco(fn: BlockPruner) -> BlockPruner:
        if any(n == name for n, _, _ in _BLOCKS):
            raise ValueError(f"block pruner {name!r} is already registered")
        _BLOCKS.append((name, predicate, fn))
        return fn

    return deco


def block_kind(m: nn.Module) -> str | None:
    for name, pred, _ in _BLOCKS:
        if pred(m):
            return name
    return None


def is_block(m: nn.Module) -> bool:
    return block_kind(m) is not None


def prune_block(m: nn.Module, head_ratio: float, ffn_ratio: float, imp: Importance,
                round_to: int = 1) -> dict[str, Any]:
    for _, pred, fn in _BLOCKS:
        if pred(m):
            return fn(m, head_ratio, ffn_ratio, imp, round_to)
    return {}


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


def _prune_ffn(first: nn.Linear, second: nn.Linear, ratio: float, imp: Importance, round_to: int,
               where: str) -> tuple[int, int]:
    n = first.out_features
    if ratio <= 0:
        return n, n
    keep_n = keep_count(n, ratio, round_to, f"the feed-forward layer of {where}")
    scores = _channel(imp, [(first, 0), (second, 1)], n)
    keep = complement(n, lowest(scores, n - keep_n))
    keep_slices(first, ("weight", "bias"), 0, keep)
    keep_slices(second, ("weight",), 1, keep)
    first.out_features = second.in_features = len(keep)
    return n, len(keep)


def _is_bert_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    sa = getattr(att, "self", None)
    return (all(isinstance(getattr(sa, k, None), nn.Linear) for k in ("query", "key", "value"))
            and isinstance(getattr(getattr(att, "output", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)
            and hasattr(sa, "num_attention_heads") and hasattr(sa, "attention_head_size"))


@register_block("hf-bert-layer", _is_bert_layer)
def _prune_bert_layer(m: nn.Module, head_ratio: float, ffn_ratio: float, imp: Importance,
                      round_to: int) -> dict[str, Any]:
    sa, out = m.attention.self, m.attention.output.dense
    heads, d = int(sa.num_attention_heads), int(sa.attention_head_size)
    kept_heads = heads
    if head_ratio > 0:
        keep_h = keep_count(heads, head_ratio, 1, "the attention heads of a block")
        per_row = _channel(imp, [(sa.query, 0), (sa.key, 0), (sa.value, 0), (out, 1)], heads * d)
        head_scores = per_row.view(heads, d).sum(1)
        kept = complement(heads, lowest(head_scores, heads - keep_h))
        rows = (kept[:, None] * d + torch.arange(d)[None, :]).flatten()
        for lin in (sa.query, sa.key, sa.value):
            keep_slices(lin, ("weight", "bias"), 0, rows)
            lin.out_features = len(rows)
        keep_slices(out, ("weight",), 1, rows)
        out.in_features = len(rows)
        sa.num_attention_heads = len(kept)
        sa.all_head_size = len(rows)
        kept_heads = len(kept)
        pruned = getattr(m.attention, "pruned_heads", None)
        if isinstance(pruned, set):
            pruned.update(set(range(heads)) - set(kept.tolist()))
    before, after = _prune_ffn(m.intermediate.dense, m.output.dense, ffn_ratio, imp, round_to, "a BERT layer")
    return {"heads": [heads, kept_heads], "ffn": [before, after]}


@register_block("torch-transformer-encoder-layer", lambda m: isinstance(m, nn.TransformerEncoderLayer))
def _prune_torch_encoder_layer(m: nn.Module, head_ratio: float, ffn_ratio: float, imp: Importance,
                               round_to: int) -> dict[str, Any]:
    heads = int(m.self_attn.num_heads)
    before, after = _prune_ffn(m.linear1, m.linear2, ffn_ratio, imp, round_to, "a TransformerEncoderLayer")
    return {"heads": [heads, heads], "ffn": [before, after]}
