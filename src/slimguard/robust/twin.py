"""Fake-quant twins: differentiable stand-ins for quantized models, so gradient attacks can reach them.

Integer kernels (``torch._int_mm`` and friends) have no gradient. A quantized model is
attacked through its *twin*: a deep copy in which every quantized module is swapped for the float module
its ``fake_quant_twin()`` method returns (dequantized weights, activations rounded like the int8 kernel in
the forward pass and passed straight through in the backward pass). The adversarial examples found on
the twin are then *transferred* to the real int8 model; :func:`slimguard.robust.scorecard` reports both.

Quantized module classes provide ``fake_quant_twin() -> nn.Module``. For classes that do not (yet), a
twin builder can be registered here with :func:`register_twin`.

Example:
    >>> twin = fake_quant_twin(int8_model)
    >>> x_adv = PGD(eps=0.1)(twin, x, y, bounds=data.meta.bounds())
    >>> accuracy_on(int8_model, x_adv, y)   # transferred
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.nn as nn

from slimguard.core.registry import Registry

TwinBuilder = Callable[[nn.Module], nn.Module]
TWINS: Registry[TwinBuilder] = Registry("fake-quant twin builder")


def register_twin(cls: type[nn.Module]) -> Callable[[TwinBuilder], TwinBuilder]:
    """Register ``fn(module) -> twin module`` for a quantized class (and its subclasses) that has no
    ``fake_quant_twin`` method; a second builder for the same class is refused."""
    key: type = cls
    return TWINS.register(key)


def _twin_builder(module: nn.Module) -> Callable[[], nn.Module] | None:
    method = getattr(module, "fake_quant_twin", None)
    if callable(method):
        return method
    fn = TWINS.for_type(type(module))
    return None if fn is None else (lambda: fn(module))


def is_quantized(model: nn.Module) -> bool:
    """True when some module of ``model`` has a fake-quant twin (and so runs integer kernels)."""
    return any(_twin_builder(m) is not None for m in model.modules())


def fake_quant_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every quantized module swapped for its differentiable twin.

    The original is not changed. The twin keeps the original's mode and slimguard info.

    Args:
        model: a model, quantized or not (a model without quantized modules gives a plain copy).

    Returns:
        The twin (``nn.Module``) on the same device.
    """
    root_builder = _twin_builder(model)
    if root_builder is not None:
        return root_builder()
    twin = copy.deepcopy(model)
    for _, parent in list(twin.named_modules()):
        for cname, child in list(parent.named_children()):
            builder = _twin_builder(child)
            if builder is not None:
                new = builder()
                new.train(child.training)
                setattr(parent, cname, new)
    return twin
