"""Int8 layers with quantized weights *and* activations (static quantization), and their fake-quant twins.

* :class:`FakeQuantConv2d` / :class:`FakeQuantLinear`: float layers that observe their input and output
  (calibration), and, once enabled, fake-quantize input, weight (per output channel) and output with
  straight-through gradients. They may carry the BatchNorm that follows them (folded with running
  statistics, updated until frozen) and a fused ReLU. Used for PTQ calibration, QAT, and as the
  differentiable twin of a quantized layer.
* :class:`QuantConv2d` / :class:`QuantLinear`: the converted layers: int8 weights (symmetric, per output
  channel) and uint8 input / output parameters. ``QuantLinear`` multiplies in integers on CPU
  (``torch._int_mm``, exact int32 accumulation; see :mod:`slimguard.quantize.kernels`); ``QuantConv2d``
  computes the same integer grid with float accumulation (an int8 convolution through ``im2col`` measured
  slower than the float one; the kernels module has the numbers). Both agree with their float emulation
  up to float rounding: an output may land one output step away where a value sits on a rounding edge.
  Exported to ONNX they become QDQ pairs that ONNX Runtime fuses into ``QLinearConv`` / ``QGemm``
  (see :mod:`slimguard.runtime.onnx`), its fast path for both.
* :func:`insert_fake_quant` (prepare: float layers -> fake-quant layers, BN folded or carried, ReLU fused)
  and :func:`convert_fake_quant` (convert: observed fake-quant layers -> int8 layers), shared by static
  PTQ and QAT.

Shape:
    As the float layer they replace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.modules import register_module
from slimguard.core.torch_utils import matches
from slimguard.quantize.common import conv_padding_reason, pair, set_submodule
from slimguard.quantize.fuse import FoldedConv2d, FoldedLinear, find_chains, fold_all
from slimguard.quantize.kernels import (
    PackCache,
    Prepacked,
    int8_linear_static,
    use_int_kernels,
    weight_row_sums,
)
from slimguard.quantize.observers import (
    Observer,
    QScheme,
    fake_quantize,
    make_observer,
)

ACT = QScheme(8, symmetric=False)


def _weight_scheme(bits: int) -> QScheme:
    return QScheme(bits, symmetric=True, axis=0)


def weight_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel scale (and zero points) of a weight tensor."""
    s = _weight_scheme(bits)
    scale = (w.detach().reshape(w.shape[0], -1).abs().amax(1) / s.qmax).clamp_min(1e-8)
    return scale, torch.zeros(w.shape[0], dtype=torch.int32)


class _FakeQuantMixin(nn.Module):
    """Shared state of the fake-quant layers (activation observers and their frozen parameters).

    Mixed into ``nn.Conv2d`` / ``nn.Linear`` (listed after them), whose ``weight`` and ``bias`` it uses.
    """

    weight: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_scale: torch.Tensor
    output_zero_point: torch.Tensor
    observed: torch.Tensor

    def _init_fq(self, relu: bool, weight_bits: int, observer: str, quantize_output: bool) -> None:
        self.relu = relu
        self.weight_bits = weight_bits
        self.observer = observer
        self.quantize_output = quantize_output
        self.fake_quant_enabled = True
        self.observers_frozen = False
        self.bn_frozen = False
        self.obs_in: Observer = make_observer(observer)
        self.obs_out: Observer = make_observer(observer)
        for n in ("input", "output"):
            self.register_buffer(f"{n}_scale", torch.ones(1))
            self.register_buffer(f"{n}_zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self._stale: set[str] = set()  # observers with data not yet copied into the buffers

    def _observe(self, obs: Observer, t: torch.Tensor, which: str) -> None:
        if (self.training or not self.fake_quant_enabled) and not self.observers_frozen:
            obs(t)
            self._stale.add(which)
            self.observed.fill_(True)

    def sync_qparams(self) -> None:
        """Copy the observers' current ranges into the ``input_*`` / ``output_*`` buffers."""
        for which in sorted(self._stale):
            s, z = (self.obs_in if which == "input" else self.obs_out).qparams(ACT)
            getattr(self, f"{which}_scale").copy_(s.reshape(1))
            getattr(self, f"{which}_zero_point").copy_(z.reshape(1))
        self._stale.clear()

    def _fq_act(self, t: torch.Tensor, which: str) -> torch.Tensor:
        if not self.fake_quant_enabled or not bool(self.observed):
            return t
        if which in self._stale:
            self.sync_qparams()
        return fake_quantize(t, getattr(self, f"{which}_scale"), getattr(self, f"{which}_zero_point"), ACT)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with the carried BatchNorm folded in (running statistics)."""
        w, b = self.weight, self.bias if isinstance(self.bias, torch.Tensor) else None
        bn = getattr(self, "bn", None)
        if bn is None:
            return w, b
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = [-1] + [1] * (w.dim() - 1)
        b0 = b if b is not None else torch.zeros_like(factor)
        return w * factor.reshape(shape), (b0 - bn.running_mean) * factor + bn.bias

    def _run(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        self._observe(self.obs_in, x, "input")
        x = self._fq_act(x, "input")
        bn = getattr(self, "bn", None)
        if bn is not None and self.training and not self.bn_frozen:
            with torch.no_grad():  # update BN running statistics from this batch
                bn.train()
                bn(op(x, self.weight, self.bias))
        w, b = self.folded()
        if self.fake_quant_enabled:
            s, z = weight_qparams(w, self.weight_bits)
            w = fake_quantize(w, s, z, _weight_scheme(self.weight_bits))
        y = op(x, w, b)
        if self.relu:
            y = F.relu(y)
        if self.quantize_output:
            self._observe(self.obs_out, y, "output")
            y = self._fq_act(y, "output")
        return y

    def _fq_kwargs(self) -> dict[str, Any]:
        return {"relu": self.relu, "weight_bits": self.weight_bits, "observer": self.observer,
                "quantize_output": self.quantize_output, "with_bn": getattr(self, "bn", None) is not None}


@register_module("slimguard.FakeQuantConv2d")
class FakeQuantConv2d(nn.Conv2d, _FakeQuantMixin):
    """Conv2d (+ optional BN, ReLU) with observers and fake quantization (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, relu: bool = False, weight_bits: int = 8,
                 observer: str = "moving-average", quantize_output: bool = True, with_bn: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._init_fq(relu, weight_bits, observer, quantize_output)
        self.bn: nn.Module | None = nn.BatchNorm2d(out_channels) if with_bn else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.Module | None = None, **kw: Any) -> FakeQuantConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, with_bn=bn is not None, **kw)
        m.load_state_dict(conv.state_dict(), strict=False)
        if bn is not None:
            m.bn = bn
        return m.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda i, w, b: self._conv_forward(i, w, b))

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, **self._fq_kwargs())


@register_module("slimguard.FakeQuantLinear")
class FakeQuantLinear(nn.Linear, _FakeQuantMixin):
    """Linear (+ optional BatchNorm1d, ReLU) with observers and fake quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, relu: bool = False,
                 weight_bits: int = 8, observer: str = "moving-average", quantize_output: bool = True,
                 with_bn: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self._init_fq(relu, weight_bits, observer, quantize_output)
        self.bn: nn.Module | None = nn.BatchNorm1d(out_features) if with_bn else None

    @classmethod
    def from_float(cls, linear: nn.Linear, bn: nn.Module | None = None, **kw: Any) -> FakeQuantLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, with_bn=bn is not None, **kw)
        m.load_state_dict(linear.state_dict(), strict=False)
        if bn is not None:
            m.bn = bn
        return m.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, F.linear)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    **self._fq_kwargs())


# ---- converted int8 layers ----------------------------------------------------------------------------
class _QuantMixin(nn.Module):
    """Shared state of the converted int8 layers: int8 weight, its per-channel scales, and the activations'
    frozen parameters (buffers)."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_scale: torch.Tensor
    output_zero_point: torch.Tensor

    def _init_q(self, out: int, wshape: tuple[int, ...], bias: bool, relu: bool, weight_bits: int) -> None:
        self.relu = relu
        self.weight_bits = weight_bits
        self.register_buffer("weight_int8", torch.zeros(wshape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        for n in ("input", "output"):
            self.register_buffer(f"{n}_scale", torch.ones(1))
            self.register_buffer(f"{n}_zero_point", torch.zeros(1, dtype=torch.int32))

    def dequantized_weight(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.weight_scale.reshape(shape)

    def _weight(self) -> torch.Tensor:
        w = self.dequantized_weight()
        if torch.jit.is_tracing():  # export the weight as an int8 initializer + DequantizeLinear
            zp = torch.zeros_like(self.weight_scale, dtype=torch.int32)  # ONNX int8 range; codes lie in +-127
            w = torch.fake_quantize_per_channel_affine(w, self.weight_scale.float(), zp, 0, -128, 127)
        return w

    def _run(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        x = fake_quantize(x, self.input_scale, self.input_zero_point, ACT)
        y = op(x, self._weight(), self.bias)
        if self.relu:
            y = F.relu(y)
        return fake_quantize(y, self.output_scale, self.output_zero_point, ACT)

    def _load_from(self, fq: _FakeQuantMixin) -> None:
        fq.sync_qparams()
        w, b = fq.folded()
        w = w.detach()
        s, _ = weight_qparams(w, self.weight_bits)
        shape = [-1] + [1] * (w.dim() - 1)
        q = torch.round(w / s.reshape(shape)).clamp(-127, 127).to(torch.int8)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(s)
        if self.bias is not None:
            self.bias.data.copy_(b.detach() if b is not None else torch.zeros_like(self.bias))
        for n in ("input_scale", "input_zero_point", "output_scale", "output_zero_point"):
            getattr(self, n).copy_(getattr(fq, n))

    def _twin(self, twin: _FakeQuantMixin) -> nn.Module:
        sd = {"weight": self.dequantized_weight()}
        if self.bias is not None:
            sd["bias"] = self.bias.detach().clone()
        twin.load_state_dict(sd, strict=False)
        for n in ("input_scale", "input_zero_point", "output_scale", "output_zero_point"):
            getattr(twin, n).copy_(getattr(self, n))
        twin.observed.fill_(True)
        twin.observers_frozen = True
        twin.requires_grad_(False)
        return twin.eval().to(self.weight_scale.device)


@register_module("slimguard.QuantConv2d")
class QuantConv2d(_QuantMixin):
    """Static int8 Conv2d: int8 weights per output channel, uint8 activations (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, relu: bool = False,
                 weight_bits: int = 8) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self._init_q(out_channels, (out_channels, in_channels // groups, *self.kernel_size), bias, relu, weight_bits)

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantConv2d) -> QuantConv2d:
        m = cls(fq.in_channels, fq.out_channels, fq.kernel_size, fq.stride, fq.padding, fq.dilation, fq.groups,
                bias=True, relu=fq.relu, weight_bits=fq.weight_bits)
        m._load_from(fq)
        return m.to(fq.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda i, w, b: F.conv2d(i, w, b, self.stride, self.padding, self.dilation, self.groups))

    def fake_quant_twin(self) -> nn.Module:
        """A differentiable float :class:`FakeQuantConv2d` with the same numerics (STE rounding)."""
        twin = FakeQuantConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                               self.dilation, self.groups, True, self.relu, self.weight_bits)
        return self._twin(twin)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, relu=self.relu, weight_bits=self.weight_bits)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, int{self.weight_bits}" + (
            ", relu" if self.relu else "")


@register_module("slimguard.QuantLinear")
class QuantLinear(_QuantMixin, Prepacked):
    """Static int8 Linear: int8 weights per output channel, uint8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, relu: bool = False,
                 weight_bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_q(out_features, (out_features, in_features), bias, relu, weight_bits)
        self._rows = PackCache()  # sum_k W[n, k], for the int8 kernel's zero-point correction

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantLinear) -> QuantLinear:
        m = cls(fq.in_features, fq.out_features, bias=True, relu=fq.relu, weight_bits=fq.weight_bits)
        m._load_from(fq)
        return m.to(fq.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_int_kernels(x):  # traced for ONNX export (QDQ form), or another device / dtype
            return self._run(x, F.linear)
        rows = self._rows.get((self.weight_int8,), lambda: weight_row_sums(self.weight_int8))
        y = int8_linear_static(x, self.weight_int8, self.weight_scale, rows, self.bias, self.input_scale,
                               self.input_zero_point)
        if self.relu:
            y = F.relu_(y)
        return fake_quantize(y, self.output_scale, self.output_zero_point, ACT)

    def prepack(self) -> None:
        """Compute the integer kernel's weight row sums now (else at the first forward)."""
        self._rows.get((self.weight_int8,), lambda: weight_row_sums(self.weight_int8))

    def fake_quant_twin(self) -> nn.Module:
        """A differentiable float :class:`FakeQuantLinear` with the same numerics (STE rounding)."""
        return self._twin(FakeQuantLinear(self.in_features, self.out_features, True, self.relu, self.weight_bits))

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    relu=self.relu, weight_bits=self.weight_bits)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.weight_bits}" + (
            ", relu" if self.relu else "")


#: fake-quant layer type (exactly) -> the function converting an observed one to its int8 layer
FAKE_TO_QUANT: dict[type[nn.Module], Callable[..., nn.Module]] = {
    FakeQuantConv2d: QuantConv2d.from_fake_quant, FakeQuantLinear: QuantLinear.from_fake_quant}


def convert_fake_quant(model: nn.Module) -> list[str]:
    """Replace every observed fake-quant layer by its int8 layer (in place); returns the names converted."""
    done = []
    for name, mod in list(model.named_modules()):
        fn = FAKE_TO_QUANT.get(type(mod))
        if fn is not None and isinstance(mod, _FakeQuantMixin) and bool(mod.observed):
            set_submodule(model, name, fn(mod))
            done.append(name)
    return done


# ---- prepare: float layers -> fake-quant layers -------------------------------------------------------
#: float layer type (exactly) -> the function building its fake-quant layer (``from_float(layer, bn=..., ...)``)
QUANTIZABLE: dict[type[nn.Module], Callable[..., nn.Module]] = {
    nn.Conv2d: FakeQuantConv2d.from_float, FoldedConv2d: FakeQuantConv2d.from_float,
    nn.Linear: FakeQuantLinear.from_float, FoldedLinear: FakeQuantLinear.from_float}
#: float layer types that hold weights but have no int8 layer here (reported, left in float)
NOT_SUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
                 nn.Bilinear, nn.LSTM, nn.GRU, nn.MultiheadAttention)


def insert_fake_quant(model: nn.Module, *, ignore: list[str], weight_bits: int, observer: str, fuse_bn: bool,
                      keep_bn: bool = False) -> dict[str, Any]:
    """Replace quantizable layers by fake-quant layers (BN folded, or carried when ``keep_bn``; ReLU fused).

    Returns ``{"prepared": [...], "kept_float": [{"layer", "reason"}], "fused_bn": [...], "fused_relu": [...]}``.
    """
    chains = find_chains(model)
    fused: list[list[str]] = []
    if fuse_bn and not keep_bn:
        chains, fused = fold_all(model, chains)
    prepared, kept, relus = [], [], []
    for c in chains:
        layer = model.get_submodule(c.layer)
        to_fake_quant = QUANTIZABLE.get(type(layer))
        reason = None
        if matches(c.layer, ignore):
            reason = "ignored by config"
        elif to_fake_quant is None:
            reason = f"{type(layer).__name__} has no int8 layer"
        else:
            reason = conv_padding_reason(layer)
        if reason or to_fake_quant is None:
            kept.append({"layer": c.layer, "reason": reason})
            continue
        bn_name = c.bn if keep_bn and c.bn else None
        bn = model.get_submodule(bn_name) if bn_name else None
        # a ReLU after an unfolded BN cannot move before that BN
        relu_name = c.relu if c.bn is None or bn_name is not None else None
        fq = to_fake_quant(layer, bn=bn, relu=relu_name is not None, weight_bits=weight_bits, observer=observer)
        set_submodule(model, c.layer, fq)
        if bn_name is not None:
            set_submodule(model, bn_name, nn.Identity())
            fused.append([c.layer, bn_name])
        if relu_name is not None:
            set_submodule(model, relu_name, nn.Identity())
            relus.append([c.layer, relu_name])
        prepared.append(c.layer)
    chained = {c.layer for c in chains}
    for name, mod in model.named_modules():
        if isinstance(mod, NOT_SUPPORTED) or (type(mod) in QUANTIZABLE and name not in chained
                                              and not any(k["layer"] == name for k in kept)):
            kept.append({"layer": name, "reason": f"{type(mod).__name__} is not quantized here"})
    return {"prepared": prepared, "kept_float": kept, "fused_bn": fused, "fused_relu": relus}
