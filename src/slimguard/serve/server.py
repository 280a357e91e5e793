"""Running the service under uvicorn: one process, or ``workers`` processes sharing one socket.

The socket is bound before the model loads in worker processes, and the line
``serving on http://HOST:PORT`` is printed on stdout once it listens (``--port 0`` picks a free port,
which that line names). One process: the model is loaded, warmed up and its checksums verified before
the socket opens, so the service is ready when it first answers. SIGTERM drains and exits 0.

``--workers N`` (N > 1) starts N uvicorn worker processes (spawned; each loads its own model, batcher
and Guard from the config handed over in ``$SLIMGUARD_SERVE_CONFIG``). ``/metrics`` reports the whole
service whichever worker answers (prometheus-client's multiprocess mode over a directory made for this
service and removed when it stops; see :mod:`slimguard.serve.metrics`). Each worker keeps its own
monitor and label ids: a ``/v1/labels`` or ``/v1/status`` call reaches whichever worker accepts it, and
``/v1/status`` says which (``worker``: its pid, ``scope: worker``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

from slimguard.serve.config import SERVE_CONFIG_ENV, ServeConfig
from slimguard.serve.loaded import LoadedModel
from slimguard.serve.metrics import MULTIPROC_ENV

log = logging.getLogger("slimguard.serve")


def _logging() -> None:
    """JSON access lines and service messages to stderr, one per line."""
    logger = logging.getLogger("slimguard.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _not_cancelled(record: logging.LogRecord) -> bool:
    """Keep a log record unless it reports a task cancelled by a forced stop: the cancelled lifespan, logged
    as an error with the exception attached or with its traceback as the message (Starlette's "shutdown
    failed")."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, asyncio.CancelledError) or record.getMessage().rstrip().endswith("CancelledError"))


def _uvicorn_server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but a handled SIGTERM ends the process with status 0 (uvicorn re-raises the
        signal after its graceful shutdown, which would end it with -15). A second signal while draining
        stops at once, says so in one line, and leaves no traceback of the tasks it cancels."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                if not self.force_exit:
                    print("second signal: stopping now; requests still in flight are dropped", file=sys.stderr,
                          flush=True)
                    logging.getLogger("uvicorn.error").addFilter(_not_cancelled)
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer


def _set_threads(config: ServeConfig) -> None:
    """torch's intra-op threads for this server process. On a busy machine more threads than free cores
    cost far more than they give: a parallel region waits for its slowest thread, and a thread that lost
    its core stalls it (a batch of 32 digits through LeNet-5 ran 7x slower with 2 threads than with 1 on
    2 loaded cores)."""
    import torch

    torch.set_num_threads(config.threads())


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (``IPPROTO_TCP``, not 0): asyncio turns Nagle's
    algorithm off (``TCP_NODELAY``) only on connections whose socket says TCP, and with Nagle on, the body
    of each response waits for the client's delayed ACK of its headers (about 40 ms per request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from slimguard.core.errors import ConfigError

        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
                          "pick a free port or --port 0") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, config: ServeConfig, **extra: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, access_log=False, log_level="warning",
                          timeout_graceful_shutdown=int(max(config.timeout_s * 2, 5)), lifespan="on",
                          server_header=False, **extra)


def run(config: ServeConfig, loaded: LoadedModel | None = None,
        announce: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; ``loaded`` (already checked) is served in a single process.
    ``announce(url)`` is called once the socket listens (default: print ``serving on URL``).

    Raises:
        UserError: the artifact is refused or the port cannot be bound (before anything listens).
    """
    from slimguard.serve.app import create_app
    from slimguard.serve.loaded import load_served
    from slimguard.serve.service import Service

    _logging()
    if config.workers > 1:
        _run_workers(config, announce or _print_url)
        return
    _set_threads(config)
    service = Service(config)
    service.start(loaded if loaded is not None else load_served(config))
    sock = bind(config.host, config.port)
    (announce or _print_url)(_url(sock))
    server = _uvicorn_server_class()(_uvicorn_config(create_app(service), config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.stop()
    log.info("stopped")


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _print_url(url: str) -> None:
    sys.stdout.write(f"serving on {url}\n")
    sys.stdout.flush()


def _run_workers(config: ServeConfig, announce: Callable[[str], None]) -> None:
    from uvicorn.supervisors import Multiprocess

    from slimguard.serve.loaded import load_served

    load_served(config).close()  # refuse a bad artifact here, once, with one line (exit 2)
    os.environ[SERVE_CONFIG_ENV] = config.to_json()
    uconfig = _uvicorn_config("slimguard.serve.server:app_from_env", config, factory=True, workers=config.workers)
    sock = bind(config.host, config.port)
    metrics_dir = tempfile.mkdtemp(prefix="slimguard-metrics-")  # fresh and empty: this service's only
    previous_dir = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # the spawned workers inherit it
    previous = signal.getsignal(signal.SIGTERM)
    try:
        announce(_url(sock))
        Multiprocess(uconfig, sockets=[sock]).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous_dir is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous_dir


def app_from_env() -> Any:
    """The app of one worker process of ``--workers``: its config from ``$SLIMGUARD_SERVE_CONFIG``; the
    model loads in the lifespan, before the worker accepts requests."""
    from slimguard.serve.app import create_app
    from slimguard.serve.service import Service

    _logging()
    config = ServeConfig.from_json(os.environ.get(SERVE_CONFIG_ENV, "{}"))
    _set_threads(config)
    service = Service(config)
    return create_app(service, on_startup=service.start)
