"""Service behaviour over time: micro-batching, concurrency and timeout limits, draining on SIGTERM,
refusing artifacts at start-up, scrub repairs, and the cascade threshold chosen on validation data."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
from tests.serve.conftest import metric, serving, wait_until


def _one(digits, i: int = 0) -> dict:
    return {"inputs": digits.test.x[i : i + 1].tolist()}


def test_concurrent_requests_are_micro_batched(artifacts, digits):
    """Four single-item requests within the wait window run as ONE batch of 4 (max_batch closes it)."""
    with serving(artifacts["small"], "--max-wait-ms", "5000", "--max-batch", "4") as server, server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda i: c.post("/v1/predict", json=_one(digits, i)), range(4)))
        assert [r.status_code for r in rs] == [200] * 4
        assert [r.json()["predictions"][0] for r in rs] == digits.test.y[:4].tolist()
        text = c.get("/metrics").text
    assert metric(text, "slimguard_batch_items_count") == 1 and metric(text, "slimguard_batch_items_sum") == 4


def test_a_violating_request_in_a_micro_batch_gets_its_422_and_the_others_their_answers(artifacts, digits):
    """Values are checked over the whole batch at once; the request with an out-of-range row is answered
    422 alone (counted as a contract reject), and the batch runs without it."""
    bad = {"inputs": (digits.test.x[:1] * 0 + 1e9).tolist()}
    with serving(artifacts["small"], "--max-wait-ms", "5000", "--max-batch", "3") as server, server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bodies = [_one(digits, 0), bad, _one(digits, 1)]
            rs = list(pool.map(lambda b: c.post("/v1/predict", json=b), bodies))
        assert [r.status_code for r in rs] == [200, 422, 200]
        assert rs[1].json()["errors"][0]["rule"] == "range"
        assert [rs[0].json()["predictions"][0], rs[2].json()["predictions"][0]] == digits.test.y[:2].tolist()
        text = c.get("/metrics").text
    assert metric(text, "slimguard_batch_items_count") == 1 and metric(text, "slimguard_batch_items_sum") == 2
    assert metric(text, 'slimguard_rejects_total{reason="contract"}') == 1


def test_concurrency_limit_429_and_timeout_504(artifacts, digits):
    """max_concurrency 1 and a batch window longer than the deadline: the first request times out (504),
    a second one sent meanwhile is refused with 429 and Retry-After."""
    with serving(artifacts["small"], "--max-wait-ms", "6000", "--timeout-s", "3", "--max-concurrency", "1",
                 "--max-batch", "64") as server, server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/predict", json=_one(digits))
            assert wait_until(lambda: metric(c.get("/metrics").text, "slimguard_inflight") == 1, timeout=5)
            second = c.post("/v1/predict", json=_one(digits))
            r1 = first.result(10)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["title"] == "Too many requests"
        assert r1.status_code == 504 and r1.json()["title"] == "Timed out"
        text = c.get("/metrics").text
        assert metric(text, 'slimguard_rejects_total{reason="concurrency"}') == 1
        assert metric(text, 'slimguard_rejects_total{reason="timeout"}') == 1
        assert c.get("/healthz").status_code == 200  # the service survives both


def test_sigterm_drains_in_flight_requests_reports_not_ready_and_exits_0(artifacts, digits):
    # the request waits 5 s for a batch; readiness is checked inside the 3 s drain window (load-tolerant margins)
    with serving(artifacts["small"], "--max-wait-ms", "5000", "--drain-s", "3") as server, server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/v1/predict", json=_one(digits))
            assert wait_until(lambda: metric(c.get("/metrics").text, "slimguard_inflight") == 1, timeout=5)
            server.proc.terminate()  # SIGTERM
            assert wait_until(lambda: c.get("/readyz").status_code == 503, timeout=5)
            assert c.get("/readyz").json() == {"status": "draining"}
            r = pending.result(15)
        assert r.status_code == 200 and r.json()["predictions"] == digits.test.y[:1].tolist()
        assert server.proc.wait(30) == 0
    assert any("draining" in line for line in server.stderr)


def test_a_second_sigterm_while_draining_stops_at_once_without_a_traceback(artifacts, digits):
    # one request waits 10 s for its batch, so the first SIGTERM drains for up to 20 s; the second ends it
    with serving(artifacts["small"], "--max-wait-ms", "10000", "--drain-s", "20", "--timeout-s", "60") as server, \
            server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(c.post, "/v1/predict", json=_one(digits))
            assert wait_until(lambda: metric(c.get("/metrics").text, "slimguard_inflight") == 1, timeout=5)
            server.proc.terminate()
            assert wait_until(lambda: c.get("/readyz").status_code == 503, timeout=5)
            server.proc.terminate()
            assert server.proc.wait(15) == 0
    assert any("second signal: stopping now" in line for line in server.stderr)
    assert not any("Traceback" in line or "CancelledError" in line for line in server.stderr), server.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["--require-signature"], "artifact is not signed"),
    (["--key-env", "SG_NOT_SET_ANYWHERE"], "--key-env SG_NOT_SET_ANYWHERE"),
    (["--api-key-env", "SG_NOT_SET_ANYWHERE"], "--api-key-env SG_NOT_SET_ANYWHERE"),
    (["--detector", "crystal-ball"], "detector: 'crystal-ball' is not allowed"),
    (["--max-batch", "0"], "max_batch: 0 is out of range"),
])
def test_refusals_at_start_are_one_line_exit_2(artifacts, options, message, monkeypatch):
    from typer.testing import CliRunner

    from slimguard.cli import build_app

    monkeypatch.delenv("SLIMGUARD_SIGNING_KEY", raising=False)
    r = CliRunner().invoke(build_app(), ["serve", str(artifacts["small"]), *options, "--port", "0"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert "serving on" not in r.output


def test_signed_artifact_is_served_under_require_signature(artifacts, tmp_path, digits):
    from slimguard.artifact import load, save

    signed = save(load(artifacts["small"]), tmp_path / "signed.slim", key="k1")
    env = {"SG_KEYS": "k1"}
    with serving(signed, "--require-signature", "--key-env", "SG_KEYS", env=env) as server, server.client() as c:
        assert c.post("/v1/predict", json=_one(digits)).status_code == 200


def test_scrub_repairs_a_flipped_weight_and_counts_it(artifacts, digits):
    from slimguard.guard.faults import flip_bit_
    from slimguard.serve import ServeConfig, load_served
    from slimguard.serve.service import Service

    svc = Service(ServeConfig(artifact=str(artifacts["small"]), scrub_interval_s=0)).start()
    try:
        want = svc.loaded.small(digits.test.x[:8]).clone()
        flip_bit_(svc.loaded.small.get_parameter("2.weight"), 11, 30)  # exponent bit: a large change
        assert not torch.equal(svc.loaded.small(digits.test.x[:8]), want)
        out = svc.scrub("on_demand")
        assert out["damaged"] == out["repaired"] == ["2.weight"]
        torch.testing.assert_close(svc.loaded.small(digits.test.x[:8]), want, rtol=0, atol=0)  # bit-exact repair
        assert svc.scrub("on_demand")["damaged"] == []
        text = svc.metrics.render()[0].decode()
        assert metric(text, 'slimguard_fault_events_total{kind="detected"}') == 1
        assert metric(text, 'slimguard_fault_events_total{kind="repaired"}') == 1
        assert metric(text, 'slimguard_scrubs_total{trigger="on_demand"}') == 2
    finally:
        svc.stop()
    assert load_served  # imported for the public surface it names


def test_cascade_threshold_is_chosen_on_validation_data(zoo_model, digits):
    import slimguard as sg
    from slimguard.serve import cascade_threshold

    large = zoo_model("digits-mlp")
    small = zoo_model("digits-mlp")
    sg.prune_(small, sg.MagnitudePruningConfig(sparsity=0.8))  # 88.6% val accuracy vs 98.1%
    t, st = cascade_threshold(small, large, digits.val.x, digits.val.y, tolerance_points=0.5)
    assert st["cascade_accuracy"] >= st["large_accuracy"] - 0.5 and st["small_accuracy"] < st["large_accuracy"] - 5
    assert 0 < st["fallback_rate"] < 0.6 and 0 < t < 1
    # the fallback rate is what the threshold implies on validation data
    conf = torch.softmax(small(digits.val.x), -1).amax(-1)
    assert abs(float((conf < t).double().mean()) - st["fallback_rate"]) < 1e-9
    lenient, st2 = cascade_threshold(small, large, digits.val.x, digits.val.y, tolerance_points=100.0)
    assert lenient == 0.0 and st2["fallback_rate"] == 0.0  # any accuracy will do: never fall back
    strict, st3 = cascade_threshold(small, large, digits.val.x, digits.val.y, tolerance_points=0.0)
    assert strict >= t and st3["cascade_accuracy"] >= st3["large_accuracy"]


def test_cascade_sends_unsure_items_to_the_reference(artifacts, digits):
    with serving(artifacts["small"], "--reference", "zoo:digits-mlp", "--cascade-tolerance", "0",
                 "--max-items", "256") as server, server.client() as c:
        items = c.post("/v1/predict", json={"inputs": digits.test.x[:200].tolist()}).json()["items"]
        text = c.get("/metrics").text
    fell = sum(it["guard"]["fallback"] for it in items)
    assert 0 < fell < 100  # some, not most, items need the reference model
    assert metric(text, "slimguard_fallback_items_total") == fell
    acc = sum(it["prediction"] == y for it, y in zip(items, digits.test.y[:200].tolist(), strict=True)) / 200
    assert acc >= 0.95


def test_workers_serve_from_several_processes_and_metrics_report_the_whole_service(artifacts, digits):
    """Two workers: requests on fresh connections reach both (told apart by the worker prefix of item ids),
    and every scrape, whichever worker answers it, counts all of them."""
    with serving(artifacts["small"], "--workers", "2", "--scrub-interval-s", "0") as server, server.client() as c:
        assert wait_until(lambda: c.get("/readyz", timeout=60).status_code == 200, timeout=90, every=0.2)

        def post(i: int):
            with server.client() as fresh:  # a new connection each time: the kernel picks the worker
                return fresh.post("/v1/predict", json=_one(digits, i % 8), headers={"Connection": "close"})

        workers: set[str] = set()
        sent = 0
        end = time.monotonic() + 60
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            while (len(workers) < 2 or sent < 12) and sent < 400 and time.monotonic() < end:
                rs = list(pool.map(post, range(sent, sent + 4)))
                assert [r.status_code for r in rs] == [200] * 4
                sent += 4
                workers |= {r.json()["items"][0]["id"].rsplit("-", 1)[0] for r in rs}
        assert len(workers) == 2, "both workers should have answered some requests"
        pids = {w[:-6] for w in workers}  # item ids start with the worker's pid in hex

        def status() -> dict:
            with server.client() as fresh:
                return fresh.get("/v1/status", headers={"Connection": "close"}).json()["worker"]

        seen = [status() for _ in range(8)]  # each says which worker answered, and that it speaks for itself
        assert all(w["workers"] == 2 and w["scope"] == "worker" and f"{w['pid']:x}" in pids for w in seen), seen

        def scrape() -> str:
            with server.client(key=None) as anon:
                return anon.get("/metrics", headers={"Connection": "close"}).text

        for _ in range(6):  # fresh connections: the scrapes land on either worker
            assert wait_until(lambda: metric(scrape(), 'slimguard_requests_total{endpoint="/v1/predict",'
                                                       'status="200"}') == sent, timeout=5)
            text = scrape()
            assert metric(text, "slimguard_items_total") == sent and metric(text, "slimguard_batch_items_sum") == sent
            assert metric(text, "slimguard_ready") == 1 and metric(text, "slimguard_inflight") == 0
            assert "slimguard_monitor_state" in text and "slimguard_model_info{" in text
        start = time.monotonic()
        assert server.terminate(30) == 0 and time.monotonic() - start < 30
