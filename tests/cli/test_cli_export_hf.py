"""``slimguard export ARTIFACT --format hf``: a BERT classifier pruned to different head counts and FFN widths
per layer, saved as a .slim artifact, comes out as a Hugging Face folder (tokenizer included) that
``from_pretrained`` loads with the stock config and that computes what the artifact does, zero-padded, with a
one-line warning and the zeros counted in the JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimguard as sg
from hf_support import build_family
from slimguard.artifact import load, save
from slimguard.cli import build_app
from slimguard.models.sources import load_model
from slimguard.prune.structured import ChannelPruningConfig

transformers = pytest.importorskip("transformers")
runner = CliRunner()
APP = build_app()
TEXTS = ["the film was good", "a bad movie with a long and dull story", "great actor"]


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """A tiny BERT (matrices 10x transformers' init, so logits are of order 1) pruned to heads 4 -> 2 / 3 and
    FFN neurons 64 -> 32 / 48 in its two layers, saved as an artifact."""
    model = load_model(f"hf:{build_family('bert', tmp_path / 'bert')}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    ratios = {"model.bert.encoder.layer.0": 0.5, "model.bert.encoder.layer.1": 0.25}
    sg.prune_(model, ChannelPruningConfig(ratio=0.0, ratios=ratios), example_inputs=model.tokenize(TEXTS[:1]))
    return save(model, tmp_path / "pruned.slim")


def test_pruned_artifact_exports_a_padded_folder_that_computes_the_same(artifact: Path, tmp_path: Path) -> None:
    from slimguard.cli import _one_line_warning

    out = tmp_path / "hf"
    with pytest.warns(UserWarning, match="zero-padded") as caught:
        result = runner.invoke(APP, ["export", str(artifact), "--format", "hf", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["zero_padded"] is True and record["out"] == str(out)
    assert (record["zero_heads"], record["zero_ffn_neurons"]) == (3, 16)  # (2 + 1) heads, 16 neurons of layer 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(record["files"])
    assert sorted(p.name for p in out.iterdir()) == record["files"]  # no staging folder left behind
    said = [str(w.message) for w in caught if "zero-padded" in str(w.message)]
    assert len(said) == 1 and "--format onnx keeps the smaller shape" in said[0]
    assert _one_line_warning(said[0], UserWarning).count("\n") == 1  # the CLI prints it as one line

    pruned = load(artifact)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = pruned(batch["input_ids"], batch["attention_mask"])
        got = back(**batch).logits
    assert want.abs().max() > 0.1  # outputs of order 1, so the tolerance below is a real check
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_non_empty_out_folder_is_one_line_and_nothing_is_written(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(APP, ["export", str(artifact), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 2 and "--format hf needs a new or empty folder" in result.output
    assert "Traceback" not in result.output and [p.name for p in out.iterdir()] == ["keep.txt"]
