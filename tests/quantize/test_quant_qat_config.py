"""The ``qat`` step takes its training options in one nested ``finetune:`` block; the old flat spelling still
parses, with a deprecation warning naming the new one, into the same nested config, and keys the block leaves
out keep qat's own defaults."""

from __future__ import annotations

import warnings

import pytest

from slimguard.core.config import Config
from slimguard.core.errors import ConfigError
from slimguard.core.recipe import loads
from slimguard.quantize.qat import QATConfig
from slimguard.train.loop import FinetuneConfig

HEAD = "model: zoo:digits-mlp\ndata: digits\nsteps:\n"
QAT_DEFAULT = FinetuneConfig(epochs=3, lr=1e-4, batch_size=64, patience=0)  # what qat trained with before


def _steps(yaml_steps: str) -> list[Config]:
    return loads(HEAD + yaml_steps, "recipe").steps


def test_old_flat_qat_step_parses_into_the_nested_form_with_a_warning():
    message = (r"recipe\.steps\[0\]\.qat: training options beside the step \(epochs, lr, batch_size\) are "
               r"deprecated; write them in its finetune block: finetune: \{epochs: 2, lr: 0\.001, batch_size: 32\}")
    with pytest.warns(FutureWarning, match=message):
        (old,) = _steps("  - qat: {weight_bits: 4, epochs: 2, lr: 0.001, batch_size: 32}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        (new,) = _steps("  - qat: {weight_bits: 4, finetune: {epochs: 2, lr: 0.001, batch_size: 32}}\n")
    assert old == new == QATConfig(weight_bits=4, finetune=FinetuneConfig(epochs=2, lr=1e-3, batch_size=32,
                                                                          patience=0))


@pytest.mark.parametrize(("flat", "nested"), [
    ("{epochs: 1}", FinetuneConfig(epochs=1, lr=1e-4, batch_size=64, patience=0)),  # the rest: qat's defaults
    ("{lr: 0.01}", FinetuneConfig(epochs=3, lr=0.01, batch_size=64, patience=0)),
    ("{batch_size: 16, freeze_bn_epoch: 0}", FinetuneConfig(epochs=3, lr=1e-4, batch_size=16, patience=0)),
])
def test_every_old_flat_qat_key_is_moved_into_the_block(flat, nested):
    with pytest.warns(FutureWarning, match="deprecated"):
        (cfg,) = _steps(f"  - qat: {flat}\n")
    assert cfg.finetune == nested


@pytest.mark.parametrize(("yaml_step", "expected"), [
    ("qat: {}", QAT_DEFAULT),
    ("qat: {finetune: {}}", QAT_DEFAULT),
    ("qat: {finetune: {epochs: 5}}", FinetuneConfig(epochs=5, lr=1e-4, batch_size=64, patience=0)),
    ("qat: {finetune: {optimizer: sgd, patience: 2}}",
     FinetuneConfig(epochs=3, lr=1e-4, batch_size=64, optimizer="sgd", patience=2)),
])
def test_keys_a_block_leaves_out_keep_the_steps_defaults(yaml_step, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (cfg,) = _steps(f"  - {yaml_step}\n")
    assert cfg.finetune == expected


def test_defaults_match_what_qat_trained_with_before():
    assert QATConfig().finetune == QAT_DEFAULT


@pytest.mark.parametrize(("yaml_step", "message"), [
    ("qat: {epochs: 3, finetune: {epochs: 4}}", r"'epochs' is given both beside the step and in its finetune"),
    ("qat: {patience: 3}", r"qat: unknown key 'patience'; allowed: .*finetune"),  # never a flat qat key
    ("qat: {finetune: {epoch: 4}}", r"qat\.finetune: unknown key 'epoch'; allowed: batch_size, "),
    ("qat: {finetune: {lr: 0}}", r"qat\.finetune: lr: 0\.0 is out of range"),
    ("qat: {lr: -1}", r"qat\.finetune: lr: -1\.0 is out of range"),
    ("qat: {finetune: 3}", r"qat\.finetune: expected a mapping of FinetuneConfig options"),
])
def test_bad_training_options_are_one_line_errors_naming_the_key(yaml_step, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ConfigError, match=message) as info:
            _steps(f"  - {yaml_step}\n")
    assert "\n" not in str(info.value)


def test_python_construction_checks_the_block_and_configs_round_trip():
    with pytest.raises(ConfigError, match="finetune: expected a FinetuneConfig, got dict"):
        QATConfig(finetune={"epochs": 3})
    cfg = QATConfig(finetune=FinetuneConfig(epochs=2, lr=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_a_stored_flat_qat_config_still_loads():
    stored = {"_type": "qat", "_version": 1, "_data": {"weight_bits": 4, "epochs": 2, "lr": 0.002, "batch_size": 64,
                                                       "freeze_bn_epoch": 1, "freeze_observers_epoch": 2,
                                                       "ignore": []}}
    with pytest.warns(FutureWarning, match="deprecated"):
        cfg = Config.from_dict(stored)
    assert cfg == QATConfig(weight_bits=4, finetune=FinetuneConfig(epochs=2, lr=0.002, patience=0))
