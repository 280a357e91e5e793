"""Sensitivity analysis (API and CLI) and its per-layer ratios."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slimguard.core.errors import ConfigError
from slimguard.prune.sensitivity import ratios_from_sensitivity, sensitivity


@pytest.mark.parametrize("method,expected", [
    ("magnitude", {"2", "4", "6"}),
    ("channel", {"2", "4"}),  # groups named by their first producer; the output layer is fixed
])
def test_sensitivity_layers_and_monotone_scores(method, expected, zoo_model, digits):
    model = zoo_model("digits-mlp")
    result = sensitivity(model, digits, sparsities=(0.0, 0.5, 0.95), method=method, max_examples=200,
                         progress=False)
    assert set(result["layers"]) == expected and result["metric"] == "accuracy"
    for rec in result["layers"].values():
        s = rec["scores"]
        assert s["0"] == pytest.approx(result["baseline"])  # nothing pruned: unchanged
        assert s["0.95"] <= s["0"] + 1e-9
    json.dumps(result)  # plain JSON
    assert model[2].weight.count_nonzero() == model[2].weight.numel()  # the model itself is untouched


def test_ratios_from_sensitivity():
    result = {"baseline": 0.9, "layers": {
        "a": {"scores": {"0.25": 0.9, "0.5": 0.895, "0.75": 0.7}},
        "b": {"scores": {"0.25": 0.5, "0.5": 0.4}},
        "c": {"scores": {"0.25": None, "0.5": 0.9}},
    }}
    assert ratios_from_sensitivity(result, max_drop=0.01) == {"a": 0.5, "c": 0.5}


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "bogus"}, "method"),
    ({"sparsities": (1.0,)}, "sparsities"),
    ({"layers": ["nope"]}, "layers"),
])
def test_sensitivity_bad_input(kwargs, match, zoo_model, digits):
    with pytest.raises(ConfigError, match=match):
        sensitivity(zoo_model("digits-mlp"), digits, progress=False, **kwargs)


def test_cli_sensitivity(tmp_path):
    from slimguard.cli import build_app

    app = build_app()
    runner = CliRunner()
    out = tmp_path / "sens"
    res = runner.invoke(app, ["sensitivity", "zoo:digits-mlp", "--sparsity", "0.5", "--sparsity", "0.9",
                              "--max-examples", "100", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["data"] == "digits" and set(data["layers"]) == {"2", "4", "6"}
    assert "suggested_ratios" in json.loads(res.stdout)
    bad = runner.invoke(app, ["sensitivity", "zoo:digits-mlp", "--sparsity", "0.5,0.9"])
    assert bad.exit_code == 2 and "--sparsity" in bad.output
