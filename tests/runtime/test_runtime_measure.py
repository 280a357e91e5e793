"""Measurement helpers: parameter, nonzero and MAC counts are exact; threads and modes are restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.runtime.measure import count_macs, count_nonzero, count_params, percentile, threads


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
