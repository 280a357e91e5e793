"""Quantization-aware training (QAT): fake quantization with straight-through gradients, trained with the
one training loop, then converted to real int8 layers.

``prepare_qat_`` replaces Conv2d / Linear layers by fake-quant layers that carry the following
BatchNorm (folded into the weight with running statistics, which keep updating until frozen) and a fused
ReLU; activation ranges come from moving-average observers, initialised by a calibration pass. A
:class:`QATFreezer` callback freezes BN statistics and then observers after set epochs (Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR
2018). ``convert_`` turns the trained layers into :class:`~slimguard.quantize.qmodules.QuantConv2d` /
``QuantLinear``. The ``qat`` recipe step does all three.

Example:
    >>> cfg = sg.QATConfig(weight_bits=4)
    >>> sg.prepare_qat_(model, cfg, calib=data.calib)
    >>> sg.finetune(model, data, cfg.finetune, callbacks=[QATFreezer(cfg.freeze_bn_epoch, cfg.freeze_observers_epoch)])
    >>> sg.convert_(model)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.registry import register_handler
from slimguard.data.core import Split
from slimguard.quantize.calibrate import calibration_split, check_input_shape, run_calibration
from slimguard.quantize.observers import reduce_observers_
from slimguard.quantize.qmodules import (
    FakeQuantConv2d,
    FakeQuantLinear,
    convert_fake_quant,
    insert_fake_quant,
)
from slimguard.train.loop import Callback, FinetuneConfig, check_finetune, finetune, finetune_block

_FQ = (FakeQuantConv2d, FakeQuantLinear)


@register_config("qat")
@dataclasses.dataclass
class QATConfig(Config):
    """Quantization-aware training of Conv2d / Linear layers (also the ``qat`` recipe step).

    Args:
        weight_bits: weight bits, 2..8 (default 8); activations are uint8.
        freeze_bn_epoch: epochs after which BN statistics stop updating (default 1).
        freeze_observers_epoch: epochs after which activation ranges stop updating (default 2).
        ignore: layers to keep in float.
        finetune: the training loop's options (:class:`~slimguard.train.loop.FinetuneConfig`; default 3
            epochs at lr 1e-4, batch size 64, no early stopping, otherwise FinetuneConfig's defaults). In a
            recipe, keys the block leaves out keep these defaults; the old spelling with ``epochs``, ``lr``,
            ``batch_size`` beside the step's options is still read, with a deprecation warning.

    Example:
        >>> cfg = QATConfig(weight_bits=4, finetune=FinetuneConfig(epochs=5, lr=1e-4))

    In a recipe::

        - qat: {weight_bits: 4, finetune: {epochs: 5, lr: 0.0001}}
    """

    weight_bits: int = 8
    freeze_bn_epoch: int = 1
    freeze_observers_epoch: int = 2
    ignore: list[str] = dataclasses.field(default_factory=list)
    finetune: FinetuneConfig = dataclasses.field(
        default_factory=lambda: FinetuneConfig(epochs=3, lr=1e-4, batch_size=64, patience=0))

    # training options older recipes wrote beside the step's own (read into ``finetune``, with a warning)
    FLAT_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size")

    def validate(self) -> None:
        check_range("weight_bits", self.weight_bits, 2, 8)
        check_range("freeze_bn_epoch", self.freeze_bn_epoch, 0)
        check_range("freeze_observers_epoch", self.freeze_observers_epoch, 0)
        check_finetune(self.finetune)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], where: str = "") -> QATConfig:
        where = where or cls.config_name
        return super().from_fields(finetune_block(cls, fields, where, cls.FLAT_TRAINING_KEYS), where)


def prepare_qat_(model: nn.Module, config: QATConfig | None = None, *, calib: Split | None = None, data: Any = None,
                 progress: bool = True) -> dict[str, Any]:
    """Insert fake-quant layers (BN carried, ReLU fused) and initialise activation ranges on ``calib``.

    Returns ``{"prepared": [...], "kept_float": [...], "fused_bn": [...], "fused_relu": [...]}``.
    """
    cfg = config or QATConfig()
    split = calibration_split(calib, data, "prepare_qat_")
    check_input_shape(model, split, "prepare_qat_")
    report = insert_fake_quant(model, ignore=list(cfg.ignore), weight_bits=cfg.weight_bits,
                               observer="moving-average", fuse_bn=True, keep_bn=True)
    layers = [m for m in model.modules() if isinstance(m, _FQ)]
    for m in layers:
        m.fake_quant_enabled = False
    run_calibration(model, split, 64, 0, "QAT init", progress, shard=True)
    for m in layers:
        m.fake_quant_enabled = True
    return report


def convert_(model: nn.Module) -> list[str]:
    """Convert trained (or calibrated) fake-quant layers to int8 layers in place; returns their names."""
    return convert_fake_quant(model)


class QATFreezer(Callback):
    """Freeze BN statistics after ``bn_epoch`` epochs and observers after ``observer_epoch`` epochs.

    Early stopping only tracks epochs after the observers are frozen (before, ranges still move).
    """

    def __init__(self, bn_epoch: int = 1, observer_epoch: int = 2) -> None:
        self.bn_epoch, self.observer_epoch = bn_epoch, observer_epoch

    def _apply(self, model: nn.Module, epochs_done: int) -> None:
        for m in model.modules():
            if isinstance(m, _FQ):
                m.bn_frozen = epochs_done >= self.bn_epoch
                m.observers_frozen = epochs_done >= self.observer_epoch

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self._apply(model, 0)

    def on_epoch_end(self, model: nn.Module, epoch: int, val_score: float | None) -> None:
        self._apply(model, epoch + 1)

    def best_tracking_allowed(self, epoch: int) -> bool:
        return epoch + 1 >= self.observer_epoch


@register_handler("quantize", QATConfig)
def _qat(model: nn.Module, config: QATConfig, *, data: Any = None, calib: Split | None = None, progress: bool = True,
         **_: Any) -> dict[str, Any]:
    from slimguard.core.errors import DataError

    if data is None:
        raise DataError("QAT needs training data; pass data=<a DataBundle> (recipes do this)")
    report = prepare_qat_(model, config, calib=calib, data=data, progress=progress)
    history = finetune(model, data, config.finetune,
                       callbacks=[QATFreezer(config.freeze_bn_epoch, config.freeze_observers_epoch)],
                       progress=progress, description="QAT")
    if reduce_observers_(model):  # data-parallel: every rank takes the ranks' mean ranges before converting
        for m in model.modules():
            if isinstance(m, _FQ) and bool(m.observed):
                m._stale.update(("input", "output") if m.quantize_output else ("input",))
    report["quantized"] = convert_(model)
    report["best_val_score"] = history.get("best_val_score")
    del report["prepared"]
    return report
