"""Recipes are validated completely before work starts; the CLI prints one-line errors with exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slimguard.cli import build_app
from slimguard.core.errors import ConfigError
from slimguard.core.recipe import parse
from slimguard.pipeline import METRICS_FIELDS

runner = CliRunner()
APP = build_app()
GOOD = {"model": "zoo:digits-mlp", "data": "digits", "budget": {"max_accuracy_drop": 1.0},
        "steps": [{"magnitude": {"sparsity": 0.5}}, {"finetune": {"epochs": 1}}, "int8-dynamic"]}


def test_good_recipe_parses():
    r = parse(GOOD)
    assert [s.config_name for s in r.steps] == ["magnitude", "finetune", "int8-dynamic"]
    assert r.steps[0].sparsity == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modle": "x"}, "recipe: unknown key 'modle'; allowed:"),
        ({"steps": [{"magnitude": {"sparsity": 1.5}}]}, "recipe.steps[0].magnitude: sparsity: 1.5 is out of range"),
        ({"steps": [{"magnitude": {"sparsity": "lots"}}]}, "recipe.steps[0].magnitude.sparsity: expected a number"),
        ({"steps": [{"magnitude": {"level": 2}}]}, "recipe.steps[0].magnitude: unknown key 'level'"),
        ({"steps": [{"shrink": {}}]}, "recipe.steps[0]: unknown step 'shrink'; allowed:"),
        ({"steps": []}, "recipe.steps: expected a non-empty list"),
        ({"budget": {"max_accuracy_drop": -1}}, "max_accuracy_drop: -1 is out of range"),
        ({"task": "regression"}, "recipe.task: 'regression' is not allowed"),
        ({"steps": [{"finetune": {"epochs": 1.5}}]}, "recipe.steps[0].finetune.epochs: expected an integer"),
    ],
)
def test_bad_recipes_name_the_key(change, message):
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, **change})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _write_recipe(tmp_path, body):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_compress_runs_a_recipe(tmp_path):
    recipe = _write_recipe(tmp_path, GOOD)
    out = tmp_path / "out"
    r = runner.invoke(APP, ["compress", "--recipe", str(recipe), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert (out / "model.slim").is_file() and json.loads((out / "metrics.json").read_text()) == result
    assert sorted(result) == sorted(METRICS_FIELDS)
    assert result["compressed"]["size_bytes"] < result["baseline"]["size_bytes"] / 3
    assert result["budget"]["ok"]
    _check_speed_block(result)
    page = (out / "report.html").read_text()
    assert ">file bytes</td>" in page and page.count("data:image/png;base64,") >= 3  # size, latency, accuracy


SPEED_KEYS = {"ratio", "ci95", "spread", "verdict", "per_round", "median_ms", "batch_size", "threads", "rounds",
              "calls_per_round", "warmup", "seed", "machine"}


def _check_speed_block(result):
    """The ``speed`` block of metrics.json has the documented keys and holds together (no timing asserted)."""
    from slimguard.runtime.measure import verdict

    speed = result["speed"]
    assert set(speed) == SPEED_KEYS
    assert speed["threads"] == 1 and result["baseline"]["threads"] == result["compressed"]["threads"] == 1
    assert speed["batch_size"] == 64 and speed["rounds"] == len(speed["per_round"]) >= 5
    assert speed["spread"] == [min(speed["per_round"]), max(speed["per_round"])]
    assert speed["spread"][0] <= speed["ci95"][0] <= speed["ratio"] <= speed["ci95"][1] <= speed["spread"][1]
    assert speed["verdict"] == verdict(speed["ratio"], speed["ci95"])
    assert set(speed["median_ms"]) == {"baseline", "compressed"} and min(speed["median_ms"].values()) > 0
    assert {"cpu", "cores", "threads", "torch", "avx2", "avx512_vnni"} <= set(speed["machine"])
    assert result["baseline"]["machine"]["torch"] == speed["machine"]["torch"]


def test_compress_table_prints_the_speed_verdict(tmp_path, monkeypatch):
    """The before/after table's speed row carries the verdict, not a ratio of two unpaired latencies."""
    import slimguard.pipeline

    scores = {"accuracy": 0.9, "params": 100, "nonzero_params": 50, "size_bytes": 1000, "macs": 10,
              "latency_ms_p50": 5.0}
    speed = {"ratio": 1.02, "ci95": [0.97, 1.08], "spread": [0.9, 1.2], "verdict": "no measurable difference",
             "per_round": [1.02] * 15, "median_ms": {"baseline": 2.5, "compressed": 2.45}, "batch_size": 64,
             "threads": 1, "rounds": 15, "calls_per_round": 20, "warmup": 10, "seed": 0,
             "machine": {"cpu": "Test CPU", "cores": 2, "threads": 1, "torch": "9.9"}}
    canned = {"baseline": scores, "compressed": {**scores, "latency_ms_p50": 1.0}, "speed": speed,
              "accepted": True, "artifact": "a", "metrics_file": "m", "report": "r"}
    monkeypatch.setattr(slimguard.pipeline, "compress", lambda *args, **kwargs: canned)
    monkeypatch.setenv("COLUMNS", "200")
    r = runner.invoke(APP, ["compress", "--recipe", str(_write_recipe(tmp_path, GOOD)), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "ms / call, batch 64" in line)
    assert "no measurable difference" in row and "2.5" in row and "2.45" in row
    assert "5.00x" not in r.output  # the unpaired latencies (5.0 -> 1.0 ms) are not turned into a claim
    assert "15 paired rounds x 20 calls, 1 thread pinned" in r.output and "Test CPU, 2 cores" in r.output


def test_cli_bad_recipe_writes_nothing(tmp_path):
    recipe = _write_recipe(tmp_path, {**GOOD, "steps": [{"magnitude": {"sparsity": 2}}]})
    out = tmp_path / "out"
    r = runner.invoke(APP, ["compress", "--recipe", str(recipe), "--out", str(out)])
    _one_line_exit_2(r, "sparsity: 2.0 is out of range")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "zoo:nope"], "unknown zoo model 'nope'"),
        (["evaluate", "zoo:digits-mlp", "--data", "nodata"], "unknown data set 'nodata'"),
        (["evaluate", "zoo:digits-mlp", "--data", "digits32"], "but the model expects (1, 8, 8)"),
        (["evaluate", "missing.slim"], "artifact not found: missing.slim"),
        (["inspect", "missing.slim"], "artifact not found"),
        (["compress", "--recipe", "missing.yaml", "--out", "o"], "recipe file not found: missing.yaml"),
    ],
)
def test_cli_user_errors(args, message):
    _one_line_exit_2(runner.invoke(APP, args), message)


def test_cli_refuses_damaged_artifacts(tmp_path, zoo_model):
    from slimguard.artifact import save

    good = save(zoo_model("digits-mlp"), tmp_path / "m.slim")
    truncated = tmp_path / "t.slim"
    truncated.write_bytes(good.read_bytes()[:500])
    _one_line_exit_2(runner.invoke(APP, ["evaluate", str(truncated)]), "may be truncated")
    flipped = tmp_path / "f.slim"
    blob = bytearray(good.read_bytes())
    blob[len(blob) // 3] ^= 0x10
    flipped.write_bytes(bytes(blob))
    r = runner.invoke(APP, ["evaluate", str(flipped)])
    assert r.exit_code == 2 and "error: " in r.output and "Traceback" not in r.output


def test_cli_inspect_and_evaluate(tmp_path, zoo_model):
    from slimguard.artifact import save
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.transforms import prune_

    m = zoo_model("digits-mlp")
    prune_(m, MagnitudePruningConfig(sparsity=0.9))
    p = save(m, tmp_path / "m.slim")
    r = runner.invoke(APP, ["inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["tensor"]: row for row in json.loads(r.output)["tensors"]}
    weights = [rows[f"{i}.weight"] for i in (2, 4, 6)]
    assert all(w["codec"] == "sparse" for w in weights)
    kept = sum(w["nonzero"] for w in weights) / sum(w["params"] for w in weights)
    assert kept == pytest.approx(0.1, abs=1e-4)  # global 90% sparsity
    r = runner.invoke(APP, ["evaluate", str(p), "--json"])
    assert r.exit_code == 0, r.output
    from slimguard import data as sgdata
    from slimguard.evaluate import predict

    test = sgdata.load("digits").test
    expected = float((predict(m, test.x).argmax(-1) == test.y).float().mean())
    assert json.loads(r.output)["accuracy"] == pytest.approx(expected)  # the artifact scores as the model did
    assert json.loads(r.output)["threads"] == 1  # pinned by default, and recorded
    r = runner.invoke(APP, ["evaluate", str(p), "--threads", "2"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    machine_row = next(line for line in r.output.splitlines() if "machine" in line)
    assert "2 threads" in machine_row and "torch" in machine_row  # one line, not a dict


def test_cli_demo_json(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(APP, ["demo", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and sorted(saved) == sorted(METRICS_FIELDS)  # one shape, written by compress
    for side in ("baseline", "compressed"):
        assert set(metrics[side]) >= {"accuracy", "params", "nonzero_params", "size_bytes", "latency_ms_p50"}
    assert metrics["baseline"]["size_bytes"] / metrics["compressed"]["size_bytes"] >= 4
    assert metrics["baseline"]["accuracy"] - metrics["compressed"]["accuracy"] <= 0.01
    _check_speed_block(metrics)


def test_cli_compress_embedding_recipe_scores_fidelity(tmp_path):
    pytest.importorskip("transformers")
    from slimguard import data as sgdata

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sgdata.load("docs-text").test.x[:30]))
    recipe = _write_recipe(tmp_path, {"model": "minilm", "data": f"text:{texts}", "task": "embedding",
                                      "budget": {"min_cosine_mean": 0.9}, "steps": ["int8-dynamic"]})
    r = runner.invoke(APP, ["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["baseline"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)  # the original against itself
    assert 0.9 < result["compressed"]["cosine_mean"] < 0.9999  # int8 is close, but not identical
    assert result["compressed"]["size_bytes"] < result["baseline"]["size_bytes"]


def test_causal_lm_recipes_parse_and_judge_perplexity():
    from slimguard.core.recipe import load as load_recipe
    from slimguard.pipeline import budget_check

    r = load_recipe("docs-lm-gptq4")  # shipped: GPTQ 4-bit on docs-lm
    assert r.task == "causal-lm" and r.budget == {"max_perplexity_ratio": 1.05}
    assert r.steps[0].config_name == "gptq" and r.steps[0].bits == 4 and r.steps[0].act_order
    ok = budget_check(r.budget, {"perplexity": 100.0}, {"perplexity": 104.0})
    missed = budget_check(r.budget, {"perplexity": 100.0}, {"perplexity": 106.0})
    assert ok["ok"] and ok["max_perplexity_ratio"]["value"] == pytest.approx(1.04)
    assert not missed["ok"]
    with pytest.raises(ConfigError, match="max_perplexity_ratio"):
        parse({**GOOD, "task": "causal-lm", "budget": {"max_perplexity_ratio": 0.5}})
