"""``POST /v1/predict`` goes straight to its endpoint, past FastAPI's router and middleware (the event loop's
cost per request sets the service's throughput under load), with the same answers: predictions, problem
documents counted as rejects, and a 500 problem without internals for an unexpected error. In process,
through httpx's ASGI transport (no socket)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tests.serve.conftest import metric


@pytest.fixture
def service(artifacts):
    from slimguard.serve import ServeConfig
    from slimguard.serve.service import Service

    svc = Service(ServeConfig(artifact=str(artifacts["small"]), scrub_interval_s=0)).start()
    yield svc
    svc.stop()


def _call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await asyncio.wait_for(client.request(method, path, **kwargs), 30)

    return asyncio.run(go())


def test_predict_is_answered_without_fastapis_route(service, digits_json, digits):
    from slimguard.serve.app import create_app

    app = create_app(service)
    inner = app.app  # the FastAPI app under the access log
    inner.router.routes = [r for r in inner.router.routes if getattr(r, "path", "") != "/v1/predict"]
    r = _call(app, "POST", "/v1/predict", json=digits_json["id"])
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == digits.test.y[:4].tolist()
    assert _call(app, "GET", "/v1/predict").status_code == 404  # other methods still go through FastAPI
    text = service.metrics.render()[0].decode()
    assert metric(text, 'slimguard_requests_total{endpoint="/v1/predict",status="200"}') == 1


def test_problems_and_errors_on_the_fast_path(service, digits_json, monkeypatch):
    from slimguard.serve.app import create_app

    app = create_app(service)
    r = _call(app, "POST", "/v1/predict", json={"inputs": [[1.0, 2.0]]})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["rule"] == "shape"
    text = service.metrics.render()[0].decode()
    assert metric(text, 'slimguard_rejects_total{reason="contract"}') + metric(
        text, 'slimguard_rejects_total{reason="schema"}') == 1

    def boom(_x):
        raise RuntimeError("/secret/path/model.slim exploded")

    monkeypatch.setattr(service.batcher, "submit", boom)
    r = _call(app, "POST", "/v1/predict", json=digits_json["id"])
    assert r.status_code == 500 and r.json()["title"] == "Internal error"
    assert "secret" not in r.text and "Traceback" not in r.text
