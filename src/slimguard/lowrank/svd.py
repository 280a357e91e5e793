"""Low-rank factorisation by truncated SVD.

``sg.factorize_(model, LowRankConfig(energy=0.9))`` replaces each eligible layer by two thinner ones:

* ``Linear(in, out)`` -> ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` with
  ``W ~= U_r S_r V_r^T`` split as ``(S_r^1/2 V_r^T)`` and ``(U_r S_r^1/2)``.
* ``Conv2d(cin, cout, k x k)`` -> ``Sequential(Conv2d(cin, r, k x k, bias=False), Conv2d(r, cout, 1x1))``,
  factorising the weight reshaped to ``(cout, cin * k * k)`` (Jaderberg et al. 2014 / Zhang et al. 2015
  style channel decomposition).

The rank keeps a fraction ``energy`` of the squared singular values (so the relative Frobenius error
of the weight is exactly ``sqrt(1 - retained)``), or a fixed ``ratio`` of the full rank. A layer is
only factorised when that saves parameters (``r * (m + n) < m * n``). Only standard layers are
produced, so artifacts need no new module classes. Fine-tune afterwards (``finetune`` step).

Example:
    >>> sg.factorize_(model, sg.LowRankConfig(energy=0.9))
    >>> sg.finetune(model, data, sg.FinetuneConfig(epochs=3))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.modules import set_submodule
from slimguard.core.registry import register_handler
from slimguard.core.torch_utils import matches


@register_config("lowrank")
@dataclasses.dataclass
class LowRankConfig(Config):
    """Truncated-SVD factorisation of Linear and Conv2d layers.

    Args:
        energy: keep the smallest rank whose squared singular values sum to at least this fraction of
            the total, in (0, 1] (default 0.9). Ignored when ``ratio`` is set.
        ratio: if > 0, the rank is ``ceil(ratio * full_rank)`` instead, in (0, 1] (default 0: use energy).
        min_rank: never go below this rank (default 1).
        ignore: module names (or prefixes) to leave alone, e.g. the classifier head (default none).
        layers: ``linear``, ``conv`` or both (default both).
        only_if_smaller: skip layers where the pair would have as many parameters (default True).
    """

    energy: float = 0.9
    ratio: float = 0.0
    min_rank: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    layers: list[str] = dataclasses.field(default_factory=lambda: ["linear", "conv"])
    only_if_smaller: bool = True

    def validate(self) -> None:
        check_range("energy", self.energy, 0.0, 1.0, low_inclusive=False)
        check_range("ratio", self.ratio, 0.0, 1.0)
        check_range("min_rank", self.min_rank, 1)
        for kind in self.layers:
            if kind not in ("linear", "conv"):
                raise ConfigError(f"layers: {kind!r} is not allowed; allowed: linear, conv")


def choose_rank(s: torch.Tensor, energy: float = 0.9, ratio: float = 0.0, min_rank: int = 1) -> int:
    """Rank to keep from singular values ``s`` (descending): by ``ratio`` of the full rank when > 0,
    else the smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)``."""
    full = int(s.numel())
    if ratio > 0:
        r = int(torch.ceil(torch.tensor(ratio * full)).item())
    else:
        e = s.double().pow(2)
        cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-30)
        r = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1
    return max(1, min(full, max(min_rank, r)))


def _split(w2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``w2d (m, n) ~= a @ b`` with ``a (m, r)``, ``b (r, n)``; returns the retained energy fraction too."""
    u, s, vh = torch.linalg.svd(w2d.double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).to(w2d.dtype)
    b = (root[:, None] * vh[:rank]).to(w2d.dtype)
    retained = float(s[:rank].pow(2).sum() / s.pow(2).sum().clamp_min(1e-30))
    return a, b, retained


def factorize_linear(layer: nn.Linear, rank: int) -> tuple[nn.Sequential, float]:
    """Two Linears (in -> r -> out) approximating ``layer``; returns them and the retained energy.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)`` as before.
    """
    w = layer.weight.detach()
    a, b, retained = _split(w, rank)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(b)
        second.weight.copy_(a)
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(w.device), retained


def _two(size: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d size attribute as the pair it always is (the stubs type it for any dimension)."""
    return size[0], size[1]


def factorize_conv(layer: nn.Conv2d, rank: int) -> tuple[nn.Sequential, float]:
    """``Conv2d(cin, r, k x k)`` then ``Conv2d(r, cout, 1x1)`` approximating ``layer`` (groups == 1).

    Shape:
        Same input and output as ``layer``.
    """
    w = layer.weight.detach()
    cout = w.shape[0]
    a, b, retained = _split(w.reshape(cout, -1), rank)
    padding = layer.padding if isinstance(layer.padding, str) else _two(layer.padding)
    first = nn.Conv2d(layer.in_channels, rank, _two(layer.kernel_size), _two(layer.stride), padding,
                      _two(layer.dilation), bias=False, padding_mode=layer.padding_mode)
    second = nn.Conv2d(rank, cout, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(b.reshape(rank, *w.shape[1:]))
        second.weight.copy_(a.reshape(cout, rank, 1, 1))
        if layer.bias is not None and second.bias is not None:  # second has a bias exactly when layer has
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(w.device), retained


def _singular_values(w2d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w2d.detach().double())


@register_handler("factorize", LowRankConfig)
def _lowrank(model: nn.Module, config: LowRankConfig, **_: Any) -> dict[str, Any]:
    """Factorise eligible layers in place; returns per-layer ``{rank, full_rank, retained_energy}``."""
    done: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            full = f"{parent_name}.{cname}" if parent_name else cname
            if matches(full, config.ignore):
                continue
            make: Callable[[int], tuple[nn.Sequential, float]]  # rank -> (replacement, retained energy)
            if type(child) is nn.Linear and "linear" in config.layers:
                w2d, make = child.weight, partial(factorize_linear, child)
            elif type(child) is nn.Conv2d and "conv" in config.layers and child.groups == 1:
                w2d, make = child.weight.reshape(child.out_channels, -1), partial(factorize_conv, child)
            else:
                continue
            m, n = w2d.shape
            rank = choose_rank(_singular_values(w2d), config.energy, config.ratio, config.min_rank)
            if config.only_if_smaller and rank * (m + n) >= m * n:
                skipped.append(full)
                continue
            pair, retained = make(rank)
            set_submodule(model, full, pair)
            done[full] = {"rank": rank, "full_rank": min(m, n), "retained_energy": retained,
                          "params_before": m * n, "params_after": rank * (m + n)}
    return {"factorized": done, "skipped": skipped}
