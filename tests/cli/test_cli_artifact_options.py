"""Every command that loads a model takes the loading policy options (``--trust-code``,
``--require-signature``, ``--key-env``) and applies them to a ``.slim`` before any other work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimguard.artifact import slim as artifact
from slimguard.cli import build_app

runner = CliRunner()
APP = build_app()

# command -> its arguments after the model (what it needs to get as far as loading)
COMMANDS = {
    "evaluate": [],
    "inspect": [],
    "sensitivity": [],
    "robustness": [],
    "ood": [],
    "faults": [],
    "export": ["--out", "{tmp}/onnx"],
    "distill": ["--out", "{tmp}/student", "--width", "0.5"],
}


def _args(command: str, model: Path, tmp: Path, *options: str) -> list[str]:
    if command == "compress":
        recipe = tmp / "r.yaml"
        recipe.write_text(f"model: {model}\ndata: digits\nsteps:\n  - magnitude: {{sparsity: 0.5}}\n")
        return ["compress", "--recipe", str(recipe), "--out", str(tmp / "out"), *options]
    return [command, str(model), *(a.format(tmp=tmp) for a in COMMANDS[command]), *options]


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory) -> Path:
    from slimguard.models import zoo

    return artifact.save(zoo.load("digits-mlp", progress=False), tmp_path_factory.mktemp("a") / "u.slim")


@pytest.mark.parametrize("command", [*COMMANDS, "compress"])
def test_every_loading_command_applies_the_policy(command, unsigned, tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMGUARD_SIGNING_KEY", raising=False)  # only the options under test configure a key
    monkeypatch.setenv("MY_KEYS", "k2,k1")
    for options in (["--require-signature"], ["--key-env", "MY_KEYS"]):
        r = runner.invoke(APP, _args(command, unsigned, tmp_path, *options))
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "artifact is not signed" in lines[0], r.output
    r = runner.invoke(APP, _args(command, unsigned, tmp_path, "--key-env", "NOT_SET_ANYWHERE"))
    assert r.exit_code == 2 and "--key-env NOT_SET_ANYWHERE" in r.output, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.slim").exists()  # nothing was written
