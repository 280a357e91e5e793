"""Fake-quant twins: differentiable stand-ins for quantized models, so gradient attacks can reach them.

Integer kernels (``quantized::linear_dynamic`` and friends) have no gradient. A quantized model is
attacked through its *twin*: a deep copy in which every quantized module is swapped for the float module
its ``fake_quant_twin()`` method returns (dequantized weights, activations rounded like the int8 kernel in
the forward pass and passed straight through in the backward pass). The adversarial examples found on
the twin are then *transferred* to the real int8 model; :func:`slimguard.robust.scorecard` reports both.

Quantized module classes provide ``fake_quant_twin() -> nn.Module``. For classes that do not (yet), a
twin builder can be registered here with :func:`register_twin`.

Example:
    >>> twin = fake_quant_twin(int8_model)
    >>> x_adv = PGD(eps=0.1)(twin, x, y, bounds=data.meta.bounds())
    >>> accuracy_on(int8_model, x_adv, y)   # transferred
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.modules import register_module

_TWINS: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_twin(cls: type[nn.Module]) -> Callable[[Callable[[nn.Module], nn.Module]], Callable[[nn.Module], nn.Module]]:
    """Register ``fn(module) -> twin module`` for a quantized class that has no ``fake_quant_twin`` method."""

    def deco(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        _TWINS[cls] = fn
        return fn

    return deco


def _twin_builder(module: nn.Module) -> Callable[[], nn.Module] | None:
    method = getattr(module, "fake_quant_twin", None)
    if callable(method):
        return method
    fn = _TWINS.get(type(module))
    return None if fn is None else (lambda: fn(module))


def is_quantized(model: nn.Module) -> bool:
    """True when some module of ``model`` has a fake-quant twin (and so runs integer kernels)."""
    return any(_twin_builder(m) is not None for m in model.modules())


def fake_quant_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every quantized module swapped for its differentiable twin.

    The original is not changed. The twin keeps the original's mode and slimguard info.

    Args:
        model: a model, quantized or not (a model without quantized modules gives a plain copy).

    Returns:
        The twin (``nn.Module``) on the same device.
    """
    root_builder = _twin_builder(model)
    if root_builder is not None:
        return root_builder()
    twin = copy.deepcopy(model)
    for _, parent in list(twin.named_modules()):
        for cname, child in list(parent.named_children()):
            builder = _twin_builder(child)
            if builder is not None:
                new = builder()
                new.train(child.training)
                setattr(parent, cname, new)
    return twin


# ---- twin of the foundation's DynamicInt8Linear (used until the class grows its own method) -------------
def fake_quant_dynamic(x: torch.Tensor, reduce_range: bool = True) -> torch.Tensor:
    """Per-tensor asymmetric uint8 fake quantization of activations, as the fbgemm dynamic kernel does
    (``reduce_range``: 7 bits), with a straight-through gradient."""
    qmax = 127 if reduce_range else 255
    lo = x.detach().min().clamp(max=0.0)
    hi = x.detach().max().clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = (torch.round(x.detach() / scale) + zero).clamp(0, qmax)
    return x + ((q - zero) * scale - x.detach())


@register_module("slimguard.robust.FakeQuantDynamicLinear")
class FakeQuantDynamicLinear(nn.Module):
    """Differentiable twin of an int8 dynamic Linear: dequantized float weight, fake-quantized activations.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_dynamic(x), self.weight, self.bias)


def _register_builtin_twins() -> None:
    from slimguard.quantize.dynamic import DynamicInt8Linear

    if hasattr(DynamicInt8Linear, "fake_quant_twin"):
        return

    @register_twin(DynamicInt8Linear)
    def _dynamic_int8_twin(module: nn.Module) -> nn.Module:
        twin = FakeQuantDynamicLinear(module.in_features, module.out_features, module.bias is not None)
        with torch.no_grad():
            twin.weight.copy_(module.dequantized_weight())
            if module.bias is not None:
                twin.bias.copy_(module.bias)
        return twin.to(module.weight_scale.device)


_register_builtin_twins()
