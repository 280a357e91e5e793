"""The hashing trick for weights (HashedNets).

Paper: Chen, Wilson, Tyree, Weinberger, Chen, "Compressing Neural Networks with the Hashing Trick",
ICML 2015. A :class:`HashedLinear` layer has a *virtual* weight matrix ``V[i, j] = s(i, j) * w[h(i, j)]``
drawn from a small trainable vector ``w`` of ``buckets`` entries by a hash ``h`` and a sign hash ``s``
(both deterministic functions of ``(i, j, seed)``, so only ``w``, the bias and four integers are stored).
Gradients reach ``w`` through the gather, so the layer trains in the ordinary loop; it exports to ONNX as
Gather + Mul + Gemm.

Example:
    >>> sg.cluster_(model, sg.HashingConfig(compression=0.125))   # every Linear -> HashedLinear, 8x fewer weights
    >>> sg.finetune(model, data, sg.FinetuneConfig(epochs=5))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.modules import register_module, set_submodule
from slimguard.core.registry import register_handler

_MASK32 = np.uint64(0xFFFFFFFF)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values (wrap-around defined)."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    return h ^ (h >> np.uint64(16))


def hash_indices(out_features: int, in_features: int, buckets: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Bucket index and sign of every virtual weight; the same on every platform for the same arguments.

    Shape:
        returns index (out_features, in_features) int64 in ``[0, buckets)`` and sign (same shape) float32
        of +1/-1.
    """
    key = np.arange(out_features * in_features, dtype=np.uint64)
    s = np.uint64(seed & 0xFFFFFFFF)
    h1 = _fmix32((key ^ _fmix32(np.array([s * np.uint64(2) + np.uint64(1)]))[0]) & _MASK32)
    h2 = _fmix32((_fmix32(key ^ np.uint64(0x5BD1E995)) ^ _fmix32(np.array([s * np.uint64(2)]))[0]) & _MASK32)
    index = torch.from_numpy((h1 % np.uint64(buckets)).astype(np.int64)).reshape(out_features, in_features)
    sign = torch.from_numpy(1.0 - 2.0 * (h2 & np.uint64(1)).astype(np.float32)).reshape(out_features, in_features)
    return index, sign


@register_module("slimguard.HashedLinear")
class HashedLinear(nn.Module):
    """Linear layer whose weight matrix is hashed into ``buckets`` shared, trainable values.

    Args:
        in_features, out_features: as :class:`torch.nn.Linear`.
        buckets: number of real weights (``weight_pool`` size), at least 1.
        seed: hash seed (default 0).
        bias: learn an additive bias (default True).

    Shape:
        input (*, in_features) -> output (*, out_features).

    Example:
        >>> layer = HashedLinear(64, 300, buckets=2400, seed=1)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 300])
    """

    index: torch.Tensor  # (out_features, in_features) int64 bucket of each virtual weight, a buffer
    sign: torch.Tensor  # (out_features, in_features) +-1 sign of each virtual weight, a buffer

    def __init__(self, in_features: int, out_features: int, buckets: int, seed: int = 0, bias: bool = True) -> None:
        super().__init__()
        if buckets < 1:
            raise ConfigError(f"buckets: {buckets} is out of range; allowed: >= 1")
        self.in_features, self.out_features, self.buckets, self.seed = in_features, out_features, buckets, seed
        bound = 1.0 / max(1, in_features) ** 0.5
        self.weight_pool = nn.Parameter(torch.empty(buckets).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
        if torch.empty(0).is_meta:  # a structure-only build (artifact loading checks sizes first): no hashing
            index = torch.empty(out_features, in_features, dtype=torch.int64)
            sign = torch.empty(out_features, in_features)
        else:
            index, sign = hash_indices(out_features, in_features, buckets, seed)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The virtual weight matrix ``(out_features, in_features)``."""
        return self.weight_pool[self.index] * self.sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "buckets": self.buckets,
                "seed": self.seed, "bias": self.bias is not None}

    @classmethod
    def from_linear(cls, linear: nn.Linear, buckets: int, seed: int = 0) -> HashedLinear:
        """Hash a trained Linear: each bucket takes the mean of its (sign-corrected) weights, the
        least-squares fit of the original matrix."""
        layer = cls(linear.in_features, linear.out_features, buckets, seed, bias=linear.bias is not None)
        layer.to(linear.weight.device)
        with torch.no_grad():
            w = (linear.weight.detach() * layer.sign).reshape(-1)
            idx = layer.index.reshape(-1)
            sums = torch.zeros(buckets, dtype=w.dtype, device=w.device).index_add_(0, idx, w)
            counts = torch.bincount(idx, minlength=buckets).clamp(min=1)
            layer.weight_pool.copy_(sums / counts)
            if linear.bias is not None and layer.bias is not None:  # built with a bias exactly when linear has one
                layer.bias.copy_(linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, buckets={self.buckets}, "
                f"seed={self.seed}, bias={self.bias is not None}")


@register_config("hashing")
@dataclasses.dataclass
class HashingConfig(Config):
    """Replace Linear layers by :class:`HashedLinear` (HashedNets, Chen et al. 2015).

    Args:
        compression: real weights kept per virtual weight, in (0, 1] (default 0.125 = 8x fewer).
        seed: hash seed; layer ``k`` uses ``seed + k`` (default 0).
        ignore: names of Linear modules to keep.
        overrides: ``{module_name: compression}`` per layer.
    """

    compression: float = 0.125
    seed: int = 0
    ignore: list[str] = dataclasses.field(default_factory=list)
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        check_range("compression", self.compression, 0.0, 1.0, low_inclusive=False)
        check_range("seed", self.seed, 0, (1 << 31) - 1)
        for name, c in self.overrides.items():
            check_range(f"overrides.{name}", c, 0.0, 1.0, low_inclusive=False)


@register_handler("cluster", HashingConfig)
def _hashing(model: nn.Module, config: HashingConfig, **_: Any) -> dict[str, Any]:
    names = dict(model.named_modules())
    for entry in [*config.ignore, *config.overrides]:
        if not isinstance(names.get(entry), nn.Linear):
            raise ConfigError(f"hashing: {entry!r} is not a Linear module; Linear modules: "
                              f"{', '.join(n for n, m in names.items() if isinstance(m, nn.Linear))}")
    targets = [n for n, m in names.items() if n and isinstance(m, nn.Linear) and n not in config.ignore]
    if not targets:
        raise ConfigError("hashing: the model has no Linear layer to hash")
    report: dict[str, Any] = {}
    for k, name in enumerate(targets):
        linear = names[name]
        ratio = config.overrides.get(name, config.compression)
        buckets = max(1, round(ratio * linear.weight.numel()))
        model = set_submodule(model, name, HashedLinear.from_linear(linear, buckets, config.seed + k))
        report[name] = {"virtual": linear.weight.numel(), "buckets": buckets}
    return {"layers": report}
