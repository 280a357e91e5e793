"""The scorecard: original vs compressed side by side, int8 via the fake-quant twin, JSON, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError
from slimguard.robust import scorecard
from slimguard.runtime.measure import threads

SMALL = dict(attack_examples=120, corruption_examples=120, pgd_steps=5, apgd_steps=5, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def mlp_and_int8():
    from slimguard.models import zoo
    from slimguard.quantize.dynamic import Int8DynamicConfig
    from slimguard.transforms import quantize_

    original = zoo.load("digits-mlp", progress=False)
    q = copy.deepcopy(original)
    quantize_(q, Int8DynamicConfig())
    return original, q


@pytest.fixture(scope="module")
def card(mlp_and_int8, digits):
    original, q = mlp_and_int8
    with threads(1):
        return scorecard(q, digits, against=original, seed=0, **SMALL)


def test_scorecard_compares_original_and_int8_model(card):
    d = card.to_dict()
    assert list(d["models"]) == ["original", "compressed"]
    orig, comp = d["models"]["original"], d["models"]["compressed"]
    assert not orig["quantized"] and comp["quantized"]
    labels = list(orig["attacks"])
    assert len(labels) == 9  # fgsm, pgd, apgd x 3 eps
    for label in labels:
        assert "twin_accuracy" not in orig["attacks"][label]
        assert {"accuracy", "twin_accuracy", "white_box"} <= set(comp["attacks"][label])
    for model in (orig, comp):
        accs = {label: model["attacks"][label]["accuracy"] for label in labels}
        # stronger with eps, and PGD never better than FGSM at the same eps (same examples)
        assert accs["pgd-linf eps=0.03"] >= accs["pgd-linf eps=0.1"] >= accs["pgd-linf eps=0.2"]
        for eps in ("0.03", "0.1", "0.2"):
            assert accs[f"pgd-linf eps={eps}"] <= accs[f"fgsm-linf eps={eps}"]
            assert accs[f"apgd-ce+dlr-linf eps={eps}"] <= model["clean_accuracy_attack_subset"]
        assert set(model["corruptions"]) == {"blur", "brightness", "contrast", "gaussian_noise", "occlusion",
                                             "salt_pepper"}
        assert all(len(v) == 5 for v in model["corruptions"].values())
    # int8 weights change little: the transferred attack and the twin agree within 5 points
    for label in labels:
        assert abs(comp["attacks"][label]["accuracy"] - comp["attacks"][label]["twin_accuracy"]) <= 0.05


def test_scorecard_records_seed_and_settings(card):
    s = card.settings
    assert s["seed"] == 0 and s["eps_grid"] == [0.03, 0.1, 0.2] and s["middle_eps"] == 0.1
    assert s["attack_examples"] == 120 and s["corruption_examples"] == 120 and s["test_examples"] == 360
    assert s["pgd_steps"] == 5 and len(s["attacks"]) == 9


def test_scorecard_is_deterministic(mlp_and_int8, digits, card):
    original, q = mlp_and_int8
    again = scorecard(q, digits, against=original, seed=0, **SMALL)
    assert again.to_dict() == card.to_dict()


def test_scorecard_table_and_json(card, tmp_path):
    rows = card.rows()
    assert card.columns() == ["metric", "original", "compressed", "change"]
    assert rows[0][0] == "clean accuracy" and rows[0][-1].endswith("pts")
    assert any("(fake-quant twin)" in r[0] for r in rows)
    assert any(r[0] == "corruptions severity 5" for r in rows)
    text = card.table()
    assert "pgd-linf eps=0.1" in text
    path = card.save(tmp_path / "card.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(card.to_dict()))


def test_scorecard_on_tabular_data_uses_relative_eps():
    from slimguard import data
    from slimguard.models import zoo

    d = data.load("breast-cancer")
    model = zoo.create("tabular-mlp")  # untrained is enough to check the plumbing
    card = scorecard(model, d, attacks=["pgd"], eps=[0.05], **SMALL)
    m = card.models["model"]
    assert set(m["corruptions"]) == {"feature_noise", "missing_values"}
    assert m["attacks"]["pgd-linf eps=0.05"]["accuracy"] <= m["clean_accuracy_attack_subset"]
    assert card.settings["attacks"][0]["relative"] is True


class _CharEmbedder(nn.Module):
    """A tiny bag-of-characters text embedder with the tokenize/encode interface of SentenceEmbedder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.EmbeddingBag(128, 16, mode="mean")

    def tokenize(self, texts, max_length=128):
        ids = [torch.tensor([min(ord(c), 127) for c in t[:max_length]] or [0]) for t in texts]
        lengths = torch.tensor([len(i) for i in ids])
        return {"input_ids": torch.cat(ids), "offsets": torch.cat([torch.zeros(1, dtype=torch.long),
                                                                     lengths.cumsum(0)[:-1]])}

    def forward(self, input_ids, offsets):
        return nn.functional.normalize(self.emb(input_ids, offsets), dim=-1)

    @torch.no_grad()
    def encode(self, texts, batch_size=32, max_length=128):
        return torch.cat([self(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)])


def test_text_scorecard_reports_embedding_fidelity_under_typos():
    from slimguard import data

    d = data.load("docs-text")
    model = _CharEmbedder()
    card = scorecard(model, d, corruption_examples=64, progress=False)
    m = card.models["model"]
    assert m["clean_cosine"] == pytest.approx(1.0, abs=1e-5)  # the model against itself on clean text
    fid = m["corruptions"]["typos"]
    assert len(fid) == 5 and fid[-1] < fid[0] < 1.0  # more typos, lower fidelity
    assert card.settings["attacks"] == []


BAD = [
    pytest.param(dict(eps=[-0.1]), ConfigError, "eps", id="negative-eps"),
    pytest.param(dict(eps=[1.5]), ConfigError, "beyond the input range", id="eps-beyond-range"),
    pytest.param(dict(attacks=["deepfool"]), ConfigError, "unknown attack", id="unknown-attack"),
    pytest.param(dict(corruptions=["fog"]), ConfigError, "unknown corruption", id="unknown-corruption"),
    pytest.param(dict(severities=[0]), ConfigError, "severities", id="bad-severity"),
    pytest.param(dict(attack_examples=-1), ConfigError, "attack_examples", id="negative-examples"),
]


@pytest.mark.parametrize("kwargs,err,word", BAD)
def test_bad_scorecard_requests(mlp_and_int8, digits, kwargs, err, word):
    original, _ = mlp_and_int8
    opts = {**SMALL, "attack_examples": 8, "corruption_examples": 8, **kwargs}
    with pytest.raises(err, match=word) as info:
        scorecard(original, digits, **opts)
    assert "\n" not in str(info.value)


def test_labels_out_of_range_and_wrong_data(mlp_and_int8, digits, digits32):
    from slimguard.data.core import Split

    original, _ = mlp_and_int8
    bad = Split("test", digits.test.x[:8], digits.test.y[:8] + 10, digits.meta)
    with pytest.raises(DataError, match="labels"):
        scorecard(original, bad, **SMALL)
    with pytest.raises(DataError, match="shape"):
        scorecard(original, digits32, **SMALL)


def test_cli_robustness_against_original(tmp_path, mlp_and_int8):
    from typer.testing import CliRunner

    from slimguard.artifact import save
    from slimguard.cli import build_app

    _, q = mlp_and_int8
    path = save(q, tmp_path / "int8.slim")
    out = tmp_path / "card"
    runner = CliRunner()
    args = ["robustness", str(path), "--against", "zoo:digits-mlp", "--eps", "0.1", "--attack", "fgsm", "--attack",
            "pgd", "--max-examples", "60", "--pgd-steps", "3", "--corruption", "blur", "--out", str(out), "--json"]
    res = runner.invoke(build_app(), args)
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    assert card["models"]["compressed"]["quantized"] is True
    assert "twin_accuracy" in card["models"]["compressed"]["attacks"]["pgd-linf eps=0.1"]
    assert json.loads((out / "scorecard.json").read_text())["settings"]["attack_examples"] == 60
    bad = runner.invoke(build_app(), ["robustness", "zoo:digits-mlp", "--eps", "-0.1", "--quiet"])
    assert bad.exit_code == 2 and "eps" in bad.output and "Traceback" not in bad.output
