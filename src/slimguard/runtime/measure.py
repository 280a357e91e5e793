"""What a model costs: parameters, nonzeros, MACs (counted from a real forward), and speed.

Counts are exact. Speed is measured one way everywhere (``sg.evaluate``, ``compress``, the report and
``demo``), because a wall-clock time taken once, on a shared machine, moves by more than the effects it is
meant to show (a baseline timed first and alone measured 36.8 ms in one run and 1.48 ms in the next):

* :func:`compare_speed` is the measure for "is B faster than A". All candidates run **in turn within each
  round** (the order rotates every round, from a seeded shuffle) after an interleaved warm-up, with torch's
  thread count **pinned**; each round gives a ratio ``baseline time / candidate time``, so a slow spell of
  the machine slows every candidate of that round alike and cancels out. The result is the **median
  ratio**, its **95% bootstrap interval** (seeded percentile bootstrap of the per-round ratios, 2000
  resamples) and the **spread** (smallest and largest per-round ratio).
* :func:`verdict` turns a ratio and its interval into words: ``"1.80x faster [1.60, 2.00]"``,
  ``"1.40x slower [1.25, 1.54]"``, or ``"no measurable difference"`` when the interval contains 1.
* :func:`latency` is for a single model's absolute numbers (p50 / p95 ms, throughput), with the same
  warm-up and pinned threads. Absolute times say little on a shared machine; quote them with
  :func:`machine` (CPU model, cores, threads, torch version, AVX2 / AVX-512 VNNI).

Example:
    >>> import torch.nn as nn, torch
    >>> big, small = nn.Linear(512, 512), nn.Linear(512, 64)
    >>> cmp = compare_speed({"big": big, "small": small}, torch.randn(64, 512), baseline="big", threads=1)
    >>> cmp.verdict  # doctest: +SKIP
    '5.21x faster [4.87, 5.60]'
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.cpu import cpu_flags
from slimguard.core.errors import ConfigError
from slimguard.core.torch_utils import eval_mode, forward
from slimguard.runtime.stats import BOOTSTRAP_RESAMPLES, bootstrap_ci, percentile


def _weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    for module in model.modules():
        skip = getattr(module, "not_weights", ())  # buffers a module declares are not weights (a serialized graph)
        for bname, b in module._buffers.items():
            # quantized weights and coded payloads are integer buffers; counters and statistics are not
            # weights, nor are non-persistent buffers (masks, cluster indices, hash indices: never stored)
            if (b is None or b.is_floating_point() or b.dtype == torch.bool or bname == "num_batches_tracked"
                    or bname in module._non_persistent_buffers_set or bname in skip):
                continue
            yield b


def _declared(model: nn.Module) -> tuple[int, int]:
    """``(weights, nonzero)`` that modules holding weights outside torch tensors (an ONNX graph) report
    through a ``weight_counts()`` method."""
    counts: list[tuple[int, int]] = []
    for m in model.modules():
        report = getattr(m, "weight_counts", None)
        if callable(report):
            counts.append(report())
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def count_params(model: nn.Module) -> int:
    """Parameters plus integer weight buffers (int8/int4 quantized weights), plus the weights of modules that
    hold them elsewhere (an ONNX graph's initializers)."""
    return sum(t.numel() for t in _weight_tensors(model)) + _declared(model)[0]


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(t)) for t in _weight_tensors(model)) + _declared(model)[1]


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``inputs``, counted by PyTorch's FLOP counter at the
    operator level (convolutions, matrix products, attention); ``MACs = FLOPs / 2``."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), FlopCounterMode(display=False) as counter:
        forward(model, inputs)
    return int(counter.get_total_flops() // 2)


WARMUP = 10
"""Calls of every candidate before anything is timed: first calls pack weights, allocate and fill caches."""

MEASURE_THREADS = 1
"""Torch threads that ``sg.evaluate``, ``compress`` and ``demo`` pin while timing, unless told otherwise.

One thread measures the model rather than the machine's other load: on a shared 2-core machine a second
torch thread waits on a core another job holds, which made the same model take 1.5 ms in one run and 37 ms
in the next. Pass more (or None: torch's current count) to measure a multi-threaded deployment; the count
is recorded beside every number either way."""

MIN_ROUNDS = 5
"""The fewest rounds a time budget may cut :func:`compare_speed` down to."""

"""Resamples of the per-round ratios behind every 95% interval."""


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


_pin = threads  # the context manager, under a name the ``threads=`` arguments below do not hide


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """Collect garbage now, then keep the collector from pausing inside the timed calls."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_fn(fn: Callable[[], Any], warmup: int = WARMUP, repeats: int = 20,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Wall times in milliseconds of ``repeats`` calls after ``warmup`` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    _sync()
    out = []
    with _quiet_gc():
        for _ in range(repeats):
            t0 = clock()
            fn()
            _sync()
            out.append((clock() - t0) * 1e3)
    return out


def verdict(ratio: float, ci95: Sequence[float]) -> str:
    """Words for a speed ratio (``baseline time / candidate time``) and its 95% interval.

    ``"1.80x faster [1.60, 2.00]"`` when the whole interval is above 1, ``"1.40x slower [1.25, 1.54]"``
    (the ratio and interval inverted, so both read as "times slower") when it is below 1, and
    ``"no measurable difference"`` when it contains 1.

    Example:
        >>> verdict(1.8, (1.6, 2.0))
        '1.80x faster [1.60, 2.00]'
        >>> verdict(0.5, (0.4, 0.8))
        '2.00x slower [1.25, 2.50]'
        >>> verdict(1.03, (0.97, 1.1))
        'no measurable difference'
    """
    lo, hi = sorted(float(v) for v in ci95)
    if not all(v > 0 and v != float("inf") for v in (ratio, lo, hi)):  # also false for nan
        return "not measured"
    if lo > 1:
        return f"{ratio:.2f}x faster [{lo:.2f}, {hi:.2f}]"
    if hi < 1:
        return f"{1 / ratio:.2f}x slower [{1 / hi:.2f}, {1 / lo:.2f}]"
    return "no measurable difference"


@dataclass(frozen=True)
class RatioSummary:
    """One candidate against the baseline: ``baseline time / candidate time`` per round (above 1: faster).

    Attributes:
        per_round: the ratio of every round, in round order.
        ratio: their median.
        ci95: the 95% percentile-bootstrap interval of that median (seeded).
        spread: the smallest and largest per-round ratio.
    """

    per_round: tuple[float, ...]
    ratio: float
    ci95: tuple[float, float]
    spread: tuple[float, float]

    @classmethod
    def of(cls, per_round: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> RatioSummary:
        """Summarise per-round ratios: median, seeded bootstrap interval, min and max."""
        values = tuple(float(v) for v in per_round)
        ci = bootstrap_ci(values, resamples=resamples, seed=seed)
        return cls(values, float(statistics.median(values)), ci, (min(values), max(values)))

    @property
    def verdict(self) -> str:
        """:func:`verdict` of this ratio and interval."""
        return verdict(self.ratio, self.ci95)


@dataclass(frozen=True)
class SpeedComparison:
    """What :func:`compare_speed` measured.

    Attributes:
        baseline: the candidate every ratio is relative to.
        ratios: one :class:`RatioSummary` per other candidate.
        median_ms: per candidate (baseline included), the median over rounds of the time of one call, in ms.
        rounds, calls_per_round, warmup: how much was measured (as run, after any time budget).
        threads: torch's intra-op thread count, pinned for the whole measurement.
        batch_size: examples per call (None when the candidates were plain callables and none was given).
        seed: the seed of the candidate order and of the bootstrap.
        machine: :func:`machine` while the threads were pinned.

    With one candidate besides the baseline, ``ratio``, ``ci95``, ``spread`` and ``verdict`` are that
    candidate's; with more, use ``ratios[name]``.
    """

    baseline: str
    ratios: dict[str, RatioSummary]
    median_ms: dict[str, float]
    rounds: int
    calls_per_round: int
    warmup: int
    threads: int
    batch_size: int | None
    seed: int
    machine: dict[str, Any] = field(default_factory=dict)

    def _only(self, candidate: str | None) -> str:
        if candidate is not None:
            if candidate not in self.ratios:
                raise ConfigError(f"no candidate {candidate!r} besides the baseline; measured: {sorted(self.ratios)}")
            return candidate
        if len(self.ratios) != 1:
            raise ConfigError(f"{len(self.ratios)} candidates besides the baseline ({sorted(self.ratios)}); "
                              "name the one you mean")
        return next(iter(self.ratios))

    def summary(self, candidate: str | None = None) -> RatioSummary:
        """The :class:`RatioSummary` of ``candidate`` (default: the only candidate besides the baseline)."""
        return self.ratios[self._only(candidate)]

    @property
    def ratio(self) -> float:
        return self.summary().ratio

    @property
    def ci95(self) -> tuple[float, float]:
        return self.summary().ci95

    @property
    def spread(self) -> tuple[float, float]:
        return self.summary().spread

    @property
    def verdict(self) -> str:
        return self.summary().verdict

    def to_dict(self, candidate: str | None = None) -> dict[str, Any]:
        """JSON-ready record of ``candidate`` against the baseline: ``ratio``, ``ci95`` and ``spread`` (as
        ``[low, high]``), ``verdict``, ``per_round``, ``median_ms`` ({baseline, candidate}: ms per call),
        ``batch_size``, ``threads``, ``rounds``, ``calls_per_round``, ``warmup``, ``seed``, ``machine``."""
        name = self._only(candidate)
        s = self.ratios[name]
        return {"ratio": s.ratio, "ci95": list(s.ci95), "spread": list(s.spread), "verdict": s.verdict,
                "per_round": list(s.per_round),
                "median_ms": {self.baseline: self.median_ms[self.baseline], name: self.median_ms[name]},
                "batch_size": self.batch_size, "threads": self.threads, "rounds": self.rounds,
                "calls_per_round": self.calls_per_round, "warmup": self.warmup, "seed": self.seed,
                "machine": dict(self.machine)}


def _callable(name: str, candidate: nn.Module | Callable[[], Any], inputs: Any) -> Callable[[], Any]:
    if isinstance(candidate, nn.Module):
        if inputs is None:
            raise ConfigError(f"compare_speed: candidate {name!r} is a model; pass the inputs to run it on")
        return lambda: forward(candidate, inputs)
    if not callable(candidate):
        raise ConfigError(f"compare_speed: candidate {name!r} is a {type(candidate).__name__}; "
                          "pass a model or a function of no arguments")
    return candidate


@torch.no_grad()
def compare_speed(
    candidates: Mapping[str, nn.Module | Callable[[], Any]],
    inputs: Any = None,
    *,
    baseline: str,
    rounds: int = 15,
    calls_per_round: int = 20,
    warmup: int = WARMUP,
    threads: int | None = None,
    seed: int = 0,
    budget_s: float | None = None,
    batch_size: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SpeedComparison:
    """How much faster each candidate runs than ``baseline``, from paired, interleaved rounds.

    Every candidate is called ``warmup`` times (interleaved), untimed; then come ``rounds`` timed rounds in
    which each candidate makes ``calls_per_round`` calls in a row. Within a round all run in turn, in an
    order that rotates every round (starting from a seeded shuffle), so each runs first equally often and a
    busy moment of the machine hits all candidates of that round. Torch's thread count is pinned throughout
    and restored after; models run in eval mode (restored) without gradients.

    Args:
        candidates: name -> a model (run on ``inputs``) or a function of no arguments. At least two.
        inputs: what models are called on (a tensor, a tuple of them, or a dict of keyword tensors).
        baseline: the name every ratio is relative to.
        rounds: paired rounds (default 15); each gives one ratio per candidate.
        calls_per_round: calls of each candidate per round (default 20; at most this with ``budget_s``).
        warmup: untimed calls of each candidate first (default :data:`WARMUP`).
        threads: torch intra-op threads to pin (default: the current count, pinned and recorded).
        seed: seeds the candidate order and the bootstrap (default 0).
        budget_s: when set, fewer calls per round so that the timed rounds take about this many seconds,
            estimated from the later warm-up calls; when even one call per round is too many, fewer
            rounds too, down to :data:`MIN_ROUNDS` (so slow models overrun it). The warm-up stops early
            (after one call each) once it has taken half this time.
        batch_size: examples per call, recorded (default: the leading dimension of ``inputs``).
        clock: seconds, monotonic (default :func:`time.perf_counter`; tests pass a fake one).

    Returns:
        A :class:`SpeedComparison`: median ratio, 95% bootstrap interval, spread, per-candidate median ms,
        rounds, calls per round, threads, batch size and :func:`machine`.
    """
    names = list(candidates)
    if baseline not in candidates:
        raise ConfigError(f"compare_speed: baseline {baseline!r} is not a candidate; candidates: {names}")
    if len(names) < 2:
        raise ConfigError(f"compare_speed: {len(names)} candidate; pass the baseline and at least one other")
    for key, value, least in (("rounds", rounds, 2), ("calls_per_round", calls_per_round, 1), ("warmup", warmup, 0),
                              ("threads", threads, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ConfigError(f"compare_speed: {key}={value!r}; use an integer >= {least}")
    if budget_s is not None and not budget_s > 0:
        raise ConfigError(f"compare_speed: budget_s={budget_s!r}; use a positive number of seconds or None")
    fns = {name: _callable(name, c, inputs) for name, c in candidates.items()}
    order = list(names)
    random.Random(seed).shuffle(order)

    def round_order(r: int) -> list[str]:
        k = r % len(order)
        return order[k:] + order[:k]

    pinned = threads if threads is not None else torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_pin(pinned))
        for c in candidates.values():
            if isinstance(c, nn.Module):
                stack.enter_context(eval_mode(c))
        warm_s: dict[str, list[float]] = {name: [] for name in names}
        warmed = 0
        while warmed < max(warmup, 1 if budget_s is not None else 0):
            for name in round_order(warmed):
                t0 = clock()
                fns[name]()
                _sync()
                warm_s[name].append(clock() - t0)
            warmed += 1
            if budget_s is not None and sum(map(sum, warm_s.values())) > budget_s / 2:
                break  # slow models: half the budget spent on warming up is enough
        calls = calls_per_round
        if budget_s is not None:  # the later warm-up calls estimate one call of each candidate
            per_call = sum(statistics.median(t[len(t) // 2:]) for t in warm_s.values())
            if per_call > 0:
                calls = max(1, min(calls_per_round, int(budget_s / (rounds * per_call))))
                if calls == 1:
                    rounds = max(min(rounds, MIN_ROUNDS), min(rounds, int(budget_s / per_call)))
        times: dict[str, list[float]] = {name: [] for name in names}
        with _quiet_gc():
            for r in range(rounds):
                for name in round_order(r):
                    fn = fns[name]
                    _sync()
                    t0 = clock()
                    for _ in range(calls):
                        fn()
                    _sync()
                    times[name].append(clock() - t0)
        info = machine()
    base = times[baseline]
    ratios = {name: RatioSummary.of([b / t if t > 0 else float("inf") for b, t in zip(base, times[name], strict=True)],
                                    seed=seed)
              for name in names if name != baseline}
    if batch_size is None and inputs is not None:
        batch_size = _batch_size(inputs)
    return SpeedComparison(baseline=baseline, ratios=ratios,
                           median_ms={name: statistics.median(t) / calls * 1e3 for name, t in times.items()},
                           rounds=rounds, calls_per_round=calls, warmup=warmed, threads=pinned,
                           batch_size=batch_size, seed=seed, machine=info)


def _cpuinfo() -> dict[str, Any]:
    """CPU model, physical cores and instruction-set flags from ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(4 << 20)  # a few KiB per logical CPU
    except OSError:
        return {}
    model, cores = None, set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = model or fields.get("model name") or fields.get("Model") or fields.get("cpu model")
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
    out: dict[str, Any] = {"cpu": model, "cores": len(cores) or None}
    flags = cpu_flags()
    if flags is not None:
        out["avx2"] = "avx2" in flags
        out["avx512_vnni"] = "avx512_vnni" in flags
    return out


def machine() -> dict[str, Any]:
    """Where a number was measured, to quote beside it.

    Returns:
        ``cpu`` (model name), ``cores`` (physical; None when not readable), ``logical_cpus``, ``usable_cpus``
        (those this process may run on), ``threads`` (torch's intra-op threads now), ``torch`` (version),
        ``cpu_capability`` (the vector ISA torch dispatches to, e.g. ``AVX2``, ``AVX512``), ``avx2`` and
        ``avx512_vnni`` (bool; None when the flags are not readable), ``gpu`` (name, or None).
    """
    info = _cpuinfo()
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        capability: str | None = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"cpu": info.get("cpu") or platform.processor() or platform.machine() or None,
            "cores": info.get("cores"), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_capability": capability,
            "avx2": info.get("avx2"), "avx512_vnni": info.get("avx512_vnni"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machine_line(info: Mapping[str, Any]) -> str:
    """One line for a :func:`machine` record, to print beside a number.

    Example:
        >>> machine_line({"cpu": "AMD EPYC", "cores": 2, "threads": 2, "torch": "2.13.0", "avx2": True,
        ...               "avx512_vnni": False, "cpu_capability": "AVX2"})
        'AMD EPYC, 2 cores, 2 threads, torch 2.13.0, AVX2'
    """
    parts = [str(info.get("cpu") or "unknown CPU")]
    for key, unit in (("cores", "core"), ("threads", "thread")):
        if info.get(key):
            parts.append(f"{info[key]} {unit}" + ("s" if info[key] != 1 else ""))
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    isa = info.get("cpu_capability") or ("AVX2" if info.get("avx2") else None)
    if isa:
        parts.append(f"{isa}" + (" + VNNI" if info.get("avx512_vnni") else ""))
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    return ", ".join(parts)


@torch.no_grad()
def latency(model: nn.Module, inputs: Any, *, warmup: int = WARMUP, repeats: int = 30,
            num_threads: int | None = None) -> dict[str, Any]:
    """One model's latency on ``inputs``: p50 / p95 in ms and throughput in examples per second.

    The same warm-up (:data:`WARMUP` calls) and pinned threads as :func:`compare_speed`; ``num_threads``
    defaults to the current count, which is pinned and returned as ``threads``, with :func:`machine` as
    ``machine``. Absolute times on a shared
    machine move from run to run: to say whether one model is faster than another, use
    :func:`compare_speed`.
    """
    pinned = num_threads if num_threads is not None else torch.get_num_threads()
    with eval_mode(model), _pin(pinned):
        times = time_fn(lambda: forward(model, inputs), warmup, repeats)
        info = machine()
    batch = _batch_size(inputs)
    p50 = statistics.median(times)
    return {"latency_ms_p50": p50, "latency_ms_p95": percentile(times, 0.95),
            "throughput_per_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"), "batch_size": batch,
            "threads": pinned, "machine": info}


def _batch_size(inputs: Any) -> int:
    if torch.is_tensor(inputs):
        return int(inputs.shape[0]) if inputs.ndim else 1
    if isinstance(inputs, dict):
        return _batch_size(next(iter(inputs.values()))) if inputs else 1
    if isinstance(inputs, (tuple, list)) and inputs:
        return _batch_size(inputs[0])
    return 1
