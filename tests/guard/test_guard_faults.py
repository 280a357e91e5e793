"""Bit flips are exact and reversible; campaigns count silent corruptions; protections work."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import ConfigError, NotFittedError
from slimguard.guard.faults import (
    ActivationFault,
    FaultCampaignConfig,
    bit_fields,
    flip_bit_,
    flipped,
    run_campaign,
    weight_targets,
    wilson,
)
from slimguard.guard.protect import Cascade, RangeRestriction, RangeRestrictionConfig, WeightChecksums

DTYPES = [(torch.float32, 32), (torch.float16, 16), (torch.bfloat16, 16), (torch.int8, 8), (torch.uint8, 8)]


@pytest.mark.parametrize(("dtype", "width"), DTYPES, ids=[str(d) for d, _ in DTYPES])
def test_every_bit_flip_changes_one_bit_and_is_restored_exactly(dtype, width):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(7, 5, generator=g) * 40).to(dtype)
    ref = t.clone()
    for bit in range(width):
        idx = (bit * 3) % t.numel()
        flip_bit_(t, idx, bit)
        raw_t = t.view(-1)[idx : idx + 1].view(torch.uint8)
        raw_r = ref.view(-1)[idx : idx + 1].view(torch.uint8)
        diff = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(raw_t.tolist(), raw_r.tolist(), strict=True))
        assert diff == 1, (dtype, bit)
        assert torch.equal(t.view(-1)[:idx].view(torch.uint8), ref.view(-1)[:idx].view(torch.uint8))
        flip_bit_(t, idx, bit)
        assert torch.equal(t.view(torch.uint8), ref.view(torch.uint8)), (dtype, bit)  # exact, bytes equal


def test_ieee_fields_have_the_documented_meaning():
    x = torch.tensor([1.5])
    assert bit_fields(torch.float32) == {"sign": [31], "exponent": list(range(23, 31)), "mantissa": list(range(23))}
    with flipped(x, 0, 31):
        assert x.item() == -1.5
    with flipped(x, 0, 30):  # top exponent bit: 1.5 * 2^128 overflows the exponent range to a huge value
        assert x.item() == pytest.approx(1.5 * 2.0**128, rel=1e-6) or not torch.isfinite(x).all()
    with flipped(x, 0, 22):  # top mantissa bit: 1.5 -> 1.0
        assert x.item() == 1.0
    assert x.item() == 1.5
    h = torch.tensor([1.0], dtype=torch.float16)
    with flipped(h, 0, 15):
        assert h.item() == -1.0
    q = torch.tensor([3], dtype=torch.int8)
    with flipped(q, 0, 7):
        assert q.item() == 3 - 128


def test_flipping_a_model_weight_is_restored_exactly_without_copies(zoo_model):
    model = zoo_model("digits-mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.get_parameter("2.weight")
    ptr = w.data_ptr()
    with flipped(w, 123, 30):
        assert not torch.equal(w, before["2.weight"])
    assert w.data_ptr() == ptr  # same storage: changed in place
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.is_floating_point() else v,
                           before[k].view(torch.uint8) if v.is_floating_point() else before[k]), k


@pytest.mark.parametrize(("index", "bit", "message"), [(10**9, 0, "index"), (0, 32, "bit: 32 is out of range")])
def test_bad_flip_arguments(index, bit, message):
    with pytest.raises(ConfigError, match=message):
        flip_bit_(torch.zeros(4), index, bit)


def test_campaign_counts_exponent_flips_and_range_restriction_cuts_them(zoo_model, digits):
    model = zoo_model("digits-mlp")
    cfg = FaultCampaignConfig(trials=400, bits="exponent", seed=0)
    x = digits.test.x
    base = run_campaign(model, x, cfg)
    again = run_campaign(model, x, cfg)
    assert base.sdc == again.sdc and base.by_layer == again.by_layer  # seeded and exactly restored
    assert set(base.by_field) == {"exponent"} and sum(v["trials"] for v in base.by_bit.values()) == 400
    assert base.sdc >= 10  # measured: flips of bit 30 make weights ~1e38
    rates = {b: v["rate"] for b, v in base.by_bit.items()}
    assert max(rates, key=rates.get) == "30" and rates["30"] > 0.2  # measured 0.38
    acc = (model(x).argmax(-1) == digits.test.y).float().mean()
    rr = RangeRestriction().profile(model, digits.train.x).attach(model)
    try:
        assert (model(x).argmax(-1) == digits.test.y).float().mean() == acc  # clean accuracy unchanged
        prot = run_campaign(model, x, cfg)
    finally:
        rr.detach()
    assert prot.sdc * 5 <= base.sdc, (prot.sdc, base.sdc)  # measured 2 vs 30
    lo, hi = prot.ci
    assert lo <= prot.rate <= hi


def test_activation_faults_and_int8_storage(zoo_model, digits):
    import slimguard as sg

    model = zoo_model("digits-mlp")
    cfg = FaultCampaignConfig(trials=150, target="activations", bits=[30], seed=1)
    res = run_campaign(model, digits.test.x, cfg)
    assert res.trials == 150 and res.sdc > 0
    hook = ActivationFault(model.get_submodule("3"), index=5, bit=30)
    with torch.no_grad():
        out = model(digits.test.x[:4])
    hook.remove()
    with torch.no_grad():
        assert not torch.equal(out, model(digits.test.x[:4]))
    sg.quantize_(model, sg.Int8DynamicConfig())
    targets = weight_targets(model)
    assert all(t.dtype == torch.int8 for t in targets.values())
    q = run_campaign(model, digits.test.x, FaultCampaignConfig(trials=100, bits="sign"))
    assert set(q.by_field) == {"sign"}
    with pytest.raises(ConfigError, match="selects no bit"):
        run_campaign(model, digits.test.x, FaultCampaignConfig(trials=10, bits="exponent"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trials": 0}, "trials: 0 is out of range"), ({"target": "gradients"}, "target: 'gradients' is not allowed"),
    ({"bits": "most"}, "bits: 'most' is not allowed"), ({"bits": []}, "bits: \\[\\] is not allowed"),
])
def test_bad_campaigns(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FaultCampaignConfig(**kwargs)


def test_wilson_interval():
    lo, hi = wilson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.037, abs=1e-3)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_checksums_catch_every_injected_weight_flip_and_repair_from_the_artifact(zoo_model, tmp_path):
    import slimguard as sg

    model = zoo_model("digits-mlp")
    path = sg.save(model, tmp_path / "m.slim")
    sums = WeightChecksums.from_artifact(path)
    assert sums.verify(model) == []
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    names = [k for k, v in state.items() if v.is_floating_point()]
    caught = 0
    for trial in range(300):
        name = names[trial % len(names)]
        t = state[name]
        idx = int(torch.randint(t.numel(), (1,), generator=g))
        bit = int(torch.randint(32, (1,), generator=g))
        with flipped(t, idx, bit):
            caught += sums.verify(model) == [name]
    assert caught == 300
    flip_bit_(state["2.weight"], 7, 30)
    flip_bit_(state["6.bias"], 1, 3)
    assert sums.repair(model) == ["2.weight", "6.bias"]
    assert sums.verify(model) == []
    assert torch.equal(model.state_dict()["2.weight"], sg.load(path).state_dict()["2.weight"])


def test_checksum_hook_repairs_before_the_forward(zoo_model, digits):
    model = zoo_model("digits-mlp")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(digits.test.x[:8])
    sums = WeightChecksums.from_model(model, source=good).attach(model, tensors_per_call=2)
    flip_bit_(model.state_dict()["0.mean"], 0, 30)  # first tensors in round-robin order
    with torch.no_grad():
        got = model(digits.test.x[:8])
    sums.detach()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_range_restriction_granularity_and_state(zoo_model, digits):
    model = zoo_model("digits-mlp")
    with pytest.raises(NotFittedError, match="not profiled"):
        RangeRestriction().attach(model)
    rr = RangeRestriction(RangeRestrictionConfig(granularity="channel")).profile(model, digits.train.x)
    assert set(rr.bounds) == {"3", "5"} and rr.bounds["3"][1].shape == (1, 300)
    again = RangeRestriction.from_state_dict(rr.state_dict())
    assert all(torch.equal(again.bounds[k][1], rr.bounds[k][1]) for k in rr.bounds)
    with pytest.raises(ConfigError, match="granularity"):
        RangeRestrictionConfig(granularity="tensor")


def test_cascade_falls_back_on_low_confidence(zoo_model, digits):
    small, large = zoo_model("digits-mlp"), zoo_model("digits-mlp")
    with torch.no_grad():
        small.get_parameter("6.weight").mul_(0.05)  # an unsure small model
    cas = Cascade(small, large, threshold=0.5)
    with torch.no_grad():
        out = cas(digits.test.x)
        want = large(digits.test.x)
    fb = cas.last_fallback
    assert 0 < cas.fallback_rate <= 1 and fb.any()
    torch.testing.assert_close(out[fb], want[fb])
    assert (out.argmax(-1) == digits.test.y).float().mean() >= 0.9


@pytest.mark.parametrize("cfg", ["int8-dynamic-tensor", "int8-static", "weight-only-int4"])
def test_repair_of_quantized_weights_reaches_the_kernels_layouts(cfg, zoo_model, digits):
    """Layers keep derived layouts of their int8 weights (oneDNN's packed weight, row sums, int4 packs), rebuilt
    when the weight changes; a repair must count as a change, or the layer keeps computing with the damage."""
    import slimguard as sg

    model = zoo_model("digits-mlp")
    config = {"int8-dynamic-tensor": sg.Int8DynamicConfig(activations="tensor"), "int8-static": sg.Int8StaticConfig(),
              "weight-only-int4": sg.WeightOnlyConfig(bits=4, group_size=32)}[cfg]
    sg.quantize_(model, config, calib=digits.calib, progress=False)
    x = digits.test.x[:512]  # large enough for every layer's integer kernel
    good = {k: v.clone() for k, v in model.state_dict().items()}
    sums = WeightChecksums.from_model(model, source=good)
    with torch.no_grad():
        want = model(x)
        name = next(k for k, v in model.state_dict().items() if v.dtype in (torch.int8, torch.uint8))
        for i in range(0, 64, 3):
            flip_bit_(model.state_dict()[name], i, 6)
        damaged = model(x)  # the layouts are rebuilt from the damaged weight here
        assert not torch.equal(damaged, want)
        assert sums.repair(model) == [name]
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
