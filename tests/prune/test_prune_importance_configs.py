"""Importance options live in one config per importance; names are looked up in a generic registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.prune.importance import (
    IMPORTANCES,
    ActivationImportance,
    ActivationImportanceConfig,
    BNScaleImportance,
    ImportanceConfig,
    MagnitudeImportance,
    MagnitudeImportanceConfig,
    RandomImportance,
    RandomImportanceConfig,
    TaylorImportance,
    TaylorImportanceConfig,
    get_importance,
    importance_names,
)

BAD = [
    (MagnitudeImportanceConfig, {"p": 3}, "p"),
    (TaylorImportanceConfig, {"max_batches": 0}, "max_batches"),
    (ActivationImportanceConfig, {"max_batches": -1}, "max_batches"),
    (RandomImportanceConfig, {"seed": -1}, "seed"),
]


@pytest.mark.parametrize("cls,options,key", BAD, ids=[c.__name__ for c, _, _ in BAD])
def test_each_importance_config_refuses_a_bad_value_naming_the_key(cls, options, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        cls(**options)


CASES = [
    ("l2", MagnitudeImportance, MagnitudeImportanceConfig, {"p": 2}),
    ("taylor", TaylorImportance, TaylorImportanceConfig, {"max_batches": 3}),
    ("random", RandomImportance, RandomImportanceConfig, {"seed": 5}),
    ("wanda", ActivationImportance, ActivationImportanceConfig, {"max_batches": 2}),
    ("bn", BNScaleImportance, ImportanceConfig, {}),
]


@pytest.mark.parametrize("name,cls,config,opts", CASES, ids=[c[0] for c in CASES])
def test_keywords_config_and_name_build_the_same_importance(name, cls, config, opts):
    made = [cls(**opts), cls(config(**opts)), get_importance(name, **opts)]
    assert all(type(m) is cls for m in made)
    assert made[0].config == made[1].config == made[2].config == config(**opts)


def test_names_choose_the_preset_and_options_take_effect():
    assert importance_names() == IMPORTANCES.names() == ["bn", "l1", "l2", "random", "taylor", "wanda"]
    assert get_importance("l1").config.p == 1 and get_importance("l2").config.p == 2
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-3.0, 2.0]]))
    assert get_importance("l2").score(lin).tolist() == [[9.0, 4.0]]
    assert torch.equal(RandomImportance(seed=5).score(lin), get_importance("random", seed=5).score(lin))
    assert not torch.equal(RandomImportance(seed=5).score(lin), RandomImportance(seed=6).score(lin))
    taylor = get_importance("taylor", max_batches=1)
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    model = nn.Sequential(lin, nn.Linear(1, 2))
    taylor.prepare(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    one = taylor.score(lin)
    both = get_importance("taylor", max_batches=2)
    both.prepare(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert not torch.equal(one, both.score(lin))  # max_batches decided how many batches were used


def test_bad_names_and_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown importance 'bogus'; allowed: bn, l1, l2, random, "):
        get_importance("bogus")
    with pytest.raises(ConfigError, match="TaylorImportance: unknown key 'batches'; allowed: max_batches"):
        get_importance("taylor", batches=2)
    with pytest.raises(ConfigError, match="go with a name"):
        get_importance(TaylorImportance(), max_batches=2)
