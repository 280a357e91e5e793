"""Teachers: ensembles whose averaged outputs teach one student, and taps that capture the outputs of
named layers during a forward pass (for feature and attention transfer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, ModelError


class Ensemble(nn.Module):
    """Several teachers as one: the (weighted) mean of their outputs.

    Logits are averaged (a classifier ensemble); embeddings are averaged and, when ``normalize`` is
    True, re-normalised to unit length. All members must produce outputs of the same shape.

    Args:
        teachers: two or more models taking the same inputs.
        weights: one non-negative weight per teacher (default equal); normalised to sum 1.
        normalize: L2-normalise the averaged output (default False; use True for embedding teachers).

    Example:
        >>> teacher = Ensemble([model_a, model_b])
        >>> distill(teacher, student, data, DistillConfig())
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 normalize: bool = False) -> None:
        super().__init__()
        if len(teachers) < 1:
            raise ModelError("an ensemble needs at least one teacher")
        w = [1.0] * len(teachers) if weights is None else [float(x) for x in weights]
        if len(w) != len(teachers) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"ensemble weights {list(w)} must be {len(teachers)} non-negative numbers, not all 0")
        self.teachers = nn.ModuleList(teachers)
        self.weights = [x / sum(w) for x in w]
        self.normalize = normalize

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outs = [t(*args, **kwargs) for t in self.teachers]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise ModelError(f"ensemble members disagree on output shape: {sorted(shapes)}; they must match")
        avg = sum(w * o for w, o in zip(self.weights, outs, strict=True))
        return F.normalize(avg, dim=-1) if self.normalize else avg

    def tokenize(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        for t in self.teachers:
            if hasattr(t, "tokenize"):  # torch's stub types the attribute Tensor | Module, hiding the method
                return t.tokenize(texts, max_length)  # type: ignore[operator]
        raise ModelError("no ensemble member has a tokenizer")


def resolve_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that names the layer and some that exist."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        names = [n for n in modules if n]
        close = [n for n in names if name and (name in n or n in name)][:5] or names[:8]
        raise ConfigError(
            f"{role} layer {name!r} does not exist; pick one of its module names, e.g. {', '.join(close)}"
        )
    return modules[name]


class Taps:
    """Forward hooks that record the outputs of named modules.

    ``taps[name]`` is the module's output from the latest forward (the first element when the module
    returns a tuple, unless ``keep_tuple``). Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str, keep_tuple: bool = False) -> None:
        self.outputs: dict[str, Any] = {}
        self._handles = []
        modules = [(name, resolve_module(model, name, role)) for name in names]  # all checked before any hook
        for name, module in modules:
            self._handles.append(module.register_forward_hook(self._hook(name, keep_tuple)))

    def _hook(self, name: str, keep_tuple: bool):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, (tuple, list)) and not keep_tuple:
                out = out[0]
            self.outputs[name] = out

        return fn

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
