"""``optimize`` on an embedder: a tiny random BERT embedder on a text file, scored by mean cosine to the original's
embeddings on validation texts, with ``--min-cosine`` as the constraint; the test split scored once per point."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.hf_support import WORDS, build_family

import slimguard  # noqa: F401  (fills the registries)
from slimguard import data as sgdata
from slimguard.core.errors import ConfigError
from slimguard.models import sources
from slimguard.search import Settings, optimize
from slimguard.search.objectives import Evaluator, cosine_budget_points
from slimguard.search.space import build_space

SPACE = {"sparsify": ["none"], "factorize": ["none"], "quantize": ["int8-dynamic", "half", "ort-int8"]}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """A tiny random BERT embedder folder and a text file of 60 lines (6 validation texts)."""
    tmp = tmp_path_factory.mktemp("embed")
    folder = build_family("bert-embed", tmp / "embed")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(60)]
    (tmp / "t.txt").write_text("\n".join(lines))
    return f"hf:{folder}", f"text:{tmp / 't.txt'}"


def test_fidelity_is_the_mean_cosine_to_the_original_on_validation(embedder):
    model = sources.load_model(embedder[0], seed=0, progress=False)
    data = sgdata.load(embedder[1], seed=0)
    ev = Evaluator(model, data, cosine_budget_points(0.99), speed_budget_s=0.2)
    assert ev.base_val_accuracy == pytest.approx(1.0, abs=1e-6)  # the original against itself
    noisy = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.5)
    got = ev.fidelity(noisy, data.val)
    texts = list(data.val.x)
    cos = F.cosine_similarity(noisy.encode(texts), model.encode(texts), dim=-1)
    assert got["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert got["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-5)
    assert got["cosine_mean"] < 0.95  # the noise is visible to the metric
    assert (1 - ev.score(noisy, data.val)) * 100 == pytest.approx((1 - got["cosine_mean"]) * 100, abs=1e-4)


def test_embedder_search_meets_min_cosine_and_scores_test_once(embedder, tmp_path, monkeypatch):
    scored: list[str] = []
    real = Evaluator.fidelity

    def counting(self, model, split):
        scored.append(split.name)
        return real(self, model, split)

    monkeypatch.setattr(Evaluator, "fidelity", counting)
    s = Settings(model=embedder[0], data=embedder[1], out=tmp_path, trials=3, seed=0, speed_budget_s=0.2,
                 track=False, objectives=("latency", "size"), search=SPACE, min_cosine=0.99)
    result = optimize(s, progress=False)
    assert result["budget_points"] == pytest.approx(1.0)
    assert result["trials"]["finished"] == 3
    assert [e["recipe"] for e in result["warm_start"]["enqueued"]] == ["minilm-fast"]  # the shipped embedder recipe
    assert result["points"]
    for p in result["points"]:
        assert p["val_cosine_mean"] >= 0.99
        assert p["val_accuracy_drop_points"] == pytest.approx((1 - p["val_cosine_mean"]) * 100, abs=1e-6)
        assert 0 < p["test_cosine_min"] <= p["test_cosine_mean"] <= 1 + 1e-6
    assert scored.count("test") == len(result["points"])  # the test split: once per front point, nothing else
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["task"] == "embedding" and best["budget"] == {"min_cosine_mean": 0.99}


def test_embedder_space_leaves_out_steps_that_cannot_apply():
    block = Settings(model="m", data="d", out="o").search_block("embedding")
    space = build_space(block)
    assert space.stages["structured"] == ("none",) and space.stages["train"] == ("none",)
    assert "int8-static" not in space.stages["quantize"] and "ort-int8" in space.stages["quantize"]
    assert "int8-static" in build_space(Settings(model="m", data="d", out="o").search_block()).stages["quantize"]


def test_min_cosine_budget_and_refusals(embedder, tmp_path):
    s = Settings(model="m", data="d", out=tmp_path, min_cosine=0.995, budget=3.0)
    s.for_task("classification")
    assert s.budget == 3.0
    s.for_task("embedding")
    assert s.budget == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="--min-cosine"):
        Settings(model="m", data="d", out=tmp_path, min_cosine=1.5)
    # an option the caller set on purpose that does not fit the task is refused, never ignored
    with pytest.raises(ConfigError, match="--budget: an accuracy drop applies to classification data"):
        Settings(model="m", data="d", out=tmp_path, budget=3.0, given=("budget",)).for_task("embedding")
    with pytest.raises(ConfigError, match="--min-cosine: applies to embedding data"):
        Settings(model="m", data="d", out=tmp_path, min_cosine=0.9, given=("min_cosine",)).for_task("classification")
    model = sources.load_model(embedder[0], seed=0, progress=False)
    with pytest.raises(ConfigError, match="--target"):
        Evaluator(model, sgdata.load(embedder[1], seed=0), 1.0, target="ort")
