"""Dynamic int8 for Linear layers: int8 weights (per output channel, symmetric), activations quantized
per batch at run time, executed by PyTorch's x86/fbgemm int8 kernels.

``quantized::linear_dynamic`` is registered with PyTorch's FLOP counter, so MACs of quantized layers are
counted by :func:`slimguard.runtime.measure.count_macs`.

Example:
    >>> sg.quantize_(model, sg.Int8Dynamic())
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, register_config
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler


@register_config("int8-dynamic")
@dataclasses.dataclass
class Int8Dynamic(Config):
    """Dynamic int8 quantization of Linear layers.

    Args:
        ignore: qualified module names (or prefixes) to keep in float (default none).
        min_features: leave Linear layers with fewer input features in float (default 0).
    """

    ignore: list[str] = dataclasses.field(default_factory=list)
    min_features: int = 0


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``w ~= q * scale[:, None]``, ``q`` in [-127, 127]."""
    scale = (w.detach().abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()
    q = torch.round(w.detach() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@register_module("slimguard.DynamicInt8Linear")
class DynamicInt8Linear(nn.Module):
    """Linear with int8 weights and dynamically quantized int8 activations.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: Any = None
        self._packed_key: Any = None

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_float(cls, linear: nn.Linear) -> DynamicInt8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, s = quantize_weight_per_channel(linear.weight)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _pack(self) -> Any:
        key = (self.weight_int8.data_ptr(), self.weight_scale.data_ptr(), self.weight_int8._version)
        if self._packed is None or self._packed_key != key:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.weight_scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = None if self.bias is None else self.bias.detach().float()
                self._packed = torch.ops.quantized.linear_prepack(qw, bias)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.jit.is_tracing() \
                and not torch.compiler.is_compiling():
            try:
                return torch.ops.quantized.linear_dynamic(x, self._pack(), True)
            except RuntimeError:
                pass
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def fake_quant_twin(self) -> nn.Module:
        """A differentiable float module emulating this layer: the input is fake-quantized per batch
        (asymmetric, 7-bit range as fbgemm's ``reduce_range``) with a straight-through gradient, and
        multiplied by the dequantized int8 weight."""
        return _DynamicTwin(self.dequantized_weight(), None if self.bias is None else self.bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class _DynamicTwin(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = torch.clamp(x.detach().min(), max=0.0)
        hi = torch.clamp(x.detach().max(), min=0.0)
        scale = ((hi - lo) / 127).clamp_min(1e-8)
        zp = torch.round(-lo / scale).clamp(0, 127).int()
        xq = torch.fake_quantize_per_tensor_affine(x, scale.float(), zp, 0, 127)
        return F.linear(xq, self.weight, self.bias)


def _register_flops() -> None:
    """Count ``quantized::linear_dynamic`` as ``2 * tokens * in * out`` FLOPs (MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.quantized.linear_dynamic, get_raw=True)
    def _linear_dynamic_flop(x: torch.Tensor, packed: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        w, _ = torch.ops.quantized.linear_unpack(packed)
        return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


_register_flops()


def _ignored(name: str, ignore: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ignore)


@register_handler("quantize", Int8Dynamic)
def _int8_dynamic(model: nn.Module, config: Int8Dynamic, **_: Any) -> dict[str, Any]:
    replaced, kept = [], []
    for name, module in list(model.named_modules()):
        for cname, child in list(module.named_children()):
            full = f"{name}.{cname}" if name else cname
            if type(child) is nn.Linear:
                if _ignored(full, config.ignore) or child.in_features < config.min_features:
                    kept.append(full)
                    continue
                setattr(module, cname, DynamicInt8Linear.from_float(child))
                replaced.append(full)
    return {"quantized": replaced, "kept_float": kept}
