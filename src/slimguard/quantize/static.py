"""Static int8 post-training quantization (PTQ) of Conv2d and Linear layers.

Steps: fold BatchNorm into the layer before it, fuse a following ReLU, put observers on every layer's
input and output, stream the calibration split through the model (batch by batch; nothing is held), then
convert to :class:`~slimguard.quantize.qmodules.QuantConv2d` / ``QuantLinear``: int8 weights (symmetric,
per output channel) and uint8 activations (asymmetric, per tensor, range from the chosen observer).

Layers of other types (Conv1d, ConvTranspose, embeddings, ...) stay in float and are listed in the
result under ``kept_float`` with the reason.

Runtime: in PyTorch, int8 Linear layers multiply in integers (``torch._int_mm``, see
:mod:`slimguard.quantize.kernels`); int8 Conv2d layers compute the same integer grid with float
accumulation, at float speed. For fast convolutions, export with :func:`slimguard.runtime.onnx.export_onnx`
and run on ONNX Runtime, which fuses both into ``QLinearConv`` / ``QGemm`` kernels.

Example:
    >>> sg.quantize_(model, sg.Int8StaticConfig(calibration="percentile"), calib=data.calib)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch.nn as nn

from slimguard.core.config import Config, check_choice, check_range, register_config
from slimguard.core.registry import register_handler
from slimguard.data.core import Split
from slimguard.quantize.calibrate import calibration_split, check_input_shape, run_calibration
from slimguard.quantize.qmodules import (
    FakeQuantConv2d,
    FakeQuantLinear,
    convert_fake_quant,
    insert_fake_quant,
)


@register_config("int8-static")
@dataclasses.dataclass
class Int8StaticConfig(Config):
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


@register_handler("quantize", Int8StaticConfig)
def _int8_static(model: nn.Module, config: Int8StaticConfig, *, calib: Split | None = None, data: Any = None,
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
                                                    progress, shard=True)
    report["quantized"] = convert_fake_quant(model)
    del report["prepared"]
    return report
