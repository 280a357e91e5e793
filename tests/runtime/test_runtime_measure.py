"""Measurement helpers: parameter, nonzero and MAC counts are exact; threads and modes are restored; speed is
compared in paired, interleaved rounds and summarised by a seeded bootstrap interval and a verdict."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.runtime.measure import (
    MIN_ROUNDS,
    RatioSummary,
    bootstrap_ci,
    compare_speed,
    count_macs,
    count_nonzero,
    count_params,
    latency,
    machine,
    machine_line,
    percentile,
    threads,
    verdict,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_counts_are_exact() -> None:
    m = _mlp()
    assert count_params(m) == 8 * 16 + 16 + 16 * 4 + 4
    with torch.no_grad():
        m[0].weight[:, :4] = 0
    assert count_nonzero(m) == count_params(m) - 16 * 4
    assert count_macs(m, torch.randn(3, 8)) == 3 * (8 * 16 + 16 * 4)


def test_count_macs_restores_training_mode() -> None:
    m = _mlp().train()
    count_macs(m, torch.randn(2, 8))
    assert m.training


def test_threads_are_restored_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("values", "q", "want"), [([1, 2, 3, 4, 5], 0.5, 3.0), ([10, 20], 0.95, 19.5),
                                                   ([7.0], 0.95, 7.0)])
def test_percentile_interpolates(values: list[float], q: float, want: float) -> None:
    assert percentile(values, q) == pytest.approx(want)


# ---- speed: bootstrap interval, verdict, paired rounds ----------------------------------------------------------
# No test here times anything: compare_speed takes a fake clock that each candidate advances by a fixed cost,
# so every ratio, interval and per-call time below is exact.
SPEED_KEYS = {"ratio", "ci95", "spread", "verdict", "per_round", "median_ms", "batch_size", "threads", "rounds",
              "calls_per_round", "warmup", "seed", "machine"}


def test_bootstrap_interval_hand_checked_cases() -> None:
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)  # no variation, no width
    # two values: resampled medians are 1, 2 or 3 with chances 1/4, 1/2, 1/4, so the 2.5% and 97.5% points are
    # the extremes
    assert bootstrap_ci([1.0, 3.0]) == (1.0, 3.0)
    # with the same seed the resamples are the same, so scaling the values scales the interval exactly
    values = [0.9, 1.4, 1.1, 1.7, 1.2, 1.3, 0.8, 1.5]
    lo, hi = bootstrap_ci(values, seed=3)
    assert bootstrap_ci([v * 4 for v in values], seed=3) == pytest.approx((lo * 4, hi * 4), rel=1e-12)
    assert min(values) <= lo <= 1.25 <= hi <= max(values)  # 1.25: the sample median
    narrow = bootstrap_ci(values, seed=3, level=0.5)
    assert lo <= narrow[0] <= narrow[1] <= hi
    # 21 evenly spread values: the median's interval covers the middle ranks, not the extremes (a resample's
    # median is below the 5th value or above the 17th with a chance well under 2.5% each)
    lo, hi = bootstrap_ci([float(v) for v in range(1, 22)])
    assert 5 <= lo < 11 < hi <= 17


def test_bootstrap_is_seeded() -> None:
    values = [0.9, 1.4, 1.1, 1.7, 1.2, 1.3, 0.8, 1.5, 1.05, 0.95, 1.6]
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert len({bootstrap_ci(values, seed=s, resamples=50) for s in range(5)}) > 1  # the seed is used
    with pytest.raises(ConfigError, match="empty"):
        bootstrap_ci([])


@pytest.mark.parametrize(("ratio", "ci", "want"), [
    (1.8, (1.6, 2.0), "1.80x faster [1.60, 2.00]"),
    (0.5, (0.4, 0.8), "2.00x slower [1.25, 2.50]"),  # inverted, so both read as "times slower"
    (18.2, (17.0, 19.5), "18.20x faster [17.00, 19.50]"),
    (1.03, (0.97, 1.10), "no measurable difference"),
    (1.2, (1.0, 1.4), "no measurable difference"),  # an interval that touches 1 contains it
    (0.9, (0.8, 1.0), "no measurable difference"),
    (float("nan"), (0.5, 2.0), "not measured"),
    (float("inf"), (2.0, float("inf")), "not measured"),
])
def test_verdict(ratio: float, ci: tuple[float, float], want: str) -> None:
    assert verdict(ratio, ci) == want


def test_ratio_summary_of_round_ratios() -> None:
    s = RatioSummary.of([1.0, 3.0, 2.0, 2.5, 1.5])
    assert s.ratio == 2.0 and s.spread == (1.0, 3.0) and s.per_round == (1.0, 3.0, 2.0, 2.5, 1.5)
    assert s.ci95 == bootstrap_ci([1.0, 3.0, 2.0, 2.5, 1.5])
    assert s.verdict == verdict(s.ratio, s.ci95)
    assert RatioSummary.of([0.99, 1.02, 1.0, 0.98, 1.01]).verdict == "no measurable difference"


class FakeClock:
    """Seconds that pass only when a candidate says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _candidates(costs: dict[str, float], clock: FakeClock, log: list[str], seen_threads: set[int]) -> dict:
    def make(name: str, cost: float):
        def call() -> None:
            log.append(name)
            seen_threads.add(torch.get_num_threads())
            clock.now += cost
        return call
    return {name: make(name, cost) for name, cost in costs.items()}


def _blocks(log: list[str]) -> list[tuple[str, int]]:
    """Runs of the same name in a call log: [(name, length), ...]."""
    out: list[tuple[str, int]] = []
    for name in log:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return out


def test_compare_speed_interleaves_pins_threads_and_reports_every_field() -> None:
    clock, log, seen = FakeClock(), [], set()
    costs = {"fp32": 2 / 1024, "int8": 1 / 1024}  # powers of two: the clock's sums stay exact
    with threads(2):
        result = compare_speed(_candidates(costs, clock, log, seen), baseline="fp32", rounds=6, calls_per_round=4,
                               warmup=3, threads=1, batch_size=64, clock=clock)
        assert torch.get_num_threads() == 2  # restored
    assert seen == {1}  # every call, warm-up included, ran with the pinned count
    warm, timed = log[:2 * 3], log[2 * 3:]
    assert sorted(warm) == ["fp32"] * 3 + ["int8"] * 3 and warm[0] != warm[1]  # warm-up interleaved too
    rounds = [timed[r * 8:(r + 1) * 8] for r in range(6)]
    assert len(timed) == 6 * 8
    # each round: both candidates, each for calls_per_round calls in a row (paired)
    assert all(sorted(n for n, _ in _blocks(r)) == ["fp32", "int8"] and {k for _, k in _blocks(r)} == {4}
               for r in rounds)
    firsts = [r[0] for r in rounds]  # the candidate that opened each round
    assert firsts.count("fp32") == firsts.count("int8") == 3  # alternated: each first in half the rounds
    assert all(a != b for a, b in itertools.pairwise(firsts))
    assert result.ratio == 2.0 and result.ci95 == (2.0, 2.0) and result.spread == (2.0, 2.0)
    assert result.verdict == "2.00x faster [2.00, 2.00]"
    assert result.median_ms == {"fp32": pytest.approx(2000 / 1024), "int8": pytest.approx(1000 / 1024)}
    d = result.to_dict()
    assert set(d) == SPEED_KEYS
    assert (d["rounds"], d["calls_per_round"], d["warmup"], d["threads"], d["batch_size"], d["seed"]) == (
        6, 4, 3, 1, 64, 0)
    assert d["per_round"] == [2.0] * 6 and d["ci95"] == [2.0, 2.0] and d["median_ms"].keys() == {"fp32", "int8"}
    assert d["machine"]["threads"] == 1  # recorded while pinned


def test_compare_speed_rotates_three_candidates_and_is_seeded() -> None:
    def run(seed: int) -> list[str]:
        clock, log = FakeClock(), []
        compare_speed(_candidates({"a": 1 / 64, "b": 1 / 32, "c": 1 / 16}, clock, log, set()), baseline="a",
                      rounds=6, calls_per_round=1, warmup=0, seed=seed, clock=clock)
        return log

    log = run(0)
    rounds = [log[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(sum(r[0] == name for r in rounds) == 2 for name in "abc")  # each opens a round equally often
    assert run(0) == log
    assert len({tuple(run(s)[:3]) for s in range(8)}) > 1  # the seed chooses the starting order


def test_compare_speed_slower_candidate_and_several_ratios() -> None:
    clock = FakeClock()
    result = compare_speed(_candidates({"a": 1 / 64, "b": 1 / 16, "c": 1 / 64}, clock, [], set()), baseline="a",
                           rounds=4, calls_per_round=2, warmup=1, clock=clock)
    assert result.ratios["b"].ratio == 0.25 and result.ratios["b"].verdict == "4.00x slower [4.00, 4.00]"
    assert result.ratios["c"].verdict == "no measurable difference"
    with pytest.raises(ConfigError, match="name the one"):
        _ = result.ratio
    assert set(result.to_dict("b")["median_ms"]) == {"a", "b"}


def test_compare_speed_time_budget_sets_calls_per_round() -> None:
    clock = FakeClock()
    result = compare_speed(_candidates({"a": 1 / 64, "b": 1 / 64}, clock, [], set()), baseline="a", rounds=4,
                           calls_per_round=20, warmup=2, budget_s=1.0, clock=clock)
    assert result.calls_per_round == 8  # 1 s / (4 rounds x 2/64 s per pair of calls)
    assert result.rounds == 4 and result.warmup == 2
    slow = compare_speed(_candidates({"a": 1 / 4, "b": 1 / 4}, clock, [], set()), baseline="a", rounds=15,
                         warmup=10, budget_s=2.0, clock=clock)
    # the warm-up stops once it took more than half the budget (3 x 1/2 s > 1 s); one call per round; 2 s fit
    # 4 rounds of 1/2 s, but a budget never cuts below MIN_ROUNDS
    assert (slow.warmup, slow.calls_per_round, slow.rounds) == (3, 1, MIN_ROUNDS)
    medium = compare_speed(_candidates({"a": 1 / 32, "b": 1 / 32}, clock, [], set()), baseline="a", rounds=15,
                           warmup=2, budget_s=0.5, clock=clock)
    assert (medium.calls_per_round, medium.rounds) == (1, 8)  # 0.5 s / (1/16 s per round)


class _Recorder(nn.Module):
    """Records its mode and the thread count at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.modes: set[bool] = set()
        self.threads: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.add(self.training)
        self.threads.add(torch.get_num_threads())
        return self.lin(x)


def test_compare_speed_runs_models_on_inputs_in_eval_mode() -> None:
    a, b = _Recorder().train(), _Recorder().train()
    with threads(2):
        result = compare_speed({"a": a, "b": b}, torch.randn(5, 4), baseline="a", rounds=2, calls_per_round=1,
                               warmup=1, threads=1)
    assert a.modes == b.modes == {False} and a.training and b.training  # eval while timed, restored after
    assert a.threads == b.threads == {1}
    assert result.batch_size == 5 and set(result.to_dict()) == SPEED_KEYS


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"baseline": "nope"}, "baseline 'nope' is not a candidate"),
    ({"baseline": "a", "rounds": 1}, "rounds=1; use an integer >= 2"),
    ({"baseline": "a", "threads": 0}, "threads=0; use an integer >= 1"),
    ({"baseline": "a", "budget_s": 0}, "budget_s=0"),
])
def test_compare_speed_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compare_speed({"a": lambda: None, "b": lambda: None}, **kwargs)


def test_compare_speed_refuses_a_model_without_inputs_and_a_lone_candidate() -> None:
    with pytest.raises(ConfigError, match="is a model; pass the inputs"):
        compare_speed({"a": _mlp(), "b": _mlp()}, baseline="a")
    with pytest.raises(ConfigError, match="at least one other"):
        compare_speed({"a": lambda: None}, baseline="a")


def test_latency_pins_threads_and_records_the_machine() -> None:
    m = _Recorder().train()
    with threads(2):
        out = latency(m, torch.randn(3, 4), warmup=1, repeats=2, num_threads=1)
        assert torch.get_num_threads() == 2
    assert m.threads == {1} and m.modes == {False} and m.training
    assert out["threads"] == 1 and out["batch_size"] == 3 and out["machine"]["threads"] == 1
    assert out["latency_ms_p50"] > 0 and out["latency_ms_p95"] >= out["latency_ms_p50"]


def test_machine_record_and_line() -> None:
    info = machine()
    assert {"cpu", "cores", "logical_cpus", "usable_cpus", "threads", "torch", "cpu_capability", "avx2",
            "avx512_vnni", "gpu"} <= set(info)
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["avx2"] in (True, False, None)
    line = machine_line({"cpu": "Xeon", "cores": 2, "threads": 1, "torch": "2.13", "cpu_capability": "AVX512",
                         "avx512_vnni": True, "gpu": None})
    assert line == "Xeon, 2 cores, 1 thread, torch 2.13, AVX512 + VNNI"
    assert machine_line({}) == "unknown CPU"
