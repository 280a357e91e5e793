"""Mixed precision by sensitivity: each Linear / Conv2d layer gets the fewest weight bits (or stays float)
such that the measured accuracy drop stays within a budget.

1. Sensitivity: the accuracy drop on the evaluation split when *only* that layer is quantized
   (weight-only, group-wise) to each candidate bit width.
2. Assignment: every layer starts at the lowest candidate whose own drop is within the budget (float
   when none is); then, while the measured drop of the whole assignment exceeds the budget, the layer
   with the largest own drop moves up one step (next bit width, then float).

The evaluation split is ``data.val`` (labelled), else ``calib`` when it has labels; never the test split.

Example:
    >>> sg.quantize_(model, sg.MixedPrecisionConfig(budget=0.5, bits=[4, 8]), data=data)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import register_handler
from slimguard.data.core import Split
from slimguard.quantize.common import conv_padding_reason, select_layers, set_submodule
from slimguard.quantize.weight_only import weight_only_layer
from slimguard.train.loop import accuracy


@register_config("mixed-precision")
@dataclasses.dataclass
class MixedPrecisionConfig(Config):
    """Per-layer weight bits chosen by sensitivity under an accuracy budget.

    Args:
        budget: allowed accuracy drop in percentage points on the evaluation split (default 0.5).
        bits: candidate bit widths, each of 2, 3, 4, 8 (default [4, 8]).
        group_size: group size of the weight-only layers (default 32; rows are padded when needed).
        conv: include Conv2d layers (default True).
        ignore: layers to keep in float.
    """

    budget: float = 0.5
    bits: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    group_size: int = 32
    conv: bool = True
    ignore: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check_range("budget", self.budget, 0.0, 100.0)
        if not self.bits or any(b not in (2, 3, 4, 8) for b in self.bits):
            raise ConfigError(f"bits: {self.bits} is not allowed; give a non-empty list of 2, 3, 4, 8")
        check_range("group_size", self.group_size, 0)


def _quantized(model: nn.Module, assignment: dict[str, int | None], group: int) -> nn.Module:
    m = copy.deepcopy(model)
    for name, bits in assignment.items():
        if bits is None:
            continue
        set_submodule(m, name, weight_only_layer(m.get_submodule(name), bits, group))
    return m


@register_handler("quantize", MixedPrecisionConfig)
def _mixed(model: nn.Module, config: MixedPrecisionConfig, *, data: Any = None, calib: Split | None = None,
           **_: Any) -> dict[str, Any]:
    split = getattr(data, "val", None)
    if split is None or len(split) == 0 or split.y is None:
        split = calib
    if split is None or len(split) == 0 or split.y is None:
        raise DataError("MixedPrecision needs a labelled evaluation split; pass data= (uses data.val) or calib=")
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d) if config.conv else (nn.Linear,)
    layers, kept = select_layers(model, kinds, config.ignore, exact=True,
                                 check=conv_padding_reason)
    cands = sorted(set(config.bits))
    base = accuracy(model, split) * 100
    drop = {n: {b: base - accuracy(_quantized(model, {n: b}, config.group_size), split) * 100 for b in cands}
            for n in layers}
    assign: dict[str, int | None] = {n: next((b for b in cands if drop[n][b] <= config.budget), None) for n in layers}

    def total(a: dict[str, int | None]) -> float:
        return base - accuracy(_quantized(model, a, config.group_size), split) * 100

    measured = total(assign)
    while measured > config.budget:
        movable = {n: b for n in layers if (b := assign[n]) is not None}  # layer -> its current bits
        if not movable:
            break
        worst = max(movable, key=lambda n: drop[n][movable[n]])
        higher = [b for b in cands if b > movable[worst]]
        assign[worst] = higher[0] if higher else None
        measured = total(assign)
    for name, bits in assign.items():
        if bits is not None:
            set_submodule(model, name, weight_only_layer(model.get_submodule(name), bits, config.group_size))
    return {"bits": assign, "sensitivity": drop, "accuracy_drop": measured, "evaluated_on": split.name,
            "kept_float": kept + [{"layer": n, "reason": "over budget at every bit width"} for n, b in assign.items()
                                  if b is None]}
