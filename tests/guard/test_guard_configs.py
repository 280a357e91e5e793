"""Every guard component takes one config: bad values are refused naming the key, keywords and a config
build the same object, and detectors and protections are looked up in generic registries."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.guard import (
    DETECTORS,
    KNN,
    MSP,
    ODIN,
    PROTECTIONS,
    Cascade,
    CascadeConfig,
    DetectorConfig,
    Energy,
    EnergyConfig,
    FaultCampaignConfig,
    KNNConfig,
    Mahalanobis,
    MahalanobisConfig,
    MaxLogit,
    Monitor,
    MonitorConfig,
    ODINConfig,
    RangeRestriction,
    RangeRestrictionConfig,
    WeightChecksums,
    WeightChecksumsConfig,
    make_detector,
    run_campaign,
)

# (config class, bad options, the key the error must name)
BAD = [
    (DetectorConfig, {"batch_size": 0}, "batch_size"),
    (EnergyConfig, {"temperature": 0.0}, "temperature"),
    (ODINConfig, {"temperature": -1.0}, "temperature"),
    (ODINConfig, {"epsilon": -0.1}, "epsilon"),
    (MahalanobisConfig, {"shrinkage": -1.0}, "shrinkage"),
    (KNNConfig, {"k": 0}, "k"),
    (KNNConfig, {"max_bank": 0}, "max_bank"),
    (MonitorConfig, {"window": 0}, "window"),
    (MonitorConfig, {"psi_warn": 0.5, "psi_alert": 0.2}, "psi_warn"),
    (RangeRestrictionConfig, {"granularity": "tensor"}, "granularity"),
    (RangeRestrictionConfig, {"margin": -0.1}, "margin"),
    (CascadeConfig, {"threshold": 1.5}, "threshold"),
    (WeightChecksumsConfig, {"tensors_per_call": 0}, "tensors_per_call"),
    (FaultCampaignConfig, {"trials": 0}, "trials"),
    (FaultCampaignConfig, {"target": "biases"}, "target"),
    (FaultCampaignConfig, {"bits": "middle"}, "bits"),
]


@pytest.mark.parametrize("cls,options,key", BAD, ids=[f"{c.__name__}-{k}" for c, o, k in BAD])
def test_each_guard_config_refuses_a_bad_value_naming_the_key(cls, options, key):
    with pytest.raises(ConfigError, match=rf"^{key}: ") as info:
        cls(**options)
    assert "\n" not in str(info.value)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


DETECTOR_CASES = [
    ("msp", MSP, DetectorConfig, {"batch_size": 7}),
    ("max-logit", MaxLogit, DetectorConfig, {"batch_size": 7}),
    ("energy", Energy, EnergyConfig, {"temperature": 2.0, "batch_size": 7}),
    ("odin", ODIN, ODINConfig, {"temperature": 10.0, "epsilon": 0.01}),
    ("mahalanobis", Mahalanobis, MahalanobisConfig, {"layer": "2", "shrinkage": 0.1}),
    ("knn", KNN, KNNConfig, {"k": 3, "max_bank": 50}),
]


@pytest.mark.parametrize("name,cls,config,opts", DETECTOR_CASES, ids=[c[0] for c in DETECTOR_CASES])
def test_detector_keywords_config_and_name_build_the_same_detector(name, cls, config, opts):
    model = _mlp()
    dets = [cls(model, **opts), cls(model, config(**opts)), make_detector(name, model, **opts)]
    assert DETECTORS.get(name) is cls and cls.config_class is config
    assert all(type(d) is cls for d in dets)
    assert dets[0].config == dets[1].config == dets[2].config == config(**opts)
    for key, value in opts.items():
        assert getattr(dets[0].config, key) == value, key
    x = torch.rand(20, 4)
    scores = [d.fit((x, torch.arange(20) % 3)).score(x) for d in dets]
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
    torch.testing.assert_close(scores[0], scores[2], rtol=0, atol=0)


@pytest.mark.parametrize("name,cls,config,opts", DETECTOR_CASES, ids=[c[0] for c in DETECTOR_CASES])
def test_make_detector_names_an_unknown_option_and_the_allowed_ones(name, cls, config, opts):
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(config)))
    with pytest.raises(ConfigError, match=f"^{name}: unknown key 'tpr'; allowed: {allowed}$"):
        make_detector(name, _mlp(), tpr=0.9)


def test_temperature_option_changes_the_energy_score():
    model, x = _mlp(), torch.rand(5, 4)
    cold, hot = make_detector("energy", model).fit(x), make_detector("energy", model, temperature=5.0).fit(x)
    logits = model(x)
    torch.testing.assert_close(hot.score(x), -5.0 * torch.logsumexp(logits / 5.0, -1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cold.score(x), hot.score(x))


def test_component_keywords_and_configs_give_the_same_state():
    model = _mlp()
    probs = torch.softmax(torch.randn(30, 3), -1)
    assert Monitor(window=40, psi_warn=0.2).config == Monitor(MonitorConfig(window=40, psi_warn=0.2)).config
    assert Monitor(reference=probs, window=40).config.window == 40
    a = RangeRestriction(granularity="layer", margin=0.1).profile(model, torch.rand(16, 4))
    b = RangeRestriction(RangeRestrictionConfig(granularity="layer", margin=0.1))
    b.profile(model, torch.rand(16, 4))
    assert a.config == b.config and a.bounds.keys() == b.bounds.keys()
    assert all(lo.numel() == 1 for lo, _ in a.bounds.values())  # layer granularity arrived
    assert Cascade(model, model, threshold=0.7).config == Cascade(model, model, CascadeConfig(0.7)).config
    cfg = FaultCampaignConfig(trials=12, bits="exponent", seed=3)
    x = torch.rand(4, 4)
    by_cfg = run_campaign(model, x, cfg).to_dict()
    by_kw = run_campaign(model, x, trials=12, bits="exponent", seed=3).to_dict()
    assert by_cfg == by_kw and by_cfg["trials"] == 12
    for make in (lambda: Monitor(windw=3), lambda: RangeRestriction(granularity="layer", extra=1),
                 lambda: Cascade(model, model, thresh=0.5), lambda: run_campaign(model, x, trails=3)):
        with pytest.raises(ConfigError, match="unknown key"):
            make()


def test_checksum_attach_options_take_effect():
    model = _mlp()
    sums = WeightChecksums.from_model(model, source={k: v.clone() for k, v in model.state_dict().items()})
    sums.attach(model, tensors_per_call=1, repair=False)  # one tensor per call, round robin
    with torch.no_grad():
        model[3].bias.add_(1.0)  # the last of four tensors
    for _ in range(3):
        model(torch.rand(1, 4))  # checks tensors 0, 1, 2: the damage is not seen yet
    with pytest.raises(Exception, match="failed its checksum"):
        model(torch.rand(1, 4))
    sums.attach(model, WeightChecksumsConfig(repair=True))  # every tensor, repaired
    model(torch.rand(1, 4))
    assert sums.verify(model) == []
    sums.detach()
    with pytest.raises(ConfigError, match="unknown key 'per_call'"):
        sums.attach(model, per_call=2)


def test_guard_protections_are_registered_by_name():
    assert PROTECTIONS.names() == ["checksums", "range"]
    with pytest.raises(ConfigError, match="unknown protection 'magic'; allowed: checksums, range"):
        PROTECTIONS.get("magic")
