"""Configs validate themselves, round-trip through dicts, and registries refuse duplicates."""

from __future__ import annotations

import dataclasses

import pytest

from slimguard.core.config import Config, check_ranges, config_class, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.registry import handler_for, register_handler
from slimguard.prune.gradual import AGPConfig
from slimguard.prune.magnitude import MagnitudePruningConfig
from slimguard.train.loop import FinetuneConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": 1.0}, "sparsity: 1.0 is out of range; allowed: [0.0, 1.0)"),
        ({"sparsity": -0.1}, "sparsity: -0.1 is out of range"),
        ({"sparsity": "high"}, "magnitude.sparsity: expected a number, got 'high'"),
        ({"scope": "model"}, "magnitude.scope: 'model' is not allowed; allowed: 'global', 'layer'"),
        ({"sparsty": 0.5}, "magnitude: unknown key 'sparsty'; allowed: ignore, "),
        ({"ignore": "fc1"}, "magnitude.ignore: expected a list"),
    ],
)
def test_bad_fields_name_the_key_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError) as err:
        MagnitudePruningConfig.from_fields(fields)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="lr"):
        FinetuneConfig(lr=0.0)


def test_round_trip_through_dict():
    cfg = MagnitudePruningConfig(sparsity=0.7, scope="layer", ignore=["fc"], overrides={"a": 0.2})
    d = cfg.to_dict()
    assert d["_type"] == "magnitude" and d["_version"] == 1
    assert Config.from_dict(d) == cfg


def test_a_stored_config_of_another_class_is_refused():
    stored = FinetuneConfig(epochs=2).to_dict()
    assert FinetuneConfig.from_dict(stored) == FinetuneConfig(epochs=2)
    with pytest.raises(ConfigError, match="finetune: expected a MagnitudePruningConfig, got a FinetuneConfig"):
        MagnitudePruningConfig.from_dict(stored)
    with pytest.raises(ConfigError, match=r"agp\.finetune: expected a FinetuneConfig, got a stored 'magnitude' config"):
        AGPConfig.from_fields({"sparsity": 0.5, "finetune": MagnitudePruningConfig().to_dict()})


def test_int_is_accepted_for_float_fields_but_bool_is_not():
    assert MagnitudePruningConfig.from_fields({"sparsity": 0}).sparsity == 0.0
    with pytest.raises(ConfigError, match="expected a number"):
        MagnitudePruningConfig.from_fields({"sparsity": True})


def test_unknown_step_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown step 'prune-everything'; allowed: .*magnitude"):
        config_class("prune-everything")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_config("magnitude")
        @dataclasses.dataclass
        class Other(Config):
            pass


def test_handler_lookup_by_type_and_duplicates_refused():
    assert handler_for("prune", MagnitudePruningConfig()) is not None
    with pytest.raises(ConfigError, match="is not a quantize config"):
        handler_for("quantize", MagnitudePruningConfig())
    with pytest.raises(ValueError, match="already registered"):
        register_handler("prune", MagnitudePruningConfig)(lambda m, c: None)



@dataclasses.dataclass
class _Counts(Config):
    steps: int = 1
    restarts: int = 1
    ratio: float = 0.5

    def validate(self) -> None:
        check_ranges(self, ("steps", "restarts"), 1)
        check_ranges(self, ("ratio",), 0.0, 1.0, high_inclusive=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "steps: 0 is out of range; allowed: >= 1"),
        ({"restarts": 0}, "restarts: 0 is out of range; allowed: >= 1"),
        ({"steps": 0, "restarts": 0}, "steps: 0 is out of range; allowed: >= 1"),  # checked in the order named
        ({"ratio": 1.0}, "ratio: 1.0 is out of range; allowed: [0.0, 1.0)"),
    ],
)
def test_check_ranges_checks_every_named_field_with_the_same_bounds(fields, message):
    with pytest.raises(ConfigError) as err:
        _Counts(**fields)
    assert str(err.value) == message
    assert _Counts(steps=1, restarts=1, ratio=0.0).restarts == 1  # the bounds themselves are allowed
