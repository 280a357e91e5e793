"""Heads of PyTorch's own ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` packs every head into projections as wide as the model (its functional forward
requires ``num_heads * head_dim == embed_dim``), so it cannot lose a head as it is. Structured pruning
first converts it to :class:`PrunedMultiheadAttention`, which computes the same outputs with separate
q/k/v projections of any number of heads (:meth:`MultiheadAttentionRule.convert`), then removes heads
from that (:func:`~slimguard.prune.attention.prune_heads`). The replacement takes the same call
(``query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal``), so
``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and user modules keep working; it is in the
artifact allowlist, so a pruned model saves and loads.

torch's fused "fast path" kernels need the packed full-width projection: they step aside for the
replacement (it says ``_qkv_same_embed_dim = False``), and ``nn.TransformerEncoder`` stacks turn off their
nested-tensor path (:class:`TorchStackRule`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ModelError
from slimguard.core.modules import register_module
from slimguard.prune.attention import HeadLayout, prune_heads
from slimguard.prune.blocks import BlockRule, Skip
from slimguard.prune.importance import Importance
from slimguard.prune.rules import register_rule


@register_module("slimguard.PrunedMultiheadAttention")
class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose heads need not fill ``embed_dim``: ``nn.MultiheadAttention``'s call with
    separate ``q_proj``/``k_proj``/``v_proj`` (``embed_dim``/``kdim``/``vdim`` -> ``num_heads * head_dim``)
    and ``out_proj`` back to ``embed_dim``.

    Args:
        embed_dim: query and output width.
        num_heads: number of heads.
        head_dim: width of one head (kept from the original, so the softmax scale is unchanged).
        kdim, vdim: key and value input widths (default ``embed_dim``).
        bias: projections have biases.
        dropout: dropout on the attention weights while training.
        batch_first: inputs are ``(batch, seq, feature)`` instead of ``(seq, batch, feature)``.

    Shape:
        query ``(L, N, E)`` (``(N, L, E)`` when ``batch_first``, ``(L, E)`` unbatched); output the same;
        weights ``(N, L, S)`` averaged over heads, else ``(N, num_heads, L, S)``.
    """

    in_proj_weight = None  # torch's fused paths look for a packed projection: there is none
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "kdim": self.kdim, "vdim": self.vdim, "bias": self.q_proj.bias is not None,
                "dropout": self.dropout, "batch_first": self.batch_first}

    @classmethod
    @torch.no_grad()
    def from_torch(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """The same attention as ``mha`` (every head kept), with separate projections."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise Skip("its add_bias_kv / add_zero_attn options have no pruned form")
        e, h = mha.embed_dim, mha.num_heads
        bias = mha.in_proj_bias is not None
        new = cls(e, h, mha.head_dim, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = list(mha.in_proj_weight.chunk(3))
        else:
            weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        biases = list(mha.in_proj_bias.chunk(3)) if bias else [None, None, None]
        for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if bias:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def _mask(self, mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
        """A boolean mask (True: not allowed) as an additive float mask; a float mask as it is."""
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(mask, float("-inf"))
        return mask.to(query.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, ls = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, ls, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, ls, h, d).transpose(1, 2)
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=query.device).triu(1)
        add = self._mask(attn_mask, q)
        if add is not None:
            if add.dim() == 3:
                if add.shape[0] != n * h:
                    raise ModelError(f"attn_mask has {add.shape[0]} per-head masks; this attention has "
                                     f"{n} x {h} (batch x heads left after pruning): pass a 2-D mask")
                add = add.view(n, h, lq, ls)
            scores = scores + add
        pad = self._mask(key_padding_mask, q)
        if pad is not None:
            scores = scores + pad.view(n, 1, 1, ls)
        weights = torch.softmax(scores, dim=-1)
        attn = F.dropout(weights, p=self.dropout, training=self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(n, lq, h * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = attn.mean(1) if average_attn_weights else attn  # as torch: after dropout
        return out, (w.squeeze(0) if unbatched else w)


MHA_LAYOUT = HeadLayout("q_proj", "k_proj", "v_proj", "out_proj", head_dim="head_dim", heads=("num_heads",))


class MultiheadAttentionRule(BlockRule[nn.Module]):
    """``nn.MultiheadAttention`` (converted to :class:`PrunedMultiheadAttention`) and the converted
    module itself: its heads go (``head_ratio``)."""

    def convert(self, block: nn.Module) -> nn.Module:
        if isinstance(block, nn.MultiheadAttention):
            return PrunedMultiheadAttention.from_torch(block)
        return block

    def prune_block(self, block: nn.Module, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        if not isinstance(block, PrunedMultiheadAttention):  # convert() comes first when heads are to go
            if head_ratio <= 0:
                return {"heads": [block.num_heads, block.num_heads]}
            raise Skip("convert it first (MultiheadAttentionRule.convert)")
        before, after = prune_heads(block, MHA_LAYOUT, head_ratio, importance, "a MultiheadAttention")
        return {"heads": [before, after]}


TorchStack = nn.TransformerEncoder | nn.TransformerDecoder | nn.Transformer  # what TorchStackRule handles


class TorchStackRule(BlockRule[TorchStack]):
    """``nn.TransformerEncoder`` / ``TransformerDecoder`` / ``Transformer``: their layers are pruned by their
    own rules; once heads go, the encoders' nested-tensor fast path (which reads the packed full-width
    projection) is turned off."""

    def prune_block(self, block: TorchStack, head_ratio: float, ffn_ratio: float, importance: Importance,
                    round_to: int = 1) -> dict[str, Any]:
        if head_ratio > 0:
            for m in block.modules():
                if isinstance(m, nn.TransformerEncoder):
                    m.use_nested_tensor = False
        return {}


register_rule(nn.MultiheadAttention, PrunedMultiheadAttention)(MultiheadAttentionRule())
register_rule(nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)(TorchStackRule())
