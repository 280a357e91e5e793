"""``slimguard serve`` end to end over HTTP: predictions with guard verdicts, every kind of bad input as a
problem document (never a 5xx, never a path or a trace), auth, limits, metrics, scrubs and reload."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from tests.serve.conftest import API_KEY, KEY_ENV, metric, serving, wait_until

ARGS = ["--api-key-env", KEY_ENV, "--reference", "zoo:digits-mlp", "--max-items", "32",
        "--max-body-bytes", "65536", "--max-json-depth", "8", "--scrub-interval-s", "0.2", "--max-wait-ms", "2"]


@pytest.fixture(scope="module")
def server(artifacts):
    with serving(artifacts["small"], *ARGS) as s:
        yield s


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for text in (r.text,):  # no stack traces, no file paths
        assert "Traceback" not in text and "/tmp" not in text and ".py" not in text and "slim.slim" not in text
    return body


def test_predict_answers_each_item_with_a_guard_verdict(client, digits, digits_json):
    r = client.post("/v1/predict", json=digits_json["id"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["predictions"] == digits.test.y[:4].tolist()  # digits-mlp gets these four right
    assert len(out["items"]) == 4 and len({it["id"] for it in out["items"]}) == 4
    for it in out["items"]:
        assert abs(sum(it["scores"]) - 1) < 1e-4 and it["confidence"] == max(it["scores"])
        assert it["guard"]["contract_ok"] is True and isinstance(it["guard"]["ood"], bool)
        assert isinstance(it["guard"]["ood_score"], float) and isinstance(it["guard"]["fallback"], bool)


def test_far_ood_inputs_are_flagged(client, digits, digits_json):
    # energy flags 92% of 200 far-OOD images on this model, and 3% of test digits
    r = client.post("/v1/predict", json=digits_json["ood"])
    assert r.status_code == 200, r.text
    assert sum(it["guard"]["ood"] for it in r.json()["items"]) >= 24  # >= 75% of 32
    r = client.post("/v1/predict", json={"inputs": digits.test.x[:32].tolist()})
    assert sum(it["guard"]["ood"] for it in r.json()["items"]) <= 4  # <= 12.5% of 32


def test_binary_bodies_npy_and_safetensors(client, digits):
    from safetensors.torch import save as st_save

    x = digits.test.x[:3]
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    r = client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200 and r.json()["predictions"] == digits.test.y[:3].tolist(), r.text
    r = client.post("/v1/predict", content=st_save({"inputs": x.contiguous()}),
                    headers={"content-type": "application/x-safetensors"})
    assert r.status_code == 200 and r.json()["predictions"] == digits.test.y[:3].tolist(), r.text
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array is never unpickled
    _problem(client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"}), 422)


def _image(value: float = 0.5) -> list:
    return [[[value] * 8 for _ in range(8)]]


# body -> (status, field, rule): every kind of bad input gets a problem naming the field and the rule
BAD_BODIES = {
    "range": ({"inputs": [_image(1e9)]}, 422, "x", "range"),
    "nan_like_overflow": ({"inputs": [_image(1e300)]}, 422, "x", "nonfinite"),
    "shape": ({"inputs": [[1.0, 2.0, 3.0]]}, 422, "inputs", "shape"),
    "wrong_example_shape": ({"inputs": [[[[0.5] * 7] * 8]]}, 422, "shape", "shape"),
    "ragged": ({"inputs": [_image(), [[[0.5] * 8] * 7]]}, 422, "inputs", "shape"),
    "strings": ({"inputs": [[[["a"] * 8] * 8]]}, 422, "inputs", "type"),
    "bools": ({"inputs": [[[[True] * 8] * 8]]}, 422, "inputs", "type"),
    "empty": ({"inputs": []}, 422, "batch", "empty"),
    "not_list": ({"inputs": 5}, 422, "inputs", "type"),
    "missing": ({"data": []}, 422, "data", "unknown_key"),
    "no_inputs": ({}, 422, "inputs", "required"),
    "texts": ({"texts": ["hello"]}, 422, "texts", "unsupported"),
    "array_body": ([1, 2], 422, "body", "type"),
    "too_many_items": ({"inputs": [_image()] * 33}, 413, "inputs", "max_items"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
def test_bad_bodies_get_a_problem_naming_field_and_rule(client, case):
    body, status, field, rule = BAD_BODIES[case]
    problem = _problem(client.post("/v1/predict", json=body), status)
    first = problem["errors"][0]
    assert (first["field"], first["rule"]) == (field, rule), problem


def test_texts_sent_to_a_tensor_model_name_what_it_takes(client):
    problem = _problem(client.post("/v1/predict", json={"texts": ["a digit"]}), 422)
    assert problem["errors"][0]["field"] == "texts" and "(N, 1, 8, 8)" in problem["detail"]


@pytest.mark.parametrize(("content", "status", "rule"), [
    (b"{not json", 400, "json"),
    (b"\xff\xfe\x00", 400, "json"),
    (b"[" * 9 + b"]" * 9, 400, "max_json_depth"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "max_body_bytes"),
    (b"[" * 5000 + b"]" * 5000, 400, "max_json_depth"),
])
def test_malformed_deep_and_large_bodies(client, content, status, rule):
    problem = _problem(client.post("/v1/predict", content=content, headers={"content-type": "application/json"}),
                       status)
    assert problem["errors"][0]["rule"] == rule


def test_body_size_is_enforced_while_streaming_without_content_length(client):
    def chunks():
        for _ in range(20):
            yield b" " * 8192

    problem = _problem(client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"}),
                       413)
    assert problem["errors"][0]["rule"] == "max_body_bytes"


def test_unsupported_media_type(client):
    _problem(client.post("/v1/predict", content=b"x=1", headers={"content-type": "text/plain"}), 415)


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer"])
def test_api_key_is_required_on_model_routes(server, header, digits_json):
    with server.client(key=None) as c:
        headers = {"Authorization": header} if header else {}
        for method, path in (("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/v1/status"),
                             ("POST", "/v1/admin/scrub"), ("POST", "/v1/admin/reload")):
            r = c.request(method, path, json=digits_json["id"] if method == "POST" else None, headers=headers)
            _problem(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"


def test_probes_and_metrics_need_no_key(server):
    with server.client(key=None) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def test_model_summary_has_no_weights_and_no_paths(client, artifacts):
    r = client.get("/v1/model")
    assert r.status_code == 200
    s = r.json()
    assert s["input_shape"] == [1, 8, 8] and s["source"] == {"kind": "zoo", "name": "digits-mlp",
                                                            "factory": "digits_mlp"}
    assert s["history"] == ["prune"] and 0 < s["cascade"]["threshold"] < 1
    assert s["guard"]["checksummed_tensors"] == s["tensors"] > 0
    assert str(artifacts["small"].parent) not in r.text and len(r.content) < 8192  # a summary, not weights


def test_openapi_describes_the_routes(server):
    with server.client(key=None) as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/predict", "/v1/model", "/v1/status", "/v1/labels", "/healthz", "/readyz", "/metrics",
              "/v1/admin/reload", "/v1/admin/scrub"):
        assert p in paths, p
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-npy", "application/x-safetensors"} <= set(body)


def test_metrics_count_requests_rejects_items_and_periodic_scrubs(server, client, digits_json):
    assert client.post("/v1/predict", json=digits_json["id"]).status_code == 200
    assert client.post("/v1/predict", json={"inputs": [_image(1e9)]}).status_code == 422
    with server.client(key=None) as anon:
        assert wait_until(lambda: metric(anon.get("/metrics").text, 'slimguard_scrubs_total{trigger="periodic"}') >= 2)
        text = anon.get("/metrics").text
    assert metric(text, 'slimguard_requests_total{endpoint="/v1/predict",status="200"}') >= 1
    assert metric(text, 'slimguard_rejects_total{reason="contract"}') >= 1
    assert metric(text, "slimguard_items_total") >= 4 and metric(text, "slimguard_batch_items_count") >= 1
    assert metric(text, "slimguard_ready") == 1 and metric(text, "slimguard_monitor_state") in (0, 1, 2)
    for name in ("slimguard_drift_psi", "slimguard_drift_ks", "slimguard_ood_rate",
                 'slimguard_fault_events_total{kind="detected"}', "slimguard_model_info{"):
        assert name in text, name


def test_on_demand_scrub_reports_intact_weights(client):
    r = client.post("/v1/admin/scrub")
    assert r.status_code == 200, r.text
    assert r.json() == {"trigger": "on_demand", "checked": 8, "damaged": [], "repaired": []}


def test_labels_feed_the_error_rate(client, digits, digits_json):
    items = client.post("/v1/predict", json=digits_json["id"]).json()["items"]
    r = client.post("/v1/labels", json={"ids": [it["id"] for it in items], "labels": digits.test.y[:4].tolist()})
    assert r.status_code == 200 and r.json() == {"matched": 4}
    st = client.get("/v1/status").json()
    assert st["counters"]["labels"] >= 4 and st["metrics"]["error_rate"]["samples"] >= 4
    _problem(client.post("/v1/labels", json={"ids": ["a"], "labels": [1, 2]}), 422)


def test_status_names_the_process_that_answered(server, client):
    worker = client.get("/v1/status").json()["worker"]
    threads = worker.pop("torch_threads")
    assert worker == {"pid": server.proc.pid, "workers": 1, "scope": "service"}
    assert isinstance(threads, int) and threads >= 1


def test_reload_swaps_atomically_and_rolls_back_a_broken_artifact(client, artifacts, digits_json):
    before = client.get("/v1/model").json()["version"]
    problem = _problem(client.post("/v1/admin/reload", json={"artifact": str(artifacts["broken"])}), 409)
    assert problem["errors"][0]["rule"] == "checks" and "broken.slim" in problem["detail"]
    assert client.get("/v1/model").json()["version"] == before  # rolled back: the old model still serves
    assert client.post("/v1/predict", json=digits_json["id"]).status_code == 200
    r = client.post("/v1/admin/reload", json={"artifact": str(artifacts["other"])})
    assert r.status_code == 200, r.text
    assert r.json()["previous"] == before and r.json()["version"] != before
    assert client.post("/v1/predict", json=digits_json["id"]).json()["model_version"] == r.json()["version"]
    back = client.post("/v1/admin/reload", json={"artifact": str(artifacts["small"])})
    assert back.status_code == 200 and back.json()["version"] == before
    _problem(client.post("/v1/admin/reload", json={"artifact": 5}), 422)


def test_unknown_routes_and_methods_are_problems(client):
    _problem(client.get("/nope"), 404)
    _problem(client.get("/v1/predict"), 405)


def test_served_answers_match_the_model_in_process(client, artifacts, digits):
    """The service answers what the artifact's model answers in process (the cascade only replaces rows
    the small model is unsure of, so compare against the cascade's own rule)."""
    from slimguard.serve import ServeConfig, load_served

    loaded = load_served(ServeConfig(artifact=str(artifacts["small"]), reference="zoo:digits-mlp"))
    try:
        want = loaded.guard(digits.test.x[:8]).pred.tolist()
    finally:
        loaded.close()
    got = client.post("/v1/predict", json={"inputs": digits.test.x[:8].tolist()}).json()["predictions"]
    assert got == want
    assert torch.equal(torch.tensor(got), torch.tensor(want))
    assert json.dumps(got)
