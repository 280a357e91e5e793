"""BN folding is exact; QAT recovers accuracy that PTQ loses; freezing; fake-quant twins."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.quantize.qat import QATFreezer
from slimguard.quantize.qmodules import FakeQuantConv2d, QuantLinear
from slimguard.train.loop import accuracy


def randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.Flatten(),
                         nn.Linear(8 * 3 * 3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("factory", [conv_bn_net, lambda: sg.zoo.create("digits32-resnet", widths=(8, 16, 16))])
def test_fuse_bn_is_exact(factory):
    model = randomize_bn(factory())
    size = 8 if isinstance(model, nn.Sequential) else 32
    x = torch.rand(4, 1, size, size)
    ref = model(x).detach()
    report = sg.fuse_(model, sg.FuseBNConfig())
    assert report["fused"] and report["not_fused"] == []
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)  # float rounding only


def test_fused_model_saves_and_loads(tmp_path):
    model = randomize_bn(sg.zoo.create("digits32-resnet", widths=(8, 16, 16)))
    sg.fuse_(model, sg.FuseBNConfig())
    back = sg.load(sg.save(model, tmp_path / "f.slim"))
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model(x), back(x))


def test_qat_recovers_what_ptq_loses(zoo_model, digits):
    # 2-bit weights: round-to-nearest PTQ loses a lot; a short QAT run (2 epochs) wins it back
    base = zoo_model("digits-mlp")
    ptq = copy.deepcopy(base)
    sg.quantize_(ptq, sg.Int8StaticConfig(weight_bits=2, calibration="minmax"), calib=digits.calib, progress=False)
    qat = copy.deepcopy(base)
    sg.prepare_qat_(qat, sg.QATConfig(weight_bits=2), calib=digits.calib, progress=False)
    sg.finetune(qat, digits, sg.FinetuneConfig(epochs=2, lr=1e-3, patience=0), callbacks=[QATFreezer(1, 1)],
                progress=False)
    converted = sg.convert_(qat)
    assert len(converted) == 3 and all(isinstance(qat.get_submodule(n), QuantLinear) for n in converted)
    acc_ptq, acc_qat = accuracy(ptq, digits.test), accuracy(qat, digits.test)
    assert acc_qat >= acc_ptq + 0.05, (acc_ptq, acc_qat)


def test_qat_freezer_freezes_bn_then_observers():
    model = randomize_bn(conv_bn_net())
    from slimguard.quantize.qmodules import insert_fake_quant

    insert_fake_quant(model, ignore=[], weight_bits=8, observer="moving-average", fuse_bn=True, keep_bn=True)
    fq = [m for m in model.modules() if isinstance(m, FakeQuantConv2d)]
    assert fq and all(m.bn is not None for m in fq)  # BN carried, folded with running stats
    cb = QATFreezer(bn_epoch=1, observer_epoch=2)
    cb.on_train_begin(model, 10)
    assert not fq[0].bn_frozen and not fq[0].observers_frozen and not cb.best_tracking_allowed(0)
    cb.on_epoch_end(model, 0, None)
    assert fq[0].bn_frozen and not fq[0].observers_frozen
    cb.on_epoch_end(model, 1, None)
    assert fq[0].observers_frozen and cb.best_tracking_allowed(1)
    model.train()
    mean_before = fq[0].bn.running_mean.clone()
    model(torch.rand(4, 1, 8, 8))
    assert torch.equal(fq[0].bn.running_mean, mean_before)  # frozen statistics do not move


# (config, minimum SQNR in dB of the twin against the real layer)
TWIN_CASES = [
    # the same integer grids; the twin accumulates in float, the int8 kernel exactly in int32
    (sg.Int8StaticConfig(), 80.0),
    (sg.Int8DynamicConfig(), 80.0),
    # the weight-only kernels take bfloat16 activations (8 significant bits): about 50 dB
    (sg.WeightOnlyConfig(bits=4, group_size=32), 45.0),
    (sg.WeightOnlyConfig(bits=8, group_size=0), 45.0),
    # bfloat16 products rounded to bfloat16 outputs
    (sg.HalfPrecisionConfig(), 45.0),
]


@pytest.mark.parametrize(("cfg", "min_db"), TWIN_CASES, ids=["static", "dynamic", "int4", "int8", "half"])
def test_fake_quant_twins_match_and_are_differentiable(zoo_model, digits, cfg, min_db):
    from slimguard.quantize.observers import sqnr

    m = zoo_model("digits-mlp")
    sg.quantize_(m, cfg, calib=digits.calib, progress=False)
    for layer in (m[2], m[4]):
        twin = layer.fake_quant_twin()
        x = (torch.rand(8, layer.in_features) * 3).requires_grad_(True)
        real = layer(x.detach())
        if not isinstance(cfg, sg.HalfPrecisionConfig):  # integer kernels have no gradient; the twin carries it
            assert not real.requires_grad
        assert sqnr(real, twin(x).detach()) > min_db
        if isinstance(cfg, sg.Int8StaticConfig):  # outputs on the int8 grid: at most one step apart, nearly all equal
            diff = (twin(x).detach() - real).abs() / float(layer.output_scale)
            assert float(diff.max()) <= 1.001 and float((diff == 0).float().mean()) >= 0.99
        twin(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_static_without_folding_keeps_relu_after_bn(digits):
    import dataclasses

    from slimguard.quantize.observers import sqnr

    model = randomize_bn(conv_bn_net())
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    calib = dataclasses.replace(digits.calib, x=x, y=torch.zeros(128, dtype=torch.long))
    ref = model(x).detach()
    report = sg.quantize_(model, sg.Int8StaticConfig(fuse_bn=False), calib=calib, progress=False)
    assert report["fused_relu"] == [] and report["fused_bn"] == []  # BN stays, so its ReLU stays after it
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], nn.ReLU)
    assert sqnr(ref, model(x).detach()) > 20
