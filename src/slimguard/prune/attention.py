"""Attention heads and MLP neurons of Hugging Face models (Llama, Mistral, Qwen2, GPT-2, ViT, DistilBERT).

Each family is one row of a table, not a class: a :class:`HeadLayout` says where an attention module keeps
its query, key, value and output projections and which attributes count its heads; an :class:`MLPLayout`
says which projections open the hidden neurons and which one closes them. :class:`HeadRule` and
:class:`MLPRule` turn a layout into a :class:`~slimguard.prune.blocks.BlockRule`, registered in the layer
rule table under a predicate that checks the module's structure (only for classes ``transformers``
defines, so a user's own module named alike keeps its own rule).

Heads (:func:`prune_heads`):

* multi-head attention (as many key/value heads as query heads): the lowest-scoring heads go, rows of
  q/k/v and the matching input columns of the output projection;
* grouped-query attention (``num_key_value_heads`` < ``num_attention_heads``, each KV head shared by a
  group of query heads): whole KV groups go, each with its query heads, so every kept query head keeps
  its own key/value head and ``num_key_value_groups`` stays;
* when the ratio is too small to remove a whole group (2 groups at ratio 0.25), and for multi-query
  attention (one KV head): every group loses the same number of its query heads, and the KV heads stay
  (``num_key_value_groups`` shrinks, the same in every group, as ``repeat_kv`` needs).

A fused projection (GPT-2's ``c_attn``, outputs ``[q | k | v]``) loses the rows of a head in all three
sections. ``head_dim`` never changes; the attributes a module uses to count heads (``num_heads``,
``num_key_value_groups``, ``split_size``, ...) are updated, so its forward runs and an artifact records
the new sizes. GPT-2's ``Conv1D`` (weight ``(in, out)``) gets a channel rule here as well, so the
dependency graph also follows it in models that are not Hugging Face ones.

Example:
    >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(...))
    >>> sg.prune_(model, sg.ChannelPruningConfig(ratio=0.5), example_inputs={"input_ids": ids})
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn as nn

from slimguard.prune.blocks import BlockRule, Skip, neuron_scores, projection_rule, prune_neurons
from slimguard.prune.importance import Importance
from slimguard.prune.rules import ChannelRule, register_rule
from slimguard.prune.surgery import complement, keep_count, keep_slices, lowest


# ---- GPT-2's Conv1D: a Linear with its weight transposed ---------------------------------------------
def _is_conv1d(m: nn.Module) -> bool:
    pu = sys.modules.get("transformers.pytorch_utils")  # a Conv1D exists only if transformers was imported
    cls = getattr(pu, "Conv1D", None)
    return cls is not None and isinstance(m, cls)


class _Conv1D(Protocol):
    nf: int  # output width
    nx: int  # input width


class Conv1DRule(ChannelRule[nn.Module]):
    """Hugging Face ``Conv1D`` (GPT-2): weight ``(in, out)``, channels on the last dimension; ``nf``/``nx``
    are its output/input widths."""

    channels_last = True
    weight_dims: ClassVar[dict[str, int]] = {"out": 1, "in": 0, "feat": 1}

    def in_channels(self, module: nn.Module) -> int:
        return int(cast(_Conv1D, module).nx)

    def out_channels(self, module: nn.Module) -> int:
        return int(cast(_Conv1D, module).nf)

    def prune_out(self, module: nn.Module, keep: torch.Tensor) -> None:
        cast(_Conv1D, module).nf = keep_slices(module, ("weight",), 1, keep)
        keep_slices(module, ("bias",), 0, keep)

    def prune_in(self, module: nn.Module, keep: torch.Tensor) -> None:
        cast(_Conv1D, module).nx = keep_slices(module, ("weight",), 0, keep)


register_rule(_is_conv1d)(Conv1DRule())


def _from_transformers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.")


def _set(module: nn.Module, names: tuple[str, ...], value: int) -> None:
    """Set each attribute of ``names`` that ``module`` has to ``value``."""
    for name in names:
        if hasattr(module, name):
            setattr(module, name, value)


# ---- attention heads ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where one attention family keeps its heads.

    Attributes:
        q, k, v: submodule names of the query, key and value projections (one name three times: a fused
            projection whose outputs are ``[q | k | v]``).
        o: the output projection; its inputs are the query heads' outputs.
        head_dim: the attribute holding the width of one head (it never changes).
        heads: attributes counting query heads (those the module has are updated).
        kv_heads: attributes counting key/value heads.
        groups: attributes holding query heads per key/value head.
        widths: attributes holding the query width, heads * head_dim.
        when: an extra condition on the module (e.g. not a cross-attention).
        config: the model config's keys for (query heads, key/value heads, head width), when the family
            reads all three from its config (Llama does; GPT-2 derives the head width from the model width).
    """

    q: str
    k: str
    v: str
    o: str
    head_dim: str
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()
    when: Callable[[nn.Module], bool] | None = None
    config: tuple[str, str, str] | None = None

    def matches(self, m: nn.Module) -> bool:
        """``m`` is a ``transformers`` module with these projections and a head width."""
        if not _from_transformers(m) or not isinstance(getattr(m, self.head_dim, None), int):
            return False
        projections = [getattr(m, n, None) for n in (self.q, self.k, self.v, self.o)]
        if not all(isinstance(p, nn.Module) and isinstance(projection_rule_or_none(p), ChannelRule)
                   for p in projections):
            return False
        return self.when is None or self.when(m)


def projection_rule_or_none(m: nn.Module) -> ChannelRule | None:
    try:
        return projection_rule(m, "")
    except Skip:
        return None


@dataclasses.dataclass
class _Heads:
    """Head counts of one attention module and where each section's rows start in its projection."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    d: int
    nq: int
    nkv: int
    offsets: tuple[int, int, int]  # first row of q, k, v in their (maybe shared) projection


def _heads_of(m: nn.Module, layout: HeadLayout, where: str) -> _Heads:
    q, k, v, o = (getattr(m, n) for n in (layout.q, layout.k, layout.v, layout.o))
    d = int(getattr(m, layout.head_dim))
    if layout.q == layout.k == layout.v:  # fused [q | k | v]
        width = projection_rule(q, where).out_channels(q)
        if width % 3:
            raise Skip(f"its fused projection {layout.q!r} has {width} outputs, not three equal parts")
        section = width // 3
        nq = nkv = section // d
        offsets = (0, section, 2 * section)
    else:
        nq = projection_rule(q, where).out_channels(q) // d
        nkv = projection_rule(k, where).out_channels(k) // d
        offsets = (0, 0, 0)
    if nq < 1 or nkv < 1 or nq % nkv or projection_rule(o, where).in_channels(o) != nq * d:
        raise Skip(f"its projections do not split into heads of {d} ({nq} query, {nkv} key/value)")
    return _Heads(q, k, v, o, d, nq, nkv, offsets)


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Row indices of ``heads`` (sorted head indices) with ``d`` rows each."""
    return (heads[:, None] * d + torch.arange(d)[None, :]).flatten()


def prune_heads(m: nn.Module, layout: HeadLayout, ratio: float, imp: Importance, where: str) -> tuple[int, int]:
    """Remove ``ratio`` of the heads of attention module ``m`` (see the module docstring for grouped-query
    attention) and update its head-count attributes. Returns (query heads before, after)."""
    h = _heads_of(m, layout, where)
    if ratio <= 0:
        return h.nq, h.nq
    g = h.nq // h.nkv
    per_q = neuron_scores(imp, [(h.q, "out", h.offsets[0]), (h.o, "in", 0)], h.nq * h.d).view(h.nq, h.d).sum(1)
    per_kv = neuron_scores(imp, [(h.k, "out", h.offsets[1]), (h.v, "out", h.offsets[2])],
                           h.nkv * h.d).view(h.nkv, h.d).sum(1)
    groups_left = h.nkv if h.nkv == 1 else keep_count(h.nkv, ratio, 1, f"the key/value heads of {where}")
    if g > 1 and groups_left == h.nkv:
        # multi-query, or too few groups to lose one: every group loses as many of its query heads
        per = keep_count(g, ratio, 1, f"the query heads of each group of {where}")
        keep_q = torch.cat([j * g + complement(g, lowest(per_q[j * g : (j + 1) * g], g - per))
                            for j in range(h.nkv)])
        keep_kv = torch.arange(h.nkv)
    else:  # a KV head and its group of query heads go together (g = 1: plain multi-head attention)
        scores = per_kv + per_q.view(h.nkv, g).sum(1)
        keep_kv = complement(h.nkv, lowest(scores, h.nkv - groups_left))
        keep_q = _rows(keep_kv, g)
    q_rows, kv_rows = _rows(keep_q, h.d), _rows(keep_kv, h.d)
    if layout.q == layout.k == layout.v:
        section = h.offsets[1]
        rows = torch.cat([q_rows, kv_rows + section, kv_rows + 2 * section])
        projection_rule(h.q, where).prune_out(h.q, rows)
    else:
        projection_rule(h.q, where).prune_out(h.q, q_rows)
        projection_rule(h.k, where).prune_out(h.k, kv_rows)
        projection_rule(h.v, where).prune_out(h.v, kv_rows)
    projection_rule(h.o, where).prune_in(h.o, q_rows)
    nq, nkv = len(keep_q), len(keep_kv)
    _set(m, layout.heads, nq)
    _set(m, layout.kv_heads, nkv)
    _set(m, layout.groups, nq // nkv)
    _set(m, layout.widths, nq * h.d)
    pruned = getattr(m, "pruned_heads", None)
    if isinstance(pruned, set):
        pruned.update(set(range(h.nq)) - set(keep_q.tolist()))
    return h.nq, nq


class HeadRule(BlockRule[nn.Module]):
    """An attention module described by a :class:`HeadLayout`: its heads go (``head_ratio``)."""

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout

    def prune_block(self, block: nn.Module, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        before, after = prune_heads(block, self.layout, head_ratio, importance, f"a {type(block).__name__}")
        return {"heads": [before, after]}

    def config_sizes(self, block: nn.Module) -> list[dict[str, int]]:
        if self.layout.config is None:
            return []
        h = _heads_of(block, self.layout, type(block).__name__)
        return [dict(zip(self.layout.config, (h.nq, h.nkv, h.d), strict=True))]


# ---- MLP neurons --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """Where one MLP family keeps its hidden neurons.

    Attributes:
        firsts: projections whose outputs are the neurons (``gate_proj`` and ``up_proj`` of a gated MLP).
        second: the projection whose inputs are the neurons.
        sizes: attributes holding the number of neurons (those the module has are updated).
        config: the model config's key for the number of neurons.
    """

    firsts: tuple[str, ...]
    second: str
    sizes: tuple[str, ...] = ()
    config: str | None = None

    def matches(self, m: nn.Module) -> bool:
        """``m`` is a ``transformers`` module with these projections."""
        return _from_transformers(m) and all(
            isinstance(getattr(m, n, None), nn.Module) and projection_rule_or_none(getattr(m, n)) is not None
            for n in (*self.firsts, self.second))


class MLPRule(BlockRule[nn.Module]):
    """An MLP described by an :class:`MLPLayout`: its hidden neurons go (``ffn_ratio``)."""

    def __init__(self, layout: MLPLayout) -> None:
        self.layout = layout

    def prune_block(self, block: nn.Module, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        firsts = [getattr(block, n) for n in self.layout.firsts]
        before, after = prune_neurons(firsts, getattr(block, self.layout.second), ffn_ratio, importance,
                                      round_to, f"a {type(block).__name__}")
        _set(block, self.layout.sizes, after)
        return {"ffn": [before, after]}

    def config_sizes(self, block: nn.Module) -> list[dict[str, int]]:
        if self.layout.config is None:
            return []
        second = getattr(block, self.layout.second)
        return [{self.layout.config: projection_rule(second, type(block).__name__).in_channels(second)}]


def register_layout(layout: HeadLayout | MLPLayout) -> BlockRule[nn.Module]:
    """Register the rule of ``layout`` under its structural predicate; returns the rule."""
    rule: BlockRule[nn.Module] = HeadRule(layout) if isinstance(layout, HeadLayout) else MLPRule(layout)
    register_rule(layout.matches)(rule)
    return rule


#: Llama, Mistral, Qwen2, Gemma, and ViT in transformers 5 (separate q/k/v/o projections).
QKVO = HeadLayout("q_proj", "k_proj", "v_proj", "o_proj", head_dim="head_dim",
                  heads=("num_heads", "num_attention_heads"), kv_heads=("num_key_value_heads",),
                  groups=("num_key_value_groups",), config=("num_attention_heads", "num_key_value_heads", "head_dim"))
#: GPT-2: fused ``c_attn`` (Conv1D) split at ``split_size``; cross-attention (``q_attn``) is left out.
GPT2 = HeadLayout("c_attn", "c_attn", "c_attn", "c_proj", head_dim="head_dim", heads=("num_heads",),
                  widths=("split_size",), when=lambda m: not getattr(m, "is_cross_attention", False))
#: DistilBERT.
DISTILBERT = HeadLayout("q_lin", "k_lin", "v_lin", "out_lin", head_dim="attention_head_size", heads=("n_heads",))
#: Llama-style gated MLP.
GATED_MLP = MLPLayout(("gate_proj", "up_proj"), "down_proj", sizes=("intermediate_size",), config="intermediate_size")
#: ViT, CLIP-style MLP.
FC_MLP = MLPLayout(("fc1",), "fc2", config="intermediate_size")
#: GPT-2 MLP (Conv1D).
GPT2_MLP = MLPLayout(("c_fc",), "c_proj", config="n_inner")
#: DistilBERT FFN.
DISTILBERT_FFN = MLPLayout(("lin1",), "lin2", config="hidden_dim")

for _layout in (QKVO, GPT2, DISTILBERT, GATED_MLP, FC_MLP, GPT2_MLP, DISTILBERT_FFN):
    register_layout(_layout)
