"""Unstructured, N:M and gradual (AGP) pruning: exact patterns, importances, schedule, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.core.config import Config
from slimguard.core.errors import ConfigError, ModelError
from slimguard.core.masks import get_mask, sparsity
from slimguard.core.recipe import loads
from slimguard.prune.gradual import AGPCallback, AGPConfig, agp_sparsity
from slimguard.prune.importance import (
    BNScaleImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    get_importance,
)
from slimguard.prune.magnitude import MagnitudePruningConfig, prune_unstructured
from slimguard.prune.nm import NMSparsityConfig, has_nm_pattern, nm_mask
from slimguard.train.loop import FinetuneConfig
from slimguard.transforms import prune_


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("importance", ["l1", "l2", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_exact_sparsity(importance, scope):
    model = _mlp()
    prune_(model, MagnitudePruningConfig(sparsity=0.75, scope=scope, importance=importance))
    n = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros == round(0.75 * n) if scope == "global" else abs(zeros - 0.75 * n) <= 3
    for m in model:
        if isinstance(m, nn.Linear):
            assert torch.equal(get_mask(m, "weight"), m.weight != 0)


def test_magnitude_removes_the_smallest():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]]))
    prune_(lin_model := nn.Sequential(lin), MagnitudePruningConfig(sparsity=0.5, scope="layer"))
    assert lin_model[0].weight.ne(0).tolist() == [[False, True, False, True], [False, False, True, True]]


BN_REFUSED = (r"importance: 'bn' is not allowed for single weights \(it scores whole channels: use it with "
              r"channel pruning\); allowed: l1, l2, random, taylor, wanda$")


@pytest.mark.parametrize("step", ["magnitude", "nm", "agp"])
def test_bn_importance_is_refused_for_single_weights(step):
    """``bn`` scores a channel by its BatchNorm scale; a single weight has none, so unstructured, N:M and
    gradual pruning refuse it when the recipe is read instead of silently ranking by ``l1``."""
    with pytest.raises(ConfigError, match=BN_REFUSED):
        loads(f"model: zoo:digits-mlp\ndata: digits\nsteps:\n  - {step}: {{importance: bn}}\n", "recipe")


def test_bn_importance_object_is_refused_before_any_mask():
    model = _mlp()
    with pytest.raises(ConfigError, match=BN_REFUSED):
        prune_unstructured(model, MagnitudePruningConfig(sparsity=0.5), BNScaleImportance())
    with pytest.raises(ConfigError, match=BN_REFUSED):
        BNScaleImportance().score(model[0])
    assert all(get_mask(m, "weight") is None for m in model if isinstance(m, nn.Linear))
    assert torch.equal(BNScaleImportance().channel_score(nn.BatchNorm1d(3), 0), torch.ones(3))  # channels: fine


def test_demo_recipe_form_still_validates():
    cfg = Config.from_dict({"_type": "magnitude", "_data": {"sparsity": 0.8, "scope": "global"}})
    assert isinstance(cfg, MagnitudePruningConfig) and cfg.importance == "l1"


@pytest.mark.parametrize("importance", ["taylor", "wanda"])
def test_data_driven_importances(importance, digits):
    from slimguard.models import zoo

    model = zoo.create("digits-mlp")
    prune_(model, MagnitudePruningConfig(sparsity=0.5, importance=importance), data=digits)
    assert abs(sparsity(model) - 0.5) < 0.01
    with pytest.raises(Exception, match="needs data"):
        prune_(zoo.create("digits-mlp"), MagnitudePruningConfig(sparsity=0.5, importance=importance))


def test_wanda_weights_by_input_norm():
    from slimguard.prune.importance import ActivationImportance

    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    imp = ActivationImportance()
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1
    imp.prepare(nn.Sequential(lin), [(x, None)])
    assert imp.score(lin).tolist() == [[5.0, 1.0]]
    assert imp.channel_score(lin, 1).tolist() == [5.0, 1.0]


def test_importance_objects():
    lin = nn.Linear(3, 2)
    assert MagnitudeImportance(p=2).channel_score(lin, 0).shape == (2,)
    assert BNScaleImportance().channel_score(lin, 0) is None
    bn = nn.BatchNorm1d(3)
    assert torch.equal(BNScaleImportance().channel_score(bn, 0), torch.ones(3))
    a, b = RandomImportance(seed=1).score(lin), RandomImportance(seed=1).score(lin)
    assert torch.equal(a, b)
    with pytest.raises(Exception, match="no gradients"):
        TaylorImportance().score(lin)
    with pytest.raises(ConfigError, match="allowed"):
        get_importance("bogus")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_pattern_exact(n, m):
    model = _mlp()
    prune_(model, NMSparsityConfig(n=n, m=m))
    for layer in (model[0], model[2], model[4]):
        w = layer.weight
        blocks = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((blocks == n).all())
        assert has_nm_pattern(w, n, m)


def test_nm_mask_keeps_largest_and_skips_odd_layers():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    result = prune_(model, NMSparsityConfig(n=2, m=4))
    assert result["pruned"] == ["1"] and "0" in result["skipped"]
    with pytest.raises(ModelError, match="no layer fits"):
        prune_(nn.Sequential(nn.Linear(6, 2)), NMSparsityConfig(n=2, m=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need CUDA")
def test_semi_structured_on_gpu():  # pragma: no cover - needs a GPU
    from slimguard.prune.nm import to_semi_structured

    model = nn.Sequential(nn.Linear(128, 128)).half().cuda()
    prune_(model, NMSparsityConfig(n=2, m=4))
    x = torch.rand(64, 128, device="cuda", dtype=torch.half)
    ref = model(x)
    assert to_semi_structured(model) == ["0"]
    torch.testing.assert_close(model(x), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("cls,kwargs,match", [
    (MagnitudePruningConfig, {"sparsity": 1.0}, "sparsity"),
    (MagnitudePruningConfig, {"importance": "x"}, "importance"),
    (NMSparsityConfig, {"n": 4, "m": 4}, "n"),
    (NMSparsityConfig, {"n": 0}, "n"),
    (NMSparsityConfig, {"m": 1}, "m"),
    (AGPConfig, {"sparsity": 1.2}, "sparsity"),
    (AGPConfig, {"start": 0.5, "end": 0.4}, "end"),
    (AGPConfig, {"frequency": 0}, "frequency"),
])
def test_bad_configs(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_bad_names_and_emptying():
    with pytest.raises(ConfigError, match="names no module"):
        prune_(_mlp(), MagnitudePruningConfig(sparsity=0.5, ignore=["nope"]))
    with pytest.raises(ConfigError, match="would empty"):
        prune_(nn.Sequential(nn.Linear(1, 1)), MagnitudePruningConfig(sparsity=0.9, scope="layer"))


@pytest.mark.parametrize("step,expected", [(0, 0.0), (25, 0.9 * (1 - (1 - 25 / 75) ** 3)), (75, 0.9), (100, 0.9)])
def test_agp_schedule(step, expected):
    assert agp_sparsity(step, 100, 0.9, 0.0, 0.0, 0.75) == pytest.approx(expected)


def test_agp_step_reaches_target_and_grows_monotonically(digits):
    from slimguard.models import zoo
    from slimguard.train.loop import FinetuneConfig

    model = zoo.create("digits-mlp")
    cfg = AGPConfig(sparsity=0.9, frequency=3, scope="layer",
                         finetune=FinetuneConfig(epochs=1, patience=0, max_steps=12))
    result = prune_(model, cfg, data=digits, progress=False)
    levels = [s for _, s in result["schedule"]]
    assert levels == sorted(levels) and levels[-1] == pytest.approx(0.9)
    assert sparsity(model) == pytest.approx(0.9, abs=0.002)


def test_agp_callback_blocks_best_tracking_until_done():
    cb = AGPCallback(MagnitudePruningConfig(sparsity=0.5), end=0.5, frequency=1)
    model = _mlp()
    cb.on_train_begin(model, 10)
    cb.on_step_end(model, 2, 10)
    assert not cb.best_tracking_allowed(0) and 0 < sparsity(model) < 0.5
    cb.on_step_end(model, 5, 10)
    assert cb.best_tracking_allowed(1) and sparsity(model) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(("block", "expected"), [
    ("{}", FinetuneConfig(epochs=10, patience=0)),
    ("{finetune: {}}", FinetuneConfig(epochs=10, patience=0)),
    ("{finetune: {epochs: 2}}", FinetuneConfig(epochs=2, patience=0)),  # keeps agp's patience 0
    ("{finetune: {lr: 0.01, max_steps: 5}}", FinetuneConfig(epochs=10, lr=0.01, patience=0, max_steps=5)),
])
def test_agp_finetune_block_keeps_the_steps_defaults_for_keys_it_leaves_out(block, expected):
    recipe = loads(f"model: zoo:digits-mlp\ndata: digits\nsteps:\n  - agp: {block}\n", "recipe")
    assert recipe.steps[0].finetune == expected


@pytest.mark.parametrize(("block", "message"), [
    ("{epochs: 3}", r"agp: unknown key 'epochs'; allowed: .*finetune"),  # agp never had flat training keys
    ("{finetune: {epochs: -1}}", r"agp\.finetune: epochs: -1 is out of range"),
    ("{finetune: [1]}", r"agp\.finetune: expected a mapping of FinetuneConfig options"),
])
def test_agp_bad_finetune_block_is_one_line_error_naming_the_key(block, message):
    with pytest.raises(ConfigError, match=message) as info:
        loads(f"model: zoo:digits-mlp\ndata: digits\nsteps:\n  - agp: {block}\n", "recipe")
    assert "\n" not in str(info.value)


def test_agp_python_construction_checks_the_block_and_round_trips():
    with pytest.raises(ConfigError, match="finetune: expected a FinetuneConfig, got dict"):
        AGPConfig(finetune={"epochs": 3})
    cfg = AGPConfig(sparsity=0.5, finetune=FinetuneConfig(epochs=2, lr=0.05))
    assert Config.from_dict(cfg.to_dict()) == cfg
