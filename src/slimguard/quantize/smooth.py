"""SmoothQuant-style activation smoothing (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023).

Activations of transformers have a few channels with large values, which makes per-tensor int8
activations coarse. Smoothing divides each input channel ``j`` of a norm's output (an affine ``LayerNorm``,
or an ``RMSNorm`` of a Llama-style decoder: :func:`is_norm`) by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (folded into the LayerNorm's weight and bias) and
multiplies column ``j`` of every Linear that reads that output by ``s_j``. The float model computes the
same function; its activations become easier and its weights a little harder to quantize.

Norm -> Linear pairs are found by running calibration batches (a split of tensors or texts, or batches of
token ids): a Linear whose input *is* a norm's output tensor (or a same-layout view of it) reads it directly.

W8A8 for language models is this step followed by ``int8-dynamic`` (int8 weights per output channel, int8
activations per token, products in ``torch._int_mm``), the per-token variant of the paper's recipe.

Example:
    >>> sg.quantize_(model, sg.SmoothQuantConfig(alpha=0.5), calib=data.calib)   # then Int8Dynamic or ONNX int8
    >>> sg.quantize_(model, sg.Int8DynamicConfig())                              # W8A8
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.registry import register_handler
from slimguard.data.core import Split
from slimguard.quantize.calibrate import calibrate, calibration_batches, calibration_split


@register_config("smoothquant")
@dataclasses.dataclass
class SmoothQuantConfig(Config):
    """Migrate activation outliers into weights (see the module docstring).

    Args:
        alpha: migration strength in [0, 1] (default 0.5).
        batch_size: calibration batch size (default 32).
        max_batches: calibration batches; 0 = the whole split (default 8).
    """

    alpha: float = 0.5
    batch_size: int = 32
    max_batches: int = 8

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_batches", self.max_batches, 0)


def same_data_key(t: torch.Tensor) -> tuple[Any, ...]:
    """A key equal for a tensor and any view of it with the same layout (``h[:, 0:, :]`` of a norm's output,
    as Llama's LM head reads it): storage address, shape and strides."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def is_norm(module: nn.Module) -> bool:
    """A normalisation whose per-channel weight can absorb a scale: affine LayerNorm or any ``*RMSNorm``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return False
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def smooth_(model: nn.Module, batches: Iterable[Any], alpha: float = 0.5) -> list[dict[str, Any]]:
    """Smooth every norm -> Linear(s) group found while running ``batches``; returns the groups."""
    lns = {n: m for n, m in model.named_modules() if is_norm(m)}
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    last_out: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}
    readers: dict[str, set[str]] = {}
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def ln_hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            last_out[same_data_key(out)] = (name, out)  # the reference keeps its memory from being reused
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return fn

    def lin_hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            src = last_out.get(same_data_key(inputs[0]))
            if src is not None:
                readers.setdefault(src[0], set()).add(name)
        return fn

    hooks += [m.register_forward_hook(ln_hook(n)) for n, m in lns.items()]
    hooks += [m.register_forward_pre_hook(lin_hook(n)) for n, m in lins.items()]
    try:  # tensor ids are only meaningful within one batch: forget them after each
        calibrate(model, batches, "SmoothQuant", progress=False, after_batch=last_out.clear)
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for ln_name, names in sorted(readers.items()):
        ln, layers = lns[ln_name], [lins[n] for n in sorted(names)]
        wmax = torch.stack([lay.weight.abs().amax(0) for lay in layers]).amax(0).float().clamp_min(1e-5)
        s = (amax[ln_name].clamp_min(1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp_min(1e-5)
        ln.weight.div_(s.to(ln.weight.dtype))
        if getattr(ln, "bias", None) is not None:
            ln.bias.div_(s.to(ln.bias.dtype))
        for lay in layers:
            lay.weight.mul_(s.to(lay.weight.dtype)[None, :])
        groups.append({"norm": ln_name, "linears": sorted(names), "max_scale": float(s.max())})
    return groups


@register_handler("quantize", SmoothQuantConfig)
def _smooth(model: nn.Module, config: SmoothQuantConfig, *, calib: Split | None = None, data: Any = None,
            **_: Any) -> dict[str, Any]:
    split = calibration_split(calib, data, "SmoothQuant", text_ok=True)
    groups = smooth_(model, calibration_batches(model, split, config.batch_size, config.max_batches), config.alpha)
    return {"smoothed": groups, "kept_float": []}
