"""Text models behind the service: ``{"texts": [...]}`` requests, tokenized under limits, and their guard.

A text artifact (a Hugging Face sequence classifier or embedder, or the MiniLM embedder) is served from
``{"texts": ["...", ...]}`` bodies. Each request is tokenized in the request path with the tokenizer the
artifact embeds, so every limit is refused before anything is queued:

| limit                                   | status | field      | rule             |
|-----------------------------------------|--------|------------|------------------|
| more than ``max_items`` texts           | 413    | ``texts``    | ``max_items``      |
| a text over ``max_text_chars`` characters | 413  | ``texts[i]`` | ``max_text_chars`` |
| a text over ``max_tokens`` tokens       | 422    | ``texts[i]`` | ``max_tokens``     |
| not a list of strings / an empty text   | 422    | ``texts[i]`` | ``type`` / ``empty`` |

Texts are never truncated: a prediction is always about the whole text. ``max_tokens`` is also capped at
the model's own position limit (``max_position_embeddings``).

The micro-batcher joins the token lists of several requests and pads them once into a packed ``(N, 2, L)``
tensor (token ids and attention mask), which :class:`PackedText` hands to the model. So a classifier runs
behind the ordinary :class:`~slimguard.guard.Guard` (OOD score from its logits: ``msp``, ``max-logit`` or
``energy``, calibrated on the data set's validation texts; the monitor's reference from the same texts).
An embedder has no classes: its OOD score is the cosine distance to the nearest of up to
:data:`REFERENCE_TEXTS` training texts' embeddings, with the threshold accepting ``tpr`` of the validation
texts (``--detector none`` turns it off); it has no monitor.

Example:
    >>> serving = load_text(small, bundle, config)          # inside load_served
    >>> batch = serving.encode(["a fine film"])             # TextBatch, limits checked (Problem on failure)
    >>> items = serving.answer(guard, batch, ids=["r-0"])   # on the batcher's thread
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import eval_mode
from slimguard.guard.guard import Guard
from slimguard.guard.monitor import Monitor, MonitorConfig
from slimguard.guard.ood import make_detector, threshold_at_tpr
from slimguard.serve.answers import items_of
from slimguard.serve.limits import Problem, check_items, schema_problem

TEXT_DETECTORS = ("msp", "max-logit", "energy")
"""OOD detectors a text classifier can use (they read the logits; feature detectors need tensor inputs)."""
REFERENCE_TEXTS = 1024
"""Most training texts an embedder's OOD reference holds."""
FIT_BATCH = 64


@dataclasses.dataclass
class TextBatch:
    """Token id lists of one request (or of a micro-batch of them), not padded yet."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concat(parts: list[TextBatch]) -> TextBatch:
        return TextBatch([row for p in parts for row in p.ids])


class PackedText(nn.Module):
    """A text model that takes one packed tensor ``(N, 2, L)``: token ids in ``[:, 0]``, attention mask in
    ``[:, 1]`` (what the Guard and its detector call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=packed[:, 0], attention_mask=packed[:, 1])
        return out


def is_text_model(model: nn.Module) -> bool:
    """True for the text models the service can serve (sequence classifiers and embedders)."""
    from slimguard.models.hf import HfTextClassifier, SentenceEmbedder

    return isinstance(model, (HfTextClassifier, SentenceEmbedder))


class TextServing:
    """The tokenizer, limits and (for embedders) OOD reference of a served text model.

    Args:
        model: an :class:`~slimguard.models.hf.HfTextClassifier` or
            :class:`~slimguard.models.hf.SentenceEmbedder` with its tokenizer.
        max_items / max_chars / max_tokens: the request limits (``max_tokens`` capped at the model's
            position limit).
    """

    def __init__(self, model: nn.Module, max_items: int, max_chars: int, max_tokens: int) -> None:
        from slimguard.models.hf import SentenceEmbedder

        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ModelError("this text model has no tokenizer; save it from a folder with its tokenizer files")
        self.tokenizer = tok
        self.embedder = isinstance(model, SentenceEmbedder)
        inner = getattr(model, "encoder" if self.embedder else "model", None)
        positions = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
        self.max_tokens = min(max_tokens, int(positions)) if positions else max_tokens
        self.max_items, self.max_chars = max_items, max_chars
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else tok.unk_token_id
        self.pad_id = int(pad or 0)
        self._lock = threading.Lock()  # a fast tokenizer's state is not safe to share across threads
        self.reference: torch.Tensor | None = None  # embedder: normalised reference embeddings (M, D)
        self.threshold: float | None = None

    # ---- requests ---------------------------------------------------------------------------------------
    def from_json(self, obj: Any) -> TextBatch:
        """The texts of a ``{"texts": [...]}`` body, tokenized (Problem naming the field and the rule)."""
        if not isinstance(obj, dict):
            raise schema_problem("body", "type", f"the body must be a JSON object, got {type(obj).__name__}")
        if "inputs" in obj:
            raise schema_problem("inputs", "unsupported", "this model takes texts, not tensors; send "
                                 "{\"texts\": [\"...\"]}")
        extra = sorted(set(obj) - {"texts"})
        if extra:
            raise schema_problem(extra[0], "unknown_key", f"unknown key {extra[0]!r}; allowed: texts")
        if "texts" not in obj:
            raise schema_problem("texts", "required", "the body needs a \"texts\" list of strings")
        return self.encode(obj["texts"])

    def encode(self, texts: Any) -> TextBatch:
        """Check ``texts`` against every limit and tokenize them (Problem naming the field and the rule)."""
        if not isinstance(texts, list):
            raise schema_problem("texts", "type", f"texts must be a list of strings, got {type(texts).__name__}")
        check_items(len(texts), self.max_items, field="texts")
        if not texts:
            raise schema_problem("texts", "empty", "texts is empty; send at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise schema_problem(f"texts[{i}]", "type", f"texts must hold strings; texts[{i}] is a "
                                     f"{type(t).__name__}")
            if len(t) > self.max_chars:
                raise Problem(413, "Text too long", f"texts[{i}] has {len(t)} characters; at most {self.max_chars}",
                              "text_size", [{"field": f"texts[{i}]", "rule": "max_text_chars",
                                             "detail": f"at most {self.max_chars} characters"}])
            if not t.strip():
                raise schema_problem(f"texts[{i}]", "empty", f"texts[{i}] is empty; send some text")
        with self._lock:
            ids = self.tokenizer(texts, add_special_tokens=True, padding=False, truncation=False,
                                 verbose=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise schema_problem(f"texts[{i}]", "max_tokens", f"texts[{i}] has {len(row)} tokens; at most "
                                     f"{self.max_tokens} (texts are never truncated; split it)")
            if not row:
                raise schema_problem(f"texts[{i}]", "no_tokens", f"texts[{i}] gives no tokens; send words")
        return TextBatch([list(r) for r in ids])

    def pack(self, batch: TextBatch) -> torch.Tensor:
        """Pad token lists into one ``(N, 2, L)`` int64 tensor (ids, attention mask)."""
        width = max(len(r) for r in batch.ids)
        packed = torch.zeros((len(batch), 2, width), dtype=torch.int64)
        packed[:, 0] = self.pad_id
        for i, row in enumerate(batch.ids):
            packed[i, 0, : len(row)] = torch.tensor(row, dtype=torch.int64)
            packed[i, 1, : len(row)] = 1
        return packed

    def pack_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts of a data set, packed (longer ones cut at ``max_tokens``: only for fitting the guard)."""
        with self._lock:
            ids = self.tokenizer(texts, add_special_tokens=True, padding=False, truncation=True,
                                 max_length=self.max_tokens, verbose=False)["input_ids"]
        return self.pack(TextBatch([list(r) or [self.pad_id] for r in ids]))

    # ---- answers (the batcher's thread) ------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, guard: Guard, batch: TextBatch, ids: list[str], class_names: list[str]) -> list[dict[str, Any]]:
        """One JSON-able answer per text: a classifier's class and scores, or an embedder's embedding; each
        with its guard verdict."""
        packed = self.pack(batch)
        if not self.embedder:
            return items_of(guard(packed, ids=ids), None, class_names, ids)
        with eval_mode(guard.model):
            emb = guard.model(packed).float()
        score = self.ood_scores(emb)
        out = []
        for i, row in enumerate(emb.tolist()):
            s = None if score is None else float(score[i])
            out.append({"id": ids[i], "prediction": row,
                        "guard": {"contract_ok": True, "ood": bool(s is not None and self.threshold is not None
                                                                    and s > self.threshold),
                                  "ood_score": s if s is None or math.isfinite(s) else None, "fallback": False}})
        return out

    def ood_scores(self, emb: torch.Tensor) -> torch.Tensor | None:
        """Cosine distance of each embedding to its nearest reference embedding (None without a reference)."""
        if self.reference is None:
            return None
        return 1 - (F.normalize(emb.float(), dim=-1) @ self.reference.T).amax(-1)

    def embed(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        with eval_mode(model), torch.no_grad():
            return torch.cat([model(self.pack_texts(texts[i : i + FIT_BATCH])).float()
                              for i in range(0, len(texts), FIT_BATCH)])

    def summary(self) -> dict[str, Any]:
        return {"kind": "texts", "task": "embedding" if self.embedder else "classification",
                "max_texts": self.max_items, "max_text_chars": self.max_chars, "max_tokens": self.max_tokens}


def load_text(model: nn.Module, bundle: Any, config: Any) -> tuple[Guard, TextServing]:
    """The guard and the request front end of a text model, fitted on ``bundle`` (a text data set).

    Raises:
        DataError: the data set holds no texts, or too few to fit on.
        ConfigError: a cascade or a detector that text models cannot use.
    """
    if not isinstance(bundle.train.x, list) or not isinstance(bundle.val.x, list):
        raise DataError(f"data set {bundle.meta.name!r} holds tensors; a text model needs texts (pass --data, "
                        "e.g. jsonl:FILE or text:FILE)")
    if not bundle.train.x or not bundle.val.x:
        raise DataError(f"data set {bundle.meta.name!r} has an empty train or val split; give more texts")
    if config.reference is not None:
        raise ConfigError("--reference: the cascade serves tensor classifiers; drop --reference for a text model")
    serving = TextServing(model, config.max_items, config.max_text_chars, config.max_tokens)
    packed_model = PackedText(model).eval()
    if serving.embedder:
        if config.detector != "none":
            rng = torch.Generator().manual_seed(0)
            train = list(bundle.train.x)
            pick = torch.randperm(len(train), generator=rng)[:REFERENCE_TEXTS].tolist()
            serving.reference = F.normalize(serving.embed(packed_model, [train[i] for i in pick]), dim=-1)
            scores = serving.ood_scores(serving.embed(packed_model, list(bundle.val.x)))
            assert scores is not None
            serving.threshold = threshold_at_tpr(scores, config.tpr)
        return Guard(packed_model), serving
    if config.detector not in (*TEXT_DETECTORS, "none"):
        raise ConfigError(f"--detector {config.detector}: a text classifier takes one of "
                          f"{', '.join(TEXT_DETECTORS)} or none (they read its logits)")
    val = serving.pack_texts(list(bundle.val.x))
    detector = None
    if config.detector != "none":
        detector = make_detector(config.detector, packed_model, batch_size=FIT_BATCH).fit(val)
        detector.calibrate(val, config.tpr)
    with eval_mode(packed_model), torch.no_grad():
        logits = torch.cat([packed_model(val[i : i + FIT_BATCH]) for i in range(0, len(val), FIT_BATCH)])
    monitor = Monitor(MonitorConfig(window=1000, min_samples=50), torch.softmax(logits.float(), -1), bundle.val.y)
    return Guard(packed_model, None, detector, monitor), serving
