"""The monitor moves to warn/alert under injected drift and returns to ok; Prometheus text."""

from __future__ import annotations

import re

import pytest
import torch

from slimguard.core.errors import ConfigError, DataError, NotFittedError
from slimguard.guard.monitor import Monitor, MonitorConfig, ks_statistic, psi

C = 10


def _probs(n: int, classes: torch.Tensor, confidence: float) -> torch.Tensor:
    """Softmax-like rows: ``confidence`` on the given class, the rest spread evenly."""
    p = torch.full((n, C), (1 - confidence) / (C - 1))
    p[torch.arange(n), classes] = confidence
    return p


def _reference(n: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    conf = 0.9 + 0.09 * torch.rand(n, generator=g)
    p = _probs(n, torch.arange(n) % C, 0.0)
    p[torch.arange(n), torch.arange(n) % C] = conf
    return p


def _stream(mon: Monitor, n: int, classes: torch.Tensor, conf: float, ood: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, 50):
        k = min(50, n - i)
        c = conf + 0.09 * torch.rand(k, generator=g)  # same spread as the reference
        p = _probs(k, classes[i : i + k], 0.0)
        p[torch.arange(k), classes[i : i + k]] = c.clamp(max=0.99)
        mon.observe(p, ood=torch.rand(k, generator=g) < ood, latency_ms=2.0)


def test_monitor_goes_warn_then_alert_under_drift_and_back_to_ok():
    mon = Monitor(MonitorConfig(window=300, min_samples=50), _reference())
    healthy = torch.arange(600) % C
    _stream(mon, 300, healthy, conf=0.9, ood=0.03, seed=1)
    st = mon.status()
    assert st["state"] == "ok", st["reasons"]
    # mild drift: a sixth of traffic collapses onto class 0 (PSI about 0.16), a few more OOD flags
    mild = torch.where(torch.arange(300) % 6 == 1, torch.zeros(300, dtype=torch.long), torch.arange(300) % C)
    _stream(mon, 300, mild, conf=0.9, ood=0.15, seed=2)
    st = mon.status()
    assert st["state"] == "warn", st["reasons"]
    assert st["metrics"]["ood_rate"]["state"] == "warn"
    assert st["metrics"]["class_psi"]["state"] == "warn"
    # strong drift: everything is class 3, low confidence, many OOD flags
    _stream(mon, 300, torch.full((300,), 3), conf=0.55, ood=0.5, seed=3)
    st = mon.status()
    assert st["state"] == "alert"
    for name in ("confidence", "ood_rate", "class_psi", "confidence_ks"):
        assert st["metrics"][name]["state"] == "alert", name
    assert any(r.startswith("class_psi") for r in st["reasons"])
    # drift over: the window fills with healthy traffic again
    _stream(mon, 300, healthy, conf=0.9, ood=0.03, seed=4)
    assert mon.status()["state"] == "ok", mon.status()["reasons"]


def test_error_rate_from_late_labels_and_latency_threshold():
    mon = Monitor(MonitorConfig(window=200, min_samples=20, latency_warn_ms=5.0, latency_alert_ms=50.0),
                  _reference(), torch.arange(1000) % C)
    classes = torch.arange(100) % C
    mon.observe(_probs(100, classes, 0.95), latency_ms=3.0, ids=list(range(100)))
    assert mon.add_labels(list(range(100)), classes) == 100
    assert mon.status()["metrics"]["error_rate"]["state"] == "ok"
    mon.observe(_probs(100, classes, 0.95), latency_ms=20.0, ids=[f"b{i}" for i in range(100)])
    wrong = (classes + 1) % C
    assert mon.add_labels([f"b{i}" for i in range(100)] + ["unknown"], torch.cat([wrong, torch.tensor([0])])) == 100
    st = mon.status()
    assert st["metrics"]["error_rate"]["value"] == pytest.approx(0.5)
    assert st["metrics"]["error_rate"]["state"] == "alert"
    assert st["metrics"]["latency_p95_ms"]["state"] == "warn"
    assert st["counters"]["labels"] == 200


def test_psi_and_ks_values():
    assert psi(torch.tensor([50.0, 50.0]), torch.tensor([50.0, 50.0])) == pytest.approx(0.0)
    assert psi(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])) == pytest.approx(
        0.4 * torch.log(torch.tensor(1.8)).item() - 0.4 * torch.log(torch.tensor(0.2)).item(), rel=1e-6)
    assert ks_statistic(torch.arange(10.0), torch.arange(10.0)) == 0.0
    assert ks_statistic(torch.zeros(5), torch.ones(5)) == 1.0
    from scipy.stats import ks_2samp

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, generator=g), torch.randn(150, generator=g) + 0.3
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_prometheus_text_is_well_formed():
    mon = Monitor(MonitorConfig(window=100, min_samples=10), _reference())
    mon.observe(_probs(20, torch.arange(20) % C, 0.95), ood=torch.zeros(20, dtype=torch.bool), latency_ms=1.5)
    mon.record_rejected(3)
    text = mon.prometheus(labels={"model": 'digits "mlp"'})
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                        r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? -?[0-9.e+-]+$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'slimguard_rejected_total{model="digits \\"mlp\\""} 3' in text
    assert 'slimguard_metric{model="digits \\"mlp\\"",metric="ood_rate"} 0' in text
    assert text.endswith("\n")


def test_monitor_bad_uses():
    with pytest.raises(NotFittedError, match="no reference"):
        Monitor().observe(_probs(2, torch.tensor([0, 1]), 0.9))
    with pytest.raises(DataError, match="one id per row"):
        Monitor(reference=_reference()).observe(_probs(2, torch.tensor([0, 1]), 0.9), ids=["a"])
    with pytest.raises(ConfigError, match=r"psi_warn: 0\.5 is above psi_alert"):
        MonitorConfig(psi_warn=0.5, psi_alert=0.2)
    with pytest.raises(ConfigError, match="window: 0 is out of range"):
        MonitorConfig(window=0)
