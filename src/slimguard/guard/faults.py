"""Bit-flip fault injection: weights (IEEE-754 fp32/fp16/bf16 fields, int8 storage) and activations.

Flips are done **in place** on the tensor's storage (reinterpreted as an integer view) and undone by
flipping the same bit again, which restores the exact original bytes: no model copies are made.
A *campaign* draws ``trials`` random faults (seeded); each trial flips one bit, runs one input, and
counts a *silent data corruption* (SDC) when the top-1 prediction differs from the fault-free one.
Rates come with 95% Wilson score intervals, overall, by bit position, by bit field and by layer.

References: PyTorchFI (Mahmoud et al., 2020) for hook-based activation faults; Ranger (Chen et al., 2021)
for the SDC metric under range restriction.

Example:
    >>> cfg = FaultCampaignConfig(trials=1000, bits="exponent")
    >>> result = run_campaign(model, data.test.x, cfg)
    >>> result.rate, result.ci
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_choice, check_range
from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import eval_mode, matches
from slimguard.runtime.stats import wilson

# integer view used to flip bits of each storage dtype
_INT_VIEW = {
    torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
    torch.int8: torch.int8, torch.uint8: torch.uint8, torch.int32: torch.int32,
}
_WIDTH = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.int8: 8, torch.uint8: 8,
          torch.int32: 32}


def bit_fields(dtype: torch.dtype) -> dict[str, list[int]]:
    """Bit positions (0 = least significant) of each field of a storage format.

    IEEE-754 fp32: sign 31, exponent 23-30, mantissa 0-22; fp16: sign 15, exponent 10-14, mantissa
    0-9; bf16: sign 15, exponent 7-14, mantissa 0-6. Two's complement int8: sign 7, magnitude 0-6.
    """
    if dtype == torch.float32:
        return {"sign": [31], "exponent": list(range(23, 31)), "mantissa": list(range(23))}
    if dtype == torch.float16:
        return {"sign": [15], "exponent": list(range(10, 15)), "mantissa": list(range(10))}
    if dtype == torch.bfloat16:
        return {"sign": [15], "exponent": list(range(7, 15)), "mantissa": list(range(7))}
    if dtype == torch.int8:
        return {"sign": [7], "magnitude": list(range(7))}
    if dtype == torch.uint8:
        return {"magnitude": list(range(8))}
    if dtype == torch.int32:
        return {"sign": [31], "magnitude": list(range(31))}
    raise ModelError(f"bit flips in {dtype} tensors are not supported; supported: fp32, fp16, bf16, int8, uint8")


def field_of(dtype: torch.dtype, bit: int) -> str:
    for name, bits in bit_fields(dtype).items():
        if bit in bits:
            return name
    raise ConfigError(f"bit {bit} does not exist in {dtype} (width {_WIDTH.get(dtype)})")


def _mask(view_dtype: torch.dtype, bit: int) -> int:
    width = torch.iinfo(view_dtype).bits
    value = 1 << bit
    signed = torch.iinfo(view_dtype).min < 0
    if signed and bit == width - 1:
        value -= 1 << width  # the sign bit as a negative number of that width
    return value


@torch.no_grad()
def flip_bit_(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit ``bit`` of element ``index`` (flat, row-major) of ``tensor`` in place.

    Calling it twice with the same arguments restores the exact original bytes.

    Args:
        tensor: a contiguous fp32/fp16/bf16/int8/uint8 tensor (parameter or buffer).
        index: flat element index in ``[0, numel)``.
        bit: bit position, 0 = least significant.
    """
    if tensor.dtype not in _INT_VIEW:
        bit_fields(tensor.dtype)  # raises the one-line error
    view_dtype = _INT_VIEW[tensor.dtype]
    if not tensor.is_contiguous():
        raise ModelError("bit flips need a contiguous tensor; call .contiguous() on the model's weights first")
    if not 0 <= index < tensor.numel():
        raise ConfigError(f"index: {index} is out of range; allowed: [0, {tensor.numel() - 1}]")
    if not 0 <= bit < _WIDTH[tensor.dtype]:
        raise ConfigError(f"bit: {bit} is out of range for {tensor.dtype}; allowed: [0, {_WIDTH[tensor.dtype] - 1}]")
    flat = tensor.view(view_dtype).view(-1)
    flat[index : index + 1].bitwise_xor_(_mask(view_dtype, bit))


@contextlib.contextmanager
def flipped(tensor: torch.Tensor, index: int, bit: int) -> Iterator[None]:
    """Context manager: the bit is flipped inside the block and restored on exit (even on error)."""
    flip_bit_(tensor, index, bit)
    try:
        yield
    finally:
        flip_bit_(tensor, index, bit)


def weight_targets(model: nn.Module, layers: Sequence[str] | None = None,
                   include_bias: bool = False) -> dict[str, torch.Tensor]:
    """Tensors that hold weights: parameters of rank >= 2 (and biases if asked) and integer weight
    buffers (int8 quantized storage), keyed by qualified name. ``layers`` keeps names starting with
    one of the given prefixes."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.dtype in _INT_VIEW and (p.dim() >= 2 or (include_bias and p.dim() == 1)):
            out[name] = p
    for name, b in model.named_buffers():
        if b.dtype in (torch.int8, torch.uint8) and b.dim() >= 2:
            out[name] = b
    if layers:
        out = {k: v for k, v in out.items() if matches(k, layers)}
    if not out:
        raise ModelError("no weight tensors to inject faults into; check `layers`")
    return out


def activation_targets(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Modules whose outputs receive activation faults: leaf modules with parameters or activation /
    pooling modules (default), or the named ``layers``."""
    if layers:
        mods = dict(model.named_modules())
        missing = [n for n in layers if n not in mods]
        if missing:
            raise ConfigError(f"layers: {missing[0]!r} is not a module of the model")
        return {n: mods[n] for n in layers}
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.GELU, nn.MaxPool2d, nn.AvgPool2d)
    out: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if n and isinstance(m, kinds)}
    if not out:
        raise ModelError("no activation modules found to inject faults into; pass `layers`")
    return out


@dataclasses.dataclass
class Fault:
    """One fault: where (tensor or module), which element, which bit."""

    layer: str
    index: int
    bit: int
    field: str
    kind: str = "weight"  # weight | activation


@dataclasses.dataclass
class FaultCampaignConfig(Config):
    """A bit-flip campaign.

    Args:
        trials: number of faults, each run on one input (default 1000).
        target: ``weights`` (flips in stored tensors) or ``activations`` (flips in layer outputs).
        bits: ``all``, a field name (``exponent``, ``sign``, ``mantissa``, ``magnitude``) or a list of
            bit positions.
        layers: tensor-name prefixes (weights) or module names (activations); default all.
        activation_dtype: format whose bits are flipped in activations (``float32`` or ``float16``).
        seed: seed of the fault and input draws (default 0).
    """

    trials: int = 1000
    target: str = "weights"
    bits: Any = "all"
    layers: list[str] = dataclasses.field(default_factory=list)
    activation_dtype: str = "float32"
    seed: int = 0

    def validate(self) -> None:
        check_range("trials", self.trials, 1)
        check_choice("target", self.target, ("weights", "activations"))
        check_choice("activation_dtype", self.activation_dtype, ("float32", "float16"))
        if isinstance(self.bits, str):
            check_choice("bits", self.bits, ("all", "sign", "exponent", "mantissa", "magnitude"))
        elif not (isinstance(self.bits, (list, tuple)) and self.bits and all(isinstance(b, int) for b in self.bits)):
            raise ConfigError(f"bits: {self.bits!r} is not allowed; allowed: all, sign, exponent, mantissa, "
                              "magnitude or a list of bit positions")


def _allowed_bits(dtype: torch.dtype, bits: Any) -> list[int]:
    fields = bit_fields(dtype)
    if bits == "all":
        return list(range(_WIDTH[dtype]))
    if isinstance(bits, str):
        return fields.get(bits, [])
    return [b for b in bits if 0 <= b < _WIDTH[dtype]]


@dataclasses.dataclass
class CampaignResult:
    """Outcome of a campaign: counts, rates with 95% Wilson intervals, and breakdowns."""

    trials: int
    sdc: int
    nonfinite: int
    by_bit: dict[str, dict[str, Any]]
    by_field: dict[str, dict[str, Any]]
    by_layer: dict[str, dict[str, Any]]
    config: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.sdc / self.trials if self.trials else 0.0

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.sdc, self.trials)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"trials": self.trials, "sdc": self.sdc, "sdc_rate": self.rate, "ci95": [lo, hi],
                "nonfinite_outputs": self.nonfinite, "by_bit": self.by_bit, "by_field": self.by_field,
                "by_layer": self.by_layer, "config": self.config}


def _tally(counts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, (n, k) in sorted(counts.items(), key=lambda kv: (len(kv[0]), kv[0])):
        lo, hi = wilson(k, n)
        out[key] = {"trials": n, "sdc": k, "rate": k / n if n else 0.0, "ci95": [lo, hi]}
    return out


def draw_weight_faults(model: nn.Module, cfg: FaultCampaignConfig, gen: torch.Generator) -> list[Fault]:
    """``cfg.trials`` faults drawn uniformly over the eligible (element, bit) pairs of every target."""
    targets = weight_targets(model, cfg.layers or None)
    names, sizes, bitsets = [], [], []
    for name, t in targets.items():
        allowed = _allowed_bits(t.dtype, cfg.bits)
        if allowed:
            names.append(name)
            sizes.append(t.numel() * len(allowed))
            bitsets.append(allowed)
    if not names:
        raise ConfigError(f"bits: {cfg.bits!r} selects no bit of the model's weight formats "
                          f"({', '.join(sorted({str(t.dtype) for t in targets.values()}))})")
    weights = torch.tensor(sizes, dtype=torch.float64)
    picks = torch.multinomial(weights, cfg.trials, replacement=True, generator=gen).tolist()
    faults = []
    for ti in picks:
        t = targets[names[ti]]
        idx = int(torch.randint(t.numel(), (1,), generator=gen))
        bit = bitsets[ti][int(torch.randint(len(bitsets[ti]), (1,), generator=gen))]
        faults.append(Fault(names[ti], idx, bit, field_of(t.dtype, bit), "weight"))
    return faults


def _output_sizes(model: nn.Module, mods: dict[str, nn.Module], x1: torch.Tensor) -> dict[str, int]:
    sizes: dict[str, int] = {}
    handles = []
    for name, m in mods.items():
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if torch.is_tensor(out):
                sizes[name] = out[0].numel()
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return sizes


class ActivationFault:
    """A forward hook that flips one bit of one element of a module's output (per example).

    The output is copied before the flip, so the module's own state is never touched; ``remove()``
    takes the hook away.

    Args:
        module: the module whose output is corrupted.
        index: flat element index within one example's output.
        bit: bit position in ``dtype``'s representation.
        dtype: format the activation is stored in when the flip happens (float32 or float16).
    """

    def __init__(self, module: nn.Module, index: int, bit: int, dtype: torch.dtype = torch.float32) -> None:
        self.index, self.bit, self.dtype = index, bit, dtype
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        y = out.detach().to(self.dtype).contiguous().clone()
        per = y[0].numel()
        for b in range(y.shape[0]):
            flip_bit_(y[b].view(-1), self.index % per, self.bit)
        return y.to(out.dtype)

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def run_campaign(model: nn.Module, inputs: torch.Tensor, cfg: FaultCampaignConfig | None = None,
                 progress: bool = False, **options: Any) -> CampaignResult:
    """Run a bit-flip campaign and count silent corruptions (top-1 changes).

    Each trial draws a fault and an input (seeded), applies the fault in place, runs the model on the
    input, restores the fault, and compares the top-1 class with the fault-free one. Protections that
    are attached to the model (range restriction hooks) take part, so the same ``cfg`` run with and
    without them gives paired results (the same faults on the same inputs).

    Args:
        model: the model (eval mode during the campaign; mode restored).
        inputs: ``(N, *input_shape)`` candidate inputs; each trial uses one of them.
        cfg: the campaign (default ``FaultCampaignConfig()``), or its keys as keywords
            (``run_campaign(model, x, trials=100)``).
        progress: show a progress bar.

    Returns:
        :class:`CampaignResult` (SDC count and rate with 95% Wilson interval, by bit/field/layer).
    """
    from slimguard.ui import progress as bar

    cfg = FaultCampaignConfig.build(cfg, options, where="fault campaign")
    if not torch.is_tensor(inputs) or len(inputs) == 0:
        raise DataError("fault campaigns need a non-empty tensor of inputs")
    gen = torch.Generator().manual_seed(cfg.seed)
    with eval_mode(model):
        golden = model(inputs).argmax(-1)
        if cfg.target == "weights":
            faults = draw_weight_faults(model, cfg, gen)
            tensors = weight_targets(model, cfg.layers or None)
        else:
            mods = activation_targets(model, cfg.layers or None)
            sizes = _output_sizes(model, mods, inputs[:1])
            adt = getattr(torch, cfg.activation_dtype)
            allowed = _allowed_bits(adt, cfg.bits)
            if not allowed:
                raise ConfigError(f"bits: {cfg.bits!r} selects no bit of {cfg.activation_dtype}")
            names = [n for n in mods if n in sizes]
            w = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
            faults = []
            for mi in torch.multinomial(w, cfg.trials, replacement=True, generator=gen).tolist():
                idx = int(torch.randint(sizes[names[mi]], (1,), generator=gen))
                bit = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
                faults.append(Fault(names[mi], idx, bit, field_of(adt, bit), "activation"))
        picks = torch.randint(len(inputs), (cfg.trials,), generator=gen).tolist()
        by_bit: dict[str, list[int]] = {}
        by_field: dict[str, list[int]] = {}
        by_layer: dict[str, list[int]] = {}
        sdc = nonfinite = 0
        with bar(cfg.trials, "fault campaign", progress) as task:
            for fault, i in zip(faults, picks, strict=True):
                x = inputs[i : i + 1]
                if fault.kind == "weight":
                    with flipped(tensors[fault.layer], fault.index, fault.bit):
                        out = model(x)
                else:
                    hook = ActivationFault(mods[fault.layer], fault.index, fault.bit, adt)
                    try:
                        out = model(x)
                    finally:
                        hook.remove()
                bad = not bool(torch.isfinite(out).all())
                changed = bad or int(out.argmax(-1)) != int(golden[i])
                nonfinite += bad
                sdc += changed
                layer = fault.layer.rsplit(".", 1)[0] if fault.kind == "weight" else fault.layer
                for table, key in ((by_bit, str(fault.bit)), (by_field, fault.field), (by_layer, layer)):
                    c = table.setdefault(key, [0, 0])
                    c[0] += 1
                    c[1] += changed
                task.advance()
    return CampaignResult(cfg.trials, sdc, nonfinite, _tally(by_bit), _tally(by_field), _tally(by_layer),
                          cfg.to_dict()["_data"])
