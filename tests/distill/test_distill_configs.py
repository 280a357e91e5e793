"""Steps that train take their training options in one nested ``finetune:`` block; the old flat spelling
of ``distill`` and ``sparsity-train`` still parses, with a deprecation warning, into the nested form."""

from __future__ import annotations

import warnings

import pytest

from slimguard.core.config import Config
from slimguard.core.errors import ConfigError
from slimguard.core.recipe import loads
from slimguard.distill import DistillConfig
from slimguard.train.loop import FinetuneConfig
from slimguard.train.regularize import SparsityTrainingConfig

HEAD = "model: zoo:digits-mlp\ndata: digits\nsteps:\n"


def _steps(yaml_steps: str) -> list[Config]:
    return loads(HEAD + yaml_steps, "recipe").steps


def test_old_flat_distill_step_parses_into_the_nested_form_with_a_warning():
    message = (r"recipe\.steps\[0\]\.distill: training options beside the step \(epochs, lr, patience\) "
               r"are deprecated; write them in its finetune block: "
               r"finetune: \{epochs: 3, lr: 0\.01, patience: 0\}")
    with pytest.warns(FutureWarning, match=message):
        (old,) = _steps("  - distill: {temperature: 2.0, epochs: 3, lr: 0.01, patience: 0}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        (new,) = _steps("  - distill: {temperature: 2.0, finetune: {epochs: 3, lr: 0.01, patience: 0}}\n")
    assert old == new
    assert old.finetune == FinetuneConfig(epochs=3, lr=0.01, patience=0)
    assert old.temperature == 2.0


@pytest.mark.parametrize("step,flat,nested", [
    ("distill", "{epochs: 4, seed: 2, max_steps: 9}", DistillConfig(finetune=FinetuneConfig(epochs=4, seed=2,
                                                                                             max_steps=9))),
    ("distill", "{batch_size: 16, optimizer: sgd, weight_decay: 0.01}",  # keeps distill's 10 epochs
     DistillConfig(finetune=FinetuneConfig(epochs=10, batch_size=16, optimizer="sgd", weight_decay=0.01))),
    ("sparsity-train", "{bn_l1: 0.001, epochs: 2}",  # keeps sparsity-train's SGD at lr 0.01, patience 0
     SparsityTrainingConfig(bn_l1=0.001, finetune=FinetuneConfig(epochs=2, lr=0.01, optimizer="sgd", patience=0))),
    ("sparsity-train", "{lr: 0.1, batch_size: 32, optimizer: adamw, weight_decay: 0.1, patience: 2, seed: 1}",
     SparsityTrainingConfig(finetune=FinetuneConfig(epochs=5, lr=0.1, batch_size=32, optimizer="adamw",
                                              weight_decay=0.1, patience=2, seed=1))),
])
def test_every_old_flat_key_is_moved_into_the_block(step, flat, nested):
    with pytest.warns(FutureWarning, match="deprecated"):
        (cfg,) = _steps(f"  - {step}: {flat}\n")
    assert cfg == nested


@pytest.mark.parametrize("step,block,expected", [
    ("distill", "{}", FinetuneConfig(epochs=10)),
    ("distill", "{lr: 0.01}", FinetuneConfig(epochs=10, lr=0.01)),
    ("sparsity-train", "{epochs: 2}", FinetuneConfig(epochs=2, lr=0.01, optimizer="sgd", patience=0)),
    ("sparsity-train", "{optimizer: adamw, lr: 0.001}",
     FinetuneConfig(epochs=5, lr=0.001, optimizer="adamw", patience=0)),
])
def test_keys_a_block_leaves_out_keep_the_steps_defaults(step, block, expected):
    (cfg,) = _steps(f"  - {step}: {{finetune: {block}}}\n")
    assert cfg.finetune == expected


def test_defaults_match_the_old_flat_defaults():
    assert DistillConfig().finetune == FinetuneConfig(epochs=10, lr=1e-3, batch_size=64, optimizer="adamw",
                                                      weight_decay=0.0, patience=3, seed=0, max_steps=0)
    assert SparsityTrainingConfig().finetune == FinetuneConfig(epochs=5, lr=1e-2, batch_size=64, optimizer="sgd",
                                                         weight_decay=0.0, patience=0, seed=0)


@pytest.mark.parametrize("yaml_step,message", [
    ("distill: {epochs: 3, finetune: {epochs: 4}}", r"'epochs' is given both beside the step and in its "),
    ("distill: {finetune: {epoch: 4}}", r"distill\.finetune: unknown key 'epoch'; allowed: batch_size, "),
    ("distill: {finetune: 3}", r"distill\.finetune: expected a mapping of FinetuneConfig options"),
    ("distill: {finetune: {lr: -1}}", r"distill\.finetune: lr: -1\.0 is out of range"),
    ("distill: {label_smoothing: 0.1}", r"distill: unknown key 'label_smoothing'; allowed: .*finetune"),
    ("sparsity-train: {max_steps: 3}", r"sparsity-train: unknown key 'max_steps'; allowed: .*finetune"),
    ("sparsity-train: {epochs: -2}", r"sparsity-train\.finetune: epochs: -2 is out of range"),
])
def test_bad_training_options_are_one_line_errors_naming_the_key(yaml_step, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ConfigError, match=message) as info:
            _steps(f"  - {yaml_step}\n")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls", [DistillConfig, SparsityTrainingConfig])
def test_python_construction_checks_the_block_and_configs_round_trip(cls):
    with pytest.raises(ConfigError, match="finetune: expected a FinetuneConfig, got dict"):
        cls(finetune={"epochs": 3})
    cfg = cls(finetune=FinetuneConfig(epochs=2, lr=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_a_stored_flat_distill_config_still_loads():
    stored = {"_type": "distill", "_version": 1, "_data": {"temperature": 3.0, "epochs": 2, "lr": 0.002}}
    with pytest.warns(FutureWarning, match="deprecated"):
        cfg = Config.from_dict(stored)
    assert cfg == DistillConfig(temperature=3.0, finetune=FinetuneConfig(epochs=2, lr=0.002))
