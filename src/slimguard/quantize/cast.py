"""Half precision: Linear / Conv2d weights stored and multiplied in float16 or bfloat16.

Inputs are cast to the half type for the product and the result back to the input's type, so the model
still takes and returns float32. On CPUs without native half arithmetic this saves memory and file
size rather than time.

Example:
    >>> sg.quantize_(model, sg.HalfPrecisionConfig(dtype="bf16"))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, register_config
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler
from slimguard.quantize.common import conv_padding_reason, select_layers, set_submodule

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@register_config("half")
@dataclasses.dataclass
class HalfPrecisionConfig(Config):
    """Cast Linear / Conv2d layers to ``fp16`` or ``bf16`` (default ``bf16``); ``ignore`` keeps layers float."""

    dtype: Literal["fp16", "bf16"] = "bf16"
    ignore: list[str] = dataclasses.field(default_factory=list)


class _HalfMixin(nn.Module):
    """Shared by the half layers (mixed into ``nn.Linear`` / ``nn.Conv2d``, listed after them)."""

    weight: torch.Tensor
    dtype: str  # "fp16" or "bf16"

    def _half(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(DTYPES[self.dtype])

    def fake_quant_twin(self) -> nn.Module:
        """Float32 module rounding weights and inputs through the half type (differentiable casts)."""
        return _HalfTwin(self)


class _HalfTwin(nn.Module):
    def __init__(self, layer: _HalfMixin) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = DTYPES[self.layer.dtype]
        w = self.layer.weight.detach().float()
        bias = self.layer.bias
        b = bias.detach().float() if isinstance(bias, torch.Tensor) else None
        x = x.to(dt).float()
        if isinstance(self.layer, HalfConv2d):
            lay = self.layer
            return F.conv2d(x, w, b, lay.stride, lay.padding, lay.dilation, lay.groups)
        return F.linear(x, w, b)


@register_module("slimguard.HalfLinear")
class HalfLinear(nn.Linear, _HalfMixin):
    """nn.Linear whose weight and bias are fp16 / bf16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: str = "bf16") -> None:
        super().__init__(in_features, out_features, bias, dtype=DTYPES[dtype])
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._half(x), self.weight, self.bias).to(x.dtype)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": self.dtype}


@register_module("slimguard.HalfConv2d")
class HalfConv2d(nn.Conv2d, _HalfMixin):
    """nn.Conv2d whose weight and bias are fp16 / bf16."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, dtype: str = "bf16") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         dtype=DTYPES[dtype])
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._half(x), self.weight, self.bias).to(x.dtype)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, dtype=self.dtype)


def half_layer(layer: nn.Module, dtype: str) -> nn.Module:
    """A :class:`HalfLinear` / :class:`HalfConv2d` holding a float Linear / Conv2d layer's weights in ``dtype``
    (``fp16`` or ``bf16``); TypeError for other layers."""
    if isinstance(layer, nn.Linear):
        new: HalfLinear | HalfConv2d = HalfLinear(layer.in_features, layer.out_features, layer.bias is not None,
                                                  dtype)
    elif isinstance(layer, nn.Conv2d):
        new = HalfConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, dtype)
    else:
        raise TypeError(f"half precision takes Linear and Conv2d layers, not {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
    return new.to(layer.weight.device)


@register_handler("quantize", HalfPrecisionConfig)
def _half(model: nn.Module, config: HalfPrecisionConfig, **_: Any) -> dict[str, Any]:
    done, kept = select_layers(model, (nn.Linear, nn.Conv2d), config.ignore, exact=True,
                               check=conv_padding_reason)
    for name in done:
        set_submodule(model, name, half_layer(model.get_submodule(name), config.dtype))
    return {"quantized": done, "kept_float": kept, "dtype": config.dtype}
