"""``serve``: a compressed model behind its Guard as an HTTP service (FastAPI + uvicorn)."""

from __future__ import annotations

import typer

from slimguard.cli.common import Commands, Session, print_json

commands = Commands()
register = commands.register  # the CLI calls register(app)


@commands.add()
def serve(
    s: Session,
    artifact: str = typer.Argument(..., help="The .slim artifact to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0: a free one, printed once listening)."),
    workers: int = typer.Option(1, help="Server processes; each loads its own model (more cores)."),
    data: str | None = typer.Option(None, help="Data set the guard is fitted on (default: the model's own)."),
    detector: str = typer.Option("energy", help="OOD detector (msp, max-logit, energy, odin, mahalanobis, knn, "
                                               "none; text classifiers: msp, max-logit, energy; embedders use "
                                               "the cosine distance to training texts unless none)."),
    tpr: float = typer.Option(0.95, help="In-distribution acceptance rate of the OOD threshold."),
    reference: str | None = typer.Option(
        None, help="The original model (zoo:NAME or .slim) for the cascade: it answers the items the "
                   "compressed model is unsure of."),
    cascade_tolerance: float = typer.Option(
        0.5, help="Accuracy points the cascade may lose to the reference on validation data."),
    max_batch: int = typer.Option(64, help="Largest micro-batch, in items."),
    max_wait_ms: float = typer.Option(0.0, help="How long a micro-batch waits for more items (0: it leaves as "
                                                "soon as the model is free, with everything queued meanwhile)."),
    torch_threads: int = typer.Option(0, help="torch threads per server process (0: automatic: every core for "
                                              "a model that costs 2 ms or more per item at warm-up, else "
                                              "leaving each worker's event loop a core)."),
    max_items: int = typer.Option(256, help="Most items (examples or texts) in one request (more: 413)."),
    max_text_chars: int = typer.Option(10_000, help="Longest text in characters, for text models (more: 413)."),
    max_tokens: int = typer.Option(256, help="Most tokens per text, for text models, capped at the model's "
                                             "position limit (more: 422; texts are never truncated)."),
    max_body_bytes: int = typer.Option(8 * 1024**2, help="Largest request body in bytes (more: 413)."),
    max_json_depth: int = typer.Option(16, help="Deepest JSON nesting accepted (deeper: 400)."),
    timeout_s: float = typer.Option(10.0, help="Per-request deadline in seconds (later: 504)."),
    max_concurrency: int = typer.Option(64, help="Requests in flight at once (more: 429 with Retry-After)."),
    scrub_interval_s: float = typer.Option(30.0, help="Seconds between weight checksum scrubs (0: on demand only)."),
    drain_s: float = typer.Option(0.0, help="After SIGTERM, seconds to keep answering while /readyz says 503."),
    api_key_env: str | None = typer.Option(
        None, metavar="VAR", help="Environment variable holding the API key clients send as "
                                  "'Authorization: Bearer KEY' (health, readiness and metrics need none)."),
) -> None:
    """Serve a .slim artifact over HTTP behind its Guard: contract, OOD flags, drift monitor, checksum
    scrubs, micro-batching and limits. Prints 'serving on URL' once it listens; SIGTERM drains and exits 0."""
    from slimguard.core.errors import require
    from slimguard.serve import ServeConfig, load_served, run
    from slimguard.serve.auth import ApiKey

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    config = ServeConfig(
        artifact=artifact, host=host, port=port, workers=workers, data=data, detector=detector, tpr=tpr,
        reference=reference, cascade_tolerance=cascade_tolerance, max_batch=max_batch, max_wait_ms=max_wait_ms,
        torch_threads=torch_threads, max_items=max_items, max_text_chars=max_text_chars, max_tokens=max_tokens,
        max_body_bytes=max_body_bytes, max_json_depth=max_json_depth, timeout_s=timeout_s,
        max_concurrency=max_concurrency, scrub_interval_s=scrub_interval_s, drain_s=drain_s,
        api_key_env=api_key_env, require_signature=s.require_signature, key_env=s.key_env,
        trust_code=str(s.trust_code) if s.trust_code is not None else None)
    ApiKey(api_key_env)  # an unset key variable is refused before the model loads
    loaded = load_served(config) if workers == 1 else None

    def announce(url: str) -> None:
        if s.json_out:
            print_json({"url": url, "model_version": loaded.version if loaded is not None else None,
                        "workers": workers})
        else:
            typer.echo(f"serving on {url}")

    run(config, loaded, announce=announce)
