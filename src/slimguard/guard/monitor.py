"""Runtime monitor: rolling windows over what a served model sees, states ok/warn/alert, Prometheus text.

Tracked over the last ``window`` predictions (and ``window`` labelled ones):

| metric            | value                                                        | compared with      |
|-------------------|--------------------------------------------------------------|--------------------|
| ``confidence``    | drop of the mean max-softmax probability                     | the reference mean |
| ``ood_rate``      | share of inputs the detector flagged                         | absolute           |
| ``class_psi``     | population stability index of the predicted-class histogram | reference histogram|
| ``confidence_ks`` | two-sample Kolmogorov-Smirnov statistic of confidences      | reference sample   |
| ``latency_p95_ms``| 95th percentile of per-call latency                          | absolute (optional)|
| ``error_rate``    | rise of the error rate once labels arrive (``add_labels``)    | reference error    |

An embedder has no classes: :class:`EmbeddingMonitor` tracks the PSI of its embeddings' projections on the
reference's principal axes and the KS statistic of its OOD scores instead (same thresholds, states and output).

Each metric is ``ok``, ``warn`` or ``alert`` against its two thresholds; the monitor's state is the
worst of them. Metrics with fewer than ``min_samples`` observations stay ``ok``. Old observations
leave the window, so the state returns to ``ok`` once the drift is over.

PSI: ``sum_i (p_i - q_i) ln(p_i / q_i)`` with a floor of 1e-4 per bin; common reading: < 0.1 stable,
0.1-0.25 moderate shift, > 0.25 major shift (Yurdakul, 2018).

Example:
    >>> mon = Monitor.from_model(model, data.val)
    >>> mon.observe(probs, ood=flags, latency_ms=3.2, ids=request_ids)
    >>> mon.add_labels(request_ids, labels)
    >>> mon.status()["state"], mon.prometheus()
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, check_ranges
from slimguard.core.errors import ConfigError, DataError, NotFittedError
from slimguard.runtime.measure import percentile

STATES = ("ok", "warn", "alert")


@dataclasses.dataclass
class MonitorConfig(Config):
    """Window sizes and thresholds (``*_warn`` < ``*_alert``; a metric beyond a threshold takes its state).

    Args:
        window: predictions in the rolling window (default 500); also the window of labelled ones.
        min_samples: observations needed before a metric may leave ``ok`` (default 50).
        confidence_drop_warn / _alert: drop of mean confidence below the reference (0.05 / 0.15).
        ood_rate_warn / _alert: share flagged as OOD (0.10 / 0.25; a 95%-TPR threshold flags ~5%).
        psi_warn / _alert: PSI of predicted classes (0.10 / 0.25).
        ks_warn / _alert: KS statistic of confidences (0.15 / 0.30).
        latency_warn_ms / _alert_ms: p95 latency per call (None = not checked).
        error_rate_warn / _alert: rise of the error rate over the reference (0.05 / 0.15).
    """

    window: int = 500
    min_samples: int = 50
    confidence_drop_warn: float = 0.05
    confidence_drop_alert: float = 0.15
    ood_rate_warn: float = 0.10
    ood_rate_alert: float = 0.25
    psi_warn: float = 0.10
    psi_alert: float = 0.25
    ks_warn: float = 0.15
    ks_alert: float = 0.30
    latency_warn_ms: float | None = None
    latency_alert_ms: float | None = None
    error_rate_warn: float = 0.05
    error_rate_alert: float = 0.15

    def validate(self) -> None:
        check_ranges(self, ("window", "min_samples"), 1)
        for name in ("confidence_drop", "ood_rate", "psi", "ks", "latency", "error_rate"):
            suffix = "_ms" if name == "latency" else ""
            warn, alert = getattr(self, f"{name}_warn{suffix}"), getattr(self, f"{name}_alert{suffix}")
            for field, v in ((f"{name}_warn{suffix}", warn), (f"{name}_alert{suffix}", alert)):
                if v is not None:
                    check_range(field, v, 0.0)
            if warn is not None and alert is not None and warn > alert:
                raise ConfigError(f"{name}_warn{suffix}: {warn} is above {name}_alert{suffix} ({alert}); "
                                  "allowed: warn <= alert")


def psi(expected: torch.Tensor, actual: torch.Tensor, floor: float = 1e-4) -> float:
    """Population stability index between two histograms (counts or shares) of the same bins."""
    p = torch.as_tensor(actual, dtype=torch.float64)
    q = torch.as_tensor(expected, dtype=torch.float64)
    p = (p / p.sum().clamp_min(1e-12)).clamp_min(floor)
    q = (q / q.sum().clamp_min(1e-12)).clamp_min(floor)
    p, q = p / p.sum(), q / q.sum()
    return float(((p - q) * torch.log(p / q)).sum())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_a - F_b|``."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten().sort().values
    b = torch.as_tensor(b, dtype=torch.float64).flatten().sort().values
    if len(a) == 0 or len(b) == 0:
        return 0.0
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


Row = tuple[float | None, int, float | None, float | None]
"""One metric before its state is read: ``(value, samples, warn threshold, alert threshold)``."""


def _with_states(rows: dict[str, Row], min_samples: int) -> dict[str, dict[str, Any]]:
    """Each metric's value, sample count, thresholds and state (``ok`` below ``min_samples``, except the
    latency, read from the first call)."""
    out = {}
    for name, (value, count, warn, alert) in rows.items():
        enough = count >= min_samples or (name == "latency_p95_ms" and count > 0)
        out[name] = {"value": value, "samples": count, "warn": warn, "alert": alert,
                     "state": _level(value, warn, alert) if enough else "ok"}
    return out


def _level(value: float | None, warn: float | None, alert: float | None) -> str:
    if value is None:
        return "ok"
    if value != value:  # NaN (e.g. from NaN probabilities): fail closed
        return "alert"
    if alert is not None and value >= alert:
        return "alert"
    if warn is not None and value >= warn:
        return "warn"
    return "ok"


class Monitor:
    """Rolling-window monitor of a served classifier (thread-safe).

    Args:
        config: thresholds and window sizes (default :class:`MonitorConfig`), or its keys as keywords
            (``Monitor(window=200)`` is ``Monitor(MonitorConfig(window=200))``).
        reference: reference softmax probabilities ``(N, C)`` (validation data), or set later with
            :meth:`set_reference`.
        reference_labels: labels of the reference rows (gives the reference error rate).
    """

    def __init__(self, config: MonitorConfig | None = None, reference: torch.Tensor | None = None,
                 reference_labels: torch.Tensor | None = None, **options: Any) -> None:
        self.config = MonitorConfig.build(config, options, where="monitor")
        w = self.config.window
        self._lock = threading.Lock()
        self._conf: collections.deque[float] = collections.deque(maxlen=w)
        self._pred: collections.deque[int] = collections.deque(maxlen=w)
        self._ood: collections.deque[bool] = collections.deque(maxlen=w)
        self._lat: collections.deque[float] = collections.deque(maxlen=w)
        self._err: collections.deque[bool] = collections.deque(maxlen=w)
        self._pending: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self.counters = {"predictions": 0, "ood": 0, "rejected": 0, "labels": 0, "calls": 0}
        self.ref_conf: torch.Tensor | None = None
        self.ref_classes: torch.Tensor | None = None
        self.ref_error = 0.0
        if reference is not None:
            self.set_reference(reference, reference_labels)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, split: Any, config: MonitorConfig | None = None) -> Monitor:
        """A monitor whose reference is ``model``'s predictions on ``split`` (e.g. validation data)."""
        from slimguard.evaluate import predict

        probs = torch.softmax(predict(model, split.x).float(), -1)
        return cls(config, probs, getattr(split, "y", None))

    def set_reference(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Reference distribution: confidences and predicted-class histogram of ``probs`` ``(N, C)``."""
        if probs.dim() != 2 or len(probs) == 0:
            raise DataError("the monitor's reference must be probabilities of shape (N, num_classes), N > 0")
        conf, pred = probs.float().max(-1)
        self.ref_conf = conf.sort().values
        self.ref_classes = torch.bincount(pred, minlength=probs.shape[1]).double()
        self.ref_error = float((pred != labels).double().mean()) if labels is not None else 0.0

    # ---- recording -------------------------------------------------------------------------------------
    def observe(self, probs: torch.Tensor, ood: torch.Tensor | None = None, latency_ms: float | None = None,
                ids: list[Any] | None = None) -> None:
        """Record one call: softmax ``probs`` ``(N, C)``, OOD flags ``(N,)``, its latency, and request
        ids (to match labels that arrive later)."""
        if self.ref_conf is None:
            raise NotFittedError("the monitor has no reference; use Monitor.from_model or set_reference first")
        if not torch.is_tensor(probs) or probs.dim() != 2 or probs.shape[1] == 0:
            got = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
            raise DataError(f"monitor: probabilities must have shape (N, num_classes), got {got}")
        if ood is not None and tuple(ood.shape) != (len(probs),):
            raise DataError(f"monitor: OOD flags must have shape ({len(probs)},), got {tuple(ood.shape)}")
        conf, pred = probs.detach().float().max(-1)
        if ids is not None and len(ids) != len(pred):
            raise DataError(f"{len(ids)} ids for {len(pred)} predictions; give one id per row")
        with self._lock:
            self._conf.extend(conf.tolist())
            self._pred.extend(pred.tolist())
            if ids is not None:
                for i, p in zip(ids, pred.tolist(), strict=True):
                    self._pending[i] = p
                while len(self._pending) > 10 * self.config.window:
                    self._pending.popitem(last=False)
            self._count_call(len(pred), ood, latency_ms)

    def _count_call(self, n: int, ood: torch.Tensor | None, latency_ms: float | None) -> None:
        """Record one call's OOD flags, latency and counts (the caller holds the lock)."""
        if ood is not None:
            flags = ood.bool().tolist()
            self._ood.extend(flags)
            self.counters["ood"] += sum(flags)
        if latency_ms is not None:
            self._lat.append(float(latency_ms))
        self.counters["predictions"] += n
        self.counters["calls"] += 1

    def record_rejected(self, n: int = 1) -> None:
        """Count inputs refused before reaching the model (contract violations)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"monitor: rejected count {n!r} must be an integer >= 1")
        with self._lock:
            self.counters["rejected"] += n

    def add_labels(self, ids: list[Any], labels: torch.Tensor | list[int]) -> int:
        """True labels for earlier predictions (matched by id). Returns how many matched."""
        labels = torch.as_tensor(labels).tolist()
        if len(ids) != len(labels):
            raise DataError(f"{len(ids)} ids for {len(labels)} labels; give one label per id")
        matched = 0
        with self._lock:
            for i, y in zip(ids, labels, strict=True):
                p = self._pending.pop(i, None)
                if p is not None:
                    self._err.append(p != int(y))
                    matched += 1
            self.counters["labels"] += matched
        return matched

    def reset(self) -> None:
        with self._lock:
            for d in (self._conf, self._pred, self._ood, self._lat, self._err):
                d.clear()
            self._pending.clear()

    # ---- reading ------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Each metric's value, sample count, thresholds and state."""
        c = self.config
        if self.ref_conf is None or self.ref_classes is None:
            raise NotFittedError("the monitor has no reference; use Monitor.from_model or set_reference first")
        with self._lock:
            conf = torch.tensor(list(self._conf), dtype=torch.float64)
            pred = torch.tensor(list(self._pred), dtype=torch.long)
            ood = list(self._ood)
            lat = sorted(self._lat)
            err = list(self._err)
        n = len(conf)
        rows: dict[str, Row] = {}
        ref_mean = float(self.ref_conf.double().mean())
        rows["confidence"] = (ref_mean - float(conf.mean()) if n else None, n,
                              c.confidence_drop_warn, c.confidence_drop_alert)
        rows["ood_rate"] = (sum(ood) / len(ood) if ood else None, len(ood), c.ood_rate_warn, c.ood_rate_alert)
        hist = torch.bincount(pred, minlength=len(self.ref_classes)).double() if n else None
        rows["class_psi"] = (psi(self.ref_classes, hist) if hist is not None else None, n, c.psi_warn, c.psi_alert)
        rows["confidence_ks"] = (ks_statistic(self.ref_conf, conf) if n else None, n, c.ks_warn, c.ks_alert)
        p95 = percentile(lat, 0.95) if lat else None
        rows["latency_p95_ms"] = (p95, len(lat), c.latency_warn_ms, c.latency_alert_ms)
        rows["error_rate"] = (sum(err) / len(err) - self.ref_error if err else None, len(err),
                              c.error_rate_warn, c.error_rate_alert)
        out = _with_states(rows, c.min_samples)
        out["confidence"]["mean"] = float(conf.mean()) if n else None
        out["confidence"]["reference_mean"] = ref_mean
        return out

    def status(self) -> dict[str, Any]:
        """``{"state": ok|warn|alert, "reasons": [...], "metrics": {...}, "counters": {...}}``."""
        m = self.metrics()
        worst = max((STATES.index(v["state"]) for v in m.values()), default=0)
        reasons = [f"{k} = {v['value']:.4g} (>= {v[v['state']]})" for k, v in m.items() if v["state"] != "ok"]
        return {"state": STATES[worst], "reasons": reasons, "metrics": m, "counters": dict(self.counters)}

    @property
    def state(self) -> str:
        return self.status()["state"]

    def prometheus(self, prefix: str = "slimguard", labels: dict[str, str] | None = None) -> str:
        """The metrics in Prometheus text exposition format (version 0.0.4)."""
        st = self.status()
        base = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted((labels or {}).items()))

        def lab(extra: str = "") -> str:
            inner = ",".join(p for p in (base, extra) if p)
            return "{" + inner + "}" if inner else ""

        lines = [f"# HELP {prefix}_state Monitor state: 0 ok, 1 warn, 2 alert.", f"# TYPE {prefix}_state gauge",
                 f"{prefix}_state{lab()} {STATES.index(st['state'])}"]
        lines += [f"# HELP {prefix}_metric Monitored value over the rolling window (see slimguard.guard.monitor).",
                  f"# TYPE {prefix}_metric gauge"]
        for k, v in st["metrics"].items():
            if v["value"] is not None:
                lines.append(f'{prefix}_metric{lab(f"metric={chr(34)}{k}{chr(34)}")} {float(v["value"]):.6g}')
        lines += [f"# HELP {prefix}_metric_state State of each metric: 0 ok, 1 warn, 2 alert.",
                  f"# TYPE {prefix}_metric_state gauge"]
        for k, v in st["metrics"].items():
            lines.append(f'{prefix}_metric_state{lab(f"metric={chr(34)}{k}{chr(34)}")} {STATES.index(v["state"])}')
        for k, v in st["counters"].items():
            lines += [f"# HELP {prefix}_{k}_total Count of {k} since start.", f"# TYPE {prefix}_{k}_total counter",
                      f"{prefix}_{k}_total{lab()} {v}"]
        return "\n".join(lines) + "\n"


class EmbeddingMonitor(Monitor):
    """Rolling-window monitor of a served embedder (thread-safe). An embedder has no classes or
    confidences, so its drift is read from the embeddings themselves:

    | metric            | value                                                    | compared with       |
    |-------------------|----------------------------------------------------------|---------------------|
    | ``ood_rate``      | share of inputs the OOD threshold flagged                | absolute            |
    | ``embedding_psi`` | mean PSI of the projections on the top principal axes    | reference quantiles |
    | ``ood_score_ks``  | KS statistic of the OOD scores (e.g. cosine distance to  | reference scores    |
    |                   | the nearest training text)                               |                     |
    | ``latency_p95_ms``| 95th percentile of per-call latency                      | absolute (optional) |

    ``embedding_psi``: the reference embeddings are centred and their top ``components`` principal axes
    kept; each axis is cut into ``bins`` bins at the reference projections' quantiles (so each reference
    bin holds ``1/bins``), and the PSI of the window's projections over those bins is averaged over the
    axes. A mean over a few coarse histograms is steadier on small windows than one fine histogram or the
    worst axis: on MiniLM and docs-text (a reference of 348 validation texts), in-distribution windows of
    100 / 300 / 1000 texts read 0.056 / 0.049 / 0.040 (medians; 95th percentiles 0.13 / 0.07 / 0.05),
    shuffled-word sentences 0.11 / 0.09 / 0.085, and random word pieces 2.3 to 2.5. Thresholds are
    :class:`MonitorConfig`'s ``psi_*`` and ``ks_*`` (the KS of scores: 0.10 in-distribution at 100 texts,
    0.21 for shuffled words, 1.0 for random word pieces).

    Args:
        config: thresholds and window sizes (:class:`MonitorConfig`, or its keys as keywords).
        reference: reference embeddings ``(N, D)`` (e.g. of validation texts), or set later with
            :meth:`set_embedding_reference`.
        reference_scores: OOD scores of reference inputs the score threshold was not fitted on (validation
            texts), for ``ood_score_ks``; None: that metric is not tracked.
        components: principal axes kept (default 4, at most ``min(N - 1, D)``).
        bins: quantile bins per axis (default 5).

    Example:
        >>> mon = EmbeddingMonitor(MonitorConfig(window=1000, min_samples=200), val_emb, val_scores)
        >>> mon.observe(batch_emb, ood=flags, latency_ms=4.1, scores=batch_scores)
        >>> mon.status()["metrics"]["embedding_psi"]["value"]
    """

    def __init__(self, config: MonitorConfig | None = None, reference: torch.Tensor | None = None,
                 reference_scores: torch.Tensor | None = None, components: int = 4, bins: int = 5,
                 **options: Any) -> None:
        super().__init__(config, **options)
        if components < 1 or bins < 2:
            raise ConfigError(f"embedding monitor: components {components} must be >= 1 and bins {bins} >= 2")
        self.components, self.bins = components, bins
        w = self.config.window
        self._proj: collections.deque[list[float]] = collections.deque(maxlen=w)
        self._score: collections.deque[float] = collections.deque(maxlen=w)
        self.mean: torch.Tensor | None = None
        self.axes: torch.Tensor | None = None  # (D, k) principal axes of the reference
        self.edges: torch.Tensor | None = None  # (k, bins - 1) quantile edges per axis
        self.ref_hist: torch.Tensor | None = None  # (k, bins) reference counts per axis
        self.ref_scores: torch.Tensor | None = None
        if reference is not None:
            self.set_embedding_reference(reference, reference_scores)

    def set_embedding_reference(self, embeddings: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Reference principal axes, their quantile bins, and (optionally) the reference OOD scores."""
        if embeddings.dim() != 2 or len(embeddings) < 2 * self.bins:
            raise DataError(f"the embedding monitor's reference must have shape (N, dim) with N >= {2 * self.bins}, "
                            f"got {tuple(embeddings.shape)}; give more reference texts")
        if not bool(torch.isfinite(embeddings).all()):
            raise DataError("the embedding monitor's reference holds non-finite values")
        emb = embeddings.detach().double()
        mean = emb.mean(0)
        k = min(self.components, len(emb) - 1, emb.shape[1])
        axes = torch.linalg.svd(emb - mean, full_matrices=False).Vh[:k].T  # (D, k)
        proj = (emb - mean) @ axes
        qs = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[1:-1]
        edges = torch.quantile(proj, qs, dim=0).T.contiguous()  # (k, bins - 1)
        self.mean, self.axes, self.edges = mean, axes, edges
        self.ref_hist = self._histograms(proj)
        self.ref_scores = None if scores is None else scores.detach().double().flatten().sort().values

    def _histograms(self, proj: torch.Tensor) -> torch.Tensor:
        assert self.edges is not None
        return torch.stack([torch.bincount(torch.bucketize(proj[:, j].contiguous(), self.edges[j]),
                                           minlength=self.bins) for j in range(proj.shape[1])]).double()

    def observe(self, probs: torch.Tensor, ood: torch.Tensor | None = None, latency_ms: float | None = None,
                ids: list[Any] | None = None, scores: torch.Tensor | None = None) -> None:
        """Record one call: embeddings ``(N, D)`` (in ``probs``'s place), OOD flags ``(N,)``, its
        latency, and the OOD scores ``(N,)``. ``ids`` are counted, never matched: an embedder has no labels."""
        if self.mean is None or self.axes is None:
            raise NotFittedError("the embedding monitor has no reference; pass reference embeddings first")
        emb = probs
        if not torch.is_tensor(emb) or emb.dim() != 2 or emb.shape[1] != len(self.mean):
            got = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
            raise DataError(f"embedding monitor: embeddings must have shape (N, {len(self.mean)}), got {got}")
        n = len(emb)
        for name, t in (("OOD flags", ood), ("scores", scores)):
            if t is not None and tuple(t.shape) != (n,):
                raise DataError(f"embedding monitor: {name} must have shape ({n},), got {tuple(t.shape)}")
        if ids is not None and len(ids) != n:
            raise DataError(f"{len(ids)} ids for {n} embeddings; give one id per row")
        proj = ((emb.detach().double() - self.mean) @ self.axes).tolist()
        with self._lock:
            self._proj.extend(proj)
            if scores is not None:
                self._score.extend(scores.detach().double().tolist())
            self._count_call(n, ood, latency_ms)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._proj.clear()
            self._score.clear()

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Each metric's value, sample count, thresholds and state."""
        c = self.config
        if self.ref_hist is None:
            raise NotFittedError("the embedding monitor has no reference; pass reference embeddings first")
        with self._lock:
            proj = torch.tensor(list(self._proj), dtype=torch.float64)
            scores = torch.tensor(list(self._score), dtype=torch.float64)
            ood = list(self._ood)
            lat = sorted(self._lat)
        n = len(proj)
        rows: dict[str, Row] = {}
        rows["ood_rate"] = (sum(ood) / len(ood) if ood else None, len(ood), c.ood_rate_warn, c.ood_rate_alert)
        value = None
        if n:
            hist = self._histograms(proj)
            value = sum(psi(self.ref_hist[j], hist[j]) for j in range(len(hist))) / len(hist)
        rows["embedding_psi"] = (value, n, c.psi_warn, c.psi_alert)
        if self.ref_scores is not None:
            m = len(scores)
            rows["ood_score_ks"] = (ks_statistic(self.ref_scores, scores) if m else None, m, c.ks_warn, c.ks_alert)
        rows["latency_p95_ms"] = (percentile(lat, 0.95) if lat else None, len(lat), c.latency_warn_ms,
                                  c.latency_alert_ms)
        return _with_states(rows, c.min_samples)


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
