"""Adversarial training (PGD-AT, TRADES) through the one loop, and the adv-finetune recipe step."""

from __future__ import annotations

import copy

import pytest
import torch

from slimguard.core.errors import ConfigError, ModelError
from slimguard.robust import PGD, AdversarialFinetuneConfig, accuracy_on, adversarial_finetune, trades_loss
from slimguard.robust.scorecard import DEFAULT_EPS
from slimguard.runtime.measure import threads
from slimguard.train.loop import FinetuneConfig

MIDDLE_EPS = DEFAULT_EPS[len(DEFAULT_EPS) // 2]


@pytest.fixture(autouse=True)
def _one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def trained():
    """digits-mlp adversarially trained at the scorecard's middle eps (PGD-AT, 3 inner steps, 4 epochs)."""
    from slimguard import data
    from slimguard.models import zoo

    with threads(1):
        d = data.load("digits")
        original = zoo.load("digits-mlp", progress=False)
        model = copy.deepcopy(original)
        cfg = AdversarialFinetuneConfig(eps=MIDDLE_EPS, steps=3, val_examples=128,
                                  finetune=FinetuneConfig(epochs=4, lr=2e-3, patience=0))
        history = adversarial_finetune(model, d, cfg, progress=False)
    return original, model, d, history


def test_adversarial_training_raises_pgd_accuracy_and_keeps_clean_accuracy(trained):
    original, model, d, history = trained
    x, y = d.test.tensors
    pgd = PGD(eps=MIDDLE_EPS, steps=10, seed=1)  # a stronger attack than the one trained against
    clean0, clean1 = accuracy_on(original, x, y), accuracy_on(model, x, y)
    robust0 = accuracy_on(original, pgd(original, x, y, bounds=d.meta.bounds()), y)
    robust1 = accuracy_on(model, pgd(model, x, y, bounds=d.meta.bounds()), y)
    assert robust1 >= robust0 + 0.10  # a large margin: at least 10 points more under PGD
    assert clean1 >= clean0 - 0.03  # clean accuracy drops at most 3 points
    assert history["selected_by"] == "mean" and history["steps"] > 0


def test_trades_loss_trains_through_the_loop(digits, zoo_model):
    from slimguard.train.loop import finetune

    model = zoo_model("digits-mlp")
    before = copy.deepcopy(model.state_dict())
    loss = trades_loss(0.1, steps=2, beta=6.0, bounds=digits.meta.bounds())
    x, y = digits.train.x[:32], digits.train.y[:32]
    value = loss(model, x, y)
    assert torch.isfinite(value) and value.requires_grad
    finetune(model, digits, FinetuneConfig(epochs=1, max_steps=3, patience=0), loss_fn=loss, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adv_finetune_is_a_recipe_step_that_keeps_pruning_masks(digits, zoo_model):
    from slimguard.core.masks import sparsity
    from slimguard.core.recipe import parse
    from slimguard.transforms import run_step

    recipe = parse({"model": "zoo:digits-mlp", "data": "digits", "steps": [
        {"magnitude": {"sparsity": 0.8}},
        {"adv-finetune": {"method": "trades", "eps": 0.1, "steps": 2,
                          "finetune": {"epochs": 1, "max_steps": 4, "patience": 0}}}]})
    model = zoo_model("digits-mlp")
    for step in recipe.steps:
        run_step(model, step, digits, progress=False)
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)  # masks re-applied after every step
    assert model.training is False


BAD = [
    pytest.param({"eps": 0.0}, "eps", id="zero-eps"),
    pytest.param({"eps": -0.1}, "eps", id="negative-eps"),
    pytest.param({"method": "fgsm-at"}, "method", id="unknown-method"),
    pytest.param({"clean_weight": 1.5}, "clean_weight", id="clean-weight"),
    pytest.param({"steps": 0}, "steps", id="zero-steps"),
    pytest.param({"method": "trades", "relative": True}, "relative", id="trades-relative"),
]


@pytest.mark.parametrize("fields,word", BAD)
def test_bad_adv_finetune_configs(fields, word):
    with pytest.raises(ConfigError, match=word) as info:
        AdversarialFinetuneConfig.from_fields(fields)
    assert "\n" not in str(info.value)


def test_int8_model_cannot_be_adversarially_fine_tuned(digits, zoo_model):
    from slimguard.quantize.dynamic import Int8DynamicConfig
    from slimguard.transforms import quantize_

    model = zoo_model("digits-mlp")
    quantize_(model, Int8DynamicConfig())
    with pytest.raises(ModelError, match="before quantizing"):
        cfg = AdversarialFinetuneConfig(finetune=FinetuneConfig(epochs=1))
        adversarial_finetune(model, digits, cfg, progress=False)


def test_robust_recipe_end_to_end(tmp_path, zoo_model):
    """The shipped recipe (PGD-AT, 80% pruning, adversarial fine-tuning, int8) beats the original under PGD."""
    from importlib import resources

    import yaml

    from slimguard import data
    from slimguard.artifact import load
    from slimguard.core.recipe import parse
    from slimguard.pipeline import compress
    from slimguard.robust import scorecard

    raw = yaml.safe_load(resources.files("slimguard.recipes").joinpath("robust-digits-mlp.yaml").read_text())
    result = compress(parse(raw, "robust-digits-mlp.yaml"), tmp_path, progress=False)
    assert result["budget"]["ok"]
    compressed = load(tmp_path / "model.slim")
    card = scorecard(compressed, data.load("digits"), against=zoo_model("digits-mlp"), attacks=["pgd"],
                     eps=[MIDDLE_EPS], corruptions=[], pgd_steps=10, progress=False)
    label = f"pgd-linf eps={MIDDLE_EPS:g}"
    original, robust = card.models["original"], card.models["compressed"]
    assert robust["quantized"] and "twin_accuracy" in robust["attacks"][label]
    assert robust["attacks"][label]["accuracy"] >= original["attacks"][label]["accuracy"] + 0.10
    assert [r[0] for r in card.rows()] == ["clean accuracy", label, f"{label} (fake-quant twin)"]
