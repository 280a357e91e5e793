"""ONNX export keeps dynamic int8 (MatMulInteger family in ORT's graph), refuses layers it would silently
turn into float, and the ``torch.export`` path gives a program computing what the model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from hf_support import build_family
from slimguard.core.errors import ModelError
from slimguard.runtime.onnx import (
    OrtModel,
    _qualified_scope,
    check_int8_kernels,
    dynamic_int8_layers,
    export_embedder,
    export_onnx,
    export_program,
)

DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 4))


def test_dynamic_int8_stays_int8_in_onnx(tmp_path: Path) -> None:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    float_model = _mlp()
    floats = check_int8_kernels(OrtModel(export_onnx(float_model, x[:2], tmp_path / "f.onnx")), expect=False)
    assert not floats["int8_ops"]  # the float model has none: the check below is not vacuous
    model = copy.deepcopy(float_model)
    sg.quantize_(model, sg.Int8DynamicConfig())
    assert dynamic_int8_layers(model) == ["0", "2.0", "3"]
    ort = OrtModel(export_onnx(model, x[:2], tmp_path / "q.onnx"))
    ops = check_int8_kernels(ort)["int8_ops"]
    assert set(ops) <= DYNAMIC_OPS and sum(ops.values()) == 3  # every quantized layer runs in int8
    with torch.no_grad():
        want = model(x)
    got = ort(x)
    # ORT quantizes activations per tensor, slimguard per row: close, not equal (outputs are O(1))
    assert float((got - want).abs().max()) < 0.05
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_dynamic_int8_hf_families_export_int8(family: str, tmp_path: Path) -> None:
    from slimguard.models.sources import load_model

    model = load_model(f"hf:{build_family(family, tmp_path / family)}")
    sg.quantize_(model, sg.Int8DynamicConfig())
    ort = OrtModel(export_embedder(model, tmp_path / "m.onnx"))
    ops = check_int8_kernels(ort)["int8_ops"]
    assert set(ops) & DYNAMIC_OPS
    enc = model.tokenize(["the film was good", "a bad movie and a dull story"])
    with torch.no_grad():
        want = model(**enc)
    got = ort(enc["input_ids"], enc["attention_mask"])
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def test_weight_only_layers_are_refused_by_name(tmp_path: Path) -> None:
    model = _mlp()
    sg.quantize_(model, sg.WeightOnlyConfig(bits=4, group_size=16))
    with pytest.raises(ModelError, match=r"e\.g\. 0: low-bit weight-only layers"):
        export_onnx(model, torch.randn(2, 16), tmp_path / "w.onnx")
    assert not (tmp_path / "w.onnx").exists()


@pytest.mark.parametrize(("scope", "name"), [
    ("/model/vit/layers.0/mlp/fc1", "model.vit.layers.0.mlp.fc1"),
    ("/layers.0/layers.0.0", "layers.0.0"),
    ("/fc", "fc"),
])
def test_exporter_scopes_name_their_modules(scope: str, name: str) -> None:
    assert _qualified_scope(scope) == name


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_torch_export_program_matches_the_compressed_model(activations, monkeypatch) -> None:
    from slimguard.quantize import kernels

    model = _mlp()
    sg.quantize_(model, sg.Int8DynamicConfig(activations=activations))
    program = export_program(model, torch.randn(2, 16))
    # the program runs the integer kernels' sequence for large products at every size; eager PyTorch picks
    # float or a shorter sequence for small ones, so it is made to take that same path here
    monkeypatch.setattr(kernels, "FLOAT_MAX_MACS", -1)
    monkeypatch.setattr(kernels, "SMALL_PRODUCT", -1)
    monkeypatch.setattr(kernels, "ONEDNN_INT8", False)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2))  # another batch size: dynamic batch
    eager = copy.deepcopy(model)  # copies start without oneDNN layouts: ONEDNN_INT8 is read when packing
    with torch.no_grad():
        assert torch.equal(program.module()(x), eager(x))  # the same int8 kernels, traced: exact
    assert any("_int_mm" in str(node.target) for node in program.graph.nodes)
