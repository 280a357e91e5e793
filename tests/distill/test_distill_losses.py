"""Distillation losses against hand-computed values (exact up to float32 rounding: atol 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from slimguard.core.errors import ConfigError, ModelError
from slimguard.distill import DistillConfig
from slimguard.distill import losses as L

LN3 = math.log(3.0)
# teacher [ln 3, 0] -> p_t = (0.75, 0.25); student [0, 0] -> p_s = (0.5, 0.5)
KL_HAND = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308120...

KD_CASES = [
    # (name, student logits, teacher logits, labels, kwargs, expected)
    ("identical soft", [[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], None, dict(temperature=4.0), 0.0),
    ("soft T=1", [[0.0, 0.0]], [[LN3, 0.0]], None, dict(temperature=1.0), KL_HAND),
    ("soft T=2 keeps T^2 scale", [[0.0, 0.0]], [[2 * LN3, 0.0]], None, dict(temperature=2.0), 4 * KL_HAND),
    ("hard = CE to teacher argmax", [[0.0, 0.0]], [[5.0, 1.0]], None, dict(targets="hard"), math.log(2.0)),
    ("alpha mixes with labels", [[0.0, 0.0]], [[LN3, 0.0]], [1], dict(temperature=1.0, alpha=0.5),
     0.5 * KL_HAND + 0.5 * math.log(2.0)),
    ("alpha 0 = labels only", [[LN3, 0.0]], [[0.0, 9.0]], [0], dict(temperature=1.0, alpha=0.0),
     -math.log(0.75)),
    ("batch mean", [[0.0, 0.0], [1.0, 1.0]], [[LN3, 0.0], [1.0, 1.0]], None, dict(temperature=1.0), KL_HAND / 2),
]


@pytest.mark.parametrize("name,s,t,y,kw,expected", KD_CASES, ids=[c[0] for c in KD_CASES])
def test_kd_loss_hand_computed(name, s, t, y, kw, expected) -> None:
    labels = None if y is None else torch.tensor(y)
    got = L.kd_loss(torch.tensor(s), torch.tensor(t), labels, **kw)
    assert float(got) == pytest.approx(expected, abs=1e-5)


EMB_CASES = [
    ("cosine orthogonal", [[1.0, 0.0]], [[0.0, 1.0]], "cosine", 1.0),
    ("cosine equal", [[1.0, 0.0]], [[2.0, 0.0]], "cosine", 0.0),
    ("cosine opposite", [[1.0, 0.0]], [[-1.0, 0.0]], "cosine", 2.0),
    ("mse orthogonal units", [[1.0, 0.0]], [[0.0, 1.0]], "mse", 2.0),
    ("mse batch mean", [[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [3.0, 4.0]], "mse", 12.5),
]


@pytest.mark.parametrize("name,s,t,kind,expected", EMB_CASES, ids=[c[0] for c in EMB_CASES])
def test_embedding_loss_hand_computed(name, s, t, kind, expected) -> None:
    assert float(L.embedding_loss(torch.tensor(s), torch.tensor(t), kind)) == pytest.approx(expected, abs=1e-6)


def test_feature_loss_respects_token_mask() -> None:
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])  # the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert float(L.feature_loss(s, t, "mse", mask)) == pytest.approx(1.0)
    assert float(L.feature_loss(s, t, "mse")) == pytest.approx((1 + 1 + 81) / 3)


def test_attention_transfer_values() -> None:
    f = torch.randn(2, 4, 5, 5)
    assert float(L.attention_transfer(f, 3 * f)) == pytest.approx(0.0, abs=1e-6)  # maps are normalised
    a = torch.zeros(1, 1, 1, 2)
    a[..., 0] = 1.0
    b = torch.zeros(1, 1, 1, 2)
    b[..., 1] = 1.0
    assert float(L.attention_transfer(a, b)) == pytest.approx(2.0)  # ||e1 - e2||^2
    # different spatial sizes are pooled to the smaller one
    assert torch.isfinite(L.attention_transfer(torch.randn(2, 3, 8, 8), torch.randn(2, 6, 4, 4)))


def test_attention_kl_hand_computed() -> None:
    uniform = torch.full((1, 2, 2, 2), 0.5)
    assert float(L.attention_kl(uniform, uniform)) == pytest.approx(0.0, abs=1e-6)
    teacher = torch.tensor([0.75, 0.25]).expand(1, 1, 2, 2)
    student = torch.full((1, 1, 2, 2), 0.5)
    assert float(L.attention_kl(student, teacher)) == pytest.approx(KL_HAND, abs=1e-5)


def test_projection_only_when_widths_differ() -> None:
    assert L.make_projection(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4)) is None
    assert isinstance(L.make_projection(torch.zeros(2, 4, 4, 4), torch.zeros(2, 8, 4, 4)), torch.nn.Conv2d)
    assert isinstance(L.make_projection(torch.zeros(2, 5, 16), torch.zeros(2, 5, 32)), torch.nn.Linear)
    with pytest.raises(ModelError, match="ranks differ"):
        L.make_projection(torch.zeros(2, 16), torch.zeros(2, 4, 4, 4))


BAD_CONFIGS = [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(feature_weight=-1.0), "feature_weight"),
    (dict(finetune={"epochs": 3}), "finetune: expected a FinetuneConfig"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_config_names_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        DistillConfig(**kwargs)


def test_recipe_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"distill\.targets"):
        DistillConfig.from_fields({"targets": "medium"}, where="distill")
    cfg = DistillConfig.from_fields({"temperature": 2, "features": {"3": "3"}}, where="distill")
    assert cfg.temperature == 2.0 and cfg.features == {"3": "3"}


def test_failed_setup_leaves_no_hooks() -> None:
    from slimguard.distill.teachers import Taps

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ConfigError, match="'nope' does not exist"):
        Taps(model, ["0", "nope"], "student feature")
    assert not model[0]._forward_hooks
