"""Dynamic int8 for Linear layers: int8 weights (per output channel, symmetric), activations quantized
at run time, multiplied in integers (see :mod:`slimguard.quantize.kernels`).

``activations: row`` (default): each row of the input (one token, or one example) gets its own symmetric
int8 scale, ``max|x_row| / 127``; ``torch._int_mm`` multiplies and the int32 products are rescaled by the
row scale and the weight's channel scale in float. Per-row scales follow the outliers of one token instead
of the whole batch, so the result is closer to float (all-MiniLM-L6-v2: embedding cosine 0.997 to float32,
against 0.948 for PyTorch's deprecated ``quantize_dynamic``), at 0.92-0.95x that deprecated kernel's speed
(2 threads; the layers 0.79-0.98x, see :mod:`slimguard.quantize.kernels`).

``activations: tensor``: one symmetric scale for the whole input, as that kernel had (8 bits here, 7 there:
MiniLM cosine 0.982). oneDNN's ``qlinear_pointwise`` then applies every scale and the bias inside the
product (CPUs with VNNI): MiniLM runs at 0.99-1.01x the deprecated kernel (three runs, 2 threads).

Small layers with small batches (at most :data:`~slimguard.quantize.kernels.FLOAT_MAX_WEIGHTS` weights and
:data:`~slimguard.quantize.kernels.FLOAT_MAX_MACS` multiply-adds per call) multiply in float32 with the
dequantized weight, input not rounded: there the few microseconds of each operator that quantizes the input
cost more than the integer product saves, and float32 runs about as fast as the deprecated kernel did. The
file keeps the int8 weight either way; the float copy lives in memory (4 bytes per weight of such layers).

The product is registered with PyTorch's FLOP counter, so MACs of quantized layers are counted by
:func:`slimguard.runtime.measure.count_macs`.

Example:
    >>> sg.quantize_(model, sg.Int8DynamicConfig())
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_choice, check_range, register_config
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler
from slimguard.quantize.common import select_layers, set_submodule
from slimguard.quantize.kernels import (
    PackCache,
    Prepacked,
    fake_quantize_rows,
    fake_quantize_tensor,
    float_product,
    int8_linear_dynamic,
    int8_linear_dynamic_tensor,
    pack_onednn,
    small_in_float,
    use_int_kernels,
)

#: how activations are scaled: one scale per row (token, example), or one for the whole input tensor
ACTIVATIONS = ("row", "tensor")


@register_config("int8-dynamic")
@dataclasses.dataclass
class Int8DynamicConfig(Config):
    """Dynamic int8 quantization of Linear layers (and GPT-2's ``Conv1D`` projections).

    Args:
        ignore: qualified module names (or prefixes) to keep in float (default none).
        min_features: leave Linear layers with fewer input features in float (default 0).
        activations: ``"row"`` (default): each input row (token, example) gets its own int8 scale, the
            more faithful choice when a few tokens carry outliers. ``"tensor"``: one scale for the whole
            input, as PyTorch's deprecated dynamic kernel had (8 bits here, 7 there); faster, since the
            kernel then applies every scale inside the product (on CPUs with VNNI, oneDNN's
            ``qlinear_pointwise``).
    """

    ignore: list[str] = dataclasses.field(default_factory=list)
    min_features: int = 0
    activations: Literal["row", "tensor"] = "row"

    def validate(self) -> None:
        check_range("min_features", self.min_features, 0)
        check_choice("activations", self.activations, ACTIVATIONS)


def conv1d_classes() -> tuple[type[nn.Module], ...]:
    """transformers' ``Conv1D`` (GPT-2's projections: a Linear with its weight stored ``(in, out)``), when
    transformers is already imported (a model built by it is in memory); otherwise none."""
    import sys

    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return (cls,) if isinstance(cls, type) else ()


def linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or a ``Conv1D``."""
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
    if not isinstance(layer, nn.Linear):  # Conv1D: y = x @ W + b with W (in, out)
        weight = weight.t()
    return weight, bias


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``w ~= q * scale[:, None]``, ``q`` in [-127, 127]."""
    scale = (w.detach().abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()
    q = torch.round(w.detach() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@register_module("slimguard.DynamicInt8Linear")
class DynamicInt8Linear(nn.Module, Prepacked):
    """Linear with int8 weights and dynamically quantized int8 activations (per row, or per tensor: see
    :class:`Int8DynamicConfig`).

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "row") -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {list(ACTIVATIONS)}, got {activations!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed = PackCache()  # oneDNN's layout of the weight, per-tensor mode (never stored)
        self._float = PackCache()  # the dequantized weight, for small products (never stored)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"in_features": self.in_features, "out_features": self.out_features,
                                  "bias": self.bias is not None}
        if self.activations != "row":  # artifacts written before the option load as "row"
            kwargs["activations"] = self.activations
        return kwargs

    @classmethod
    def from_float(cls, linear: nn.Module, activations: str = "row") -> DynamicInt8Linear:
        """From an ``nn.Linear``, or a GPT-2-style ``Conv1D`` (weight stored ``(in, out)``: the same product)."""
        weight, bias = linear_weight(linear)
        m = cls(weight.shape[1], weight.shape[0], bias is not None, activations)
        q, s = quantize_weight_per_channel(weight)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        if bias is not None and m.bias is not None:
            m.bias.data.copy_(bias.detach())
        return m.to(weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def prepack(self) -> None:
        """Build the per-tensor mode's oneDNN weight layout now (else at the first forward)."""
        if self.activations == "tensor":
            self._onednn_weight(self.weight_int8)

    def _onednn_weight(self, weight: torch.Tensor) -> Any:
        return self._packed.get((weight,), lambda: pack_onednn(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_int_kernels(x):
            # tensors read from the module's dicts once: each attribute lookup through nn.Module costs about
            # a microsecond, which small products notice
            weight, scale = self._buffers["weight_int8"], self._buffers["weight_scale"]
            bias = self._parameters.get("bias")
            assert weight is not None and scale is not None
            if small_in_float(x, self.in_features, self.out_features):  # the input is not rounded; no gradient,
                # as from the integer kernels (attacks go through the fake-quant twin, whichever path runs)
                return F.linear(x.detach(), self._float.get((weight, scale), self.dequantized_weight), bias)
            if self.activations == "tensor":  # traced programs keep to _int_mm (oneDNN's weight is opaque)
                packed = None if torch.compiler.is_compiling() else self._onednn_weight(weight)
                return int8_linear_dynamic_tensor(x, weight, scale, bias, packed)
            return int8_linear_dynamic(x, weight, scale, bias)
        # traced for ONNX export, or another device / dtype: the float form, weights dequantized
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def fake_quant_twin(self) -> nn.Module:
        """A differentiable float module computing what this layer computes: each input row (or the whole
        input) rounded to its int8 grid (straight-through gradient), times the dequantized int8 weight."""
        return _DynamicTwin(self.dequantized_weight(), None if self.bias is None else self.bias.detach().clone(),
                            self.activations)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, per {self.activations}"


class _DynamicTwin(nn.Module):
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activations: str) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.fake_quantize = fake_quantize_tensor if activations == "tensor" else fake_quantize_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        rounded = x if float_product(x, k, n) else self.fake_quantize(x)  # as the layer decides
        return F.linear(rounded, self.weight, self.bias)


@register_handler("quantize", Int8DynamicConfig)
def _int8_dynamic(model: nn.Module, config: Int8DynamicConfig, **_: Any) -> dict[str, Any]:
    def too_small(layer: nn.Module) -> str | None:
        features = linear_weight(layer)[0].shape[1]
        if features < config.min_features:
            return f"{features} input features < min_features {config.min_features}"
        return None

    kinds: tuple[type[nn.Module], ...] = (nn.Linear, *conv1d_classes())
    chosen, kept = select_layers(model, kinds, config.ignore, exact=True, check=too_small)
    for name in chosen:
        set_submodule(model, name, DynamicInt8Linear.from_float(model.get_submodule(name), config.activations))
    return {"quantized": chosen, "kept_float": kept, "activations": config.activations}
