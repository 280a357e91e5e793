"""``ServeConfig``: every setting of ``slimguard serve``, checked in one place.

The CLI builds one from its options; the worker processes of ``--workers N`` rebuild it from JSON
(:meth:`ServeConfig.to_json` / :meth:`ServeConfig.from_json`), so a setting is declared once.
"""

from __future__ import annotations

import dataclasses
import json
import os

from slimguard.core.config import Config, check_choice, check_range
from slimguard.core.errors import ConfigError

SERVE_CONFIG_ENV = "SLIMGUARD_SERVE_CONFIG"
"""Environment variable through which ``--workers`` hands the config to each worker process."""
COMPUTE_BOUND_MS = 2.0
"""Forward-pass cost per item (ms) from which a served model, not the service's own work per request (HTTP,
JSON and the guard: about 1.5 ms of CPU on the 2-core machine of ``serve_load``), bounds the throughput."""


@dataclasses.dataclass
class ServeConfig(Config):
    """Args:
    artifact: the ``.slim`` file to serve.
    host / port: where to listen (default ``127.0.0.1:8000``).
    workers: server processes (default 1); each loads its own copy of the model.
    data: data set the guard is fitted on (contract from ``train``, detector and monitor from ``val``);
        default: the one the model records.
    detector: OOD detector name (default ``energy``; ``none`` turns OOD scoring off).
    tpr: in-distribution acceptance rate the detector threshold is calibrated for (default 0.95).
    reference: the original model (``zoo:NAME`` or a ``.slim``) for the cascade; None = no cascade.
    cascade_tolerance: accuracy points the cascade may lose against the reference on validation data
        when its confidence threshold is chosen (default 0.5).
    max_batch: largest micro-batch, in items (default 64).
    max_wait_ms: how long the batcher waits for more items once one arrived (default 0: a batch leaves as
        soon as the model is free, holding every request that queued while the previous batch ran).
    torch_threads: torch's intra-op threads per process (default 0: automatic, see :meth:`threads`).
    max_items: largest number of items (examples or texts) in one request (default 256).
    max_text_chars: longest text, in characters, a text model accepts (default 10000); longer gets 413.
    max_tokens: most tokens per text (default 256, capped at the model's position limit); more gets 422.
        Texts are never truncated.
    max_body_bytes: largest request body (default 8 MiB); larger gets 413.
    max_json_depth: deepest JSON nesting accepted (default 16).
    timeout_s: per-request deadline (default 10); later gets 504.
    max_concurrency: requests in flight at once (default 64); more get 429 with ``Retry-After``.
    scrub_interval_s: seconds between weight checksum scrubs (default 30; 0 = only on demand).
    drain_s: after SIGTERM, seconds the service keeps answering while ``/readyz`` says 503 (so a load
        balancer stops sending), before it stops accepting and drains the requests in flight (default 0).
    api_key_env: environment variable holding the API key; None = no key needed.
    require_signature / key_env / trust_code: the artifact loading policy (as for every command).
    """

    artifact: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    data: str | None = None
    detector: str = "energy"
    tpr: float = 0.95
    reference: str | None = None
    cascade_tolerance: float = 0.5
    max_batch: int = 64
    max_wait_ms: float = 0.0
    torch_threads: int = 0
    max_items: int = 256
    max_text_chars: int = 10_000
    max_tokens: int = 256
    max_body_bytes: int = 8 * 1024**2
    max_json_depth: int = 16
    timeout_s: float = 10.0
    max_concurrency: int = 64
    scrub_interval_s: float = 30.0
    drain_s: float = 0.0
    api_key_env: str | None = None
    require_signature: bool = False
    key_env: str | None = None
    trust_code: str | None = None

    def validate(self) -> None:
        if not self.artifact:
            raise ConfigError("artifact: no .slim file given; pass the artifact to serve")
        check_range("port", self.port, 0, 65535)
        check_range("workers", self.workers, 1, 64)
        check_range("tpr", self.tpr, 0.0, 1.0, low_inclusive=False)
        check_range("cascade_tolerance", self.cascade_tolerance, 0.0, 100.0)
        check_range("max_batch", self.max_batch, 1, 65536)
        check_range("max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        check_range("torch_threads", self.torch_threads, 0, 1024)
        check_range("max_items", self.max_items, 1, 65536)
        check_range("max_text_chars", self.max_text_chars, 1, 10_000_000)
        check_range("max_tokens", self.max_tokens, 1, 1_000_000)
        check_range("max_body_bytes", self.max_body_bytes, 1024, 2**31)
        check_range("max_json_depth", self.max_json_depth, 2, 256)
        check_range("timeout_s", self.timeout_s, 0.0, 3600.0, low_inclusive=False)
        check_range("max_concurrency", self.max_concurrency, 1, 100_000)
        check_range("scrub_interval_s", self.scrub_interval_s, 0.0, 86_400.0)
        check_range("drain_s", self.drain_s, 0.0, 600.0)
        if self.detector != "none":
            from slimguard.guard.ood import detector_names

            check_choice("detector", self.detector, [*detector_names(), "none"])

    def threads(self, ms_per_item: float | None = None) -> int:
        """The torch intra-op threads each server process uses: ``torch_threads``, or automatic.

        Automatic: a model whose forward pass costs at least :data:`COMPUTE_BOUND_MS` per item
        (``ms_per_item``, timed at warm-up) bounds the throughput itself, and gets ``cores // workers``
        threads; a cheaper one leaves each worker's event loop a core, ``(cores - workers) // workers``,
        since HTTP, JSON and the guard bound its throughput (at least 1 either way). Measured with
        ``benchmarks/serve_load.py`` at concurrency 32 on 2 cores: MiniLM (about 8 ms per text) served
        97 req/s with 2 threads and 81 with 1; LeNet-5 digits (0.2 ms per digit) 524 with 2 and 612 with 1.
        """
        if self.torch_threads:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if ms_per_item is not None and ms_per_item >= COMPUTE_BOUND_MS:
            return max(1, cores // self.workers)
        return max(1, (cores - self.workers) // self.workers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        try:
            fields = json.loads(text)
        except ValueError:
            raise ConfigError(f"{SERVE_CONFIG_ENV}: not valid JSON; start the service with slimguard serve") from None
        return cls.from_fields(fields, where="serve")
