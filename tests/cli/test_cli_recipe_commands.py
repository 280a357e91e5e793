"""``--version``, ``recipes``, ``steps``, and the one-step shortcuts ``prune`` and ``quantize``."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from slimguard._version import __version__
from slimguard.cli import build_app

runner = CliRunner()
APP = build_app()


def _json(args: list[str]) -> object:
    res = runner.invoke(APP, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_version() -> None:
    res = runner.invoke(APP, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"slimguard {__version__}"


def test_recipes_lists_the_shipped_recipes_with_their_steps() -> None:
    rows = {r["name"]: r for r in _json(["recipes"])}
    assert {"demo", "prune-resnet", "deep-compression"} <= set(rows)
    assert rows["prune-resnet"]["steps"] == ["channel", "finetune"]
    assert rows["demo"]["model"] == "zoo:digits-lenet5"


def test_steps_lists_every_step_and_one_steps_options() -> None:
    listing = {r["step"]: r for r in _json(["steps"])}
    assert {"channel", "magnitude", "int8-static", "finetune"} <= set(listing)
    assert "ratio" in listing["channel"]["options"]
    one = _json(["steps", "magnitude"])
    opts = {o["option"]: o["default"] for o in one["options"]}
    assert opts["scope"] == "global"
    res = runner.invoke(APP, ["steps", "shrink"])
    assert res.exit_code == 2 and "unknown step 'shrink'" in res.output


def test_prune_shortcut_runs_a_one_step_recipe(tmp_path: Path) -> None:
    out = tmp_path / "p"
    result = _json(["prune", "zoo:digits-mlp", "--method", "magnitude", "--ratio", "0.6", "--data", "digits",
                    "--finetune-epochs", "0", "--out", str(out), "--budget", "50"])
    assert result["recipe"]["steps"] == [{"magnitude": {**result["steps"][0]["config"]}}]
    assert result["steps"][0]["config"]["sparsity"] == 0.6
    assert result["recipe"]["budget"] == {"max_accuracy_drop": 50.0}
    assert result["accepted"] and (out / "model.slim").is_file() and (out / "metrics.json").is_file()
    compressed = result["compressed"]
    assert abs(compressed["nonzero_params"] / compressed["params"] - 0.4) < 0.05  # biases stay dense


def test_quantize_shortcut_takes_options(tmp_path: Path) -> None:
    result = _json(["quantize", "zoo:digits-mlp", "--method", "int8-static", "--option", "calibration=minmax",
                    "--data", "digits", "--out", str(tmp_path / "q")])
    assert result["steps"][0]["step"] == "int8-static"
    assert result["steps"][0]["config"]["calibration"] == "minmax"


def test_shortcuts_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    cases = [
        (["prune", "zoo:digits-mlp", "--method", "int8-static", "--data", "digits"], "is not a prune step"),
        (["quantize", "zoo:digits-mlp", "--method", "magnitude", "--data", "digits"], "is not a quantize step"),
        (["prune", "zoo:digits-mlp", "--option", "ratio", "--data", "digits"], "is not KEY=VALUE"),
        (["prune", "zoo:digits-mlp", "--method", "nm", "--ratio", "0.5", "--data", "digits"],
         "has no ratio or sparsity option"),
        (["prune", "zoo:digits-mlp"], "needs --data"),
    ]
    for args, message in cases:
        res = runner.invoke(APP, [*args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
