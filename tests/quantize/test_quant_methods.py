"""Each quantization method on small seeded layers: SQNR thresholds, packing, artifacts, bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.core.errors import ConfigError, DataError
from slimguard.quantize.observers import sqnr
from slimguard.quantize.weight_only import WeightOnlyLinear, pack_codes, unpack_codes


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 100), nn.ReLU(), nn.Linear(100, 10)).eval()


@pytest.fixture
def calib(digits):
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    return dataclasses.replace(digits.calib, x=x, y=torch.zeros(256, dtype=torch.long))


# (config, minimum output SQNR in dB vs the float model; int4 group-wise keeps ~ 4 bits x 6 dB)
CASES = [
    (sg.Int8StaticConfig(calibration="minmax"), 25.0),
    (sg.Int8StaticConfig(calibration="percentile"), 25.0),
    (sg.Int8StaticConfig(calibration="mse"), 25.0),
    (sg.Int8StaticConfig(calibration="entropy"), 20.0),
    (sg.Int8DynamicConfig(), 25.0),
    (sg.WeightOnlyConfig(bits=8, group_size=0), 35.0),
    (sg.WeightOnlyConfig(bits=4, group_size=32), 15.0),
    (sg.GPTQConfig(bits=4, group_size=32), 15.0),
    (sg.HalfPrecisionConfig(dtype="bf16"), 35.0),
    (sg.HalfPrecisionConfig(dtype="fp16"), 50.0),
]


@pytest.mark.parametrize(("config", "min_db"), CASES,
                         ids=lambda c: type(c).__name__ if not isinstance(c, float) else "")
def test_sqnr_and_report(config, min_db, calib):
    model = small_mlp()
    ref = model(calib.x[:64]).detach()
    q = copy.deepcopy(model)
    report = sg.quantize_(q, config, calib=calib, progress=False)
    out = q(calib.x[:64]).detach()
    assert sqnr(ref, out) > min_db
    assert len(report["quantized"]) == 3 and report["kept_float"] == []
    assert not any(type(m) is nn.Linear for m in q.modules())  # the transform changed something


def test_gptq_beats_round_to_nearest(calib):
    model = small_mlp()
    ref = model(calib.x).detach()
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    sg.quantize_(rtn, sg.WeightOnlyConfig(bits=3, group_size=32), calib=calib)
    sg.quantize_(gptq, sg.GPTQConfig(bits=3, group_size=32), calib=calib, progress=False)
    assert sqnr(ref, gptq(calib.x).detach()) > sqnr(ref, rtn(calib.x).detach()) + 1.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 12), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == ((7, 6) if bits <= 4 else (7, 12))
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_int4_is_packed_and_padded():
    lin = nn.Linear(100, 8)  # 100 is not a multiple of 64: padded to 128 (documented)
    m = WeightOnlyLinear.from_float(lin, bits=4, group_size=64)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (8, 64)
    assert m.scales.shape == (8, 2)
    x = torch.randn(5, 100)
    assert sqnr(lin(x), m(x)) > 15


def test_artifact_round_trip_and_int4_smaller(zoo_model, digits, tmp_path):
    sizes = {}
    for name, cfg in [("int8", sg.WeightOnlyConfig(bits=8, group_size=0)),
                      ("int4", sg.WeightOnlyConfig(bits=4, group_size=64)),
                      ("static", sg.Int8StaticConfig()), ("half", sg.HalfPrecisionConfig())]:
        m = zoo_model("digits-mlp")
        sg.quantize_(m, cfg, calib=digits.calib, progress=False)
        path = sg.save(m, tmp_path / f"{name}.slim")
        back = sg.load(path)
        x = digits.test.x[:32]
        assert torch.equal(m(x), back(x)), name  # exact reload
        sizes[name] = path.stat().st_size
    assert sizes["int4"] < 0.65 * sizes["int8"]


def test_unsupported_layers_stay_float_and_are_reported(calib):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1d = nn.Conv1d(1, 1, 3, padding=1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.conv1d(x[:, None, :])[:, 0])

    net = Net().eval()
    w_before = net.conv1d.weight.detach().clone()
    report = sg.quantize_(net, sg.Int8StaticConfig(), calib=calib, progress=False)
    assert type(net.conv1d) is nn.Conv1d and torch.equal(net.conv1d.weight, w_before)
    assert {"layer": "conv1d", "reason": "Conv1d is not quantized here"} in report["kept_float"]
    assert report["quantized"] == ["fc"]


@pytest.mark.parametrize(("make", "error"), [
    (lambda: sg.WeightOnlyConfig(bits=5), ConfigError),
    (lambda: sg.WeightOnlyConfig(bits=4, group_size=33), ConfigError),
    (lambda: sg.GPTQConfig(bits=16), ConfigError),
    (lambda: sg.Int8StaticConfig(weight_bits=9), ConfigError),
    (lambda: sg.Int8StaticConfig(calibration="median"), ConfigError),
    (lambda: sg.MixedPrecisionConfig(bits=[5]), ConfigError),
])
def test_bad_configs(make, error):
    with pytest.raises(error):
        make()


def test_bad_calibration_data(zoo_model, digits):
    m = zoo_model("digits-mlp")
    empty = digits.calib.subset(0)
    wrong = dataclasses.replace(digits.calib, x=torch.rand(8, 3, 5))
    with pytest.raises(DataError, match="empty"):
        sg.quantize_(m, sg.Int8StaticConfig(), calib=empty)
    with pytest.raises(DataError, match="shape"):
        sg.quantize_(m, sg.Int8StaticConfig(), calib=wrong)
    with pytest.raises(DataError, match="calibration data"):
        sg.quantize_(m, sg.GPTQConfig())
    assert sum(isinstance(x, nn.Linear) for x in m.modules()) == 3  # nothing was mangled


def test_recipe_steps_are_registered():
    from slimguard.core.config import config_class

    for name, fields in [("int8-static", {"calibration": "minmax"}), ("weight-only", {"bits": 4}),
                         ("gptq", {"group_size": 32}), ("qat", {"finetune": {"epochs": 1}}),
                         ("smoothquant", {"alpha": 0.6}),
                         ("half", {"dtype": "fp16"}), ("mixed-precision", {"budget": 1.0}), ("fuse-bn", {})]:
        cfg = config_class(name).from_fields(fields)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_int8_dynamic_quantizes_gpt2_conv1d_projections() -> None:
    transformers = pytest.importorskip("transformers")
    from slimguard.quantize.dynamic import DynamicInt8Linear, Int8DynamicConfig

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                                 vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    report = sg.quantize_(model, Int8DynamicConfig())
    assert set(conv1d) <= set(report["quantized"])
    assert all(isinstance(model.get_submodule(n), DynamicInt8Linear) for n in conv1d)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # int8 weights and rows: the logits move by a small fraction of their spread, and the argmax mostly holds
    assert (after - before).abs().max() < 0.1 * before.std()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9
