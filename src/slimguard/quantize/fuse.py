"""Layer fusion: fold BatchNorm into the Conv / Linear before it (exact up to float rounding), and find
Conv/Linear -> BN -> ReLU chains for quantization.

Folding uses the BN running statistics: ``w' = w * g / sqrt(var + eps)`` (per output channel) and
``b' = (b - mean) * g / sqrt(var + eps) + beta``. The BN becomes ``nn.Identity``; the layer becomes a
:class:`FoldedConv2d` / :class:`FoldedLinear` (an ordinary Conv2d / Linear that always has a bias, so
artifacts rebuild it). Chains are found with ``torch.fx`` when the model traces, else from adjacent
layers inside ``nn.Sequential`` containers.

Example:
    >>> sg.fuse_(model, sg.FuseBNConfig())   # {"fused": [["stem.0", "stem.1"], ...], "not_fused": [...]}
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, register_config
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler
from slimguard.quantize.common import pair, set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_RELU_FNS = (F.relu, torch.relu)


@register_config("fuse-bn")
@dataclasses.dataclass
class FuseBNConfig(Config):
    """Fold every BatchNorm that directly follows a Conv2d / Linear into it (model must be in eval use:
    the running statistics are used). No options."""


@register_module("slimguard.FoldedConv2d")
class FoldedConv2d(nn.Conv2d):
    """A Conv2d with a bias produced by folding a BatchNorm into it."""

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), dilation=list(self.dilation),
                    padding=self.padding if isinstance(self.padding, str) else list(self.padding),
                    groups=self.groups, padding_mode=self.padding_mode)


@register_module("slimguard.FoldedLinear")
class FoldedLinear(nn.Linear):
    """A Linear with a bias produced by folding a BatchNorm1d into it."""

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}


@dataclasses.dataclass
class Chain:
    """A compute layer and the BN / ReLU modules that follow it alone (names; None when absent)."""

    layer: str
    bn: str | None = None
    relu: str | None = None


def find_chains(model: nn.Module) -> list[Chain]:
    """Conv2d / Linear layers with the BatchNorm and ReLU module that consume only their output."""
    try:
        return _chains_fx(model)
    except Exception:  # models that fx cannot trace (data-dependent control flow): fall back
        return _chains_sequential(model)


def _chains_fx(model: nn.Module) -> list[Chain]:
    import collections

    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    out: list[Chain] = []
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def sole_user_module(node: fx.Node, types: tuple[type, ...]) -> fx.Node | None:
        users = list(node.users)  # a module called from two places (a shared ReLU) is never fused
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(users[0].target), types) \
                and calls[users[0].target] == 1:
            return users[0]
        return None

    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), (nn.Conv2d, nn.Linear)) \
                and calls[node.target] == 1:
            chain = Chain(str(node.target))
            last = node
            bn = sole_user_module(node, _BN)
            if bn is not None:
                chain.bn, last = str(bn.target), bn
            relu = sole_user_module(last, (nn.ReLU,))
            if relu is not None:
                chain.relu = str(relu.target)
            out.append(chain)
    return out


def _chains_sequential(model: nn.Module) -> list[Chain]:
    out: list[Chain] = []
    seen: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for i, (cname, child) in enumerate(items):
                if isinstance(child, (nn.Conv2d, nn.Linear)):
                    full = f"{name}.{cname}" if name else cname
                    chain, j = Chain(full), i + 1
                    if j < len(items) and isinstance(items[j][1], _BN):
                        chain.bn = f"{name}.{items[j][0]}" if name else items[j][0]
                        j += 1
                    if j < len(items) and isinstance(items[j][1], nn.ReLU):
                        chain.relu = f"{name}.{items[j][0]}" if name else items[j][0]
                    out.append(chain)
                    seen.add(full)
    for name, mod in model.named_modules():  # layers outside Sequential containers: no chain known
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and name not in seen:
            out.append(Chain(name))
    return out


@torch.no_grad()
def fold_bn(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """A new FoldedConv2d / FoldedLinear equal to ``bn(layer(x))`` in eval mode.

    Raises:
        ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``): nothing to fold.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fold_bn: the BatchNorm keeps no running statistics; there is nothing to fold")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    if isinstance(layer, nn.Conv2d):
        padding = layer.padding if isinstance(layer.padding, str) else pair(layer.padding)
        new: nn.Conv2d | nn.Linear = FoldedConv2d(layer.in_channels, layer.out_channels, pair(layer.kernel_size),
                                                  pair(layer.stride), padding, pair(layer.dilation), layer.groups,
                                                  bias=True, padding_mode=layer.padding_mode)
    else:
        new = FoldedLinear(layer.in_features, layer.out_features, bias=True)
    new = new.to(layer.weight.device, layer.weight.dtype)
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    new.weight.copy_(layer.weight * factor.reshape(shape))
    b = layer.bias if layer.bias is not None else torch.zeros_like(std)
    cast(torch.Tensor, new.bias).copy_((b - bn.running_mean) * factor + beta)  # folded layers have a bias
    new.train(layer.training)
    return new


def fold_all(model: nn.Module, chains: list[Chain] | None = None) -> tuple[list[Chain], list[list[str]]]:
    """Fold every chain's BN into its layer (in place). Returns (chains with ``bn`` cleared, fused pairs)."""
    chains = find_chains(model) if chains is None else chains
    fused = []
    for c in chains:
        if c.bn is None:
            continue
        layer, bn = model.get_submodule(c.layer), model.get_submodule(c.bn)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not isinstance(bn, _BN):
            continue  # (chains hold only these kinds)
        if not getattr(bn, "track_running_stats", False) or bn.running_var is None:
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        set_submodule(model, c.layer, fold_bn(layer, bn))
        set_submodule(model, c.bn, nn.Identity())
        fused.append([c.layer, c.bn])
        c.bn = None
    return chains, fused


@register_handler("fuse", FuseBNConfig)
def _fuse_bn(model: nn.Module, config: FuseBNConfig, **_: Any) -> dict[str, Any]:
    fused = fold_all(model)[1]
    fused_bns = {b for _, b in fused}
    left = [n for n, m in model.named_modules() if isinstance(m, _BN) and n not in fused_bns]
    return {"fused": fused, "not_fused": left}
