"""Fuzzing the running service: random JSON documents, near-valid batches, random bytes and content
types, sent to every route of the OpenAPI schema. Property: no response is 500 or above, and every
refusal is a problem document. Bounded: a fixed number of examples, no hypothesis deadline (the machine
is shared), one server for the module."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.serve.conftest import KEY_ENV, serving

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                           st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                           max_leaves=40)
pixel = st.floats(-0.2, 1.2, allow_nan=False)
bad_leaf = st.one_of(st.just(1e308), st.just(-1e308), st.booleans(), st.none(), st.text(max_size=3),
                     st.lists(pixel, max_size=2), st.integers(-(2**70), 2**70))


@st.composite
def near_batches(draw: st.DrawFn) -> list:
    """Batches that are almost right: shapes around (n, 1, 8, 8) (rows may be ragged), in-range pixels,
    and now and then one bad leaf (a huge number, a bool, null, a string, a list)."""
    n = draw(st.integers(0, 3))
    batch = draw(st.lists(st.lists(st.lists(st.lists(pixel, min_size=7, max_size=9), min_size=7, max_size=9),
                                   min_size=1, max_size=2), min_size=n, max_size=n))
    if batch and draw(st.booleans()):
        row = batch[draw(st.integers(0, len(batch) - 1))][0][0]
        row[draw(st.integers(0, len(row) - 1))] = draw(bad_leaf)
    return batch


bodies = st.one_of(json_values, near_batches().map(lambda b: {"inputs": b}),
                   st.dictionaries(st.sampled_from(["inputs", "ids", "labels", "texts", "artifact"]), json_values,
                                   max_size=3))
content_types = st.sampled_from(["application/json", "application/x-npy", "application/x-safetensors",
                                 "text/plain", "application/json; charset=utf-8", ""])


@pytest.fixture(scope="module")
def server(artifacts):
    with serving(artifacts["small"], "--api-key-env", KEY_ENV, "--max-items", "16", "--max-body-bytes",
                 "32768", "--max-wait-ms", "1", "--scrub-interval-s", "0") as s:
        yield s


@pytest.fixture(scope="module")
def routes(server) -> list[tuple[str, str]]:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    found = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    assert ("POST", "/v1/predict") in found and len(found) >= 9
    return [(m, p) for m, p in found if p != "/v1/admin/reload"]  # reload's fuzz would reload files: below


def _check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json"), r.text[:200]
        assert "Traceback" not in r.text and "/tmp" not in r.text


@SETTINGS
@given(body=bodies)
def test_predict_never_fails_on_any_json(server, body):
    with server.client() as c:
        r = c.post("/v1/predict", content=json.dumps(body, allow_nan=False).encode(),
                   headers={"content-type": "application/json"})
    _check(r)
    if r.status_code == 200:  # only well-formed batches of finite in-range pixels get answers
        for item in r.json()["items"]:
            assert all(v is None or math.isfinite(v) for v in item["scores"])


@SETTINGS
@given(data=st.data(), raw=st.binary(max_size=2048), ctype=content_types)
def test_every_route_survives_random_bytes_and_documents(server, routes, data, raw, ctype):
    method, path = data.draw(st.sampled_from(routes))
    use_json = data.draw(st.booleans())
    content = json.dumps(data.draw(bodies), allow_nan=False).encode() if use_json else raw
    with server.client() as c:
        r = c.request(method, path, content=content if method in ("POST", "PUT", "PATCH") else None,
                      headers={"content-type": ctype} if ctype else {})
    _check(r)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(json_values, st.fixed_dictionaries({"artifact": st.text(max_size=20)})))
def test_reload_refuses_junk_without_5xx_and_keeps_serving(server, body):
    with server.client() as c:
        r = c.post("/v1/admin/reload", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        _check(r)
        assert c.get("/readyz").status_code == 200
