"""``slimguard distill`` through typer's CliRunner: a narrower student is saved; bad input exits 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def app():
    from slimguard.cli import build_app

    return build_app()


def test_distill_width_student(app, zoo_model, tmp_path) -> None:
    zoo_model("digits-mlp")  # trained and cached before the CLI loads it
    out = tmp_path / "student"
    res = CliRunner().invoke(app, ["distill", "zoo:digits-mlp", "--width", "0.5", "--epochs", "3", "--lr", "5e-3",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    slim = out / "model.slim"
    assert got["artifact"] == str(slim) and slim.is_file() and got["size_bytes"] == slim.stat().st_size
    assert got["student"]["params"] < 0.4 * got["teacher"]["params"]
    assert got["student"]["accuracy"] > 0.85


@pytest.mark.parametrize("args,match", [
    (["--width", "0.5", "--temperature", "0"], "temperature"),
    (["--width", "0.5", "--keep-layer", "0", "--keep-layer", "1"], "exactly one of"),
    (["--keep-layer", "0,1"], "--keep-layer"),
    (["--width", "0.5", "--device", "gpu"], "distill.finetune: device: 'gpu' is not allowed; allowed: auto, cpu, cuda"),
])
def test_bad_input_is_one_line_exit_2(app, zoo_model, tmp_path, args, match) -> None:
    zoo_model("digits-mlp")
    res = CliRunner().invoke(app, ["distill", "zoo:digits-mlp", "--out", str(tmp_path / "s"), *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
