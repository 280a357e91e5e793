"""Perplexity of a causal language model on a token stream, with a sliding window.

A stream longer than the model's context is cut into windows of ``window`` tokens whose starts are
``stride`` apart. Every window sees up to ``window - 1`` tokens of context, but only the tokens no earlier
window has scored count: the first window scores all its tokens after the first, each later window only
its last ``stride`` (fewer at the end). So every token after the first is scored exactly once, with at least
``window - stride`` tokens of context once the stream allows; ``stride == window`` gives windows that
overlap by the one token of context their first prediction needs (fastest, least context); a smaller stride
is slower and closer to the model's full-context perplexity. This
is the evaluation of Hugging Face's "Perplexity of fixed-length models" guide.

``perplexity = exp(nll)``, where ``nll`` is the mean negative log-likelihood (natural log) per scored token.

Example:
    >>> ids = lm.encode_texts(load_corpus("test"))
    >>> perplexity(lm, ids[:4096], window=256, stride=128)["perplexity"]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, DataError
from slimguard.core.torch_utils import device_of, eval_mode


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a causal LM's output: a tensor, an object with ``.logits``, or a tuple's first item."""
    if torch.is_tensor(output):
        return output
    got = getattr(output, "logits", None)
    if torch.is_tensor(got):
        return got
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise DataError(f"the model returned {type(output).__name__}, not next-token logits; give a causal LM "
                    "whose forward(input_ids) returns (N, L, vocab) logits")


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` of every window over ``n`` tokens: tokens ``[begin, end)`` go in and the
    predictions of the last ``scored`` of them are counted (together, each token after the first once).

    A window always holds the token before its first scored one, so a start moves on by ``stride`` but
    never past the previous window's last token (``stride == window`` gives windows overlapping by one).
    """
    out: list[tuple[int, int, int]] = []
    prev_end, begin = 1, 0  # token 0 has no prediction
    while prev_end < n:
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        begin = min(begin + stride, end - 1)
    return out


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, *, window: int = 256, stride: int = 128,
               batch_size: int = 8) -> dict[str, float | int]:
    """Sliding-window perplexity of ``model`` on one token stream (see the module docstring).

    Args:
        model: a causal LM: ``model(ids (N, L))`` returns ``(N, L, vocab)`` logits (or an object with
            ``.logits``). Run in eval mode (its modes restored after), on its own device.
        input_ids: the token stream, a 1-D integer tensor of at least 2 tokens.
        window: tokens per window, context included (default 256; at most the model's positions).
        stride: tokens between window starts, ``1 <= stride <= window`` (default 128).
        batch_size: windows per forward pass (default 8).

    Returns:
        ``{"perplexity", "nll", "tokens", "window", "stride"}``: ``tokens`` is how many predictions were
        scored (``len(input_ids) - 1``).

    Raises:
        ConfigError: window, stride or batch size out of range.
        DataError: the stream is not a 1-D integer tensor of 2+ tokens, or holds ids outside the vocabulary.
    """
    if window < 2:
        raise ConfigError(f"window: {window} is too small; give at least 2 tokens")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride: {stride} must be between 1 and window ({window})")
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} must be at least 1")
    limit = getattr(model, "max_positions", None)
    if isinstance(limit, int) and window > limit:
        raise ConfigError(f"window: {window} exceeds the model's {limit} positions; give window <= {limit}")
    if not torch.is_tensor(input_ids) or input_ids.ndim != 1 or input_ids.is_floating_point():
        raise DataError("input_ids: give the token stream as a 1-D integer tensor")
    n = int(input_ids.numel())
    if n < 2:
        raise DataError(f"input_ids: {n} token(s); perplexity needs at least 2")
    if int(input_ids.min()) < 0:
        raise DataError("input_ids: negative token ids; give ids from the model's tokenizer")
    ids = input_ids.long()
    device = device_of(model)
    spans = windows(n, window, stride)
    total, count = 0.0, 0
    with eval_mode(model):
        # windows of one length run together (all but the last few are full length)
        by_len: dict[int, list[tuple[int, int, int]]] = {}
        for span in spans:
            by_len.setdefault(span[1] - span[0], []).append(span)
        for length, group in sorted(by_len.items(), reverse=True):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
                logits = logits_of(model(batch)).float()
                vocab = logits.shape[-1]
                if int(batch.max()) >= vocab:
                    raise DataError(f"input_ids: token id {int(batch.max())} is outside the model's vocabulary "
                                    f"of {vocab}; encode the text with the model's tokenizer")
                for row, (_, _, scored) in enumerate(chunk):
                    pred = logits[row, length - scored - 1 : length - 1]
                    target = batch[row, length - scored :]
                    total += float(F.cross_entropy(pred, target, reduction="sum"))
                    count += scored
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "window": window, "stride": stride}
