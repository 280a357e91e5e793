"""Static int8 post-training quantization (PTQ) of Conv2d and Linear layers.

Steps: fold BatchNorm into the layer before it, fuse a following ReLU, put observers on every layer's
input and output, stream the calibration split through the model (batch by batch; nothing is held), then
convert to :class:`~slimguard.quantize.qmodules.QuantConv2d` / ``QuantLinear``: int8 weights (symmetric,
per output channel) and uint8 activations (asymmetric, per tensor, range from the chosen observer).

Layers of other types (Conv1d, ConvTranspose, embeddings, ...) stay in float and are listed in the
result under ``kept_float`` with the reason.

Runtime: in PyTorch the int8 layers emulate the int8 arithmetic exactly (integer grid, float
accumulation), at float speed; for speed, export with :func:`slimguard.runtime.onnx.export_onnx` and run on
ONNX Runtime, which fuses them into ``QLinearConv`` / ``QGemm`` kernels.

Example:
    >>> sg.quantize_(model, sg.Int8Static(calibration="percentile"), calib=data.calib)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_choice, check_range, register_config
from slimguard.core.errors import DataError
from slimguard.core.registry import register_handler
from slimguard.data.core import Split
from slimguard.quantize.fuse import FoldedConv2d, FoldedLinear, find_chains, fold_all, set_submodule
from slimguard.quantize.qmodules import FakeQuantConv2d, FakeQuantLinear, convert_fake_quant
from slimguard.ui import progress as progress_bar

QUANTIZABLE = {nn.Conv2d: FakeQuantConv2d, FoldedConv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear,
               FoldedLinear: FakeQuantLinear}
#: float layer types that hold weights but have no int8 layer here (reported, left in float)
NOT_SUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
                 nn.Bilinear, nn.LSTM, nn.GRU, nn.MultiheadAttention)


@register_config("int8-static")
@dataclasses.dataclass
class Int8Static(Config):
    """Static int8 quantization (weights and activations) of Conv2d and Linear layers.

    Args:
        calibration: activation observer: ``percentile`` (default), ``minmax``, ``entropy``, ``mse``,
            ``moving-average`` (see :mod:`slimguard.quantize.observers`).
        weight_bits: weight bits, 2..8 (default 8; stored as int8).
        ignore: qualified layer names (or prefixes) to keep in float (default none).
        fuse_bn: fold BatchNorm layers first (default True).
        batch_size: calibration batch size (default 64).
        max_batches: stop calibration after this many batches; 0 uses the whole split (default 0).
    """

    calibration: Literal["percentile", "minmax", "entropy", "mse", "moving-average"] = "percentile"
    weight_bits: int = 8
    ignore: list[str] = dataclasses.field(default_factory=list)
    fuse_bn: bool = True
    batch_size: int = 64
    max_batches: int = 0

    def validate(self) -> None:
        check_choice("calibration", self.calibration, ("percentile", "minmax", "entropy", "mse", "moving-average"))
        check_range("weight_bits", self.weight_bits, 2, 8)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_batches", self.max_batches, 0)


def ignored(name: str, ignore: list[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ignore)


def calibration_split(calib: Split | None, data: Any, what: str) -> Split:
    """The split to calibrate on; a one-line DataError when there is none or it is empty or not tensors."""
    split = calib if calib is not None else getattr(data, "calib", None)
    if split is None:
        raise DataError(f"{what} needs calibration data; pass calib=<a Split> (e.g. data.calib)")
    if len(split) == 0:
        raise DataError(f"{what}: the calibration split {split.name!r} is empty; give it at least one example")
    if not torch.is_tensor(split.x):
        raise DataError(f"{what}: calibration inputs must be a tensor, got {type(split.x).__name__}")
    return split


def check_input_shape(model: nn.Module, split: Split, what: str) -> None:
    from slimguard.models.spec import info

    try:
        shape = info(model).data.get("input_shape")
    except Exception:  # a plain nn.Module without slimguard info: nothing to compare with
        return
    if shape and tuple(split.x.shape[1:]) != tuple(shape):
        raise DataError(f"{what}: calibration examples have shape {tuple(split.x.shape[1:])}, the model takes "
                        f"{tuple(shape)}; calibrate with data of the model's input shape")


@torch.no_grad()
def run_calibration(model: nn.Module, split: Split, batch_size: int, max_batches: int, what: str,
                    progress: bool = True) -> int:
    """Stream the split through the model in eval mode (mode restored); returns the batches seen."""
    was = model.training
    model.eval()
    n = 0
    total = -(-len(split) // batch_size)
    if max_batches:
        total = min(total, max_batches)
    try:
        with progress_bar(total, f"calibrating ({what})", enabled=progress) as bar:
            for xb, _ in split.batches(batch_size):
                try:
                    model(xb)
                except RuntimeError as exc:
                    raise DataError(f"{what}: the model cannot run on calibration batch of shape {tuple(xb.shape)} "
                                    f"({str(exc).splitlines()[0]}); give data of the model's input shape") from None
                n += 1
                bar.advance(1)
                if max_batches and n >= max_batches:
                    break
    finally:
        model.train(was)
    return n


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
        cls = QUANTIZABLE.get(type(layer))
        reason = None
        if ignored(c.layer, ignore):
            reason = "ignored by config"
        elif cls is None:
            reason = f"{type(layer).__name__} has no int8 layer"
        elif isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            reason = f"padding {layer.padding!r} / mode {layer.padding_mode!r} is not supported"
        if reason:
            kept.append({"layer": c.layer, "reason": reason})
            continue
        bn = model.get_submodule(c.bn) if (keep_bn and c.bn) else None
        # a ReLU after an unfolded BN cannot move before that BN
        relu = c.relu is not None and (c.bn is None or bn is not None)
        fq = cls.from_float(layer, bn=bn, relu=relu, weight_bits=weight_bits, observer=observer)
        set_submodule(model, c.layer, fq)
        if bn is not None:
            set_submodule(model, c.bn, nn.Identity())
            fused.append([c.layer, c.bn])
        if relu:
            set_submodule(model, c.relu, nn.Identity())
            relus.append([c.layer, c.relu])
        prepared.append(c.layer)
    chained = {c.layer for c in chains}
    for name, mod in model.named_modules():
        if isinstance(mod, NOT_SUPPORTED) or (type(mod) in QUANTIZABLE and name not in chained
                                              and not any(k["layer"] == name for k in kept)):
            kept.append({"layer": name, "reason": f"{type(mod).__name__} is not quantized here"})
    return {"prepared": prepared, "kept_float": kept, "fused_bn": fused, "fused_relu": relus}


@register_handler("quantize", Int8Static)
def _int8_static(model: nn.Module, config: Int8Static, *, calib: Split | None = None, data: Any = None,
                 progress: bool = True, **_: Any) -> dict[str, Any]:
    what = "Int8Static"
    split = calibration_split(calib, data, what)
    check_input_shape(model, split, what)
    report = insert_fake_quant(model, ignore=list(config.ignore), weight_bits=config.weight_bits,
                               observer=config.calibration, fuse_bn=config.fuse_bn)
    for m in model.modules():
        if isinstance(m, (FakeQuantConv2d, FakeQuantLinear)):
            m.fake_quant_enabled = False  # observe float activations
    report["calibration_batches"] = run_calibration(model, split, config.batch_size, config.max_batches, what,
                                                    progress)
    report["quantized"] = convert_fake_quant(model)
    del report["prepared"]
    return report
