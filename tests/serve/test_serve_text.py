"""``slimguard serve`` with text models over HTTP: ``{"texts": [...]}`` tokenized with the artifact's own
tokenizer under the text limits, answered by a tiny random BERT classifier (class and scores) and a tiny
BERT embedder (embeddings), each with a guard verdict; tensors sent to a text model are refused naming
what it takes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from tests.serve.conftest import metric, serving

LIMITS = ["--max-items", "4", "--max-text-chars", "200", "--max-tokens", "16", "--scrub-interval-s", "0",
          "--max-wait-ms", "1"]
TEXTS = ["the film was good", "a bad movie and a dull plot", "great actor", "this story is long and fine"]


@pytest.fixture(scope="module")
def classifier(text_artifacts):
    with serving(text_artifacts["classifier"], "--data", str(text_artifacts["classifier_data"]), *LIMITS) as s:
        with s.client() as c:
            yield c


@pytest.fixture(scope="module")
def embedder(text_artifacts):
    with serving(text_artifacts["embedder"], "--data", str(text_artifacts["embedder_data"]), *LIMITS) as s:
        with s.client() as c:
            yield c


def _in_process(artifact, texts):
    from slimguard.artifact import load

    model = load(artifact).eval()
    with torch.no_grad():
        return torch.cat([model(**model.tokenize([t])) for t in texts])


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in r.text and "/tmp" not in r.text
    return r.json()


def test_classifier_answers_texts_with_classes_scores_and_guard_verdicts(classifier, text_artifacts):
    r = classifier.post("/v1/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    out = r.json()
    logits = _in_process(text_artifacts["classifier"], TEXTS)
    assert out["predictions"] == logits.argmax(-1).tolist()  # one text at a time in process; padded in a batch
    want = torch.softmax(logits, -1)
    got = torch.tensor([it["scores"] for it in out["items"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for it in out["items"]:
        assert it["confidence"] == max(it["scores"]) and it["label"] in ("0", "1", "2")
        assert it["guard"]["contract_ok"] is True and isinstance(it["guard"]["ood"], bool)
        assert isinstance(it["guard"]["ood_score"], float) and it["guard"]["fallback"] is False


def test_text_model_summary_names_its_input_and_limits(classifier):
    s = classifier.get("/v1/model").json()
    assert s["input"] == {"kind": "texts", "task": "classification", "max_texts": 4, "max_text_chars": 200,
                          "max_tokens": 16}
    assert s["input_shape"] == [] and s["classes"] == ["0", "1", "2"] and s["guard"]["detector"] == "Energy"


# body -> (status, field, rule): each text limit and bad text gets a problem naming the field and the limit
BAD_TEXTS = {
    "too_many": ({"texts": ["good"] * 5}, 413, "texts", "max_items"),
    "too_long": ({"texts": ["good", "a" * 201]}, 413, "texts[1]", "max_text_chars"),
    "too_many_tokens": ({"texts": ["good", " ".join(["film"] * 17)]}, 422, "texts[1]", "max_tokens"),
    "not_strings": ({"texts": ["good", 5]}, 422, "texts[1]", "type"),
    "empty_text": ({"texts": ["  "]}, 422, "texts[0]", "empty"),
    "empty_list": ({"texts": []}, 422, "texts", "empty"),
    "not_list": ({"texts": "good"}, 422, "texts", "type"),
    "tensors": ({"inputs": [[1.0, 2.0]]}, 422, "inputs", "unsupported"),
    "unknown_key": ({"texts": ["good"], "x": 1}, 422, "x", "unknown_key"),
    "missing": ({}, 422, "texts", "required"),
}


@pytest.mark.parametrize("case", list(BAD_TEXTS), ids=list(BAD_TEXTS))
def test_text_limits_and_bad_texts_get_a_problem_naming_the_limit(classifier, case):
    body, status, field, rule = BAD_TEXTS[case]
    problem = _problem(classifier.post("/v1/predict", json=body), status)
    assert (problem["errors"][0]["field"], problem["errors"][0]["rule"]) == (field, rule), problem
    if case == "tensors":
        assert "takes texts" in problem["detail"]


def test_a_text_at_the_token_limit_is_served_whole(classifier):
    r = classifier.post("/v1/predict", json={"texts": [" ".join(["film"] * 16)]})  # 16 word tokens, no specials
    assert r.status_code == 200, r.text


def test_binary_bodies_to_a_text_model_are_refused(classifier):
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 4), dtype=np.float32))
    problem = _problem(classifier.post("/v1/predict", content=buf.getvalue(),
                                       headers={"content-type": "application/x-npy"}), 415)
    assert problem["errors"][0]["field"] == "body" and "texts" in problem["detail"]


def test_embedder_answers_normalised_embeddings_equal_to_the_model_in_process(embedder, text_artifacts):
    r = embedder.post("/v1/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["predictions"])
    want = _in_process(text_artifacts["embedder"], TEXTS)
    assert got.shape == (4, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    for it in r.json()["items"]:
        assert set(it["guard"]) == {"contract_ok", "ood", "ood_score", "fallback"} and it["guard"]["contract_ok"]


def test_embedder_ood_score_is_the_distance_to_the_nearest_training_text(embedder, text_artifacts):
    from slimguard import data

    train = data.load(str(text_artifacts["embedder_data"])).train.x
    seen = embedder.post("/v1/predict", json={"texts": train[:2]}).json()["items"]
    for it in seen:  # a training text is its own nearest neighbour: distance 0, never flagged
        assert abs(it["guard"]["ood_score"]) < 1e-5 and it["guard"]["ood"] is False
    unseen = embedder.post("/v1/predict", json={"texts": ["zebra quantum xylophone"]}).json()["items"][0]
    assert unseen["guard"]["ood_score"] > 1e-4  # all unknown tokens: not a training text


def test_text_items_are_counted_in_metrics(classifier):
    before = metric(classifier.get("/metrics").text, "slimguard_items_total")
    assert classifier.post("/v1/predict", json={"texts": TEXTS[:3]}).status_code == 200
    assert metric(classifier.get("/metrics").text, "slimguard_items_total") == before + 3
