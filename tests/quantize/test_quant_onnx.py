"""ONNX export and ONNX Runtime: int8 kernels present, predictions agree with PyTorch, CLI, MACs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import slimguard as sg
from slimguard.cli import build_app
from slimguard.runtime.measure import count_macs
from slimguard.runtime.onnx import OrtModel, check_int8_kernels, export_onnx


@pytest.fixture
def small_resnet(digits32):
    model = sg.zoo.create("digits32-resnet", widths=(8, 16, 16)).eval()
    calib = digits32.calib.subset(64)
    return model, calib


def test_static_int8_runs_int8_kernels_and_agrees(small_resnet, digits32, tmp_path):
    model, calib = small_resnet
    sg.quantize_(model, sg.Int8StaticConfig(), calib=calib, progress=False)
    ort_model = OrtModel(export_onnx(model, calib.x[:1], tmp_path / "q.onnx"), num_threads=1)
    kernels = check_int8_kernels(ort_model)
    assert kernels["ok"] and kernels["int8_ops"].get("QLinearConv", 0) >= 5 and kernels["float_compute_ops"] == {}
    x = digits32.test.x[:64]
    with torch.no_grad():
        ref, got = model(x), ort_model(x)
    # ORT requantizes in fixed point; outputs differ by at most a few output quantization steps
    step = float(model.fc.output_scale)
    assert float((ref - got).abs().max()) <= 4 * step
    assert float((ref.argmax(1) == got.argmax(1)).float().mean()) >= 0.95
    back = sg.load(sg.save(model, tmp_path / "q.slim"))  # int8 conv layers rebuild without pickle
    assert torch.equal(back(x), ref)


def test_float_export_matches_and_warns_without_int8(small_resnet, tmp_path):
    model, calib = small_resnet
    ort_model = OrtModel(export_onnx(model, calib.x[:1], tmp_path / "f.onnx"))
    x = calib.x[:8]
    torch.testing.assert_close(ort_model(x), model(x).detach(), atol=1e-4, rtol=1e-4)
    with pytest.warns(RuntimeWarning, match="no int8 kernel"):
        assert not check_int8_kernels(ort_model)["ok"]


def test_quantized_macs_are_counted(zoo_model, digits):
    m = zoo_model("digits-mlp")
    x = digits.test.x[:1]
    before = count_macs(m, x)
    sg.quantize_(m, sg.Int8DynamicConfig())
    assert count_macs(m, x) == before == 64 * 300 + 300 * 100 + 100 * 10


def test_cli_export(tmp_path, digits):
    runner = CliRunner()
    out = tmp_path / "onnx"
    res = runner.invoke(build_app(), ["export", "zoo:digits-mlp", "--out", str(out), "--json",
                                      "--embed-into", str(tmp_path / "m.slim")])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    onnx = out / "model.onnx"
    assert payload["onnx"] == str(onnx) and sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert payload["argmax_agreement"] == 1.0 and payload["max_abs_diff"] < 1e-4
    from slimguard.artifact import read_entry

    assert read_entry(tmp_path / "m.slim", "model.onnx") == onnx.read_bytes()
    bad = runner.invoke(build_app(), ["export", "zoo:digits-mlp", "--format", "tflite", "--out", str(out)])
    assert bad.exit_code == 2 and "tflite" in bad.output


def test_ort_model_rejects_missing_inputs(small_resnet, tmp_path):
    from slimguard.core.errors import ModelError

    model, calib = small_resnet
    ort_model = OrtModel(export_onnx(model, calib.x[:1], tmp_path / "f.onnx"))
    with pytest.raises(ModelError, match="not given"):
        ort_model()
    assert dataclasses.is_dataclass(calib)
