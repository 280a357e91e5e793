"""Training batches for causal LMs: documents packed into one token stream and cut into windows.

A causal LM learns from every position of a window (position ``t`` predicts token ``t + 1``), so nothing is
padded: documents are joined into one stream, each followed by the end-of-text token, as ``zoo:docs-lm``
was trained, and the stream is cut into consecutive windows of ``length`` tokens.

When only some windows are needed (a run of ``max_steps`` steps), the documents are taken in a seeded
random order and tokenised only as far as those windows need, so a short run over a large corpus does not
tokenise all of it and still sees documents from all over the split.

Example:
    >>> ids = text_windows(lm, load_corpus("train"), 128, max_windows=512)   # (512, 128) LongTensor
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import DataError, ModelError

CHUNK_DOCS = 64
"""Documents tokenised per call of the tokenizer."""
MAX_DOC_TOKENS = 1 << 16
"""Longest document, in tokens, read whole by a ``tokenize``-only model (longer ones are cut)."""


def _encode(model: nn.Module, docs: list[str]) -> torch.Tensor:
    """``docs`` as one stream with the model's tokenizer, each followed by its end-of-text token if it has one."""
    encode_texts = getattr(model, "encode_texts", None)
    if callable(encode_texts):  # docs-lm: joined by <|endoftext|>, as it was trained
        return encode_texts(docs).long()
    tokenize = getattr(model, "tokenize", None)
    if not callable(tokenize):
        raise ModelError(f"{type(model).__name__} has no tokenizer (tokenize or encode_texts); "
                         "load the model with sg.load_model, or give token ids instead of texts")
    batch = tokenize(docs, MAX_DOC_TOKENS)
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    eos = getattr(getattr(model, "tokenizer", None), "eos_token_id", None)
    rows = []
    for i in range(ids.shape[0]):
        row = ids[i] if mask is None else ids[i][mask[i].bool()]
        rows.append(row.long())
        if isinstance(eos, int):
            rows.append(torch.tensor([eos], dtype=torch.long))
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)


def text_windows(model: nn.Module, texts: list[str], length: int, *, max_windows: int = 0,
                 seed: int = 0) -> torch.Tensor:
    """``texts`` packed into one token stream by ``model``'s tokenizer and cut into windows.

    Args:
        model: a causal LM with ``encode_texts`` (docs-lm) or ``tokenize`` (an ``hf:`` causal LM).
        texts: the documents.
        length: tokens per window (at least 2).
        max_windows: at most this many windows; 0 = all the texts hold. With a limit, the documents are
            taken in a seeded random order and tokenised only as far as needed.
        seed: the order of the documents when ``max_windows`` is set.

    Returns:
        ``(N, length)`` LongTensor of consecutive windows (the stream's tail shorter than ``length`` dropped).

    Raises:
        DataError: the texts hold fewer than ``length`` tokens (not one window).
    """
    if length < 2:
        raise DataError(f"window length {length} is too short; give at least 2 tokens")
    order = list(range(len(texts)))
    if max_windows:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    need = max_windows * length if max_windows else None
    parts: list[torch.Tensor] = []
    have = 0
    for i in range(0, len(order), CHUNK_DOCS):
        part = _encode(model, [texts[j] for j in order[i : i + CHUNK_DOCS]])
        parts.append(part)
        have += int(part.numel())
        if need is not None and have >= need:
            break
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return token_windows(stream, length, max_windows=max_windows)


def token_windows(ids: Any, length: int, *, max_windows: int = 0) -> torch.Tensor:
    """Token ids as ``(N, length)`` windows: a 1-D stream is cut into consecutive windows of ``length``; a
    2-D ``(N, L)`` batch is taken as it is (its own windows). ``max_windows`` (0: all) keeps the first ones.

    Raises:
        DataError: not an integer tensor of 1 or 2 dimensions, or a stream shorter than one window.
    """
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.ndim not in (1, 2):
        raise DataError("token data must be a 1-D stream or an (N, L) batch of integer token ids; "
                        f"got {type(ids).__name__}{'' if not torch.is_tensor(ids) else tuple(ids.shape)}")
    if ids.ndim == 1:
        n = int(ids.numel()) // length
        if n == 0:
            raise DataError(f"the text holds {int(ids.numel())} tokens, fewer than one window of {length}; "
                            "give more text or a shorter max_length")
        ids = ids[: n * length].reshape(n, length)
    if ids.shape[1] < 2:
        raise DataError(f"token windows of {ids.shape[1]} token(s) predict nothing; give at least 2 per row")
    if int(ids.min()) < 0:
        raise DataError("token ids must not be negative; encode the text with the model's tokenizer")
    return (ids[:max_windows] if max_windows else ids).long()
