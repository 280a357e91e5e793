"""The service's automatic torch threads: a model that costs more per item than the service's own work
per request gets every core; a cheap one leaves the event loop a core. The cost is timed at warm-up."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimguard.serve import ServeConfig
from slimguard.serve.config import COMPUTE_BOUND_MS
from slimguard.serve.service import Service


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    return 8


@pytest.mark.parametrize(("workers", "ms", "want"), [
    (1, None, 7), (1, 0.2, 7), (1, COMPUTE_BOUND_MS, 8), (1, 9.0, 8),
    (2, 0.2, 3), (2, 9.0, 4), (8, 0.2, 1), (8, 9.0, 1), (16, 9.0, 1),
])
def test_automatic_threads_follow_the_models_cost(cores, workers, ms, want):
    assert ServeConfig(artifact="a.slim", workers=workers).threads(ms) == want


def test_explicit_threads_win_over_the_cost(cores):
    assert ServeConfig(artifact="a.slim", torch_threads=3).threads(0.1) == 3
    assert ServeConfig(artifact="a.slim", torch_threads=3).threads(50.0) == 3


@dataclasses.dataclass
class _Timed:  # the one field of LoadedModel that Service._set_threads reads
    ms_per_item: float | None


@pytest.mark.parametrize(("ms", "want"), [(0.3, 1), (12.0, 2)])
def test_service_applies_the_threads_before_its_batcher_runs(monkeypatch, ms, want):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    service = Service(ServeConfig(artifact="a.slim"))
    try:
        service._set_threads(_Timed(ms))  # type: ignore[arg-type]
        assert service.torch_threads == want and torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_warm_up_times_the_served_model(tmp_path):
    from slimguard.artifact import save
    from slimguard.models import zoo
    from slimguard.serve import load_served

    path = save(zoo.load("digits-mlp", progress=False), tmp_path / "mlp.slim")
    loaded = load_served(ServeConfig(artifact=str(path)))
    try:
        assert loaded.ms_per_item is not None and 0 < loaded.ms_per_item < 1000
    finally:
        loaded.close()
