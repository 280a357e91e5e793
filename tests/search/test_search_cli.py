"""``slimguard optimize`` from the command line: the --json point, one-line errors, the dashboard hint, two
processes sharing one SQLite study, and --workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from slimguard.cli import build_app

runner = CliRunner()
APP = build_app()
QUICK = {"search": {"structured": ["none"], "sparsify": ["none", "magnitude"], "factorize": ["none"],
                    "train": ["none"], "quantize": ["int8-dynamic", "half", "weight-sharing"],
                    "params": {"magnitude.sparsity": [0.2, 0.5]}, "groups": False}}
COMMON = ["--data", "digits", "--budget", "2", "--speed-budget", "0.2", "--no-track"]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(QUICK))
    return path


def test_json_prints_the_chosen_point(tmp_path, space):
    out = tmp_path / "out"
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(out), "--trials", "3", "--space", str(space),
                              *COMMON, "--json"])
    assert res.exit_code == 0, res.output
    point = json.loads(res.stdout)
    for key in ("test_accuracy_drop_points", "size_ratio", "speed_ratio", "speed_ci95", "val_accuracy_drop_points",
                "steps", "files"):
        assert key in point
    assert point["val_accuracy_drop_points"] <= 2.0 and 0 < point["size_ratio"] < 1
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["best.yaml", "model.slim", "pareto.json",
                                                                    "report.html", "study.db"]


@pytest.mark.parametrize(("args", "message"), [
    (["--objectives", "size,speed"], "error: --objectives: 'speed' is not allowed"),
    (["--target", "tpu"], "error: --target: 'tpu' is not allowed; allowed: torch, ort"),
    (["--objectives", "size,robustness", "--max-examples", "0"], "error: --max-examples: 0; use 1 or more"),
    (["--storage", "mysql"], "error: --storage: 'mysql' is not a database URL"),
    (["--trials", "0"], "error: --trials: 0; use 1 or more"),
    (["--min-cosine", "1.5"], "error: --min-cosine: 1.5 is out of range"),
    (["--min-cosine", "0.95"], "error: --min-cosine: applies to embedding data, and this data set is classification"),
])
def test_user_errors_are_one_line_with_exit_2(tmp_path, args, message):
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(tmp_path / "o"), *COMMON, *args])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith(message) and len(res.stderr.strip().splitlines()) == 1


def test_target_ort_and_robustness_from_the_command_line(tmp_path):
    space = tmp_path / "space.yaml"
    block = {**QUICK["search"], "sparsify": ["none"], "quantize": ["int8-dynamic"], "params": {}}
    space.write_text(yaml.safe_dump({"search": block}))
    out = tmp_path / "out"
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(out), "--trials", "1", "--space", str(space),
                              *COMMON, "--target", "ort", "--objectives", "size,robustness", "--max-examples", "16",
                              "--robust-steps", "2", "--robust-eps", "0.05", "--json"])
    assert res.exit_code == 0, res.output
    point = json.loads(res.stdout)
    assert point["target"] == "ort" and 0 <= point["val_robust_accuracy"] <= 1
    assert point["val_robust_accuracy"] * 16 == pytest.approx(round(point["val_robust_accuracy"] * 16))
    assert json.loads((out / "pareto.json").read_text())["robustness"]["eps"] == 0.05
    assert (out / "best.yaml").read_text().startswith("# target: ort")


def test_bad_space_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  quantize: [channel]\n")
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(tmp_path / "o"), "--space", str(bad), *COMMON])
    assert res.exit_code == 2 and "'channel' is not a quantize/cluster step" in res.stderr


def test_dashboard_prints_how_to_open_the_study_and_runs_nothing(tmp_path):
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(tmp_path / "o"), *COMMON, "--dashboard"])
    assert res.exit_code == 0
    assert f"optuna-dashboard sqlite:///{(tmp_path / 'o' / 'study.db').resolve()}" in res.stdout
    assert not (tmp_path / "o" / "study.db").exists()


def _workers(storage: str, name: str) -> set[str]:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    return {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}


def test_two_processes_share_one_sqlite_study(tmp_path, space):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = [sys.executable, "-c", "from slimguard.cli import main; main()", "optimize", "zoo:digits-mlp",
           "--storage", storage, "--study-name", "shared", "--trials", "8", "--space", str(space), *COMMON, "--quiet"]
    env = {**os.environ, "SLIMGUARD_QUIET": "1"}
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    measured = [t for t in finished if "repeat_of" not in t.user_attrs]  # draws of a measured pipeline: replayed
    assert 8 <= len(measured) <= 9  # each stops once the study holds 8; one more may have started meanwhile
    assert len(_workers(storage, "shared")) == 2  # both processes ran trials of the one study
    fronts = [json.loads((tmp_path / f"out{i}" / "pareto.json").read_text()) for i in range(2)]
    numbers = {t.number for t in finished}
    assert all({p["trial"] for p in f["points"]} <= numbers for f in fronts)


def test_workers_run_trials_in_local_processes(tmp_path, space):
    out = tmp_path / "out"
    res = runner.invoke(APP, ["optimize", "zoo:digits-mlp", "--out", str(out), "--trials", "4", "--workers", "2",
                              "--space", str(space), *COMMON, "--quiet"])
    assert res.exit_code == 0, res.output
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    workers = _workers(storage, "slimguard")
    assert len(workers) >= 1 and str(os.getpid()) not in {w.rsplit(":", 1)[1] for w in workers}
    assert (out / "pareto.json").is_file()
