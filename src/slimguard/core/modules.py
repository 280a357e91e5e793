"""Allowlist of module classes an artifact may construct, with their JSON constructor arguments.

Transforms that replace modules (quantized layers, factorised pairs, hashed layers, ...) register
their classes here; each provides ``slimguard_init_kwargs() -> dict`` of JSON values such that
``cls(**kwargs)`` builds a module with the same parameter and buffer names and shapes. A handful of
standard ``torch.nn`` classes are known with extractors for their arguments. Nothing else can be
constructed from a manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from slimguard.core.errors import ArtifactError

_CLASSES: dict[str, type[nn.Module]] = {}


def register_module(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: allow ``cls`` in artifacts under ``name`` (``cls.slimguard_init_kwargs`` required)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise ValueError(f"module name {name!r} is already registered by {_CLASSES[name].__qualname__}")
        if not hasattr(cls, "slimguard_init_kwargs"):
            raise TypeError(f"{cls.__qualname__} must define slimguard_init_kwargs()")
        cls._slimguard_name = name  # type: ignore[attr-defined]
        _CLASSES[name] = cls
        return cls

    return deco


def _conv_kwargs(m: nn.Module) -> dict[str, Any]:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


def _bn_kwargs(m: nn.Module) -> dict[str, Any]:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


_TORCH: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {
    "torch.nn.Linear": (nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                                  bias=m.bias is not None)),
    "torch.nn.Conv1d": (nn.Conv1d, _conv_kwargs),
    "torch.nn.Conv2d": (nn.Conv2d, _conv_kwargs),
    "torch.nn.BatchNorm1d": (nn.BatchNorm1d, _bn_kwargs),
    "torch.nn.BatchNorm2d": (nn.BatchNorm2d, _bn_kwargs),
    "torch.nn.BatchNorm3d": (nn.BatchNorm3d, _bn_kwargs),
    "torch.nn.Conv3d": (nn.Conv3d, _conv_kwargs),
    "torch.nn.GroupNorm": (nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels,
                                                        eps=m.eps, affine=m.affine)),
    "torch.nn.LayerNorm": (nn.LayerNorm, lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                                        elementwise_affine=m.elementwise_affine,
                                                        bias=getattr(m, "bias", None) is not None)),
    "torch.nn.Embedding": (nn.Embedding, lambda m: dict(num_embeddings=m.num_embeddings,
                                                        embedding_dim=m.embedding_dim, padding_idx=m.padding_idx)),
    "torch.nn.Identity": (nn.Identity, lambda m: {}),
    "torch.nn.ReLU": (nn.ReLU, lambda m: {}),
    "torch.nn.GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "torch.nn.Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "torch.nn.Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "torch.nn.Sequential": (nn.Sequential, lambda m: {}),
    "torch.nn.ModuleList": (nn.ModuleList, lambda m: {}),
    "torch.nn.ModuleDict": (nn.ModuleDict, lambda m: {}),
}
_TORCH_BY_CLASS = {cls: name for name, (cls, _) in _TORCH.items()}

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def module_spec(module: nn.Module) -> dict[str, Any]:
    """``{"class": name, "init": kwargs}`` for an allowlisted module; ArtifactError otherwise."""
    cls = type(module)
    if cls in _TORCH_BY_CLASS:
        name = _TORCH_BY_CLASS[cls]
        return {"class": name, "init": _TORCH[name][1](module)}
    name = getattr(cls, "_slimguard_name", None)
    if name is not None and _CLASSES.get(name) is cls:
        return {"class": name, "init": module.slimguard_init_kwargs()}  # type: ignore[operator]
    raise ArtifactError(
        f"cannot store a {cls.__module__}.{cls.__qualname__} that replaced part of the model; "
        "register it with slimguard.core.modules.register_module"
    )


def is_allowlisted(module: nn.Module) -> bool:
    """True when ``module``'s class can be built from a manifest (so its tensor shapes follow from its
    constructor arguments)."""
    cls = type(module)
    name = getattr(cls, "_slimguard_name", None)
    return cls in _TORCH_BY_CLASS or (name is not None and _CLASSES.get(name) is cls)


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Construct an allowlisted module from ``{"class": name, "init": kwargs}``; ArtifactError for a
    class that is not on the allowlist (nothing is imported by name)."""
    import slimguard.registry_index  # noqa: F401  (registers slimguard's own classes)

    name = spec.get("class", "")
    init = {k: tuple(v) if isinstance(v, list) and k in ("kernel_size", "stride", "padding", "dilation",
                                                          "normalized_shape") else v
            for k, v in spec.get("init", {}).items()}
    if name in _TORCH:
        return _TORCH[name][0](**init)
    if name in _CLASSES:
        return _CLASSES[name](**init)
    raise ArtifactError(f"artifact names module class {name!r}, which is not on slimguard's allowlist")
