"""Regularisation for compressibility: hand-computed penalties; network slimming drives BN scales to 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, ModelError
from slimguard.train.loop import FinetuneConfig
from slimguard.train.regularize import (
    SparsityTrainingConfig,
    bn_l1,
    bn_scale_fraction_below,
    group_lasso,
    regularized,
    sparsity_train,
)


def test_penalties_hand_computed() -> None:
    bn = nn.BatchNorm1d(2)
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0]))
        lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    model = nn.Sequential(lin, bn)
    loss = regularized(lambda m, x, y: torch.tensor(1.0), bn_l1_weight=0.5, group_lasso_weight=0.1)
    with torch.no_grad():
        assert bn_l1(model).item() == pytest.approx(3.0)
        assert group_lasso(model).item() == pytest.approx(5.0)
        assert group_lasso(model, ignore=["0"]).item() == 0.0
        assert loss(model, None, None).item() == pytest.approx(1.0 + 1.5 + 0.5)


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def test_network_slimming_zeroes_bn_scales(digits) -> None:
    plain, slim = _bn_cnn(), _bn_cnn()
    cfg = FinetuneConfig(epochs=4, lr=0.05, batch_size=64, optimizer="sgd", patience=0)
    sparsity_train(plain, digits, SparsityTrainingConfig(bn_l1=1e-9, finetune=cfg), progress=False)
    hist = sparsity_train(slim, digits, SparsityTrainingConfig(bn_l1=0.1, finetune=cfg), progress=False)
    assert hist["bn_small_after"] > hist["bn_small_before"]
    assert bn_scale_fraction_below(slim, 0.05) >= bn_scale_fraction_below(plain, 0.05) + 0.25
    assert float(bn_l1(slim).detach()) < 0.5 * float(bn_l1(plain).detach())


def test_bad_sparsity_inputs() -> None:
    with pytest.raises(ConfigError, match="bn_l1 and group_lasso are both 0"):
        SparsityTrainingConfig(bn_l1=0.0, group_lasso=0.0)
    with pytest.raises(ConfigError, match="bn_l1"):
        SparsityTrainingConfig(bn_l1=-1.0)
    with pytest.raises(ModelError, match="needs BatchNorm layers"):
        sparsity_train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), None, SparsityTrainingConfig(bn_l1=1e-4))
