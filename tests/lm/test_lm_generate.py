"""Greedy generation with a KV cache (float and int8) and the throughput report."""

from __future__ import annotations

import pytest
import torch

import slimguard.quantize.kvcache  # noqa: F401  (registers the int8 cache)
from slimguard.core.errors import ConfigError, DataError
from slimguard.lm.generate import generate, kv_cache_bytes, make_cache, throughput
from slimguard.quantize.kvcache import dequantize_per_vector, quantize_per_vector


def _greedy_without_cache(model, prompt, n):
    ids = prompt[None].clone()
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.numel():]


def test_cached_generation_equals_recomputing_the_whole_sequence(tiny_lm):
    model, _, test = tiny_lm
    ids, times = generate(model, test[:20], 12)
    assert torch.equal(ids, _greedy_without_cache(model, test[:20], 12))
    assert set(times) == {"prefill_s", "decode_s"}


def test_int8_cache_follows_the_float_cache_in_a_quarter_of_the_memory(tiny_lm):
    model, _, test = tiny_lm
    prompt = torch.stack([test[:40], test[40:80]])
    caches = {k: make_cache(model, k) for k in ("float", "int8")}
    out = {k: generate(model, prompt, 16, cache=c)[0] for k, c in caches.items()}
    assert (out["int8"] == out["float"]).float().mean() >= 0.9  # int8 states: at most rare argmax flips
    head_dim = 64 // 4
    ratio = kv_cache_bytes(caches["int8"]) / kv_cache_bytes(caches["float"])
    assert ratio == pytest.approx((head_dim + 4) / (4 * head_dim), rel=1e-6)


def test_per_vector_int8_error_is_at_most_half_a_step():
    x = torch.randn(2, 3, 5, 16) * torch.logspace(-3, 3, 5)[None, None, :, None]
    codes, scale = quantize_per_vector(x)
    err = (dequantize_per_vector(codes, scale, torch.float32) - x).abs()
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    assert bool((err <= scale / 2 + 1e-6 * x.abs()).all())


def test_throughput_reports_both_phases_and_memory(tiny_lm):
    model, _, test = tiny_lm
    out = throughput(model, test[:32], new_tokens=8, repeats=1)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["prompt_tokens"] == 32 and out["batch"] == 1 and out["kv_cache_bytes"] > 0
    assert out["peak_rss_bytes"] is None or out["peak_rss_bytes"] > 10 << 20


@pytest.mark.parametrize(("prompt", "kwargs", "error"), [
    (torch.rand(5), {}, DataError),
    (torch.zeros(0, dtype=torch.long), {}, DataError),
    (torch.arange(5), {"new_tokens": 0}, ConfigError),
    (torch.arange(5), {"kv_cache": "fp4"}, ConfigError),
    (torch.arange(120), {"new_tokens": 20}, ConfigError),  # beyond the 128 positions
])
def test_bad_generation_arguments_are_user_errors(tiny_lm, prompt, kwargs, error):
    with pytest.raises(error):
        generate(tiny_lm[0], prompt, **kwargs)
