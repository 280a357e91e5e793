"""Weight-only quantization: int8 / int4 (2..8 bits) weights with one scale per group of ``group_size``
input weights, activations stay float. Int4 (and lower) codes are packed two per byte on disk and in memory.

Execution (see :mod:`slimguard.quantize.kernels`): on CPU, Linear layers multiply with PyTorch's
weight-only kernels: 2..4-bit codes in groups of 32, 64, 128 or 256 through
``torch._weight_int4pack_mm_for_cpu``, 8-bit codes with one group per row (``group_size=0``) through
``torch._weight_int8pack_mm``; both take bfloat16 activations and serve up to 128 rows (tokens) at a
time. Other settings, larger batches and Conv2d layers use the dequantized float weight (cached).

Padding (documented behaviour): when ``group_size`` does not divide a layer's input dimension, the
weight rows are padded with zeros up to the next multiple (and, for packing, to an even length);
the padding is never used in the product. ``group_size=0`` means one group per output row.

GPTQ (calibrated rounding with error compensation) and AWQ (activation-aware scales) produce the same
packed layers: :mod:`slimguard.quantize.gptq`, :mod:`slimguard.quantize.awq`.

Example:
    >>> sg.quantize_(model, sg.WeightOnlyConfig(bits=4, group_size=64))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.modules import register_module
from slimguard.core.registry import register_handler
from slimguard.quantize.common import conv_padding_reason, pair, select_layers, set_submodule
from slimguard.quantize.kernels import (
    WEIGHT_ONLY_MAX_ROWS,
    PackCache,
    Prepacked,
    int4_unsupported,
    int4_weight_only_linear,
    int8_weight_only_linear,
    pack_int4,
    pack_int8_rows,
    use_int_kernels,
)


def _validate_bits_group(bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"bits: {bits} is not supported; allowed: 2, 3, 4, 8")
    check_range("group_size", group_size, 0)
    if group_size and group_size % 2:
        raise ConfigError(f"group_size: {group_size} must be even (two 4-bit codes per byte) or 0 (one per row)")


@register_config("weight-only")
@dataclasses.dataclass
class WeightOnlyConfig(Config):
    """Weight-only quantization of Linear (and Conv2d) layers, round to nearest.

    Args:
        bits: 8, 4, 3 or 2 (default 4). Codes of 4 bits and fewer are packed two per byte.
        group_size: input weights sharing one scale (default 64; 0 = one group per row). Rows are
            zero-padded when it does not divide the input dimension (see the module docstring).
        symmetric: symmetric codes without zero points (default True), else asymmetric with a zero point
            per group.
        ignore: qualified layer names (or prefixes) to keep in float.
        conv: also quantize Conv2d weights (flattened per output channel; default False).
        embeddings: also quantize ``nn.Embedding`` tables (:class:`WeightOnlyEmbedding`: rows are looked up,
            then dequantized; default False). Language models keep most of their weights there.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    ignore: list[str] = dataclasses.field(default_factory=list)
    conv: bool = False
    embeddings: bool = False

    def validate(self) -> None:
        _validate_bits_group(self.bits, self.group_size)


# ---- packing ------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(rows, cols)`` (cols even when ``bits <= 4``) -> uint8; two codes per byte for <= 4 bits."""
    codes = codes.to(torch.uint8)
    if bits > 4:
        return codes
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (returns uint8 codes)."""
    if bits > 4:
        return packed
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def quantize_groups(w: torch.Tensor, bits: int, group: int, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``w (rows, cols)`` to ``bits`` per group of ``group`` columns (``cols % group == 0``).

    Returns unsigned codes ``(rows, cols)``, scales and zero points ``(rows, cols // group)``;
    ``w ~= (codes - zero) * scale``.
    """
    rows, cols = w.shape
    g = w.detach().float().reshape(rows, cols // group, group)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1) - 1 if bits > 1 else 1
        scale = (g.abs().amax(-1) / max(half, 1)).clamp_min(1e-10)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scale = ((hi - lo) / levels).clamp_min(1e-10)
        zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, levels)
    return codes.reshape(rows, cols).to(torch.uint8), scale, zero


def _padded(cols: int, group: int, bits: int) -> tuple[int, int]:
    """(padded column count, effective group size)."""
    group = group or cols + (cols % 2 if bits <= 4 else 0)
    return math.ceil(cols / group) * group, group


class _WeightOnlyMixin(nn.Module):
    """Shared state of the weight-only layers: packed codes, group scales and zero points (buffers)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def _init_wo(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> None:
        if bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits: {bits} is not supported; allowed: 2, 3, 4, 8")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.cols = cols  # input weights per output row, before padding
        self.cols_padded, self.group = _padded(cols, group_size, bits)
        packed_cols = self.cols_padded // 2 if bits <= 4 else self.cols_padded
        ngroups = self.cols_padded // self.group
        self.register_buffer("qweight", torch.zeros(rows, packed_cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, ngroups))
        self.register_buffer("zeros", torch.zeros(rows, ngroups))
        self._cache: tuple[Any, torch.Tensor] | None = None
        self._packed = PackCache()  # the kernel's layout of the weight (never stored in artifacts)

    def set_weight(self, w2d: torch.Tensor, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                   zeros: torch.Tensor | None = None) -> None:
        """Quantize and store a float ``(rows, cols)`` weight (or store given codes / scales / zeros)."""
        rows, cols = w2d.shape
        if codes is None:
            pad = torch.zeros(rows, self.cols_padded, dtype=torch.float32, device=w2d.device)
            pad[:, :cols] = w2d.detach().float()
            codes, scales, zeros = quantize_groups(pad, self.bits, self.group, self.symmetric)
        elif scales is None or zeros is None:
            raise ValueError("set_weight: give scales and zeros together with codes")
        self.qweight.copy_(pack_codes(codes, self.bits))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        self._cache = None
        self._packed.clear()

    def weight_2d(self) -> torch.Tensor:
        """The dequantized float weight ``(rows, cols)`` (cached until the buffers change)."""
        key = (self.qweight._version, self.scales._version, self.zeros._version, self.qweight.data_ptr())
        if self._cache is None or self._cache[0] != key or torch.jit.is_tracing():
            codes = unpack_codes(self.qweight, self.bits).float()
            rows = codes.shape[0]
            g = codes.reshape(rows, -1, self.group)
            w = ((g - self.zeros[..., None]) * self.scales[..., None]).reshape(rows, -1)
            self._cache = (key, w[:, : self.cols])
        return self._cache[1]


@register_module("slimguard.WeightOnlyLinear")
class WeightOnlyLinear(_WeightOnlyMixin, Prepacked):
    """Linear with 2..8-bit group-wise weights (packed), float activations.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 64, symmetric: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_wo(out_features, in_features, bits, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = True) -> WeightOnlyLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, symmetric)
        m.to(linear.weight.device).set_weight(linear.weight)
        if linear.bias is not None and m.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def kernel(self) -> str | None:
        """The integer kernel this layer runs on CPU (``"int8"`` or ``"int4"``), None when it has none."""
        if self.bits == 8:
            return "int8" if self.group == self.in_features == self.cols_padded else None
        return None if int4_unsupported(self.group) else "int4"

    def _pack(self) -> Any:
        def build() -> Any:
            codes = unpack_codes(self.qweight, self.bits)
            if self.kernel() == "int8":
                return pack_int8_rows(codes, self.scales, self.zeros)
            return pack_int4(codes, self.scales, self.zeros, self.group)

        return self._packed.get((self.qweight, self.scales, self.zeros), build)

    def prepack(self) -> None:
        """Lay the weight out for the integer kernel now (else at the first forward)."""
        if self.kernel() is not None and self.qweight.device.type == "cpu":
            self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kernel()
        if (kind is not None and use_int_kernels(x) and self.qweight.device.type == "cpu"
                and x.numel() // self.in_features <= WEIGHT_ONLY_MAX_ROWS):  # beyond: float sgemm is faster
            if kind == "int4":
                return int4_weight_only_linear(x, self._pack(), self.bias)
            return int8_weight_only_linear(x, self._pack(), self.bias)
        return F.linear(x, self.weight_2d().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def fake_quant_twin(self) -> nn.Module:
        """A float ``nn.Linear`` holding the dequantized weight (weights are constants, so it is exact)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight_2d())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False).to(self.scales.device)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"


@register_module("slimguard.WeightOnlyConv2d")
class WeightOnlyConv2d(_WeightOnlyMixin):
    """Conv2d with 2..8-bit group-wise weights over each flattened filter (packed), float activations."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, bits: int = 4, group_size: int = 64,
                 symmetric: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self._init_wo(out_channels, self._cols(), bits, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None

    def _cols(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, group_size: int, symmetric: bool = True) -> WeightOnlyConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, bits, group_size, symmetric)
        m.to(conv.weight.device).set_weight(conv.weight.reshape(conv.out_channels, -1))
        if conv.bias is not None and m.bias is not None:
            m.bias.data.copy_(conv.bias.detach())
        return m

    def weight(self) -> torch.Tensor:
        return self.weight_2d().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        self.stride, self.padding, self.dilation, self.groups)

    def fake_quant_twin(self) -> nn.Module:
        """A float ``nn.Conv2d`` holding the dequantized weight (exact)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.requires_grad_(False).to(self.scales.device)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, bits=self.bits, group_size=self.group_size,
                    symmetric=self.symmetric)


@register_module("slimguard.WeightOnlyEmbedding")
class WeightOnlyEmbedding(_WeightOnlyMixin):
    """An embedding table with 2..8-bit group-wise rows (packed); a lookup dequantizes only the rows it reads.

    Shape:
        Input ``(*)`` integer ids, output ``(*, embedding_dim)``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int = 64,
                 symmetric: bool = True) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_wo(num_embeddings, embedding_dim, bits, group_size, symmetric)

    @classmethod
    def from_float(cls, emb: nn.Embedding, bits: int, group_size: int, symmetric: bool = True) -> WeightOnlyEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric)
        m.to(emb.weight.device).set_weight(emb.weight)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack_codes(self.qweight[flat], self.bits).float()
        g = codes.reshape(flat.numel(), -1, self.group)
        rows = (g - self.zeros[flat][..., None]) * self.scales[flat][..., None]
        return rows.reshape(flat.numel(), -1)[:, : self.cols].reshape(*ids.shape, self.cols)

    def slimguard_init_kwargs(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, group={self.group}"


def weight_only_layer(layer: nn.Module, bits: int, group_size: int, symmetric: bool = True) -> nn.Module:
    """The weight-only layer (:class:`WeightOnlyConv2d` or :class:`WeightOnlyLinear`) of a float Conv2d or
    Linear layer; TypeError for other layers."""
    if isinstance(layer, nn.Conv2d):
        return WeightOnlyConv2d.from_float(layer, bits, group_size, symmetric)
    if isinstance(layer, nn.Linear):
        return WeightOnlyLinear.from_float(layer, bits, group_size, symmetric)
    raise TypeError(f"weight-only quantization takes Linear and Conv2d layers, not {type(layer).__name__}")


def _embedding_reason(layer: nn.Module) -> str | None:
    if getattr(layer, "max_norm", None) is not None or getattr(layer, "sparse", False):
        return "Embedding with max_norm or sparse gradients"
    return None


def _targets(model: nn.Module, ignore: list[str], conv: bool) -> tuple[list[str], list[dict[str, str]]]:
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    targets, kept = select_layers(model, kinds, ignore, check=conv_padding_reason)
    if not conv:
        kept += [{"layer": name, "reason": "Conv2d (set conv=True to quantize it)"}
                 for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    return targets, kept


@register_handler("quantize", WeightOnlyConfig)
def _weight_only(model: nn.Module, config: WeightOnlyConfig, **_: Any) -> dict[str, Any]:
    targets, kept = _targets(model, list(config.ignore), config.conv)
    for name in targets:
        new = weight_only_layer(model.get_submodule(name), config.bits, config.group_size, config.symmetric)
        set_submodule(model, name, new)
    if config.embeddings:
        tables, kept_tables = select_layers(model, (nn.Embedding,), list(config.ignore), check=_embedding_reason)
        for name in tables:
            emb = cast(nn.Embedding, model.get_submodule(name))
            set_submodule(model, name, WeightOnlyEmbedding.from_float(emb, config.bits, config.group_size,
                                                                      config.symmetric))
        targets, kept = targets + tables, kept + kept_tables
    return {"quantized": targets, "kept_float": kept, "bits": config.bits}
