"""Allowlist of module classes an artifact may construct, with their JSON constructor arguments.

Transforms that replace modules (quantized layers, factorised pairs, hashed layers, ...) register
their classes here; each provides ``slimguard_init_kwargs() -> dict`` of JSON values such that
``cls(**kwargs)`` builds a module with the same parameter and buffer names and shapes. A handful of
standard ``torch.nn`` classes are known with extractors for their arguments. Nothing else can be
constructed from a manifest.

Techniques that must finish a model once an artifact has rebuilt it (re-packing quantized weights,
re-attaching shared-weight views) register a load hook here (:func:`register_load_hook`), so they
never import the artifact layer that runs the hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from slimguard.core.errors import ArtifactError
from slimguard.core.registry import Registry

CLASSES: Registry[type[nn.Module]] = Registry("module class", error=ArtifactError)
"""Name -> a slimguard module class an artifact may construct (see :func:`register_module`)."""


def register_module(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: allow ``cls`` in artifacts under ``name`` (``cls.slimguard_init_kwargs`` required)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if not hasattr(cls, "slimguard_init_kwargs"):
            raise TypeError(f"{cls.__qualname__} must define slimguard_init_kwargs()")
        CLASSES.register(name, cls)
        cls._slimguard_name = name  # type: ignore[attr-defined]
        return cls

    return deco


ArgsOf = Callable[[Any], dict[str, Any]]
TORCH: Registry[tuple[type[nn.Module], ArgsOf]] = Registry("torch.nn module class", error=ArtifactError)
"""``torch.nn.<Class>`` -> (the class, the function that reads its constructor arguments off an instance)."""
_TORCH_BY_CLASS: dict[type[nn.Module], str] = {}


def _torch_args(*classes: type[nn.Module]) -> Callable[[ArgsOf], ArgsOf]:
    def deco(fn: ArgsOf) -> ArgsOf:
        for cls in classes:
            TORCH.register(f"torch.nn.{cls.__name__}", (cls, fn))
            _TORCH_BY_CLASS[cls] = f"torch.nn.{cls.__name__}"
        return fn

    return deco


@_torch_args(nn.Linear)
def _linear_args(m: Any) -> dict[str, Any]:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)


@_torch_args(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_args(m: Any) -> dict[str, Any]:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


@_torch_args(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _bn_args(m: Any) -> dict[str, Any]:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


@_torch_args(nn.GroupNorm)
def _group_norm_args(m: Any) -> dict[str, Any]:
    return dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine)


@_torch_args(nn.LayerNorm)
def _layer_norm_args(m: Any) -> dict[str, Any]:
    return dict(normalized_shape=list(m.normalized_shape), eps=m.eps, elementwise_affine=m.elementwise_affine,
                bias=getattr(m, "bias", None) is not None)


@_torch_args(nn.Embedding)
def _embedding_args(m: Any) -> dict[str, Any]:
    return dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx)


@_torch_args(nn.GELU)
def _gelu_args(m: Any) -> dict[str, Any]:
    return {"approximate": m.approximate}


@_torch_args(nn.Flatten)
def _flatten_args(m: Any) -> dict[str, Any]:
    return {"start_dim": m.start_dim, "end_dim": m.end_dim}


@_torch_args(nn.Dropout)
def _dropout_args(m: Any) -> dict[str, Any]:
    return {"p": m.p}


@_torch_args(nn.Identity, nn.ReLU, nn.Sequential, nn.ModuleList, nn.ModuleDict)
def _no_args(m: Any) -> dict[str, Any]:
    return {}



CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def module_spec(module: nn.Module) -> dict[str, Any]:
    """``{"class": name, "init": kwargs}`` for an allowlisted module; ArtifactError otherwise."""
    cls = type(module)
    if cls in _TORCH_BY_CLASS:
        name = _TORCH_BY_CLASS[cls]
        return {"class": name, "init": TORCH.get(name)[1](module)}
    if _is_registered(cls):
        name = cls._slimguard_name  # type: ignore[attr-defined]
        return {"class": name, "init": module.slimguard_init_kwargs()}  # type: ignore[operator]
    raise ArtifactError(
        f"cannot store a {cls.__module__}.{cls.__qualname__} that replaced part of the model; "
        "register it with slimguard.core.modules.register_module"
    )


def is_allowlisted(module: nn.Module) -> bool:
    """True when ``module``'s class can be built from a manifest (so its tensor shapes follow from its
    constructor arguments)."""
    cls = type(module)
    return cls in _TORCH_BY_CLASS or _is_registered(cls)


def _is_registered(cls: type) -> bool:
    name = getattr(cls, "_slimguard_name", None)
    return name is not None and name in CLASSES and CLASSES.get(name) is cls


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Construct an allowlisted module from ``{"class": name, "init": kwargs}``; ArtifactError for a
    class that is not on the allowlist (nothing is imported by name)."""
    name = spec.get("class", "")
    init = {k: tuple(v) if isinstance(v, list) and k in ("kernel_size", "stride", "padding", "dilation",
                                                          "normalized_shape") else v
            for k, v in spec.get("init", {}).items()}
    if name in TORCH:
        return TORCH.get(name)[0](**init)
    if name in CLASSES:
        return CLASSES.get(name)(**init)
    raise ArtifactError(f"artifact names module class {name!r}, which is not on slimguard's allowlist")


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``path`` under ``root`` and return the root (``module`` itself for the
    empty path, which replaces the root). Containers (Sequential, ModuleList, ModuleDict) keep their order.
    """
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, CONTAINERS):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)
    return root


# ---- load hooks ------------------------------------------------------------------------------------------
LoadHook = Callable[[nn.Module, dict[str, Any]], object]
LOAD_HOOKS: Registry[LoadHook] = Registry("load hook")
"""Functions ``fn(model, manifest)`` run, in registration order, after every artifact load (what they
return is ignored)."""


def register_load_hook(fn: LoadHook) -> LoadHook:
    """Run ``fn(model, manifest)`` after every artifact load (e.g. to re-pack quantized weights).

    Hooks are keyed by their module and qualified name; another function under a taken name is refused.
    """
    return LOAD_HOOKS.register(f"{fn.__module__}.{fn.__qualname__}", fn)
