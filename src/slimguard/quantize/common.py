"""Helpers every quantization method shares: which layers to touch, and how to swap a layer in place.

Each method picks layers the same way: walk the model, take the layers of the kinds it can quantize, and
keep in float (with a reason that lands in the method's report under ``kept_float``) every layer the
config's ``ignore`` list names or that the method cannot handle.

Example:
    >>> chosen, kept = select_layers(model, (nn.Linear,), ignore=["head"])
    >>> for name in chosen:
    ...     set_submodule(model, name, MyInt8Linear.from_float(model.get_submodule(name)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

# the one module-replacement helper (``set_submodule(model, "block.0.fc", new)``), shared with the artifact
from slimguard.core.modules import set_submodule
from slimguard.core.torch_utils import matches

__all__ = ["LayerCheck", "conv_padding_reason", "pair", "select_layers", "set_submodule"]

#: ``check(layer) -> reason`` to keep a selected layer in float, or None to quantize it
LayerCheck = Callable[[nn.Module], str | None]


def pair(v: Any) -> tuple[int, int]:
    """``3 -> (3, 3)``; a two-item list or tuple is kept as a tuple (Conv2d's kernel, stride, padding, dilation)."""
    if isinstance(v, (list, tuple)):
        first, second = v
        return first, second
    return v, v


def conv_padding_reason(layer: nn.Module) -> str | None:
    """Why a Conv2d's padding rules it out of slimguard's quantized convs (string or non-zero padding), or None."""
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return f"padding {layer.padding!r} / mode {layer.padding_mode!r} is not supported"
    return None


def select_layers(model: nn.Module, kinds: tuple[type[nn.Module], ...], ignore: Sequence[str] = (), *,
                  exact: bool = False, check: LayerCheck | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The layers of ``kinds`` to quantize, and those kept in float with the reason.

    Args:
        model: the model to walk (its own root is never selected: it cannot be replaced in place).
        kinds: layer classes to consider.
        ignore: qualified names (or prefixes) to keep in float, reported as ``"ignored by config"``.
        exact: match ``type(layer) in kinds`` (default False: ``isinstance``, so subclasses count too).
        check: ``check(layer) -> reason or None``; a reason keeps the layer in float.

    Returns:
        ``(names, kept_float)``; ``kept_float`` is a list of ``{"layer": name, "reason": text}``.
    """
    chosen: list[str] = []
    kept: list[dict[str, str]] = []
    for name, layer in model.named_modules():
        if not (type(layer) in kinds if exact else isinstance(layer, kinds)):
            continue
        if not name:
            reason: str | None = "the model itself is one layer; wrap it in nn.Sequential to quantize it"
        elif matches(name, ignore):  # "enc" covers "enc.fc"
            reason = "ignored by config"
        else:
            reason = check(layer) if check is not None else None
        if reason:
            kept.append({"layer": name, "reason": reason})
        else:
            chosen.append(name)
    return chosen, kept
