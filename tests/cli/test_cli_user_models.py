"""A user's own model through the CLI: ``python:FILE.py:factory`` with ``--weights`` and ``--input-shape``,
an npz data set, evaluate -> compress (channel pruning + static int8) -> ONNX export with int8 operators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from slimguard.cli import build_app

runner = CliRunner()
APP = build_app()

CNN = """
from pathlib import Path

import torch.nn as nn

Path(__file__).with_suffix(".imports").open("a").write("imported\\n")  # counts how often the file runs


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def make():
    return TinyCNN()
"""


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    """The CNN file, safetensors weights for it (seeded, not the factory's) and an npz of 8x8 digits."""
    from sklearn.datasets import load_digits

    file = tmp_path / "tinycnn.py"
    file.write_text(CNN)
    ns: dict = {"__file__": str(tmp_path / "scratch.py")}
    exec(compile(CNN, "cnn", "exec"), ns)
    torch.manual_seed(1)
    weights = tmp_path / "tinycnn.safetensors"
    save_file({k: v.contiguous() for k, v in ns["make"]().state_dict().items()}, str(weights))
    d = load_digits()
    npz = tmp_path / "digits.npz"
    np.savez(npz, x=(d.images[:400] / 16.0).astype(np.float32)[:, None], y=d.target[:400])
    return {"file": file, "weights": weights, "npz": npz}


def _json(args: list[str]) -> dict:
    result = runner.invoke(APP, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_python_model_evaluate_compress_export_int8(user_files: dict[str, Path], tmp_path: Path) -> None:
    from slimguard.artifact import load, read_manifest
    from slimguard.models.sources import file_sha256, load_model

    file, weights, npz = user_files["file"], user_files["weights"], user_files["npz"]
    source = f"python:{file}:make"
    metrics = _json(["evaluate", source, "--data", f"npz:{npz}", "--weights", str(weights),
                     "--input-shape", "1,8,8", "--latency-batch", "1"])
    mine = load_model(source, weights=str(weights))
    with torch.no_grad():
        first = mine(torch.ones(1, 1, 8, 8))
    assert metrics["params"] == sum(p.numel() for p in mine.parameters())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "f1_macro" in metrics

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {source}\ndata: npz:{npz}\nsteps:\n  - channel: {{ratio: 0.5}}\n"
                      "  - int8-static: {}\n")
    out = tmp_path / "out"
    result = _json(["compress", "--recipe", str(recipe), "--out", str(out), "--weights", str(weights)])
    assert result["compressed"]["params"] < 0.7 * result["baseline"]["params"]  # half the channels went
    slim = Path(result["artifact"])
    manifest = read_manifest(slim)
    assert manifest["model"]["source"]["sha256"] == file_sha256(file)
    assert manifest["model"]["data"]["input_shape"] == [1, 8, 8]
    reloaded = load(slim, trust_code=file)
    assert type(reloaded).__module__ == type(mine).__module__  # one module for the file: classes keep identity
    assert file.with_suffix(".imports").read_text().count("imported") == 1  # the file ran once in this process
    assert not torch.equal(first, torch.zeros_like(first))

    onnx_dir = tmp_path / "onnx"
    exported = _json(["export", str(slim), "--trust-code", str(file), "--out", str(onnx_dir)])
    assert exported["onnx"] == str(onnx_dir / "model.onnx") and (onnx_dir / "model.onnx").is_file()
    assert exported["int8_ops"], exported  # QLinearConv / QGemm ... : the static int8 stayed int8
    assert exported["argmax_agreement"] >= 0.75


def test_weights_apply_to_the_model(user_files: dict[str, Path]) -> None:
    """--weights loads the file's tensors: outputs differ from the factory's own initialisation."""
    from slimguard.models.sources import load_model

    source = f"python:{user_files['file']}:make"
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    plain = load_model(source).eval()
    loaded = load_model(source, weights=str(user_files["weights"])).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), loaded(x))
        w = loaded.features[0].weight
    from safetensors.torch import load_file

    assert torch.equal(w, load_file(str(user_files["weights"]))["features.0.weight"])


def test_export_without_shape_names_the_option(user_files: dict[str, Path], tmp_path: Path) -> None:
    source = f"python:{user_files['file']}:make"
    result = runner.invoke(APP, ["export", source, "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "--input-shape" in result.output
    assert not (tmp_path / "onnx").exists()  # a failed export writes nothing
    ok = _json(["export", source, "--input-shape", "1,8,8", "--out", str(tmp_path / "onnx")])
    assert ok["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "w.safetensors", "zoo:digits-mlp"], "--weights applies to python:"),
    (["--task", "causal-lm", "zoo:digits-mlp"], "--task applies to hf:"),
    (["--input-shape", "1,x,8", "zoo:digits-mlp"], "is not a list of positive sizes"),
])
def test_model_option_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(APP, ["evaluate", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_hf_models_through_the_cli(tmp_path: Path) -> None:
    """A sequence classifier scored on labelled jsonl, an embedder on plain text with no reference given, and
    both written as ONNX and as Hugging Face folders."""
    from hf_support import build_family

    bert = build_family("bert", tmp_path / "bert")
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(
        ["the film was good", "a bad movie", "great actor", "awful plot", "long story", "short film",
         "fine scene", "dull story", "good plot", "bad actor", "the end", "a long film"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    scored = _json(["evaluate", f"hf:{bert}", "--data", f"jsonl:{tmp_path / 'd.jsonl'}"])
    assert {"accuracy", "f1_macro"} <= set(scored)

    embed = build_family("bert-embed", tmp_path / "embed")
    (tmp_path / "t.txt").write_text("\n".join(r["text"] for r in rows))
    fidelity = _json(["evaluate", f"hf:{embed}", "--data", f"text:{tmp_path / 't.txt'}"])
    assert fidelity["cosine_mean"] == pytest.approx(1.0, abs=1e-5)  # its own reference by default

    onnx = _json(["export", f"hf:{bert}", "--out", str(tmp_path / "bert-onnx")])
    assert onnx["max_abs_diff"] < 1e-4
    folder = _json(["export", f"hf:{bert}", "--format", "hf", "--out", str(tmp_path / "bert-hf")])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(folder["files"])
    as_embedder = _json(["evaluate", f"hf:{bert}", "--task", "embedding", "--data", f"text:{tmp_path / 't.txt'}"])
    assert "cosine_mean" in as_embedder


@pytest.mark.parametrize("command", [
    ["robustness", "--max-examples", "16", "--attack", "fgsm", "--eps", "0.1", "--corruption", "gaussian_noise"],
    ["ood", "--ood", "digits-ood", "--detector", "energy"],
    ["faults", "--trials", "20"],
])
def test_python_model_in_the_guard_commands(user_files: dict[str, Path], command: list[str]) -> None:
    name, *options = command
    result = _json([name, f"python:{user_files['file']}:make", "--weights", str(user_files["weights"]),
                    "--input-shape", "1,8,8", "--data", f"npz:{user_files['npz']}", *options])
    assert result  # each command ran the user's model on the user's data and reported
    if name == "faults":
        assert result["unprotected"]["trials"] == 20
