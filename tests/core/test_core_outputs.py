"""Outputs: a run that misses its budget or fails never replaces a good run's files; output paths are
checked before any work (exit 2, one line); saved files get the umask's mode, not mkstemp's 0600."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat

import pytest
import yaml
from typer.testing import CliRunner

from slimguard.cli import build_app
from slimguard.core.errors import OutputError
from slimguard.core.outputs import (
    atomic_write,
    check_output_dir,
    check_output_file,
    write_json_atomic,
    write_text_atomic,
)

runner = CliRunner()
APP = build_app()
GOOD = {"model": "zoo:digits-mlp", "data": "digits", "budget": {"max_accuracy_drop": 5.0}, "steps": ["int8-dynamic"]}
# 97% of the weights removed and no fine-tuning: accuracy falls far below a zero-point budget
OVER = {**GOOD, "budget": {"max_accuracy_drop": 0.0}, "steps": [{"magnitude": {"sparsity": 0.97}}]}


def _recipe(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return p


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- a missed budget or a failed run never replaces a good run ---------------------------------------------
def test_over_budget_run_keeps_the_good_artifact_byte_identical(tmp_path):
    out = tmp_path / "out"
    good = runner.invoke(APP, ["compress", "-r", str(_recipe(tmp_path, "good.yaml", GOOD)), "-o", str(out), "-q"])
    assert good.exit_code == 0, good.output
    before = _digests(out)
    assert set(before) == {"model.slim", "metrics.json", "report.html"}

    r = runner.invoke(APP, ["compress", "-r", str(_recipe(tmp_path, "over.yaml", OVER)), "-o", str(out), "-q"])
    assert r.exit_code == 1, r.output  # a missed budget is not a user error
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("budget missed (accuracy drop "), r.output
    assert str(out / "model.rejected.slim") in lines[0] and "model.slim was not replaced" in lines[0]
    after = _digests(out)
    assert {k: after[k] for k in before} == before  # the good run's three files, byte for byte
    assert set(after) - set(before) == {"model.rejected.slim", "metrics.rejected.json", "report.rejected.html"}
    rejected = json.loads((out / "metrics.rejected.json").read_text())
    assert rejected["accepted"] is False and rejected["budget"]["ok"] is False
    assert rejected["artifact"] == str(out / "model.rejected.slim")
    assert json.loads((out / "metrics.json").read_text())["accepted"] is True

    from slimguard.artifact import load

    load(out / "model.rejected.slim")  # the rejected artifact is a complete, loadable file


def test_api_reports_where_a_rejected_run_went(tmp_path):
    from slimguard.core.recipe import parse
    from slimguard.pipeline import compress

    result = compress(parse(OVER), tmp_path, progress=False)
    assert result["accepted"] is False
    assert result["artifact"] == str(tmp_path / "model.rejected.slim")
    assert result["metrics_file"] == str(tmp_path / "metrics.rejected.json")
    assert result["report"] == str(tmp_path / "report.rejected.html")
    assert not (tmp_path / "model.slim").exists() and not (tmp_path / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.rejected.json", "model.rejected.slim",
                                                          "report.rejected.html"]  # no temporary left


def test_run_failing_after_the_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from slimguard.artifact import slim as artifact
    from slimguard.core.recipe import parse
    from slimguard.pipeline import compress

    (tmp_path / "model.slim").write_bytes(b"a good artifact")
    (tmp_path / "metrics.json").write_text("{}")
    before = _digests(tmp_path)

    def broken_load(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(artifact, "load", broken_load)
    with pytest.raises(RuntimeError, match="disk went away"):
        compress(parse(GOOD), tmp_path, progress=False)
    assert _digests(tmp_path) == before  # the pending artifact is removed, nothing replaced


# ---- output paths are checked before any work ---------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Make every model and data load fail loudly: a command that gets that far started work."""
    from slimguard import data
    from slimguard.models import sources, zoo

    def started(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(sources, "load_model", started)
    monkeypatch.setattr(data, "load", started)
    monkeypatch.setattr(zoo, "load", started)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "-r", "{recipe}", "-o", "{file}"], "is a file, not a folder"),
        (["compress", "-r", "{recipe}", "-o", "{file}/sub"], "is a file, not a folder; choose a path under"),
        (["compress", "-r", "{recipe}", "-o", "{dir}/clash"], "model.slim is a folder"),
        (["demo", "--out", "{file}"], "is a file, not a folder"),
        (["train", "digits-mlp", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["train", "digits-mlp", "--out", "{dir}/clash"], "--out {dir}/clash/model.slim is a folder"),
        (["export", "zoo:digits-mlp", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["export", "zoo:digits-mlp", "--out", "{dir}/clash"], "--out {dir}/clash/model.onnx is a folder"),
        (["export", "zoo:digits-mlp", "--out", "{dir}/o", "--embed-into", "{file}/m.slim"],
         "--embed-into {file}/m.slim: {file} is a file"),
        (["distill", "zoo:digits-mlp", "--width", "0.5", "--out", "{file}/s"], "{file} is a file, not a folder"),
        (["sensitivity", "zoo:digits-mlp", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["robustness", "zoo:digits-mlp", "--out", "{file}"], "--out {file} is a file, not a folder"),
    ],
    ids=["compress-file", "compress-under-file", "compress-clash", "demo-file", "train", "train-clash", "export",
         "export-clash", "embed-into", "distill", "sensitivity", "robustness"],
)
def test_bad_output_paths_fail_at_once(tmp_path, no_work, args, message):
    names = {"recipe": str(_recipe(tmp_path, "r.yaml", GOOD)), "file": str(tmp_path / "a-file"),
             "dir": str(tmp_path)}
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "clash" / "model.slim").mkdir(parents=True)
    (tmp_path / "clash" / "model.onnx").mkdir()
    result = runner.invoke(APP, [a.format(**names) for a in args])
    _one_line_exit_2(result, message.format(**names))
    assert "work started" not in result.output


def test_output_checks(tmp_path, monkeypatch):
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # created later
    assert check_output_file(f) == f  # an existing file is replaced atomically
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputError, match="is a folder; give the path of a file"):
        check_output_file(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is not a regular file"):
        check_output_file(fifo)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(OutputError, match=f"cannot write in {locked}"):
        check_output_dir(locked / "run")
    with pytest.raises(OutputError, match="permission denied"):
        check_output_file(locked / "m.slim")


# ---- saved files respect the umask --------------------------------------------------------------------------
def _writers(tmp_path, zoo_model):
    from slimguard.artifact import save
    from slimguard.guard.contract import Contract
    from slimguard.report import write_report

    model = zoo_model("digits-mlp")
    return {
        "json": lambda: write_json_atomic(tmp_path / "m.json", {"a": 1}),
        "text": lambda: write_text_atomic(tmp_path / "t.txt", "hello"),
        "artifact": lambda: save(model, tmp_path / "m.slim"),
        "report": lambda: write_report({"baseline": {}, "compressed": {}, "budget": {}, "steps": []},
                                       tmp_path / "r.html"),
        "contract": lambda: Contract((3,), ["float32"], 0.0, 1.0).save(tmp_path / "c.yaml"),
    }


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_mode(tmp_path, zoo_model, mask):
    writers = _writers(tmp_path, zoo_model)
    with _umask(mask):
        paths = {name: write() for name, write in writers.items()}
    want = 0o666 & ~mask
    assert {name: oct(_mode(p)) for name, p in paths.items()} == {name: oct(want) for name in writers}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="half way"), atomic_write(target) as fh:
        fh.write("new, half written")
        raise ValueError("half way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
