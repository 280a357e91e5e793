"""Dynamic int8 with one scale per input tensor (``activations: tensor``), and the codes shared by sibling
layers: accuracy against the removed kernel's numbers, the oneDNN and ``_int_mm`` paths agreeing, the
rounding trick, the shared-codes cache and its invalidation, copies, artifacts and bad values."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimguard as sg
from slimguard.core.errors import ConfigError
from slimguard.quantize import kernels
from slimguard.quantize.dynamic import DynamicInt8Linear
from slimguard.quantize.kernels import (
    fake_quantize_rows,
    fake_quantize_tensor,
    int8_linear_dynamic_tensor,
    pack_onednn,
)
from slimguard.quantize.observers import sqnr
from slimguard.runtime.measure import count_macs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _old_dynamic(x: torch.Tensor, layer: DynamicInt8Linear) -> torch.Tensor:
    """The removed fbgemm kernel's numbers, in float: per-batch asymmetric 7-bit activations."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = ((hi - lo) / 127).clamp_min(1e-8)
    zp = torch.round(-lo / scale).clamp(0, 127).int()
    return F.linear(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 127), layer.dequantized_weight(), layer.bias)


@pytest.fixture
def integer_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small products too take the integer kernels (they run in float otherwise)."""
    monkeypatch.setattr(kernels, "FLOAT_MAX_MACS", -1)


def _tokens(k: int, seed: int = 2, rows: int = 64) -> torch.Tensor:
    """MiniLM-like activations: tokens of different magnitudes, a few outlier channels (2 x rows tokens)."""
    x = torch.randn(2, rows, k, generator=_gen(seed)) * torch.rand(2, rows, 1, generator=_gen(seed + 1)) * 3
    x[..., :4] *= 8
    return x


# (in, out, tokens per sequence): small products (the short operator sequence) and large ones (oneDNN)
SHAPES = [(384, 384, 64), (384, 384, 256), (384, 1536, 64), (1536, 384, 64), (48, 20, 64)]


@pytest.mark.parametrize(("k", "n", "rows"), SHAPES)
def test_per_tensor_is_its_emulation_and_more_accurate_than_the_removed_kernel(k, n, rows, integer_paths):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = _tokens(k, rows=rows)
    layer = DynamicInt8Linear.from_float(lin, "tensor")
    ref = lin(x).detach()
    new = layer(x)
    assert new.shape == ref.shape and not new.requires_grad
    # 8 bits on one symmetric grid against the old kernel's 7 bits on an asymmetric one: about 3-6 dB better
    assert sqnr(ref, new) >= sqnr(ref, _old_dynamic(x, layer)) + 2.0
    # per row stays the more faithful mode when tokens differ in magnitude
    assert sqnr(ref, DynamicInt8Linear.from_float(lin, "row")(x)) >= sqnr(ref, new) + 3.0
    emulated = F.linear(fake_quantize_tensor(x), layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(new, emulated, rtol=1e-4, atol=1e-4 * float(emulated.abs().max()))
    twin = layer.fake_quant_twin()
    torch.testing.assert_close(twin(x), emulated, rtol=1e-5, atol=1e-5 * float(emulated.abs().max()))


@pytest.mark.skipif(not kernels.ONEDNN_INT8, reason="oneDNN's uint8 x int8 path needs a CPU with VNNI")
def test_onednn_and_int_mm_paths_compute_the_same_products():
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(384, 96), "tensor")
    x = _tokens(384, seed=5, rows=512)
    assert x.numel() > kernels.SMALL_PRODUCT  # a large product: oneDNN's path when packed
    packed = pack_onednn(layer.weight_int8)
    assert packed is not None
    a = int8_linear_dynamic_tensor(x.clone(), layer.weight_int8, layer.weight_scale, layer.bias, packed)
    b = int8_linear_dynamic_tensor(x.clone(), layer.weight_int8, layer.weight_scale, layer.bias, None)
    # the same integer codes and exact int32 sums; only where the float scales are applied differs
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("activations", ["row", "tensor"])
@pytest.mark.parametrize(("k", "n", "rows"), [(384, 384, 64), (64, 48, 8), (384, 96, 512)])
def test_small_and_large_product_sequences_agree(activations, k, n, rows, monkeypatch, integer_paths):
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(k, n), activations)
    x = _tokens(k, seed=12, rows=rows)
    out = {}
    for name, limit in (("small", 1 << 62), ("large", 0)):
        monkeypatch.setattr(kernels, "SMALL_PRODUCT", limit)
        out[name] = layer(x.clone())
    # the same integer products; codes may differ on a rounding tie and the scales apply in another order
    torch.testing.assert_close(out["small"], out["large"], rtol=1e-3, atol=2e-3 * float(out["large"].abs().max()))


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_small_layers_with_small_batches_multiply_in_float(activations):
    torch.manual_seed(0)
    lin = nn.Linear(64, 300)  # 19,200 weights: 64 x 300 x 108 rows = 2.07M MACs, the limit is 2.10M
    layer = DynamicInt8Linear.from_float(lin, activations)
    twin = layer.fake_quant_twin()
    small = torch.randn(108, 64, generator=_gen(13))
    plain = F.linear(small, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(small), plain) and torch.equal(twin(small), plain)  # the input is not rounded
    assert not layer(small.clone().requires_grad_(True)).requires_grad  # no gradient, as from the int kernels
    large = torch.randn(110, 64, generator=_gen(13))  # past the limit: integer kernels, the input rounded
    out = layer(large)
    assert not torch.equal(out, F.linear(large, layer.dequantized_weight(), layer.bias))
    torch.testing.assert_close(twin(large), out, rtol=1e-4, atol=1e-4 * float(out.abs().max()))
    wide = DynamicInt8Linear.from_float(nn.Linear(256, 257), activations)  # more weights than the float limit
    one = torch.randn(1, 256, generator=_gen(14))
    assert not torch.equal(wide(one), F.linear(one, wide.dequantized_weight(), wide.bias))
    layer.weight_int8[0, 0] += 1  # the cached float weight follows the int8 one
    assert torch.equal(layer(small), F.linear(small, layer.dequantized_weight(), layer.bias))


def test_rounding_trick_gives_the_rounded_codes():
    x = torch.randn(257, 100, generator=_gen(6)) * 5
    x[0, :6] = torch.tensor([0.0, -0.0, 2.5, -2.5, 1e-30, -1e-30])  # exact zeros, ties, tiny values
    s8, scale = kernels._quantize_tensor(x, kernels._MAGIC_S8)
    u8, scale_u = kernels._quantize_tensor(x, kernels._MAGIC_U8)
    assert scale == scale_u == pytest.approx(float(x.abs().max()) / 127)
    want = torch.round(x * (1.0 / scale))
    diff = (s8.float() - want).abs()
    # a fused multiply-add may round a value within float rounding of a tie the other way
    assert float(diff.max()) <= 1.0 and float((diff > 0).float().mean()) < 1e-3
    assert int(s8.min()) >= -127 and int(s8.max()) <= 127
    assert torch.equal(u8.view(torch.uint8).int(), s8.int() + 128)  # zero point 128


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    rows, tensor = kernels.quantize_rows, kernels._quantize_tensor
    monkeypatch.setattr(kernels, "quantize_rows", lambda *a: calls.append("row") or rows(*a))
    monkeypatch.setattr(kernels, "_quantize_tensor", lambda *a: calls.append("tensor") or tensor(*a))
    return calls


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_sibling_layers_quantize_one_input_once(activations, monkeypatch, integer_paths):
    torch.manual_seed(0)
    q, k, v = (DynamicInt8Linear.from_float(nn.Linear(32, 16), activations) for _ in range(3))
    calls = _counting(monkeypatch)
    x = torch.randn(5, 32, generator=_gen(7))
    outs = [layer(x) for layer in (q, k, v)]
    assert calls == [activations]  # query, key and value read one tensor: quantized once
    calls.clear()
    fresh = [layer(x.clone()) for layer in (q, k, v)]  # other tensors, equal values: quantized each time
    assert calls == [activations] * 3
    for a, b in zip(outs, fresh, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_shared_codes_follow_in_place_writes_and_modes(activations, monkeypatch, integer_paths):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    layer = DynamicInt8Linear.from_float(lin, activations)
    x = torch.randn(5, 32, generator=_gen(8))
    before = layer(x)
    x.mul_(3.0)  # the same tensor, written in place: its codes must be made again
    after = layer(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after - layer.bias, 3.0 * (before - layer.bias), rtol=1e-5, atol=1e-5)
    other = DynamicInt8Linear.from_float(lin, "tensor" if activations == "row" else "row")
    torch.testing.assert_close(other(x), other(x.clone()), rtol=0, atol=0)  # the other mode's codes, not these
    calls = _counting(monkeypatch)
    with torch.inference_mode():  # inference tensors keep no version: no sharing, still correct
        xi = x.clone()
        torch.testing.assert_close(layer(xi), after, rtol=0, atol=0)
        layer(xi)
    assert calls == [activations] * 2


def test_shared_codes_are_per_thread(monkeypatch, integer_paths):
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(32, 16), "tensor")
    x = torch.randn(5, 32, generator=_gen(9))
    calls = _counting(monkeypatch)
    layer(x)
    worker = threading.Thread(target=layer, args=(x,))
    worker.start()
    worker.join(timeout=30)
    assert calls == ["tensor", "tensor"]  # another thread does not read this thread's codes


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_scratch_buffers_are_reused_per_thread_and_never_stale(activations, monkeypatch):
    torch.manual_seed(0)
    a = DynamicInt8Linear.from_float(nn.Linear(384, 64), activations)
    b = DynamicInt8Linear.from_float(nn.Linear(384, 64), "tensor" if activations == "row" else "row")
    x, y = torch.randn(600, 384, generator=_gen(20)), torch.randn(600, 384, generator=_gen(21)) * 4
    assert x.numel() > kernels.SMALL_PRODUCT  # the large-product path, which stages in the scratch buffers
    first = a(x)
    codes = kernels._SCRATCH.buffers["codes"]
    b(y)  # another input quantized on this thread: the codes buffer now holds y's
    assert torch.equal(a(x), first)  # x's codes were made again, not read from the overwritten buffer
    assert kernels._SCRATCH.buffers["codes"] is codes  # the same buffer, not a new allocation per call
    seen: list[dict[str, torch.Tensor]] = []
    worker = threading.Thread(target=lambda: (a(x), seen.append(dict(kernels._SCRATCH.buffers))))
    worker.start()
    worker.join(timeout=30)
    assert seen and all(t is not codes for t in seen[0].values())  # each thread has its own buffers
    monkeypatch.setattr(kernels, "SCRATCH_MAX_BYTES", 0)  # no scratch: allocated per call, the same numbers
    assert torch.equal(a(x.clone()), first)


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_inputs_quantized_in_blocks_of_rows_give_the_same_codes(activations, monkeypatch):
    x = torch.randn(1000, 200, generator=_gen(22)) * torch.rand(1000, 1, generator=_gen(23)) * 5
    whole = kernels.quantize_rows(x) if activations == "row" else kernels._quantize_tensor(x, kernels._MAGIC_S8)
    layer = DynamicInt8Linear.from_float(nn.Linear(200, 30), activations)
    before = layer(x)
    monkeypatch.setattr(kernels, "QUANT_BLOCK_BYTES", 4 * 200 * 7)  # at most 7 rows a block: 143 blocks
    blocks = kernels._row_blocks(x)
    assert len(blocks) == 143 and {b.stop - b.start for b in blocks} <= {6, 7}  # even, each row once
    assert blocks[0].start == 0 and blocks[-1].stop == 1000
    assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))
    assert 200 < len(kernels._row_blocks(torch.empty(5000, 200))) <= kernels.MAX_BLOCKS  # 714 asked, capped
    blocked = kernels.quantize_rows(x) if activations == "row" else kernels._quantize_tensor(x, kernels._MAGIC_S8)
    assert torch.equal(blocked[0], whole[0])
    torch.testing.assert_close(blocked[1], whole[1], rtol=0, atol=0)
    if activations == "row":  # the codes are each row rounded on its own grid
        inv = 127.0 / x.abs().amax(1, keepdim=True)
        assert torch.equal(blocked[0], torch.round(x * inv).to(torch.int8))
    assert torch.equal(layer(x.clone()), before)


@pytest.mark.parametrize("activations", ["row", "tensor"])
def test_exported_programs_compute_what_the_layer_does_at_any_batch(activations, integer_paths):
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(384, 96), activations).eval()
    x = torch.randn(700, 384, generator=_gen(24))  # large: the eager layer quantizes it in blocks of rows
    batch = torch.export.Dim("batch", min=2, max=1 << 20)
    with torch.no_grad():
        program = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: batch}}).module()
        for rows in (700, 3000, 3):  # one traced program serves every batch size, in integers
            other = torch.randn(rows, 384, generator=_gen(rows))
            got, want = program(other), layer(other)
            diff = (got - want).abs()
            # the traced per-tensor path takes 1 / scale in float32, the eager one in double: a code on a
            # rounding tie may move by one step
            assert float((diff > 1e-4).float().mean()) < 1e-3
            assert float(diff.max()) <= 0.01 * float(want.abs().max())


def test_per_tensor_layers_copy_save_and_load(tmp_path, digits, zoo_model):
    m = zoo_model("digits-mlp")
    sg.quantize_(m, sg.Int8DynamicConfig(activations="tensor"), progress=False)
    layers = [mod for mod in m.modules() if isinstance(mod, DynamicInt8Linear)]
    assert len(layers) == 3 and all(layer.activations == "tensor" for layer in layers)
    x = digits.test.x[:32]
    want = m(x)
    twin = copy.deepcopy(m)  # the packed oneDNN weight is opaque: a copy rebuilds its own
    assert torch.equal(twin(x), want)
    back = sg.load(sg.save(m, tmp_path / "q.slim"))
    loaded = [mod for mod in back.modules() if isinstance(mod, DynamicInt8Linear)]
    assert [layer.activations for layer in loaded] == ["tensor"] * 3
    assert all(layer._packed.ready for layer in loaded)  # laid out at load time
    assert torch.equal(back(x), want)
    assert count_macs(back, x) == count_macs(m, x) > 0


def test_bad_activations_are_refused():
    with pytest.raises(ConfigError, match="activations: 'channel' is not allowed; allowed: row, tensor"):
        sg.Int8DynamicConfig(activations="channel")
    with pytest.raises(ValueError, match="activations must be one of"):
        DynamicInt8Linear(4, 2, activations="channel")
    # (an artifact naming a bad value: tests/artifact/test_artifact_security.py, malformed manifests)


def test_row_twin_still_rounds_rows(integer_paths):
    layer = DynamicInt8Linear.from_float(nn.Linear(16, 4))
    x = _tokens(16, seed=11)
    twin = layer.fake_quant_twin()
    torch.testing.assert_close(twin(x), F.linear(fake_quantize_rows(x), layer.dequantized_weight(), layer.bias))


@pytest.mark.parametrize("activations", ["row", "tensor"])
@pytest.mark.parametrize("rows", [4, 64, 700])  # float path, short integer sequence, long one (oneDNN per tensor)
def test_layers_without_bias(activations, rows):
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_float(nn.Linear(200, 300, bias=False), activations)
    assert layer.bias is None
    x = torch.randn(rows, 200, generator=_gen(15))
    out = layer(x)
    want = layer.fake_quant_twin()(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
