"""Pruned transformers models fitted to what their configs can describe, for ``export --format hf``.

Structured pruning leaves every layer with its own number of attention heads and FFN neurons, but a
transformers config holds one number for each, and some families cannot say "fewer heads" at all: BERT,
RoBERTa, DistilBERT and GPT-2 derive the head width as ``hidden_size / num_attention_heads``, so fewer
heads in the config would mean wider heads. :func:`fit_to_config` reads the pruned sizes from the weights
and, for each of the two kinds of size, takes the smallest shape the config can describe:

* **the pruned shape**, written into a copy of the config, when every layer has it and the family can say
  it: an FFN width the same in every layer (``intermediate_size``, DistilBERT's ``hidden_dim``, GPT-2's
  ``n_inner``), or a head count the same in every layer for families that build heads of ``config.head_dim``
  (Llama, Mistral, Qwen2 and other configs with an explicit ``head_dim``; ViT);
* **a zero-padded shape** otherwise: the widest layer's FFN width, the widest layer's head count in
  families with an explicit ``head_dim``, else the config's own head count (the original one). Each
  missing head comes back as zeros: its rows (and biases) of the query, key and value projections, and its
  columns of the output projection; each missing FFN neuron as its zero rows (and biases) of the up
  projections (``gate_proj`` too) and its zero columns of the down projection. Whatever a zero head or
  neuron computes inside is multiplied by its zero output columns, so the padded model gives the pruned
  model's outputs, up to float rounding. The kept heads and neurons come first in each layer and the zeros
  after (their order inside a layer does not change what the layer computes); in grouped-query attention,
  each kept key/value head keeps its query heads in its own group.

Padded layers save no space in this format (they are as large as the shape they are padded to); the ONNX
export keeps the pruned shape. The copy of the config records the zeros under the key ``slimguard`` (data
only), e.g.::

    "slimguard": {"zero_padded": true,
                  "zero_heads": {"bert.encoder.layer.0.attention": [[2, 4]]},
                  "zero_ffn_neurons": {"bert.encoder.layer.1": [[40, 64]]}}

ranges ``[start, stop)`` of query heads (``zero_key_value_heads`` too, in grouped-query families) and of FFN
neurons, named by the module of :data:`ATTENTION` / :data:`FFN` that holds them.

Example:
    >>> fit = fit_to_config(model.model)          # transformers' model inside a slimguard wrapper
    >>> fit.padded, fit.written      # (True, {'intermediate_size': 48}): BERT, heads and FFN pruned per layer
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ModelError

RECORD_KEY = "slimguard"
"""The config key under which a padded export lists its zero heads and neurons."""
# model types whose attention builds heads of config.head_dim even when the config class does not define it
_HEAD_DIM_READERS = frozenset({"vit"})


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """Where one attention family keeps its heads, as paths under the module it matches.

    Attributes:
        q, k, v: the query, key and value projections (one path three times: a fused projection whose
            outputs are ``[q | k | v]``, as GPT-2's ``c_attn``).
        o: the output projection; its inputs are the query heads' outputs.
        head_dim: the attribute holding one head's width (pruning never changes it).
        when: an extra condition on the module (GPT-2: not a cross-attention).
    """

    q: str
    k: str
    v: str
    o: str
    head_dim: str
    when: Callable[[nn.Module], bool] | None = None


@dataclasses.dataclass(frozen=True)
class FFNLayout:
    """Where one FFN family keeps its hidden neurons: ``firsts`` output them, ``second`` reads them, and the
    config's ``key`` counts them."""

    firsts: tuple[str, ...]
    second: str
    key: str


ATTENTION = (
    AttentionLayout("self.query", "self.key", "self.value", "output.dense", "self.attention_head_size"),  # BERT
    AttentionLayout("q_lin", "k_lin", "v_lin", "out_lin", "attention_head_size"),  # DistilBERT
    AttentionLayout("c_attn", "c_attn", "c_attn", "c_proj", "head_dim",  # GPT-2
                    when=lambda m: not getattr(m, "is_cross_attention", False)),
    AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),  # Llama, Mistral, Qwen2, ViT
)
"""Attention families, tried in order on every module of transformers' model."""
FFN = (
    FFNLayout(("intermediate.dense",), "output.dense", "intermediate_size"),  # BERT, RoBERTa
    FFNLayout(("gate_proj", "up_proj"), "down_proj", "intermediate_size"),  # Llama-style gated MLP
    FFNLayout(("fc1",), "fc2", "intermediate_size"),  # ViT
    FFNLayout(("lin1",), "lin2", "hidden_dim"),  # DistilBERT
    FFNLayout(("c_fc",), "c_proj", "n_inner"),  # GPT-2
)
"""FFN families, tried in order on every module of transformers' model."""


# ---- projections: nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out)) ------------------
def _is_conv1d(m: nn.Module) -> bool:
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(m, cls)


def _projection(m: nn.Module, path: str) -> nn.Module | None:
    try:
        p = m.get_submodule(path)
    except AttributeError:
        return None
    weight = getattr(p, "weight", None)
    ok = isinstance(p, nn.Linear) or _is_conv1d(p)
    return p if ok and isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _out_dim(p: nn.Module) -> int:
    return 1 if _is_conv1d(p) else 0


def _width(p: nn.Module, role: str) -> int:
    """Outputs (``role="out"``) or inputs (``"in"``) of a projection."""
    dim = _out_dim(p) if role == "out" else 1 - _out_dim(p)
    weight: Any = p.weight  # a Tensor (checked by _projection); torch's stub says Tensor | Module
    return int(weight.shape[dim])


def _from_transformers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.")


def _attribute(m: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    try:
        return getattr(m.get_submodule(owner) if owner else m, name, None)
    except AttributeError:
        return None


# ---- reading the pruned sizes ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Attention:
    name: str
    layout: AttentionLayout
    d: int  # one head's width
    nq: int  # query heads
    nkv: int  # key/value heads


@dataclasses.dataclass(frozen=True)
class _FFN:
    name: str
    layout: FFNLayout
    width: int


def _attention_of(name: str, m: nn.Module, lay: AttentionLayout) -> _Attention | None:
    q, k, v, o = (_projection(m, p) for p in (lay.q, lay.k, lay.v, lay.o))
    d = _attribute(m, lay.head_dim)
    if q is None or k is None or v is None or o is None or not isinstance(d, int) or d < 1:
        return None
    if lay.when is not None and not lay.when(m):
        return None
    if lay.q == lay.k == lay.v:
        width = _width(q, "out")
        nq = nkv = width // 3 // d
        fits = width % 3 == 0 and width // 3 == nq * d
    else:
        nq, nkv = _width(q, "out") // d, _width(k, "out") // d
        fits = _width(q, "out") == nq * d and _width(k, "out") == nkv * d
    if not fits or nq < 1 or nkv < 1 or nq % nkv or _width(o, "in") != nq * d:
        return None  # not heads of this layout (e.g. another head width for values); the reload check speaks
    return _Attention(name, lay, d, nq, nkv)


def _ffn_of(name: str, m: nn.Module, lay: FFNLayout) -> _FFN | None:
    firsts = [_projection(m, p) for p in lay.firsts]
    second = _projection(m, lay.second)
    if second is None or any(p is None for p in firsts):
        return None
    width = _width(second, "in")
    if any(_width(p, "out") != width for p in firsts if p is not None):
        return None  # not an FFN of this layout
    return _FFN(name, lay, width)


def _find(inner: nn.Module) -> tuple[list[_Attention], list[_FFN]]:
    """Every attention module and FFN of ``inner`` that a layout of :data:`ATTENTION` / :data:`FFN` matches."""
    attention: list[_Attention] = []
    ffn: list[_FFN] = []
    for name, m in inner.named_modules():
        if not _from_transformers(m):
            continue
        for a_lay in ATTENTION:
            found = _attention_of(name, m, a_lay)
            if found is not None:
                attention.append(found)
                break
        for f_lay in FFN:
            got = _ffn_of(name, m, f_lay)
            if got is not None:
                ffn.append(got)
                break
    return attention, ffn


# ---- padding ---------------------------------------------------------------------------------------------
def _place(t: torch.Tensor, dim: int, positions: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` widened to ``size`` along ``dim`` with zeros; its slices go to ``positions``."""
    shape = list(t.shape)
    shape[dim] = size
    return t.new_zeros(shape).index_copy_(dim, positions.to(t.device), t.detach())


def _pad(state: dict[str, torch.Tensor], inner: nn.Module, prefix: str, role: str, positions: torch.Tensor,
         size: int) -> None:
    """Widen the projection at ``prefix`` in ``state``: its outputs (weight and bias, ``role="out"``) or
    inputs (``"in"``) to ``size``, the present ones at ``positions``."""
    p = inner.get_submodule(prefix)
    dim = _out_dim(p) if role == "out" else 1 - _out_dim(p)
    state[f"{prefix}.weight"] = _place(state[f"{prefix}.weight"], dim, positions, size)
    if role == "out" and f"{prefix}.bias" in state:
        state[f"{prefix}.bias"] = _place(state[f"{prefix}.bias"], 0, positions, size)


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)[None, :]).flatten()


def _ranges(zero: list[int]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` ranges."""
    out: list[list[int]] = []
    for i in zero:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _pad_attention(state: dict[str, torch.Tensor], inner: nn.Module, a: _Attention, nq_t: int,
                   nkv_t: int) -> tuple[list[int], list[int]]:
    """Pad attention ``a`` to ``nq_t`` query and ``nkv_t`` key/value heads; returns the zero (query, key/value)
    heads. Key/value head j stays at j, and its i-th query head goes to j * (nq_t // nkv_t) + i."""
    g, g_t = a.nq // a.nkv, nq_t // nkv_t
    q_heads = torch.tensor([j * g_t + i for j in range(a.nkv) for i in range(g)])
    kv_heads = torch.arange(a.nkv)
    q_rows, kv_rows = _rows(q_heads, a.d), _rows(kv_heads, a.d)
    lay = a.layout
    if lay.q == lay.k == lay.v:  # fused [q | k | v]: each section to its padded place
        q_w, kv_w = nq_t * a.d, nkv_t * a.d
        rows = torch.cat([q_rows, kv_rows + q_w, kv_rows + q_w + kv_w])
        _pad(state, inner, _join(a.name, lay.q), "out", rows, q_w + 2 * kv_w)
    else:
        _pad(state, inner, _join(a.name, lay.q), "out", q_rows, nq_t * a.d)
        _pad(state, inner, _join(a.name, lay.k), "out", kv_rows, nkv_t * a.d)
        _pad(state, inner, _join(a.name, lay.v), "out", kv_rows, nkv_t * a.d)
    _pad(state, inner, _join(a.name, lay.o), "in", q_rows, nq_t * a.d)
    kept_q, kept_kv = set(q_heads.tolist()), set(kv_heads.tolist())
    return [h for h in range(nq_t) if h not in kept_q], [h for h in range(nkv_t) if h not in kept_kv]


def _pad_ffn(state: dict[str, torch.Tensor], inner: nn.Module, f: _FFN, width: int) -> list[int]:
    """Pad FFN ``f`` to ``width`` neurons, the kept ones first; returns the zero neurons."""
    kept = torch.arange(f.width)
    for path in f.layout.firsts:
        _pad(state, inner, _join(f.name, path), "out", kept, width)
    _pad(state, inner, _join(f.name, f.layout.second), "in", kept, width)
    return list(range(f.width, width))


# ---- the fit ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConfigFit:
    """What :func:`fit_to_config` decided for one transformers model.

    Attributes:
        config: a copy of the model's config with the sizes to write (and, when padded, the ``slimguard``
            record of the zeros).
        state_dict: the weights to write: the model's own, with padded tensors where layers were padded.
        written: config keys whose values changed, with their new values.
        zero_heads / total_heads: query heads that are zeros in the padded weights, of all query heads.
        zero_neurons / total_neurons: FFN neurons that are zeros, of all FFN neurons.
        reasons: why padding was needed (what the config cannot describe), empty when nothing was padded.
        shapes: the padded shapes, in words (``"4 attention heads (the original)"``).
    """

    config: Any
    state_dict: dict[str, torch.Tensor]
    written: dict[str, int] = dataclasses.field(default_factory=dict)
    zero_heads: int = 0
    total_heads: int = 0
    zero_neurons: int = 0
    total_neurons: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    shapes: list[str] = dataclasses.field(default_factory=list)

    @property
    def padded(self) -> bool:
        """Whether any head or neuron of the written weights is a zero the pruned model does not have."""
        return bool(self.zero_heads or self.zero_neurons)


def _set(fit: ConfigFit, key: str, value: int) -> None:
    if getattr(fit.config, key, None) != value:
        setattr(fit.config, key, value)
        fit.written[key] = value


def _head_dim_from_config(cfg: Any) -> bool:
    """Whether the family builds heads of ``config.head_dim``, so its config can describe fewer heads."""
    return isinstance(getattr(cfg, "head_dim", None), int) or getattr(cfg, "model_type", None) in _HEAD_DIM_READERS


def _fit_heads(fit: ConfigFit, inner: nn.Module, attention: list[_Attention], record: dict[str, Any]) -> None:
    cfg = fit.config
    nq0 = getattr(cfg, "num_attention_heads", None)
    if not attention or not isinstance(nq0, int):
        return
    nkv0 = int(getattr(cfg, "num_key_value_heads", None) or nq0)
    explicit = _head_dim_from_config(cfg)
    d0 = int(cfg.head_dim) if isinstance(getattr(cfg, "head_dim", None), int) else int(cfg.hidden_size) // nq0
    if {(a.nq, a.nkv, a.d) for a in attention} == {(nq0, nkv0, d0)}:
        fit.total_heads += nq0 * len(attention)
        return
    widths = {a.d for a in attention}
    if explicit and len(widths) == 1:  # the config can say the head count: the widest layer's
        nkv_t = max(a.nkv for a in attention)
        nq_t = nkv_t * max(a.nq // a.nkv for a in attention)
        _set(fit, "num_attention_heads", nq_t)
        _set(fit, "head_dim", widths.pop())
        if hasattr(cfg, "num_key_value_heads"):
            _set(fit, "num_key_value_heads", nkv_t)
        if any((a.nq, a.nkv) != (nq_t, nkv_t) for a in attention):
            fit.reasons.append("a different number of attention heads in each layer")
            fit.shapes.append(f"{nq_t} attention heads (the most any layer kept)")
    else:  # the head width follows from hidden_size / num_attention_heads: back to the config's heads
        nq_t, nkv_t = nq0, nkv0
        for a in attention:
            if a.d != d0 or a.nq > nq0 or a.nkv > nkv0 or a.nq // a.nkv > nq0 // nkv0:
                raise ModelError(f"export --format hf: {a.name} has {a.nq} heads of {a.d}, which a "
                                 f"{cfg.model_type} config of {nq0} heads of {d0} cannot hold; use --format "
                                 "onnx or the .slim artifact")
        fit.reasons.append("fewer attention heads than num_attention_heads (its head width is hidden_size / "
                           "num_attention_heads)")
        fit.shapes.append(f"{nq0} attention heads (the original)")
    grouped = nkv_t != nq_t or nkv0 != nq0
    for a in attention:
        fit.total_heads += nq_t
        if (a.nq, a.nkv) == (nq_t, nkv_t):
            continue
        zero_q, zero_kv = _pad_attention(fit.state_dict, inner, a, nq_t, nkv_t)
        fit.zero_heads += len(zero_q)
        record.setdefault("zero_heads", {})[a.name] = _ranges(zero_q)
        if grouped and zero_kv:
            record.setdefault("zero_key_value_heads", {})[a.name] = _ranges(zero_kv)


def _fit_ffn(fit: ConfigFit, inner: nn.Module, ffn: list[_FFN], record: dict[str, Any]) -> None:
    cfg = fit.config
    for key in dict.fromkeys(f.layout.key for f in ffn):
        mine = [f for f in ffn if f.layout.key == key]
        if not hasattr(cfg, key):
            continue
        value = getattr(cfg, key)
        if value is None and key == "n_inner":  # GPT-2: None means 4 * n_embd
            value = 4 * int(cfg.hidden_size)
        widths = {f.width for f in mine}
        if widths == {value}:
            fit.total_neurons += sum(f.width for f in mine)
            continue
        width = max(widths)  # the widest layer's; narrower layers are padded to it
        _set(fit, key, width)
        if len(widths) > 1:
            fit.reasons.append("a different FFN width in each layer")
            fit.shapes.append(f"{width} FFN neurons" + (" (the original)" if width == value else
                                                       " (the most any layer kept)"))
        for f in mine:
            fit.total_neurons += width
            if f.width < width:
                zero = _pad_ffn(fit.state_dict, inner, f, width)
                fit.zero_neurons += len(zero)
                record.setdefault("zero_ffn_neurons", {})[f.name] = _ranges(zero)


def fit_to_config(inner: nn.Module) -> ConfigFit:
    """The config and weights to write for transformers' model ``inner`` (see the module docstring).

    ``inner`` and its config are left as they are: the fit holds a copy of the config, and its state dict
    shares every tensor it does not pad.

    Raises:
        ModelError: heads that the config cannot hold even padded (wider, or more, than the config's).
    """
    own: Any = inner.config  # a transformers config; torch's stub says Tensor | Module
    fit = ConfigFit(copy.deepcopy(own), dict(inner.state_dict()))
    attention, ffn = _find(inner)
    record: dict[str, Any] = {}
    _fit_heads(fit, inner, attention, record)
    _fit_ffn(fit, inner, ffn, record)
    if fit.padded:
        setattr(fit.config, RECORD_KEY, {"zero_padded": True, **record})
    return fit
