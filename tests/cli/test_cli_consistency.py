"""One CLI: the same conventions in every command.

Walks every registered command's options (no ``--examples``, ``--out`` is a folder holding named files, no
comma-separated strings, booleans are flags); usage errors end as one ``error:`` line with exit code 2
through :func:`slimguard.cli.main`; and ``train``, ``export`` and ``sensitivity`` write fixed names inside
``--out`` and say where.
"""

from __future__ import annotations

import json
import re

import pytest
import typer.main
from typer.testing import CliRunner

from slimguard.cli import build_app, main

APP = build_app()
GROUP = typer.main.get_command(APP)
COMMANDS = sorted(GROUP.commands.items())  # type: ignore[attr-defined]  # the app is a group of commands
runner = CliRunner()

# the one string option allowed to talk of commas: it names an environment variable whose value lists keys
COMMA_IN_ENV_VAR = {"--key-env"}
FILE_NAME = re.compile(r"\b[\w.-]+\.(slim|json|onnx|html|yaml)\b")


def _options(cmd):
    return [p for p in cmd.params if p.param_type_name == "option"]


def _annotation(param):
    """The Python type the option was declared with (typer records it; older typers keep click's type)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation
    name = getattr(getattr(param, "type", None), "name", "")
    return {"boolean": bool, "text": str}.get(name, object)


def test_the_walk_sees_every_command():
    names = {name for name, _ in COMMANDS}
    assert {"train", "export", "sensitivity", "robustness", "ood", "faults", "distill", "compress"} <= names


@pytest.mark.parametrize(("name", "cmd"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_options_follow_the_conventions(name, cmd):
    for p in _options(cmd):
        where = f"{name} {p.opts[0]}"
        help_text = (p.help or "").lower()
        assert "--examples" not in p.opts, f"{where}: counts of examples are --max-examples"
        if "--out" in p.opts:
            assert "folder" in help_text or "directory" in help_text, f"{where}: --out is a folder; say so"
            assert FILE_NAME.search(help_text), f"{where}: name the files written inside --out"
        if _annotation(p) is str and not p.multiple and p.opts[0] not in COMMA_IN_ENV_VAR:
            assert "comma" not in help_text, f"{where}: lists are repeated flags, not comma-separated strings"
        if _annotation(p) is bool:
            assert p.is_flag, f"{where}: a boolean option is a flag (--x/--no-x), not --x true"


@pytest.mark.parametrize("name", [n for n, _ in COMMANDS])
def test_help_shows_no_boolean_placeholder(name):
    result = runner.invoke(APP, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output


def _main(args, capsys):
    """Run the installed entry point on ``args``: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.mark.parametrize(("args", "message"), [
    (["train"], "error: Missing argument 'model'. (see slimguard train --help)"),
    (["compress", "--out", "o"], "error: Missing option '--recipe'"),
    (["robustness", "zoo:digits-mlp", "--examples", "5"], "error: No such option: --examples"),
    (["sensitivity", "zoo:digits-mlp", "--max-examples", "many"], "error: Invalid value for '--max-examples'"),
    (["faults", "zoo:digits-mlp", "--trials", "1.5"], "error: Invalid value for '--trials'"),
    (["no-such-command"], "error: No such command 'no-such-command'"),
], ids=["missing-argument", "missing-option", "unknown-option", "bad-int", "bad-int-faults", "unknown-command"])
def test_usage_errors_are_one_line_exit_2(args, message, capsys):
    code, out, err = _main(args, capsys)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith(message), err


def test_user_errors_and_help_through_main(capsys, tmp_path):
    code, out, err = _main(["export", "zoo:digits-mlp", "--format", "tflite", "--out", str(tmp_path / "o")], capsys)
    assert (code, out) == (2, "") and err.startswith("error: --format: 'tflite'") and err.count("\n") == 1
    code, out, err = _main(["train", "--help"], capsys)
    assert code == 0 and out.startswith("Usage: slimguard train") and err == ""
    code, out, _ = _main(["--version"], capsys)
    assert code == 0 and out.startswith("slimguard ")
    code, out, _ = _main([], capsys)  # no command: the help, as a usage error
    assert code == 2 and out.startswith("Usage: slimguard [OPTIONS] COMMAND")


def test_train_writes_model_slim_in_out(zoo_model, tmp_path):
    from slimguard.artifact import load

    trained = zoo_model("digits-mlp")
    out = tmp_path / "run"
    result = runner.invoke(APP, ["train", "digits-mlp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    slim = out / "model.slim"
    assert sorted(p.name for p in out.iterdir()) == ["model.slim"]
    assert f"wrote {slim}" in result.output
    again = load(slim)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in trained.parameters())
    quiet = runner.invoke(APP, ["train", "digits-mlp", "--out", str(out), "--json"])
    assert quiet.exit_code == 0 and json.loads(quiet.stdout)["artifact"] == str(slim)  # no "wrote" on stdout


def test_export_writes_model_onnx_in_out_and_nothing_on_failure(zoo_model, tmp_path, monkeypatch):
    from slimguard.core.errors import ModelError
    from slimguard.runtime import onnx as sgonnx

    zoo_model("digits-mlp")
    out = tmp_path / "onnx"
    result = runner.invoke(APP, ["export", "zoo:digits-mlp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # no staging folder left behind
    assert f"wrote {out / 'model.onnx'}" in result.output
    before = (out / "model.onnx").read_bytes()

    def broken(*args, **kwargs):  # the file is exported, then its check on ONNX Runtime fails
        raise ModelError("ONNX Runtime disagrees")

    monkeypatch.setattr(sgonnx, "OrtModel", broken)
    for target in (out, tmp_path / "new"):
        failed = runner.invoke(APP, ["export", "zoo:digits-mlp", "--out", str(target)])
        assert failed.exit_code == 2 and "ONNX Runtime disagrees" in failed.output
    assert (out / "model.onnx").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert not (tmp_path / "new").exists()


def test_sensitivity_repeated_sparsity_and_max_drop_in_points(zoo_model, tmp_path):
    zoo_model("digits-mlp")
    out = tmp_path / "sens"
    args = ["sensitivity", "zoo:digits-mlp", "--sparsity", "0.5", "--sparsity", "0.95", "--max-examples", "200",
            "--max-drop", "1", "--out", str(out)]
    result = runner.invoke(APP, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'sensitivity.json'}" in result.output
    got = json.loads((out / "sensitivity.json").read_text())
    assert got["sparsities"] == [0.5, 0.95] and got["max_drop_points"] == 1.0
    floor = got["baseline"] - 0.01  # one point of accuracy
    want = {}
    for layer, rec in got["layers"].items():
        ok = [float(s) for s, v in rec["scores"].items() if v is not None and v >= floor]
        if ok:
            want[layer] = max(ok)
    assert got["suggested_ratios"] == want
    # read as a fraction, 1 would allow everything: 0.95 everywhere; one point does not
    assert want != {layer: 0.95 for layer in got["layers"]}
