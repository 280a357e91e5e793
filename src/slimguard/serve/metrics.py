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

The drift gauges read a classifier's ``class_psi`` and ``confidence_ks``, or an embedder's
``embedding_psi`` and ``ood_score_ks`` (:class:`~slimguard.guard.monitor.EmbeddingMonitor`).

Several workers (``--workers N``): the service, not one worker, is reported. The parent process makes a
fresh directory for the service and names it in ``$PROMETHEUS_MULTIPROC_DIR`` before the workers start
(prometheus-client's multiprocess mode; the directory is removed when the service stops). Every worker
writes its values there, and a scrape answered by any worker reads them all: counters and histograms
are summed, ``inflight`` is summed over live workers, ``ready`` is the minimum and ``draining`` the
maximum over live workers, and the monitor gauges are the worst (largest) value over live workers, each
worker refreshing its own at most once per :data:`MONITOR_REFRESH_S` while it answers (and when it
answers a scrape). A worker that exits cleanly removes its live gauges; counters keep counting what it
answered.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MONITOR_REFRESH_S = 1.0
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
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._status = status
        self._model_labels: tuple[str, str] | None = None
        self._refreshed = 0.0
        self._refresh_lock = threading.Lock()
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
                                ["version", "source"], registry=r, multiprocess_mode="livemax")
        self.ready = Gauge("slimguard_ready", "1 when the service takes traffic.", registry=r,
                           multiprocess_mode="livemin")
        self.draining = Gauge("slimguard_draining", "1 while the service drains before exiting.", registry=r,
                              multiprocess_mode="livemax")
        self.inflight = Gauge("slimguard_inflight", "Prediction requests in flight.", registry=r,
                              multiprocess_mode="livesum")
        self._monitor_gauges: dict[str, Any] = {}
        if self.multiprocess_dir is None:
            r.register(_MonitorCollector(status))  # read at scrape time: exact for the one process
        else:
            for name, doc, labels in _MONITOR_GAUGES:
                self._monitor_gauges[name] = Gauge(name, doc, labels, registry=r, multiprocess_mode="livemax")

    def set_model(self, version: str, source: str) -> None:
        """Mark ``version`` as the model served (the previous one, if any, set to 0: in multiprocess mode
        a label once written stays in the worker's file, so it is zeroed rather than removed)."""
        if self._model_labels is not None and self._model_labels != (version, source):
            self.model_info.labels(*self._model_labels).set(0)
        self._model_labels = (version, source)
        self.model_info.labels(version=version, source=source).set(1)

    def refresh_monitor(self, force: bool = False) -> None:
        """Multiprocess mode: copy this worker's monitor values into the shared gauges, at most once per
        :data:`MONITOR_REFRESH_S` unless ``force`` (cheap to call after every batch)."""
        if self.multiprocess_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._refreshed < MONITOR_REFRESH_S:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return  # another thread is refreshing right now
        try:
            self._refreshed = now
            for family in _monitor_families(self._status()):
                gauge = self._monitor_gauges[family.name]
                for sample in family.samples:
                    (gauge.labels(**sample.labels) if sample.labels else gauge).set(sample.value)
        finally:
            self._refresh_lock.release()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type: this process's metrics, or with several workers the
        whole service's (read from every worker's files)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        self.refresh_monitor(force=True)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """Multiprocess mode: drop this process's live gauges (its counters keep counting for the service)."""
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid(), self.multiprocess_dir)


_MONITOR_GAUGES = (
    ("slimguard_monitor_state", "Monitor state: 0 ok, 1 warn, 2 alert.", ()),
    ("slimguard_monitor_value", "Monitor rolling-window values (see slimguard.guard.monitor).", ("metric",)),
    ("slimguard_drift_psi", "PSI vs reference: of predicted classes, or of an embedder's projections.", ()),
    ("slimguard_drift_ks", "KS statistic vs reference: of confidences, or of an embedder's OOD scores.", ()),
    ("slimguard_ood_rate", "Share of recent items flagged OOD.", ()),
)


def _monitor_families(st: dict[str, Any] | None) -> Iterator[Any]:
    """The monitor's state and every rolling-window value, as gauge families (none before a model loads)."""
    from prometheus_client.core import GaugeMetricFamily

    if st is None:
        return
    docs = {name: doc for name, doc, _ in _MONITOR_GAUGES}
    state = GaugeMetricFamily("slimguard_monitor_state", docs["slimguard_monitor_state"])
    state.add_metric([], STATES.get(st["state"], 2))
    yield state
    values = GaugeMetricFamily("slimguard_monitor_value", docs["slimguard_monitor_value"], labels=["metric"])
    for name, m in st.get("metrics", {}).items():
        if m.get("value") is not None:
            values.add_metric([name], float(m["value"]))
    yield values
    metrics = st.get("metrics", {})
    for name, keys in (("slimguard_drift_psi", ("class_psi", "embedding_psi")),
                       ("slimguard_drift_ks", ("confidence_ks", "ood_score_ks")),
                       ("slimguard_ood_rate", ("ood_rate",))):
        value = next((metrics[k].get("value") for k in keys if k in metrics), None)
        g = GaugeMetricFamily(name, docs[name])
        g.add_metric([], float(value) if value is not None else 0.0)
        yield g


class _MonitorCollector:
    """Reads the monitor at scrape time: its state and every rolling-window value."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from _monitor_families(self._status())
