"""Running the service under uvicorn: one process, or ``workers`` processes sharing one socket.

The socket is bound before the model loads in worker processes, and the line
``serving on http://HOST:PORT`` is printed on stdout once it listens (``--port 0`` picks a free port,
which that line names). One process: the model is loaded, warmed up and its checksums verified before
the socket opens, so the service is ready when it first answers. SIGTERM drains and exits 0.

``--workers N`` (N > 1) starts N uvicorn worker processes (spawned; each loads its own model, batcher
and Guard from the config handed over in ``$SLIMGUARD_SERVE_CONFIG``). Each worker keeps its own
metrics, monitor and label ids: a scrape or a ``/v1/labels`` call reaches whichever worker accepts it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from slimguard.serve.config import SERVE_CONFIG_ENV, ServeConfig
from slimguard.serve.loaded import LoadedModel

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


def _uvicorn_server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but a handled SIGTERM ends the process with status 0 (uvicorn re-raises the
        signal after its graceful shutdown, which would end it with -15)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    announce(_url(sock))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        Multiprocess(uconfig, sockets=[sock]).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def app_from_env() -> Any:
    """The app of one worker process of ``--workers``: its config from ``$SLIMGUARD_SERVE_CONFIG``; the
    model loads in the lifespan, before the worker accepts requests."""
    from slimguard.serve.app import create_app
    from slimguard.serve.service import Service

    _logging()
    config = ServeConfig.from_json(os.environ.get(SERVE_CONFIG_ENV, "{}"))
    service = Service(config)
    return create_app(service, on_startup=service.start)
