"""``EmbeddingMonitor``: drift of an embedder read from its embeddings' principal-axis projections (PSI) and
its OOD scores (KS), with the same states, reasons and Prometheus text as the classifier monitor."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import DataError, NotFittedError
from slimguard.guard.monitor import EmbeddingMonitor, MonitorConfig

DIM = 16
SCALES = torch.linspace(3.0, 0.5, DIM)  # distinct variances: the principal axes are the coordinate axes


def _emb(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g) * SCALES
    x[:, 0] += shift * SCALES[0]  # along the first principal axis, in its standard deviations
    return x


def _scores(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.2 + shift


def _monitor() -> EmbeddingMonitor:
    return EmbeddingMonitor(MonitorConfig(window=1000, min_samples=200), _emb(2000, 0), _scores(2000, 1))


def test_in_distribution_embeddings_stay_ok():
    mon = _monitor()
    for i in range(10):  # 1000 rows in batches, as the service records them
        mon.observe(_emb(100, 10 + i), torch.zeros(100, dtype=torch.bool), 1.0, scores=_scores(100, 30 + i))
    st = mon.status()
    assert st["state"] == "ok", st["reasons"]
    m = st["metrics"]
    assert set(m) == {"ood_rate", "embedding_psi", "ood_score_ks", "latency_p95_ms"}
    assert m["embedding_psi"]["samples"] == 1000 and m["embedding_psi"]["value"] < 0.03
    assert m["ood_score_ks"]["value"] < 0.08 and m["ood_rate"]["value"] == 0.0
    assert st["counters"]["predictions"] == 1000 and st["counters"]["calls"] == 10


def test_shifted_embeddings_raise_psi_to_alert_and_leave_the_window():
    mon = _monitor()
    mon.observe(_emb(300, 5, shift=1.5))
    st = mon.status()
    assert st["state"] == "alert" and st["metrics"]["embedding_psi"]["state"] == "alert"
    assert st["metrics"]["embedding_psi"]["value"] > 0.25
    assert any(r.startswith("embedding_psi") for r in st["reasons"])
    assert "ood_score_ks" in st["metrics"] and st["metrics"]["ood_score_ks"]["value"] is None  # no scores sent
    mon.observe(_emb(1000, 6))  # the drift is over once it leaves the window
    assert mon.status()["state"] == "ok"


def test_shifted_ood_scores_raise_ks_and_flags_raise_the_ood_rate():
    mon = _monitor()
    mon.observe(_emb(300, 7), torch.ones(300, dtype=torch.bool), scores=_scores(300, 8, shift=0.1))
    m = mon.status()["metrics"]
    assert m["embedding_psi"]["state"] == "ok"
    assert m["ood_score_ks"]["state"] == "alert" and m["ood_score_ks"]["value"] == pytest.approx(0.5, abs=0.08)
    assert m["ood_rate"]["value"] == 1.0 and m["ood_rate"]["state"] == "alert"


def test_metrics_stay_ok_below_min_samples_and_show_in_prometheus_text():
    mon = _monitor()
    mon.observe(_emb(100, 9, shift=3.0))
    st = mon.status()
    assert st["state"] == "ok" and st["metrics"]["embedding_psi"]["value"] > 0.25  # too few rows to judge
    text = mon.prometheus()
    assert 'slimguard_metric{metric="embedding_psi"}' in text and "slimguard_predictions_total 100" in text


def test_without_reference_scores_only_projections_are_tracked():
    mon = EmbeddingMonitor(MonitorConfig(min_samples=10), _emb(100, 0), components=2, bins=4)
    assert mon.axes is not None and mon.axes.shape == (DIM, 2) and mon.edges is not None
    assert mon.edges.shape == (2, 3)
    assert "ood_score_ks" not in mon.status()["metrics"]


def test_bad_inputs_are_refused_naming_the_shape():
    with pytest.raises(NotFittedError):
        EmbeddingMonitor().observe(_emb(4, 0))
    with pytest.raises(DataError, match="N >= 10"):
        EmbeddingMonitor(reference=_emb(5, 0))
    with pytest.raises(DataError, match="non-finite"):
        EmbeddingMonitor(reference=torch.full((20, DIM), float("nan")))
    mon = _monitor()
    with pytest.raises(DataError, match=r"\(N, 16\)"):
        mon.observe(torch.zeros(3, 8))
    with pytest.raises(DataError, match=r"scores must have shape \(3,\)"):
        mon.observe(_emb(3, 1), scores=torch.zeros(2))
