"""Layer rules of structured pruning: the table, a custom layer type plugged in, unknown leaves refused
by name, GroupNorm pruned group-wise, parameter-free norms whose size attribute follows the cut."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, ModelError
from slimguard.prune.graph import DependencyGraph
from slimguard.prune.rules import LINEAR, ChannelRule, LinearRule, register_rule, rule_for
from slimguard.prune.structured import ChannelPruningConfig, prune_channels
from slimguard.prune.surgery import keep_slices


class DenseRule(ChannelRule):
    """Rule for the test's ``Dense``: weight stored as (in, out), channels on the last dimension."""

    channels_last = True
    weight_dims: ClassVar[Mapping[str, int]] = {"out": 1, "in": 0}  # weight is (in, out)

    def in_channels(self, module: nn.Module) -> int:
        return module.weight.shape[0]

    def out_channels(self, module: nn.Module) -> int:
        return module.weight.shape[1]

    def prune_out(self, module: nn.Module, keep: torch.Tensor) -> None:
        keep_slices(module, ("weight",), 1, keep)
        keep_slices(module, ("bias",), 0, keep)

    def prune_in(self, module: nn.Module, keep: torch.Tensor) -> None:
        keep_slices(module, ("weight",), 0, keep)


def _dense_type() -> type[nn.Module]:
    """A fresh linear-like layer type (fresh per call, so each test registers its own)."""

    class Dense(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
            self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    return Dense


def test_custom_layer_type_plugs_in_through_register_rule():
    dense = _dense_type()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), dense(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(5, 6)
    with pytest.raises(ModelError, match=r"operation matmul in module '2'; add ignore=\['2'\]"):
        prune_channels(model, ChannelPruningConfig(ratio=0.5), x[:1])  # traced through: its matmul is unknown

    with torch.no_grad():  # channels 8..15 of the first Linear and 6..11 of Dense carry nothing
        model[0].weight[8:] = 0
        model[0].bias[8:] = 0
        model[2].weight[8:] = 0
        model[2].weight[:, 6:] = 0
        model[2].bias[6:] = 0
        model[4].weight[:, 6:] = 0
    before = model(x)
    rule = register_rule(dense)(DenseRule())
    assert DependencyGraph(model, x[:1]).rules["2"] is rule
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5), x[:1])
    assert model[0].out_features == 8 and tuple(model[2].weight.shape) == (8, 6) and model[4].in_features == 6
    assert tuple(model[2].bias.shape) == (6,)
    assert sorted(g["channels"][1] for g in result["groups"]) == [6, 8]
    # exact up to float summation order: the removed channels were all zero
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer,width", [(nn.PixelShuffle(2), 2), (nn.ChannelShuffle(2), 8)],
                         ids=["PixelShuffle", "ChannelShuffle"])
def test_unregistered_leaf_type_is_refused_by_name(layer, width):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer, nn.Conv2d(width, 4, 3, padding=1))
    x = torch.rand(1, 3, 8, 8)
    name = type(layer).__name__
    with pytest.raises(ModelError, match=rf"cannot follow a {name} in module '1'; add ignore=\['1'\]"):
        prune_channels(model, ChannelPruningConfig(ratio=0.5), x)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5, ignore=["1"], allow_empty=True), x)
    assert model[0].out_channels == 8 and result["groups"] == []  # kept whole around the ignored leaf
    assert model(x).shape[1] == 4


def _groupnorm_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():  # smallest filters: 0, 1, 3, 4, 5, 7 -> per channel the 4 lowest span 3 groups
        for c, scale in enumerate([0.01, 0.02, 1.0, 0.03, 0.04, 0.05, 1.0, 0.06]):
            model[0].weight[c] *= scale
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_groupnorm_keeps_whole_groups_and_matches_a_hand_built_model():
    model = _groupnorm_model()
    kept = [2, 3, 6, 7]  # groups 1 and 3 hold the two large filters; groups 0 and 2 go
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    with torch.no_grad():
        ref[0].weight.copy_(model[0].weight[kept])
        ref[0].bias.copy_(model[0].bias[kept])
        ref[1].weight.copy_(model[1].weight[kept])
        ref[1].bias.copy_(model[1].bias[kept])
        ref[3].weight.copy_(model[3].weight[:, kept])
        ref[3].bias.copy_(model[3].bias)
    x = torch.rand(3, 3, 8, 8)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5), x[:1])
    assert (model[1].num_groups, model[1].num_channels, model[0].out_channels, model[3].in_channels) == (2, 4, 4, 4)
    assert result["groups"] == [{"modules": ["0"], "channels": [4, 2]}]  # units are groups
    torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=1e-5)


def test_parameter_free_norms_follow_the_cut():
    ln = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 4))
    prune_channels(ln, ChannelPruningConfig(ratio=0.5), torch.rand(1, 8))
    assert ln[1].normalized_shape == (8,) and ln(torch.rand(2, 8)).shape == (2, 4)
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=False),
                       nn.Conv2d(8, 4, 3))
    prune_channels(bn, ChannelPruningConfig(ratio=0.5), torch.rand(1, 3, 8, 8))
    assert bn[1].num_features == bn[0].out_channels == 4 and bn(torch.rand(2, 3, 8, 8)).shape == (2, 4, 4, 4)


def test_groupnorm_refuses_a_partial_group():
    gn = nn.GroupNorm(2, 8)
    with pytest.raises(ConfigError, match="part of a channel group"):
        rule_for(gn).prune(gn, {"feat": torch.tensor([0, 1, 2, 4])}, "gn")


def test_table_walks_the_mro_and_refuses_duplicates():
    class MyLinear(nn.Linear):
        pass

    assert rule_for(nn.Linear(2, 2)) is LINEAR
    assert rule_for(MyLinear(2, 2)) is LINEAR  # scored and cut like its base class
    assert rule_for(MyLinear(2, 2), inherited=False) is None  # but traced through, not one leaf
    assert rule_for(nn.PixelShuffle(2)) is None
    with pytest.raises(ValueError, match="already registered"):
        register_rule(nn.Linear)(LinearRule())
