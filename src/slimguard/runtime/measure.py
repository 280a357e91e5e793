"""What a model costs: parameters, nonzeros, MACs (counted from a real forward), and latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.torch_utils import eval_mode, forward


def _weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    for module in model.modules():
        for bname, b in module._buffers.items():
            # quantized weights and coded payloads are integer buffers; counters and statistics are not
            # weights, nor are non-persistent buffers (masks, cluster indices, hash indices: never stored)
            if (b is None or b.is_floating_point() or b.dtype == torch.bool or bname == "num_batches_tracked"
                    or bname in module._non_persistent_buffers_set):
                continue
            yield b


def count_params(model: nn.Module) -> int:
    """Parameters plus integer weight buffers (int8/int4 quantized weights)."""
    return sum(t.numel() for t in _weight_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(t)) for t in _weight_tensors(model))


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``inputs``, counted by PyTorch's FLOP counter at the
    operator level (convolutions, matrix products, attention); ``MACs = FLOPs / 2``."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), FlopCounterMode(display=False) as counter:
        forward(model, inputs)
    return int(counter.get_total_flops() // 2)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block (None leaves it)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_fn(fn: Callable[[], Any], warmup: int = 5, repeats: int = 20) -> list[float]:
    """Wall times in milliseconds of ``repeats`` calls after ``warmup`` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@torch.no_grad()
def latency(model: nn.Module, inputs: Any, *, warmup: int = 5, repeats: int = 30,
            num_threads: int | None = None) -> dict[str, float]:
    """Latency of ``model(inputs)``: p50 / p95 in ms and throughput in examples per second."""
    with eval_mode(model), threads(num_threads):
        times = time_fn(lambda: forward(model, inputs), warmup, repeats)
    batch = _batch_size(inputs)
    p50 = statistics.median(times)
    return {"latency_ms_p50": p50, "latency_ms_p95": percentile(times, 0.95),
            "throughput_per_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"), "batch_size": batch}


def _batch_size(inputs: Any) -> int:
    if torch.is_tensor(inputs):
        return int(inputs.shape[0])
    if isinstance(inputs, dict):
        return _batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)) and inputs:
        return _batch_size(inputs[0])
    return 1
