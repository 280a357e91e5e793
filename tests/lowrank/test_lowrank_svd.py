"""Low-rank factorisation: the relative Frobenius error^2 equals 1 - retained energy (SVD, Eckart-Young),
the rank is the smallest that keeps the asked energy, and factorised models save and load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.lowrank import LowRankConfig, choose_rank, factorize_conv, factorize_linear
from slimguard.transforms import factorize_


def _rel_err2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).double().norm() ** 2 / exact.double().norm() ** 2)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.99])
def test_linear_error_matches_retained_energy(energy) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(48, 32)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    rank = choose_rank(s, energy)
    pair, retained = factorize_linear(layer, rank)
    w = (pair[1].weight @ pair[0].weight).detach()
    assert _rel_err2(w, layer.weight.detach()) == pytest.approx(1 - retained, abs=1e-5)
    assert retained >= energy - 1e-9
    e = s.pow(2)
    assert float(e[: rank - 1].sum() / e.sum()) < energy  # the smallest such rank
    x = torch.randn(5, 48)
    assert torch.allclose(pair(x) - pair[1].bias, (x @ w.T), atol=1e-4)


@pytest.mark.parametrize("energy", [0.6, 0.95])
def test_conv_error_matches_retained_energy(energy) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1)
    w2d = conv.weight.detach().reshape(12, -1)
    rank = choose_rank(torch.linalg.svdvals(w2d.double()), energy)
    pair, retained = factorize_conv(conv, rank)
    approx = pair[1].weight.reshape(12, rank) @ pair[0].weight.reshape(rank, -1)
    assert _rel_err2(approx.detach(), w2d) == pytest.approx(1 - retained, abs=1e-5)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        out, ref = pair(x), conv(x)
    assert out.shape == ref.shape
    # output error is bounded by the weight error (same linear map applied to the same patches)
    rel = float((out - ref).norm() / (ref - conv.bias.detach()[None, :, None, None]).norm())
    assert rel < 2 * math.sqrt(1 - retained) + 1e-3


def test_full_energy_is_exact() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(10, 6)
    pair, retained = factorize_linear(layer, 6)
    x = torch.randn(4, 10)
    assert retained == pytest.approx(1.0) and torch.allclose(pair(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("ratio,full,expected", [(0.25, 32, 8), (0.1, 32, 4), (1.0, 32, 32)])
def test_rank_by_ratio(ratio, full, expected) -> None:
    assert choose_rank(torch.linspace(2, 1, full), ratio=ratio) == expected


def test_factorize_model_round_trip(zoo_model, digits, tmp_path) -> None:
    from slimguard.artifact import load, save
    from slimguard.runtime.measure import count_params
    from slimguard.train.loop import accuracy

    model = zoo_model("digits-mlp")
    base_acc, base_params = accuracy(model, digits.test), count_params(model)
    out = factorize_(model, LowRankConfig(energy=0.9, ignore=["6"]))
    assert set(out["factorized"]) == {"2", "4"} and "6" not in out["factorized"]
    assert all(v["retained_energy"] >= 0.9 for v in out["factorized"].values())
    assert count_params(model) < 0.85 * base_params
    assert accuracy(model, digits.test) > base_acc - 0.05  # before any fine-tuning
    path = save(model, tmp_path / "lr.slim")
    back = load(path)
    x = digits.test.x[:16]
    assert torch.equal(back(x), model.eval()(x))


def test_layers_that_would_not_shrink_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    out = factorize_(model, LowRankConfig(energy=0.999))
    assert out["skipped"] == ["0"] and isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("kwargs,field", [(dict(energy=0.0), "energy"), (dict(energy=1.5), "energy"),
                                          (dict(ratio=-0.1), "ratio"), (dict(layers=["lstm"]), "layers")])
def test_bad_lowrank_config(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        LowRankConfig(**kwargs)
