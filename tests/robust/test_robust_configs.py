"""Attack options live in one config per attack: bad values are refused naming the key, keywords and a
config build the same attack, and the scorecard's attack names, corruptions and twin builders are looked
up in generic registries."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.robust import (
    APGD,
    CW,
    FGSM,
    PGD,
    APGDConfig,
    CWConfig,
    FGSMConfig,
    PGDConfig,
    fake_quant_twin,
    is_quantized,
    register_corruption,
    register_twin,
)
from slimguard.robust.corruptions import CORRUPTIONS
from slimguard.robust.scorecard import GRID_ATTACKS, build_attacks

# (config class, bad options, the key the error must name)
BAD = [
    (FGSMConfig, {"eps": -0.1}, "eps"),
    (FGSMConfig, {"eps": float("nan")}, "eps"),
    (FGSMConfig, {"eps": float("inf")}, "eps"),
    (FGSMConfig, {"norm": "l1"}, "norm"),
    (FGSMConfig, {"batch_size": 0}, "batch_size"),
    (PGDConfig, {"steps": 0}, "steps"),
    (PGDConfig, {"restarts": 0}, "restarts"),
    (PGDConfig, {"alpha": 0.0}, "alpha"),
    (PGDConfig, {"loss": "hinge"}, "loss"),
    (APGDConfig, {"rho": 0.0}, "rho"),
    (APGDConfig, {"rho": 1.5}, "rho"),
    (APGDConfig, {"loss": "cw"}, "loss"),
    (CWConfig, {"norm": "linf"}, "norm"),
    (CWConfig, {"c": 0.0}, "c"),
    (CWConfig, {"kappa": -1.0}, "kappa"),
    (CWConfig, {"lr": -0.1}, "lr"),
    (CWConfig, {"binary_search_steps": 0}, "binary_search_steps"),
]


@pytest.mark.parametrize("cls,options,key", BAD, ids=[f"{c.__name__}-{k}-{o[k]}" for c, o, k in BAD])
def test_each_attack_config_refuses_a_bad_value_naming_the_key(cls, options, key):
    with pytest.raises(ConfigError, match=rf"^{key}: ") as info:
        cls(**options)
    assert "\n" not in str(info.value)


ATTACKS = [(FGSM, FGSMConfig), (PGD, PGDConfig), (APGD, APGDConfig), (CW, CWConfig)]
OPTIONS = {FGSM: {"eps": 0.05, "norm": "l2", "seed": 3},
           PGD: {"eps": 0.05, "steps": 4, "alpha": 0.02, "restarts": 2, "loss": "dlr", "relative": True},
           APGD: {"eps": 0.05, "steps": 7, "loss": "dlr", "rho": 0.5, "batch_size": 8},
           CW: {"eps": 1.0, "c": 2.0, "kappa": 0.5, "steps": 3, "lr": 0.1, "binary_search_steps": 2}}


@pytest.mark.parametrize("attack,config", ATTACKS, ids=[a.__name__ for a, _ in ATTACKS])
def test_keywords_and_config_build_the_same_attack(attack, config):
    opts = OPTIONS[attack]
    by_keywords, by_config = attack(**opts), attack(config(**opts))
    assert by_keywords.config == by_config.config
    assert by_keywords.settings() == by_config.settings()
    for key, value in opts.items():  # the options really arrived
        assert getattr(by_config.config, key) == value, key
    assert attack().config == config()  # and so did the defaults


@pytest.mark.parametrize("attack,config", ATTACKS, ids=[a.__name__ for a, _ in ATTACKS])
def test_keyword_errors_name_the_attack_and_the_allowed_keys(attack, config):
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(config)))
    with pytest.raises(ConfigError, match=f"^{attack.name}: unknown key 'epsilon'; allowed: {allowed}$"):
        attack(epsilon=0.1)
    with pytest.raises(ConfigError, match=f"^{attack.name}: eps: "):
        attack(eps=-1.0)
    with pytest.raises(ConfigError, match="not both"):
        attack(config(), seed=1)
    other = PGDConfig if config is not PGDConfig else FGSMConfig
    with pytest.raises(ConfigError, match=f"expected a {config.__name__}, got {other.__name__}"):
        attack(other())


def test_pgd_step_size_defaults_from_eps_and_steps():
    assert PGD(eps=0.1, steps=10).alpha == pytest.approx(0.025)
    assert PGD(eps=0.1, steps=10, alpha=0.05).alpha == 0.05
    assert PGD(eps=0.1, steps=10).settings()["alpha"] == pytest.approx(0.025)


def test_scorecard_attack_names_come_from_the_registry():
    assert GRID_ATTACKS.names() == ["apgd", "fgsm", "pgd"]
    built = build_attacks(["pgd", "apgd"], [0.1, 0.2], pgd_steps=3, apgd_steps=5, relative=True, seed=2)
    pgd1, pgd2, apgd1, apgd2 = built
    assert isinstance(pgd1, PGD) and pgd1.config == PGDConfig(eps=0.1, steps=3, relative=True, seed=2)
    assert pgd2.config.eps == 0.2
    assert [a.config.loss for a in apgd1] == ["ce", "dlr"] and apgd2[0].config.steps == 5
    with pytest.raises(ConfigError, match="unknown attack 'deepfool'; allowed: apgd, fgsm, pgd"):
        build_attacks(["deepfool"], [0.1], pgd_steps=3, apgd_steps=5, relative=True, seed=0)


def test_corruption_registry_refuses_a_second_registration():
    assert "gaussian_noise" in CORRUPTIONS and len(CORRUPTIONS) == 9
    with pytest.raises(ValueError, match="already registered"):
        register_corruption("gaussian_noise", ("image",), (1, 2, 3, 4, 5), "again")(lambda *a: a[0])
    with pytest.raises(ConfigError, match="unknown corruption 'fog'; allowed: blur, "):
        CORRUPTIONS.get("fog")


class _Int(nn.Linear):
    """A stand-in for a quantized layer without a fake_quant_twin method."""


class _IntChild(_Int):
    pass


def test_twin_builders_are_found_by_type_and_registered_once():
    model = nn.Sequential(_IntChild(2, 2), nn.ReLU())
    assert not is_quantized(model)
    built = []

    @register_twin(_Int)
    def _twin(m: nn.Module) -> nn.Module:
        built.append(m)
        twin = nn.Linear(2, 2)
        twin.load_state_dict(m.state_dict())
        return twin

    assert is_quantized(model)  # the subclass finds its base's builder
    twin = fake_quant_twin(model)
    assert type(twin[0]) is nn.Linear and isinstance(model[0], _IntChild) and len(built) == 1
    x = torch.randn(3, 2)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already registered"):
        register_twin(_Int)(lambda m: m)
