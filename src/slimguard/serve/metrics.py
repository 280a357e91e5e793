"""Prometheus metrics of the service, in their own registry (one per service, so tests and reloads never
share global state). The monitor's drift and error-rate values are read at scrape time.

| metric                                   | type      | labels            |
|------------------------------------------|-----------|-------------------|
| ``slimguard_requests_total``             | counter   | endpoint, status  |
| ``slimguard_request_seconds``            | histogram | endpoint          |
| ``slimguard_batch_items``                | histogram |                   |
| ``slimguard_rejects_total``              | counter   | reason            |
| ``slimguard_items_total``                | counter   |                   |
| ``slimguard_ood_items_total``            | counter   |                   |
| ``slimguard_fallback_items_total``       | counter   |                   |
| ``slimguard_scrubs_total``               | counter   | trigger           |
| ``slimguard_fault_events_total``         | counter   | kind              |
| ``slimguard_reloads_total``              | counter   | result            |
| ``slimguard_model_info``                 | gauge     | version, source   |
| ``slimguard_ready`` / ``_draining`` / ``_inflight`` | gauge |            |
| ``slimguard_monitor_state``              | gauge     | (0 ok, 1 warn, 2 alert) |
| ``slimguard_monitor_value``              | gauge     | metric (ood_rate, class_psi, confidence_ks, ...) |
| ``slimguard_drift_psi`` / ``_drift_ks``  | gauge     |                   |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATES = {"ok": 0, "warn": 1, "alert": 2}


class ServeMetrics:
    """The service's counters, histograms and gauges.

    Args:
        status: returns the monitor status (:meth:`slimguard.guard.Guard.status`) of the model now
            served, or None before one is loaded; read at every scrape.
    """

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the text and carry no signal here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("slimguard_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("slimguard_request_seconds", "Request latency in seconds.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("slimguard_batch_items", "Items per micro-batch run by the model.",
                               buckets=BATCH_BUCKETS, registry=r)
        self.rejects = Counter("slimguard_rejects", "Requests refused, by reason.", ["reason"], registry=r)
        self.items = Counter("slimguard_items", "Items answered by the model.", registry=r)
        self.ood = Counter("slimguard_ood_items", "Items the OOD detector flagged.", registry=r)
        self.fallback = Counter("slimguard_fallback_items", "Items the cascade sent to the reference model.",
                                registry=r)
        self.scrubs = Counter("slimguard_scrubs", "Weight checksum scrubs, by trigger.", ["trigger"], registry=r)
        self.faults = Counter("slimguard_fault_events",
                              "Weight tensors found damaged (detected), repaired, or not repairable (failed).",
                              ["kind"], registry=r)
        self.reloads = Counter("slimguard_reloads", "Artifact reloads, by result.", ["result"], registry=r)
        self.model_info = Gauge("slimguard_model_info", "The model served (1 for the current version).",
                                ["version", "source"], registry=r)
        self.ready = Gauge("slimguard_ready", "1 when the service takes traffic.", registry=r)
        self.draining = Gauge("slimguard_draining", "1 while the service drains before exiting.", registry=r)
        self.inflight = Gauge("slimguard_inflight", "Prediction requests in flight.", registry=r)
        r.register(_MonitorCollector(status))

    def set_model(self, version: str, source: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version, source=source).set(1)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _MonitorCollector:
    """Reads the monitor at scrape time: its state and every rolling-window value."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        st = self._status()
        if st is None:
            return
        state = GaugeMetricFamily("slimguard_monitor_state", "Monitor state: 0 ok, 1 warn, 2 alert.")
        state.add_metric([], STATES.get(st["state"], 2))
        yield state
        values = GaugeMetricFamily("slimguard_monitor_value", "Monitor rolling-window values "
                                   "(see slimguard.guard.monitor).", labels=["metric"])
        for name, m in st.get("metrics", {}).items():
            if m.get("value") is not None:
                values.add_metric([name], float(m["value"]))
        yield values
        for name, key, doc in (("slimguard_drift_psi", "class_psi", "PSI of predicted classes vs reference."),
                               ("slimguard_drift_ks", "confidence_ks", "KS statistic of confidences vs reference."),
                               ("slimguard_ood_rate", "ood_rate", "Share of recent items flagged OOD.")):
            value = st.get("metrics", {}).get(key, {}).get("value")
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value) if value is not None else 0.0)
            yield g
