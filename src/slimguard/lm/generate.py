"""Greedy generation with a KV cache, and its throughput: prefill and decode tokens/s, peak memory.

Generation has two phases with different costs. *Prefill* runs the whole prompt through the model at once
(matrix-matrix products; compute bound) and fills the key/value cache. *Decode* then produces one token per
step, each step reading every weight once for a single row per sequence (matrix-vector products; memory
bound), which is where weight-only quantization pays. :func:`throughput` times the two separately.

The model is a causal LM wrapper holding a transformers model as ``.model`` (``zoo:docs-lm``,
``hf:DIR`` causal LMs) or a transformers ``...ForCausalLM`` itself. The cache is transformers'
``DynamicCache``, or another kind registered in :data:`KV_CACHES` (``kv_cache="int8"``:
:func:`slimguard.quantize.kvcache.int8_kv_cache`).

Peak memory is the process's peak resident set (Linux ``VmHWM``), reset before each measurement through
``/proc/self/clear_refs``; it includes the weights and everything else the process holds, so compare
models within one process and configuration. Where the system offers no reset it is reported as None.

Example:
    >>> out = throughput(lm, prompt_ids[None, :128], new_tokens=32)
    >>> out["prefill_tokens_per_s"], out["decode_tokens_per_s"], out["peak_rss_bytes"]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import device_of, eval_mode
from slimguard.lm.metrics import logits_of

KV_CACHES: Registry[Callable[[nn.Module], Any]] = Registry("kv cache", error=ConfigError)
"""Cache kind -> ``fn(model)`` returning an empty transformers cache (``int8`` registers from
:mod:`slimguard.quantize.kvcache`)."""


def causal_core(model: nn.Module) -> nn.Module:
    """The transformers model that takes ``past_key_values``: ``model.model`` of a wrapper, or ``model``."""
    for cand in (model, getattr(model, "model", None)):
        if isinstance(cand, nn.Module) and hasattr(cand, "config") and hasattr(cand, "prepare_inputs_for_generation"):
            return cand
    raise ModelError(f"{type(model).__name__} is not a transformers causal LM (nor wraps one as .model); "
                     "generation needs one")


@KV_CACHES.register("float")
def _float_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    config: Any = causal_core(model).config
    return DynamicCache(config=config)


def make_cache(model: nn.Module, kind: str = "float") -> Any:
    """An empty KV cache for ``model`` of a registered kind: ``"float"`` (transformers' DynamicCache) or
    ``"int8"`` (:mod:`slimguard.quantize.kvcache`)."""
    return KV_CACHES.get(kind)(model)


def _check_prompt(prompt: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(prompt) or prompt.is_floating_point() or prompt.ndim not in (1, 2) or prompt.numel() == 0:
        raise DataError("prompt: give token ids as a non-empty (L,) or (N, L) integer tensor")
    return (prompt[None] if prompt.ndim == 1 else prompt).long()


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, *, kv_cache: str = "float",
             cache: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Greedy continuation of ``prompt`` by ``new_tokens`` tokens, one cached step per token.

    Args:
        model: a causal LM (see the module docstring); eval mode, modes restored after.
        prompt: token ids ``(L,)`` or ``(N, L)``.
        new_tokens: tokens to generate (default 32; at least 1).
        kv_cache: ``"float"`` (default) or ``"int8"``; ignored when ``cache`` is given.
        cache: a prepared transformers cache to fill (default: a new one of ``kv_cache``).

    Returns:
        ``(ids (N, new_tokens), {"prefill_s", "decode_s"})``: the generated ids and the seconds of the
        prompt pass and of the remaining ``new_tokens - 1`` steps.
    """
    if new_tokens < 1:
        raise ConfigError(f"new_tokens: {new_tokens} must be at least 1")
    ids = _check_prompt(prompt).to(device_of(model))
    core = causal_core(model)
    limit = getattr(core.config, "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] + new_tokens > limit:
        raise ConfigError(f"prompt ({ids.shape[1]}) + new_tokens ({new_tokens}) exceed the model's {limit} "
                          "positions; shorten one")
    cache = make_cache(model, kv_cache) if cache is None else cache
    out_ids = []
    with eval_mode(model):
        t0 = time.perf_counter()
        out = core(input_ids=ids, cache=cache, use_cache=True)
        nxt = logits_of(out)[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        out_ids.append(nxt)
        for _ in range(new_tokens - 1):
            out = core(input_ids=nxt, cache=cache, use_cache=True)
            nxt = logits_of(out)[:, -1].argmax(-1, keepdim=True)
            out_ids.append(nxt)
        t2 = time.perf_counter()
    return torch.cat(out_ids, dim=1), {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def throughput(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = 32, kv_cache: str = "float",
               repeats: int = 3) -> dict[str, Any]:
    """Prefill and decode speed of greedy generation with a KV cache (median of ``repeats`` runs after one
    warm-up run), and the peak resident memory of the runs.

    Args:
        model: a causal LM (see the module docstring).
        prompt: ``(L,)`` or ``(N, L)`` token ids; prefill tokens/s counts ``N * L`` tokens.
        new_tokens: tokens generated per run (default 32; decode tokens/s counts ``N * (new_tokens - 1)``).
        kv_cache: ``"float"`` or ``"int8"``.
        repeats: timed runs (default 3).

    Returns:
        ``{"prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "kv_cache_bytes", "prompt_tokens",
        "new_tokens", "batch", "kv_cache"}``; ``peak_rss_bytes`` is None where it cannot be measured.
    """
    if repeats < 1:
        raise ConfigError(f"repeats: {repeats} must be at least 1")
    ids = _check_prompt(prompt)
    generate(model, ids, min(new_tokens, 2), kv_cache=kv_cache)  # warm-up: kernels, packed weights, allocator
    resettable = _reset_peak()
    prefill, decode = [], []
    cache_bytes = 0
    for _ in range(repeats):
        cache = make_cache(model, kv_cache)
        _, t = generate(model, ids, new_tokens, cache=cache)
        prefill.append(t["prefill_s"])
        decode.append(t["decode_s"])
        cache_bytes = kv_cache_bytes(cache)
    n, length = ids.shape
    decode_s = statistics.median(decode)
    return {
        "prefill_tokens_per_s": n * length / max(statistics.median(prefill), 1e-9),
        "decode_tokens_per_s": n * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "peak_rss_bytes": _peak_rss() if resettable else None,
        "kv_cache_bytes": cache_bytes,
        "prompt_tokens": length, "new_tokens": new_tokens, "batch": n, "kv_cache": kv_cache,
    }


def kv_cache_bytes(cache: Any) -> int:
    """Bytes the cache's tensors hold (float caches: keys and values; int8 caches: codes and scales)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        nbytes = getattr(layer, "nbytes", None)
        if callable(nbytes):
            total += int(nbytes())
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total
