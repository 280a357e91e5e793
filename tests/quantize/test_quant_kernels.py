"""The integer kernels behind the quantized layers: exact where integers are exact, stated tolerances where
bfloat16 enters, odd shapes and padding, cache invalidation, MACs, and the stored format."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimguard as sg
from slimguard.quantize import kernels
from slimguard.quantize.dynamic import DynamicInt8Linear
from slimguard.quantize.kernels import (
    fake_quantize_rows,
    int_mm,
    quantize_static_input,
)
from slimguard.quantize.observers import sqnr
from slimguard.quantize.qmodules import QuantLinear
from slimguard.quantize.weight_only import WeightOnlyLinear
from slimguard.runtime.measure import count_macs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 5), (3, 1, 7), (1, 2, 1), (5, 3, 7), (17, 100, 10), (64, 384, 48)])
def test_int_mm_is_exact_on_odd_shapes(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=_gen(0))
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=_gen(1))
    assert torch.equal(int_mm(a, b.t()), (a.long() @ b.long().t()).int())  # exact: integers


def _old_dynamic(x: torch.Tensor, layer: DynamicInt8Linear) -> torch.Tensor:
    """The previous implementation's numbers, in float: fbgemm's per-batch asymmetric 7-bit activations."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = ((hi - lo) / 127).clamp_min(1e-8)
    zp = torch.round(-lo / scale).clamp(0, 127).int()
    return F.linear(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 127), layer.dequantized_weight(), layer.bias)


@pytest.mark.parametrize(("k", "n", "rows"), [(384, 384, 64), (384, 1536, 64), (1536, 384, 64), (384, 384, 256)])
def test_dynamic_int8_is_at_least_as_accurate_as_before(k, n, rows):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    # MiniLM-like activations: tokens of different magnitudes, a few outlier channels (small and large products)
    x = torch.randn(2, rows, k, generator=_gen(2)) * torch.rand(2, rows, 1, generator=_gen(3)) * 3
    x[..., :4] *= 8
    layer = DynamicInt8Linear.from_float(lin)
    ref = lin(x).detach()
    new, old = layer(x), _old_dynamic(x, layer)
    assert new.shape == ref.shape and not new.requires_grad
    # per-row 8-bit scales against fbgemm's per-batch 7-bit ones: the error shrinks (by 11-14 dB here)
    assert sqnr(ref, new) >= sqnr(ref, old) + 6.0 and sqnr(ref, new) > 30.0
    # the int32 product equals its float emulation (same rounding of x) up to float accumulation
    emulated = F.linear(fake_quantize_rows(x), layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(new, emulated, rtol=1e-4, atol=1e-4 * float(emulated.abs().max()))


def test_dynamic_int8_other_dtypes_and_empty_batches_use_their_paths():
    layer = DynamicInt8Linear.from_float(nn.Linear(8, 4))
    xb = torch.randn(3, 8).bfloat16()
    torch.testing.assert_close(layer(xb), F.linear(xb, layer.dequantized_weight().bfloat16(), layer.bias.bfloat16()))
    assert layer(torch.zeros(0, 8)).shape == (0, 4)
    assert torch.equal(layer(torch.zeros(2, 8)), layer.bias.detach().expand(2, 4))  # all-zero rows: exactly bias


def _static_layer(zero_point: int, relu: bool) -> QuantLinear:
    layer = QuantLinear(48, 20, relu=relu)
    layer.weight_int8.copy_(torch.randint(-127, 128, (20, 48), dtype=torch.int8, generator=_gen(4)))
    layer.weight_scale.copy_(torch.rand(20, generator=_gen(5)) * 0.01 + 1e-3)
    layer.bias.data.copy_(torch.randn(20, generator=_gen(6)))
    layer.input_scale.fill_(0.02)
    layer.input_zero_point.fill_(zero_point)
    layer.output_scale.fill_(0.05)
    layer.output_zero_point.fill_(100)
    return layer.eval()


@pytest.mark.parametrize("zero_point", [0, 37, 128, 255])
@pytest.mark.parametrize("relu", [False, True])
def test_static_int8_matches_its_float_emulation(zero_point, relu):
    layer = _static_layer(zero_point, relu)
    x = torch.randn(4, 33, 48, generator=_gen(7)) * 3  # reaches past both ends of the uint8 range
    codes = quantize_static_input(x, layer.input_scale, layer.input_zero_point)
    fq = torch.fake_quantize_per_tensor_affine(x, layer.input_scale, layer.input_zero_point, 0, 255)
    assert torch.equal((codes.float() + 128 - zero_point) * layer.input_scale, fq)  # the same input rounding
    real, emulated = layer(x), layer._run(x, F.linear)
    steps = (real - emulated).abs() / float(layer.output_scale)
    # float vs int32 accumulation: only an output on a rounding edge may move, by one step
    assert float(steps.max()) <= 1.001 and float((steps == 0).float().mean()) >= 0.99


def test_static_int8_output_in_blocks_of_rows_is_the_same(monkeypatch):
    layer = _static_layer(37, relu=False)
    x = torch.randn(4, 33, 48, generator=_gen(8)) * 3
    whole = layer(x)
    monkeypatch.setattr(kernels, "QUANT_BLOCK_BYTES", 4 * 20 * 5)  # about 5 output rows a block (6 here)
    assert len(kernels._row_blocks(torch.empty(132, 20))) == 22
    assert torch.equal(layer(x), whole)  # the zero-point correction, scales and bias reach every block


def test_static_int8_row_sums_follow_weight_changes():
    layer = _static_layer(37, relu=False)
    x = torch.randn(16, 48, generator=_gen(8))
    before = layer(x)
    layer.weight_int8.neg_()  # in place: the cached row sums must be rebuilt
    after = layer(x)
    assert not torch.equal(before, after)
    assert float(((after - layer._run(x, F.linear)).abs() / float(layer.output_scale)).max()) <= 1.001
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_int8"] = -state["weight_int8"]
    layer.load_state_dict(state)  # copied in: same tensor, new version
    assert torch.equal(layer(x), before)


# (in, out, bits, group_size, symmetric, kernel it runs)
WEIGHT_ONLY = [
    (64, 48, 4, 32, True, "int4"),
    (100, 10, 4, 64, True, "int4"),  # input padded to 128, output to 16
    (96, 20, 3, 32, False, "int4"),
    (64, 16, 2, 32, True, "int4"),
    (64, 32, 4, 32, False, "int4"),  # 4-bit asymmetric: codes cannot shift, the kernel's zero carries it
    (100, 10, 8, 0, True, "int8"),  # input padded to 112 (the kernel crashes unless K % 16 == 0)
    (64, 30, 8, 0, False, "int8"),  # asymmetric: per-row offsets added after the kernel
    (64, 30, 8, 32, True, None),  # int8 in groups: no kernel, dequantized weight
    (64, 30, 4, 16, True, None),  # group 16: the int4 kernel takes 32, 64, 128, 256
]


@pytest.mark.parametrize(("k", "n", "bits", "group", "symmetric", "kernel"), WEIGHT_ONLY)
def test_weight_only_kernels_match_the_dequantized_weight(k, n, bits, group, symmetric, kernel):
    torch.manual_seed(0)
    layer = WeightOnlyLinear.from_float(nn.Linear(k, n), bits, group, symmetric)
    assert layer.kernel() == kernel
    for shape in [(3, k), (2, 5, k)]:
        x = torch.randn(*shape, generator=_gen(9))
        float_path = F.linear(x, layer.weight_2d(), layer.bias)
        out = layer(x)
        assert out.shape == float_path.shape and not out.requires_grad
        if kernel is None:
            assert torch.equal(out, float_path)
        else:  # bfloat16 activations (8 significant bits) and outputs: about 50 dB
            assert sqnr(float_path, out) > 45.0


@pytest.mark.parametrize(("bits", "group"), [(8, 0), (4, 32)])
def test_weight_only_uses_the_float_weight_for_large_batches(bits, group):
    from slimguard.quantize.kernels import WEIGHT_ONLY_MAX_ROWS

    layer = WeightOnlyLinear.from_float(nn.Linear(64, 32), bits, group)
    big = torch.randn(WEIGHT_ONLY_MAX_ROWS + 1, 64, generator=_gen(10))
    assert torch.equal(layer(big), F.linear(big, layer.weight_2d(), layer.bias))  # float sgemm: exact match
    small = big[:WEIGHT_ONLY_MAX_ROWS]
    assert not torch.equal(layer(small), F.linear(small, layer.weight_2d(), layer.bias))  # the bf16 kernel


def test_macs_of_integer_kernels_are_counted(digits):
    torch.manual_seed(0)  # sizes need no padding (padded rows and columns would be counted: they are computed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    x = torch.randn(5, 64)
    want = 5 * (64 * 96 + 96 * 32)
    calib = dataclasses.replace(digits.calib, x=torch.randn(64, 64, generator=_gen(11)), y=None)
    for cfg in [sg.Int8DynamicConfig(), sg.WeightOnlyConfig(bits=4, group_size=32),
                sg.WeightOnlyConfig(bits=8, group_size=0),
                sg.Int8StaticConfig()]:
        q = copy.deepcopy(model)
        sg.quantize_(q, cfg, calib=calib, progress=False)
        assert count_macs(q, x) == want, cfg


# the tensors each layer stores: artifacts written before the integer kernels must still load
STORED = {
    DynamicInt8Linear: {"weight_int8": torch.int8, "weight_scale": torch.float32, "bias": torch.float32},
    QuantLinear: {"weight_int8": torch.int8, "weight_scale": torch.float32, "bias": torch.float32,
                  "input_scale": torch.float32, "input_zero_point": torch.int32, "output_scale": torch.float32,
                  "output_zero_point": torch.int32},
    WeightOnlyLinear: {"qweight": torch.uint8, "scales": torch.float32, "zeros": torch.float32,
                       "bias": torch.float32},
}


@pytest.mark.parametrize("cfg", [sg.Int8DynamicConfig(), sg.Int8StaticConfig(),
                                 sg.WeightOnlyConfig(bits=4, group_size=32),
                                 sg.WeightOnlyConfig(bits=8, group_size=0)], ids=["dynamic", "static", "int4", "int8"])
def test_stored_format_is_unchanged_and_loads_packed(cfg, zoo_model, digits, tmp_path):
    m = zoo_model("digits-mlp")
    sg.quantize_(m, cfg, calib=digits.calib, progress=False)
    layers = [mod for mod in m.modules() if type(mod) in STORED]
    assert len(layers) == 3
    for layer in layers:
        assert {k: v.dtype for k, v in layer.state_dict().items()} == STORED[type(layer)]
    back = sg.load(sg.save(m, tmp_path / "q.slim"))
    for layer in back.modules():  # the load hook laid out the kernels' weights before any call
        if isinstance(layer, WeightOnlyLinear):
            assert layer._packed.ready
        if isinstance(layer, QuantLinear):
            assert layer._rows.ready
    x = digits.test.x[:32]
    assert torch.equal(back(x), m(x))
