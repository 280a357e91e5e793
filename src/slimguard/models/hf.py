"""Hugging Face models from a local folder, by task, with their heads and tokenizer kept.

A folder holding ``config.json`` (plus weights and, for text, tokenizer files) loads as one of the tasks of
:data:`TASKS`, chosen from the config's ``architectures`` (``BertForSequenceClassification`` ->
``sequence-classification``) unless ``task=`` names one:

* ``sequence-classification`` (``AutoModelForSequenceClassification``): :class:`HfTextClassifier`,
  token ids -> ``(N, num_labels)`` logits;
* ``image-classification`` (``AutoModelForImageClassification``): :class:`HfImageClassifier`,
  ``(N, C, H, W)`` images in [0, 1] -> logits;
* ``causal-lm`` (``AutoModelForCausalLM``): :class:`HfCausalLM`, token ids -> ``(N, L, vocab)`` logits;
* ``embedding`` (``AutoModel`` plus mean pooling): :class:`SentenceEmbedder`, token ids -> ``(N, D)``.

Each wrapper keeps transformers' own model as ``.model`` (``.encoder`` for the embedder), so structured
pruning and ``export --format hf`` see the modules transformers built. Text wrappers carry the tokenizer
(``tokenize(texts)``); a text model without tokenizer files is refused, naming the files expected.

The source recorded for an artifact embeds the config, the tokenizer files (base64, at most
:data:`MAX_TOKENIZER_BYTES`) and the image preprocessing, so an artifact loads with the folder gone. Nothing
names code: ``auto_map`` and remote code are refused, and tokenizers load with ``trust_remote_code=False``.

Example:
    >>> model = load_hf("path/to/bert-sst2")                # task from config.architectures
    >>> logits = model(**model.tokenize(["a fine film"]))
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import tempfile
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ModelError, require
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import eval_mode
from slimguard.models.spec import ModelInfo, register_builder, set_info

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
"""Files a tokenizer may consist of; only these are read from a folder and embedded in artifacts."""
MAX_TOKENIZER_BYTES = 32 * 1024**2
DEFAULT_IMAGE_STATS = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # ViT's default processor


class _TextMixin:
    """``tokenize(texts)`` with the tokenizer the loader attached (not a module, not in ``state_dict``)."""

    tokenizer: Any

    def padding_tokenizer(self) -> Any:
        """The tokenizer, with a pad token (GPT-2 and Llama ship none: they pad with EOS)."""
        if self.tokenizer is None:
            raise ModelError(f"this {type(self).__name__} has no tokenizer; load it with load_hf")
        if getattr(self.tokenizer, "pad_token", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        return self.tokenizer

    def tokenize(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        enc = self.padding_tokenizer()(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class SentenceEmbedder(_TextMixin, nn.Module):
    """A Hugging Face encoder plus pooling: ``forward(input_ids, attention_mask) -> (N, D)`` embeddings.

    ``pooling="mean"`` averages token states over the attention mask and L2-normalises the result
    (as sentence-transformers' all-MiniLM-L6-v2 does). ``encode(texts)`` tokenises for you.
    """

    task = "embedding"

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = None

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

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
        """Embeddings of ``texts`` in their order, at most ``batch_size`` texts per call of the model.

        By default the texts are batched longest first (as sentence-transformers does), so each batch pads
        only to texts of similar length. An encoder that states what one call costs in tokens
        (``call_overhead_tokens``, e.g. an :class:`~slimguard.runtime.ort_transformer.OrtEncoder` built
        with it) gets padding-aware batches instead: texts sorted by token count and cut where
        :func:`padding_groups` finds that padding a short text to a long one costs more than another call.
        """
        call_tokens = int(getattr(self.encoder, "call_overhead_tokens", 0) or 0)
        if call_tokens > 0 and self.tokenizer is not None and texts:
            return self._encode_by_tokens(texts, batch_size, max_length, call_tokens)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with eval_mode(self):
            outs = [self(**self.tokenize([texts[j] for j in order[i : i + batch_size]], max_length))
                    for i in range(0, len(texts), batch_size)]
        if not outs:
            return torch.empty(0)
        emb = torch.cat(outs)
        return emb[torch.argsort(torch.tensor(order))]

    def _encode_by_tokens(self, texts: list[str], batch_size: int, max_length: int,
                          call_tokens: int) -> torch.Tensor:
        tokenizer = self.padding_tokenizer()
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        pad_id = tokenizer.pad_token_id or 0
        outs = []
        with eval_mode(self):
            for start, end in padding_groups([len(ids[i]) for i in order], batch_size, call_tokens):
                rows = [ids[i] for i in order[start:end]]
                input_ids = torch.full((len(rows), len(rows[0])), pad_id, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for r, row in enumerate(rows):
                    input_ids[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                outs.append(self(input_ids=input_ids, attention_mask=mask))
        return torch.cat(outs)[torch.argsort(torch.tensor(order))]


def padding_groups(lengths: Sequence[int], max_items: int, call_tokens: int) -> list[tuple[int, int]]:
    """Cut ``lengths`` (token counts sorted longest first) into runs ``[start, end)`` of at most
    ``max_items`` that minimise the work of encoding them, counted in tokens: every run pads to its first
    (longest) row and costs ``call_tokens`` more for the call itself. Exact (dynamic programming over the
    cut points, ``O(len(lengths) * max_items)``; of equal work, the fewest calls, full runs first); uniform
    lengths give runs of ``max_items``, a long tail gets short runs of its own.

    Example:
        >>> padding_groups([80, 30, 29, 28, 27], max_items=32, call_tokens=16)
        [(0, 1), (1, 5)]
        >>> padding_groups([20] * 4, max_items=2, call_tokens=16)
        [(0, 2), (2, 4)]
    """
    n = len(lengths)
    if any(a < b for a, b in itertools.pairwise(lengths)):
        raise ValueError("padding_groups: lengths must be sorted longest first")
    if max_items < 1 or call_tokens < 0:
        raise ValueError("padding_groups: max_items must be >= 1 and call_tokens >= 0")
    # best[j]: (least work, fewest calls at that work) for the first j rows; cut[j]: where its last run starts
    # (on ties the latest start, so full runs come first and the remainder last)
    best = [(0, 0)] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        work, calls, neg_i = min((best[i][0] + call_tokens + (j - i) * lengths[i], best[i][1] + 1, -i)
                                 for i in range(max(0, j - max_items), j))
        best[j], cut[j] = (work, calls), -neg_i
    runs: list[tuple[int, int]] = []
    j = n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


class _TokenLogitsModel(_TextMixin, nn.Module):
    """transformers' ``model`` kept as ``.model``: ``forward(input_ids, attention_mask)`` -> its logits.

    A subclass names its :attr:`task` and, in :attr:`call_options`, the keywords added to every call of
    ``model`` (read-only, so no instance can change them for all).
    """

    task: ClassVar[str]
    call_options: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _logits(self.model(input_ids=input_ids, attention_mask=attention_mask, **self.call_options))


class HfTextClassifier(_TokenLogitsModel):
    """A sequence classifier (BERT, DistilBERT, RoBERTa, ...): ``forward(input_ids, attention_mask)`` ->
    ``(N, num_labels)`` logits, the classification head kept."""

    task = "sequence-classification"


class HfCausalLM(_TokenLogitsModel):
    """A causal language model (Llama, Mistral, GPT-2, ...): ``forward(input_ids, attention_mask)`` ->
    ``(N, L, vocab)`` next-token logits, without a cache."""

    task = "causal-lm"
    call_options = types.MappingProxyType({"use_cache": False})


class HfImageClassifier(nn.Module):
    """An image classifier (ViT, ...) that takes raw images, as slimguard's data sets hold them.

    The processor's steps live inside the module: an image of another size is resized (bilinear) to the
    model's, a grey image is repeated to three channels, and ``(x - mean) / std`` is applied.

    Shape:
        Input ``(N, C, H, W)`` in [0, 1] (C of 1 or 3); output ``(N, num_labels)`` logits.
    """

    task = "image-classification"
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = tuple(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return _logits(self.model(pixel_values=(x - self.mean) / self.std))


@dataclasses.dataclass(frozen=True)
class HfTask:
    """One task: the transformers auto class that builds it, how to wrap it, whether it reads text, and the
    suffixes of ``architectures`` names that mean it."""

    auto_class: str
    wrap: Callable[[nn.Module, dict[str, Any]], nn.Module]
    text: bool
    suffixes: tuple[str, ...] = ()


TASKS: Registry[HfTask] = Registry("hf task", error=ModelError)
"""Task name -> :class:`HfTask`."""
TASKS.register("sequence-classification", HfTask(
    "AutoModelForSequenceClassification", lambda m, s: HfTextClassifier(m), True, ("ForSequenceClassification",)))
TASKS.register("image-classification", HfTask(
    "AutoModelForImageClassification",
    lambda m, s: HfImageClassifier(m, *_image_settings(m, s.get("image"))), False, ("ForImageClassification",)))
TASKS.register("causal-lm", HfTask("AutoModelForCausalLM", lambda m, s: HfCausalLM(m), True,
                                   ("ForCausalLM", "LMHeadModel")))
TASKS.register("embedding", HfTask("AutoModel", lambda m, s: SentenceEmbedder(m, pooling=s.get("pooling", "mean")),
                                   True, ("Model",)))


def task_of(config: dict[str, Any], task: str | None = None) -> str:
    """The task named by ``task``, else the one the config's ``architectures`` names, else ``embedding``."""
    if task is not None:
        TASKS.get(task)
        return task
    for arch in config.get("architectures") or []:
        for name, entry in TASKS.items():
            if name != "embedding" and str(arch).endswith(entry.suffixes):
                return str(name)
    return "embedding"


def _image_settings(model: nn.Module, image: dict[str, Any] | None) -> tuple[list[float], list[float],
                                                                              tuple[int, int]]:
    cfg: Any = getattr(model, "config", None)
    size = int(getattr(cfg, "image_size", 224) or 224)
    channels = int(getattr(cfg, "num_channels", 3) or 3)
    image = image or {}
    mean = list(image.get("mean") or DEFAULT_IMAGE_STATS[0][:channels])
    std = list(image.get("std") or DEFAULT_IMAGE_STATS[1][:channels])
    return mean, std, (size, size)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # slimguard shows its own progress; keep --json output clean


# config keys that make transformers run or fetch code instead of building its own classes
_CODE_KEYS = {"auto_map", "custom_pipelines", "trust_remote_code"}
_SAFE_IMPLEMENTATIONS = {None, "eager", "sdpa"}


def check_hf_config(config: Any, where: str = "config") -> None:
    """Refuse keys of a Hugging Face config (at any depth) that would name code to import or download."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k in _CODE_KEYS:
                raise ModelError(f"hf source {where}.{k} names code to run; slimguard builds only "
                                 "transformers' own model classes")
            if "implementation" in str(k) and v not in _SAFE_IMPLEMENTATIONS:
                raise ModelError(f"hf source {where}.{k} = {v!r} is not allowed; allowed: eager, sdpa")
            check_hf_config(v, f"{where}.{k}")
    elif isinstance(config, list):
        for i, v in enumerate(config):
            check_hf_config(v, f"{where}[{i}]")


# ---- tokenizer files: read from a folder, embedded in the source, written back for transformers -----------
def read_tokenizer_files(directory: Path) -> dict[str, str]:
    """The tokenizer files of a folder (names in :data:`TOKENIZER_FILES`) as base64 strings."""
    files = {}
    total = 0
    for name in TOKENIZER_FILES:
        p = directory / name
        if p.is_file():
            total += p.stat().st_size
            if total > MAX_TOKENIZER_BYTES:
                raise ModelError(f"hf:{directory}: tokenizer files exceed {MAX_TOKENIZER_BYTES:,} bytes")
            blob = p.read_bytes()
            _check_tokenizer_file(name, blob, f"hf:{directory}")
            files[name] = base64.b64encode(blob).decode("ascii")
    return files


def _check_tokenizer_file(name: str, blob: bytes, where: str) -> None:
    """JSON files must parse, and a tokenizer's settings may not name code (``auto_map``); vocabularies
    (``tokenizer.json``, ``vocab.json``) are data, whatever words they hold."""
    if not name.endswith(".json"):
        return
    try:
        content = json.loads(blob)
    except (ValueError, RecursionError):
        raise ModelError(f"{where}: {name} is not valid JSON; fix or remove it") from None
    if name not in ("tokenizer.json", "vocab.json") and isinstance(content, dict):
        named = sorted(set(content) & _CODE_KEYS)
        if named:
            raise ModelError(f"{where}: {name}.{named[0]} names code to run; slimguard loads only transformers' "
                             "own tokenizers")


def _tokenizer_from_files(files: dict[str, str]) -> Any:
    transformers = require("transformers", "nlp")
    bad = sorted(set(files) - set(TOKENIZER_FILES))
    if bad:
        raise ModelError(f"hf source tokenizer file {bad[0]!r} is not allowed; allowed: {', '.join(TOKENIZER_FILES)}")
    with tempfile.TemporaryDirectory(prefix="slimguard-tok-") as tmp:
        total = 0
        for name, text in files.items():
            blob = base64.b64decode(text.encode("ascii"), validate=True)
            total += len(blob)
            if total > MAX_TOKENIZER_BYTES:
                raise ModelError(f"hf source tokenizer files exceed {MAX_TOKENIZER_BYTES:,} bytes")
            _check_tokenizer_file(name, blob, "hf source")
            Path(tmp, name).write_bytes(blob)
        return _load_tokenizer(transformers, tmp, "embedded tokenizer")


def _load_tokenizer(transformers: Any, directory: str, where: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{where}: cannot load a tokenizer without remote code "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


# ---- building from a source spec (artifacts) and loading from a folder --------------------------------------
@register_builder("hf")
def build_hf(source: dict[str, Any]) -> nn.Module:
    """An untrained model of the source's task from its config dict: ``model_type`` must be one of
    transformers' own, and no remote code is ever trusted (model and tokenizer). The tokenizer comes from
    the embedded files (``tokenizer``), else from ``tokenizer_dir`` (artifacts of earlier versions)."""
    _offline()
    transformers = require("transformers", "nlp")
    check_hf_config(source["config"])
    task = task_of(source["config"], source.get("task") or "embedding")
    entry = TASKS.get(task)
    try:
        config = transformers.AutoConfig.for_model(**source["config"])
        hf_model = getattr(transformers, entry.auto_class).from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"hf source config cannot be built as {task} ({type(exc).__name__}: {exc})") from None
    model = entry.wrap(hf_model, source)
    if entry.text:
        if source.get("tokenizer"):
            model.tokenizer = _tokenizer_from_files(source["tokenizer"])
        elif source.get("tokenizer_dir") and Path(source["tokenizer_dir"]).is_dir():
            model.tokenizer = _load_tokenizer(transformers, source["tokenizer_dir"],
                                              f"hf source tokenizer_dir {source['tokenizer_dir']}")
    return model


def _image_record(path: Path) -> dict[str, Any] | None:
    """``image_mean`` / ``image_std`` of a folder's ``preprocessor_config.json`` (None when absent)."""
    p = path / "preprocessor_config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        raise ModelError(f"hf:{path}: preprocessor_config.json is not valid JSON; fix or remove it") from None
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    ok = all(isinstance(v, list) and all(isinstance(e, (int, float)) for e in v) for v in (mean, std))
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]} if ok else None


def load_hf(directory: str, task: str | None = None, pooling: str = "mean") -> nn.Module:
    """A local Hugging Face folder as the slimguard module of its task (see the module docstring).

    Args:
        directory: a folder with ``config.json``, weights (``model.safetensors``) and, for text tasks,
            tokenizer files.
        task: a name of :data:`TASKS`; default from the config's ``architectures``.
        pooling: ``mean`` or ``cls`` for embedding models.

    Raises:
        ModelError: no config, a config naming code, a text task without tokenizer files, weights that
            cannot be read.
    """
    _offline()
    transformers = require("transformers", "nlp")
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"hf:{directory}: no config.json there; point to a local Hugging Face model directory")
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError:
        raise ModelError(f"hf:{directory}: config.json is not valid JSON") from None
    check_hf_config(raw)
    task = task_of(raw, task)
    entry = TASKS.get(task)
    tok_files = read_tokenizer_files(path) if entry.text else {}
    if entry.text and not tok_files:
        raise ModelError(f"hf:{directory}: a {task} model needs its tokenizer, but the folder has none of "
                         f"{', '.join(TOKENIZER_FILES[:6])}; save it there with tokenizer.save_pretrained(DIR)")
    try:
        hf_model = getattr(transformers, entry.auto_class).from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"hf:{directory}: cannot load the model as {task} ({str(exc).splitlines()[0]})") from None
    hf_model.eval()
    image = _image_record(path) if task == "image-classification" else None
    source: dict[str, Any] = {"kind": "hf", "name": path.name, "config": hf_model.config.to_dict(), "task": task,
                              "pooling": pooling}
    if tok_files:
        source["tokenizer"] = tok_files
    if image:
        source["image"] = image
    model = entry.wrap(hf_model, source)
    if entry.text:
        model.tokenizer = _load_tokenizer(transformers, str(path), f"hf:{directory}")
    data: dict[str, Any] = {}
    if task == "image-classification":
        cfg: Any = hf_model.config
        side = int(cfg.image_size)
        data = {"input_shape": [int(cfg.num_channels), side, side], "kind": "image", "low": 0.0, "high": 1.0,
                "num_classes": int(cfg.num_labels)}
    set_info(model, ModelInfo(source=source, task=task, data=data))
    return model.eval()


def hf_module(model: nn.Module) -> nn.Module:
    """transformers' own model inside a slimguard wrapper (``.model``, or ``.encoder`` of an embedder)."""
    inner = getattr(model, "model", None)
    if inner is None:
        inner = getattr(model, "encoder", None)
    if not isinstance(inner, nn.Module) or not hasattr(inner, "save_pretrained"):
        raise ModelError(f"{type(model).__name__} holds no Hugging Face model; export --format hf needs an hf: "
                         "source")
    return inner


# ---- export --format hf ------------------------------------------------------------------------------------
def export_hf(model: nn.Module, out: str | os.PathLike[str]) -> Path:
    """Write a folder that transformers loads with ``from_pretrained`` (config, safetensors weights, tokenizer):
    the model as compressed, when its compression kept transformers' own modules (structured pruning, weight
    sparsity, fine-tuning, distillation). The folder is loaded back and its outputs compared with the model's
    before this returns; ``model`` and its config are left as they were.

    Pruned sizes go into the config where it can describe them; where it cannot (per-layer head counts or
    FFN widths, fewer heads in BERT, RoBERTa, DistilBERT or GPT-2), the folder holds the pruned model
    zero-padded to a shape the config describes, computing the same outputs, and a warning says so (see
    :mod:`slimguard.models.hf_export`; config.json lists the zeros under ``slimguard``).

    Args:
        model: a slimguard wrapper of a Hugging Face model (``hf:`` source, or an artifact of one).
        out: a new or empty folder.

    Raises:
        ModelError: the model holds layers transformers cannot rebuild (slimguard's quantized layers), heads
            its config cannot hold even padded, or the reloaded folder computes something else.

    Example:
        >>> export_hf(sg.load("pruned.slim"), "pruned-hf")   # then AutoModel*.from_pretrained("pruned-hf")
    """
    transformers = require("transformers", "nlp")
    inner = hf_module(model)
    foreign = [(n, type(m).__name__) for n, m in inner.named_modules()
               if not type(m).__module__.startswith(("transformers.", "torch.nn."))]
    if foreign:
        name, cls = foreign[0]
        raise ModelError(f"export --format hf: {name} is a {cls}, which transformers cannot rebuild; export the "
                         "model before quantizing it, or use --format onnx")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelError(f"--out {out}: exists and is not an empty folder; name a new folder")
    from slimguard.models.spec import maybe_info

    mi = maybe_info(model)
    task = mi.task if mi is not None and mi.task in TASKS else str(getattr(model, "task", "embedding"))
    from slimguard.models.hf_export import fit_to_config

    fit = fit_to_config(inner)
    own_config = inner.config
    try:  # save_pretrained writes self.config: the fitted copy, for this call only
        inner.config = fit.config
        save: Any = inner.save_pretrained
        save(str(path), state_dict=fit.state_dict)
    finally:
        inner.config = own_config
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    try:
        reloaded = getattr(transformers, TASKS.get(task).auto_class).from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"export --format hf: transformers cannot load the exported folder "
                         f"({str(exc).splitlines()[0]}); use --format onnx or the .slim artifact") from None
    probe: dict[str, torch.Tensor]
    if task == "image-classification":
        cfg: Any = inner.config
        probe = {"pixel_values": torch.rand(2, cfg.num_channels, cfg.image_size, cfg.image_size,
                                            generator=torch.Generator().manual_seed(0))}
    else:
        tok: Any = getattr(model, "tokenize", None)
        if tok is None:
            raise ModelError("export --format hf: a text model needs its tokenizer to be checked; load it with hf:")
        probe = tok(["slimguard checks the exported folder.", "a second sentence"])
    with torch.no_grad(), eval_mode(inner):
        a, b = inner(**probe), reloaded(**probe)
    ta = a.logits if hasattr(a, "logits") else a[0]
    tb = b.logits if hasattr(b, "logits") else b[0]
    if ta.shape != tb.shape or not torch.allclose(ta, tb, atol=1e-4, rtol=1e-4):
        raise ModelError("export --format hf: the exported folder does not compute what the model does "
                         "(a change its config cannot describe); use --format onnx or the .slim artifact")
    if fit.padded:
        zeros = [f"{z} of {t} {what}" for z, t, what in ((fit.zero_heads, fit.total_heads, "heads"),
                                                         (fit.zero_neurons, fit.total_neurons, "FFN neurons")) if z]
        warnings.warn(f"export --format hf: a {getattr(own_config, 'model_type', 'transformers')} config cannot "
                      f"describe {' or '.join(fit.reasons)}, so the exported folder holds the pruned model "
                      f"zero-padded to {' and '.join(fit.shapes)} per layer ({' and '.join(zeros)} are zeros, "
                      "listed under 'slimguard' in config.json; outputs unchanged): no size saving in this format "
                      "for those layers; --format onnx keeps the smaller shape", stacklevel=2)
    return path
