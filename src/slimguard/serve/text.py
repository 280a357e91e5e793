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

The micro-batcher joins the token lists of several requests; they are sorted by length and padded in
chunks of at most :data:`PAD_BUDGET` padded tokens into packed ``(N, 2, L)`` tensors (token ids and
attention mask), which :class:`PackedText` hands to the model. So a classifier runs behind the ordinary
:class:`~slimguard.guard.Guard` (OOD score from its logits: ``msp``, ``max-logit`` or ``energy``, calibrated
on the data set's validation texts; the monitor's reference from the same texts). An embedder has no
classes: its OOD score is the cosine distance to the nearest of up to :data:`REFERENCE_TEXTS` training
texts' embeddings, with the threshold accepting ``tpr`` of the validation texts (``--detector none`` turns
it off), and its monitor is an :class:`~slimguard.guard.monitor.EmbeddingMonitor` whose reference is the
validation texts' embeddings (drift of their principal-axis projections, PSI) and OOD scores (KS), shown
by ``/v1/status`` and the drift gauges as a classifier's are.

Example:
    >>> serving = load_text(small, bundle, config)          # inside load_served
    >>> batch = serving.encode(["a fine film"])             # TextBatch, limits checked (Problem on failure)
    >>> items = serving.answer(guard, batch, ids=["r-0"])   # on the batcher's thread
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import eval_mode
from slimguard.guard.guard import Guard
from slimguard.guard.monitor import EmbeddingMonitor, Monitor, MonitorConfig
from slimguard.guard.ood import make_detector, threshold_at_tpr
from slimguard.serve.answers import items_of
from slimguard.serve.limits import Problem, check_items, schema_problem

TEXT_DETECTORS = ("msp", "max-logit", "energy")
"""OOD detectors a text classifier can use (they read the logits; feature detectors need tensor inputs)."""
REFERENCE_TEXTS = 1024
"""Most training texts an embedder's OOD reference holds."""
FIT_BATCH = 64
PAD_BUDGET = 384
"""Most padded tokens (rows x longest row) in one forward pass of a text model. A micro-batch is sorted by
length and cut into chunks under this budget, so a short text is not padded to the longest one of its batch
and attention stays small: MiniLM on docs-text, 32 texts of ~22 tokens on one core, took ~50 ms per text as
one padded batch, ~40 ms each alone, and ~17-23 ms in chunks of 256 to 512 padded tokens (384 the best)."""
EMBEDDING_MONITOR = MonitorConfig(window=1000, min_samples=200)
"""An embedder's monitor: its histograms of projections need more texts than a classifier's class counts
before their PSI is steady (MiniLM on docs-text, in distribution: 95th percentile 0.13 at 100 texts, 0.07 at
300, against a warning at 0.10; see :class:`~slimguard.guard.monitor.EmbeddingMonitor`)."""


def length_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices sorted by length and cut into chunks of at most ``budget`` padded tokens (a row longer
    than the budget makes a chunk of its own).

    Example:
        >>> length_chunks([30, 5, 6, 29], budget=64)
        [[1, 2], [3, 0]]
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > budget:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


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
        self.monitor: EmbeddingMonitor | None = None  # embedder: its drift monitor (also the guard's)

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
        return self.pack(self._fit_tokens(texts))

    def _fit_tokens(self, texts: list[str]) -> TextBatch:
        with self._lock:
            ids = self.tokenizer(texts, add_special_tokens=True, padding=False, truncation=True,
                                 max_length=self.max_tokens, verbose=False)["input_ids"]
        return TextBatch([list(r) or [self.pad_id] for r in ids])

    def forward(self, model: nn.Module, batch: TextBatch) -> torch.Tensor:
        """``model`` (a :class:`PackedText`) on every row of ``batch``, run in length-sorted chunks of at
        most :data:`PAD_BUDGET` padded tokens; the outputs in the batch's order."""
        chunks = length_chunks([len(r) for r in batch.ids], PAD_BUDGET)
        if len(chunks) == 1:
            out: torch.Tensor = model(self.pack(TextBatch([batch.ids[i] for i in chunks[0]])))
            return out[torch.tensor(chunks[0]).argsort()]
        parts = [model(self.pack(TextBatch([batch.ids[i] for i in c]))) for c in chunks]
        joined = torch.cat(parts)
        result = torch.empty_like(joined)
        result[torch.tensor([i for c in chunks for i in c])] = joined
        return result

    # ---- answers (the batcher's thread) ------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, guard: Guard, batch: TextBatch, ids: list[str], class_names: list[str]) -> list[dict[str, Any]]:
        """One JSON-able answer per text: a classifier's class and scores, or an embedder's embedding; each
        with its guard verdict. The monitor records the batch."""
        t0 = time.perf_counter()
        with eval_mode(guard.model):
            out = self.forward(guard.model, batch)
        if not self.embedder:  # the text detectors read logits; the packed input only for one that reads inputs
            det = guard.detector
            x = self.pack(batch) if det is not None and not hasattr(det, "score_logits") else None
            return items_of(guard.decide(x, out, t0, ids), None, class_names, ids)
        emb, score, flags = self.guard_embeddings(out, t0)
        scores = score.tolist() if score is not None else [None] * len(emb)
        ood = flags.tolist() if flags is not None else [False] * len(emb)
        return [{"id": ids[i], "prediction": row,
                 "guard": {"contract_ok": True, "ood": bool(ood[i]),
                           "ood_score": s if s is None or math.isfinite(s) else None, "fallback": False}}
                for i, (row, s) in enumerate(zip(emb.tolist(), scores, strict=True))]

    def guard_embeddings(self, out: torch.Tensor, t0: float) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor | None]:
        """An embedder's guard, once the model gave ``out`` ``(N, D)`` for a batch that started at ``t0``
        (``time.perf_counter()``): OOD scores and flags, recorded by the monitor with the call's latency.
        Returns ``(embeddings, scores or None, flags or None)``."""
        emb = out.float()
        score = self.ood_scores(emb)
        flags = score > self.threshold if score is not None and self.threshold is not None else None
        if self.monitor is not None:
            self.monitor.observe(emb, flags, (time.perf_counter() - t0) * 1e3, scores=score)
        return emb, score, flags

    def ood_scores(self, emb: torch.Tensor) -> torch.Tensor | None:
        """Cosine distance of each embedding to its nearest reference embedding (None without a reference)."""
        if self.reference is None:
            return None
        return 1 - (F.normalize(emb.float(), dim=-1) @ self.reference.T).amax(-1)

    def embed(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Embeddings of a data set's texts (longer ones cut at ``max_tokens``), in length-sorted chunks."""
        with eval_mode(model), torch.no_grad():
            return self.forward(model, self._fit_tokens(texts)).float()

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
        monitor = EmbeddingMonitor(EMBEDDING_MONITOR)
        if len(bundle.val.x) < 2 * monitor.bins:
            raise DataError(f"data set {bundle.meta.name!r} has {len(bundle.val.x)} validation texts; the "
                            f"embedder's drift monitor needs at least {2 * monitor.bins} (give more texts)")
        val = serving.embed(packed_model, list(bundle.val.x))
        scores = None
        if config.detector != "none":
            rng = torch.Generator().manual_seed(0)
            train = list(bundle.train.x)
            pick = torch.randperm(len(train), generator=rng)[:REFERENCE_TEXTS].tolist()
            serving.reference = F.normalize(serving.embed(packed_model, [train[i] for i in pick]), dim=-1)
            scores = serving.ood_scores(val)
            assert scores is not None
            serving.threshold = threshold_at_tpr(scores, config.tpr)
        monitor.set_embedding_reference(val, scores)
        serving.monitor = monitor
        return Guard(packed_model, monitor=monitor), serving
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
    classes = Monitor(MonitorConfig(window=1000, min_samples=50), torch.softmax(logits.float(), -1), bundle.val.y)
    return Guard(packed_model, None, detector, classes), serving
