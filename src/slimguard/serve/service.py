"""The service's state and lifecycle: the model served, its batcher, periodic checksum scrubs, atomic
reloads with rollback, and draining.

States: *loading* (``/healthz`` 200, ``/readyz`` 503) -> *ready* (model loaded, warm, checksums
verified) -> *draining* after SIGTERM (``/readyz`` 503; requests in flight finish) -> exit 0.

Example:
    >>> svc = Service(ServeConfig(artifact="m.slim"))
    >>> svc.start(load_served(svc.config))        # or svc.start() to load here
    >>> svc.scrub("on_demand"); svc.reload("new.slim"); svc.stop()
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from slimguard.core.errors import UserError
from slimguard.serve.auth import ApiKey
from slimguard.serve.batcher import MicroBatcher
from slimguard.serve.config import ServeConfig
from slimguard.serve.limits import Problem
from slimguard.serve.loaded import LoadedModel, load_served, redact_paths
from slimguard.serve.metrics import ServeMetrics

log = logging.getLogger("slimguard.serve")


class Service:
    """Everything one server process holds.

    Args:
        config: the settings.

    Raises:
        ConfigError: ``config.api_key_env`` names an unset variable.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.api_key = ApiKey(config.api_key_env)
        self.loaded: LoadedModel | None = None
        self.artifact = config.artifact  # the path of the model now served (a reload may change it)
        self.metrics = ServeMetrics(self._status)
        self.batcher = MicroBatcher(self._current, config.max_batch, config.max_wait_ms, self.metrics)
        self.draining = False
        self.inflight = 0
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self._scrubber: threading.Thread | None = None
        self.torch_threads: int | None = None  # set when the model is first installed (see _set_threads)

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.loaded is not None and not self.draining

    def _current(self) -> LoadedModel:
        assert self.loaded is not None  # the batcher runs only after start()
        return self.loaded

    def _status(self) -> dict[str, Any] | None:
        return self.loaded.guard.status() if self.loaded is not None else None

    def status(self) -> dict[str, Any]:
        """The monitor's state, reasons and metrics, plus the service's own state, and who answered:
        ``worker`` names this process (``pid``), the service's ``workers``, and the ``scope`` of the body:
        ``service`` with one process; ``worker`` with several, since each worker keeps its own monitor and
        this body holds only the one that answered (``/metrics`` reports the worst state over all workers);
        ``torch_threads``: the intra-op threads its model runs with."""
        st = self._status() or {"state": "ok", "reasons": [], "metrics": {}, "counters": {}}
        workers = self.config.workers
        return {**st, "ready": self.ready, "draining": self.draining, "inflight": self.inflight,
                "model_version": self.loaded.version if self.loaded is not None else None,
                "worker": {"pid": os.getpid(), "workers": workers, "scope": "worker" if workers > 1 else "service",
                           "torch_threads": self.torch_threads}}

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self, loaded: LoadedModel | None = None) -> Service:
        """Serve ``loaded`` (or load ``config.artifact`` now), start the batcher and the scrubber."""
        loaded = loaded if loaded is not None else load_served(self.config)
        self._install(loaded)
        self._set_threads(loaded)
        self.batcher.start()
        if self.config.scrub_interval_s > 0:
            self._scrubber = threading.Thread(target=self._scrub_loop, name="slimguard-scrubber", daemon=True)
            self._scrubber.start()
        return self

    def _set_threads(self, loaded: LoadedModel) -> None:
        """torch's intra-op threads for the batcher, from the model's cost at warm-up (see
        :meth:`ServeConfig.threads`); set before the batcher thread starts, and kept across reloads."""
        import torch

        self.torch_threads = self.config.threads(loaded.ms_per_item)
        torch.set_num_threads(self.torch_threads)
        cost = f"{loaded.ms_per_item:.2f} ms per item at warm-up" if loaded.ms_per_item is not None else "not timed"
        log.info("torch threads: %d (%s)", self.torch_threads,
                 "--torch-threads" if self.config.torch_threads else f"automatic; the model cost {cost}")

    def _install(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        src = loaded.summary()["source"]
        self.metrics.set_model(loaded.version, f"{src.get('kind', '?')}:{src.get('name', src.get('factory', '?'))}")
        self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Report not ready from now on (requests still get answered until the server stops)."""
        self.draining = True
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)

    def stop(self) -> None:
        """Stop scrubbing, let the batcher finish what is queued, detach the guard."""
        self._stop.set()
        self.batcher.stop()
        if self.loaded is not None:
            self.loaded.close()
        self.metrics.close()

    # ---- checksum scrubs -----------------------------------------------------------------------------
    def _scrub_loop(self) -> None:
        while not self._stop.wait(self.config.scrub_interval_s):
            try:
                self.scrub("periodic")
            except UserError as exc:
                log.error("periodic checksum scrub failed: %s", exc)

    def scrub(self, trigger: str, timeout: float = 60.0) -> dict[str, Any]:
        """Verify every weight checksum on the batcher's thread and repair damaged tensors from the
        artifact; each damaged and repaired tensor is counted. Raises ArtifactError when one cannot be
        repaired (counted as ``failed``)."""
        self.metrics.scrubs.labels(trigger=trigger).inc()
        try:
            result: dict[str, Any] = self.batcher.call(lambda: self._current().scrub()).result(timeout)
        except UserError:
            self.metrics.faults.labels(kind="failed").inc()
            raise
        self.metrics.faults.labels(kind="detected").inc(len(result["damaged"]))
        self.metrics.faults.labels(kind="repaired").inc(len(result["repaired"]))
        if result["damaged"]:
            log.warning("checksum scrub (%s) repaired %d tensor(s): %s", trigger, len(result["repaired"]),
                        ", ".join(result["repaired"][:5]))
        return {"trigger": trigger, **result}

    # ---- reload ----------------------------------------------------------------------------------------
    def reload(self, artifact: str | None = None) -> dict[str, Any]:
        """Load ``artifact`` (default: the path now served, again) off to the side, run every check, and
        swap it in between two batches. On any failure the running model keeps serving (rollback) and a
        409 Problem says why (file paths reduced to names)."""
        path = artifact or self.artifact
        if not self._reload_lock.acquire(blocking=False):
            raise Problem(409, "Reload in progress", "another reload is running; retry when it ends", "reload_busy")
        try:
            previous = self.loaded.version if self.loaded is not None else None
            try:
                new = load_served(self.config, path)
            except UserError as exc:
                self.metrics.reloads.labels(result="rolled_back").inc()
                detail = redact_paths(str(exc), path, self.artifact, self.config.artifact, self.config.trust_code)
                raise Problem(409, "Reload failed; still serving the previous model",
                              f"the new artifact failed its checks: {detail}", "reload_failed",
                              [{"field": "artifact", "rule": "checks", "detail": detail}]) from None
            old = self.loaded
            self.batcher.call(lambda: self._install(new)).result(60)
            self.artifact = path
            if old is not None:
                old.close()
            self.metrics.reloads.labels(result="ok").inc()
            return {"version": new.version, "previous": previous}
        finally:
            self._reload_lock.release()
