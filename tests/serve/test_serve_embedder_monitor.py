"""An embedder served by ``slimguard serve`` has a drift monitor: its reference is the validation texts'
embeddings (principal-axis projections, PSI) and OOD scores (KS). In-distribution texts leave
``/v1/status`` ok; a stream of unknown words drives it to alert, with the drift gauges in ``/metrics``."""

from __future__ import annotations

import random

import pytest
from tests.hf_support import WORDS
from tests.serve.conftest import metric, serving

PER_REQUEST = 64


def _texts(n: int, seed: int) -> list[str]:
    """Random sentences over the tiny tokenizer's words (the fixture's own texts are drawn the same way)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _unknown(n: int, seed: int) -> list[str]:
    """Sentences of words the tokenizer does not know (another language, as far as the model can tell)."""
    rng = random.Random(seed)
    syllables = ("ka", "zu", "mir", "tol", "vesh", "qo", "lun", "dra")
    return [" ".join("".join(rng.choice(syllables) for _ in range(3)) for _ in range(rng.randint(3, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def embedder(text_artifacts, tmp_path_factory):
    lines = tmp_path_factory.mktemp("embed-monitor") / "lines.txt"
    lines.write_text("\n".join(_texts(3000, 0)) + "\n")  # 1800 train, 300 val (the monitor's reference)
    with serving(text_artifacts["embedder"], "--data", f"text:{lines}", "--max-items", str(PER_REQUEST),
                 "--scrub-interval-s", "0") as s:
        with s.client() as c:
            yield c


def _send(client, texts: list[str]) -> None:
    for i in range(0, len(texts), PER_REQUEST):
        r = client.post("/v1/predict", json={"texts": texts[i : i + PER_REQUEST]})
        assert r.status_code == 200, r.text


def test_embedder_drift_monitor_is_ok_in_distribution_and_alerts_on_unknown_words(embedder):
    st = embedder.get("/v1/status").json()
    assert st["state"] == "ok" and set(st["metrics"]) >= {"embedding_psi", "ood_score_ks", "ood_rate"}
    assert st["metrics"]["embedding_psi"]["samples"] == 0

    _send(embedder, _texts(320, 1))  # new sentences from the same generator: in distribution
    st = embedder.get("/v1/status").json()
    assert st["state"] == "ok", st["reasons"]
    m = st["metrics"]
    assert m["embedding_psi"]["samples"] == 320 and m["embedding_psi"]["value"] < 0.1
    assert m["ood_score_ks"]["samples"] == 320 and m["ood_score_ks"]["value"] < 0.15
    assert st["counters"]["predictions"] == 320
    text = embedder.get("/metrics").text
    assert metric(text, "slimguard_monitor_state") == 0
    assert metric(text, "slimguard_drift_psi") == pytest.approx(m["embedding_psi"]["value"], rel=1e-6)
    assert metric(text, "slimguard_drift_ks") == pytest.approx(m["ood_score_ks"]["value"], rel=1e-6)

    _send(embedder, _unknown(320, 2))
    st = embedder.get("/v1/status").json()
    assert st["state"] == "alert"
    m = st["metrics"]
    assert m["embedding_psi"]["state"] == "alert" and m["embedding_psi"]["value"] > 0.25
    assert m["ood_score_ks"]["state"] == "alert" and m["ood_rate"]["value"] > 0.25
    assert any(r.startswith("embedding_psi") for r in st["reasons"])
    text = embedder.get("/metrics").text
    assert metric(text, "slimguard_monitor_state") == 2 and metric(text, "slimguard_drift_psi") > 0.25
