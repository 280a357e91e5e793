"""Attacks: sanity laws that a broken attack fails, targeted mode, bounds, model hygiene, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.robust import APGD, CW, FGSM, PGD, accuracy_on, fake_quant_twin, is_quantized, random_targets
from slimguard.robust.attacks import apgd_checkpoints
from slimguard.robust.base import perturbation_norm
from slimguard.runtime.measure import threads

N = 240  # test examples attacked (seeded subset of the digits test split)
TOL = 1e-5  # float rounding of x + delta when clipping


@pytest.fixture(autouse=True)
def _one_thread():
    with threads(1):  # much faster than 2 on a shared 2-core machine
        yield


@pytest.fixture(scope="module")
def mlp_xy():
    from slimguard import data
    from slimguard.models import zoo

    d = data.load("digits")
    x, y = d.test.subset(N, seed=0).tensors
    return zoo.load("digits-mlp", progress=False), d, x, y


# (id, factory of eps, eps used for the ball check: L2 balls need a larger radius to change anything)
CASES = [
    ("fgsm-linf", lambda e: FGSM(eps=e), 0.1),
    ("fgm-l2", lambda e: FGSM(eps=e, norm="l2"), 0.8),
    ("pgd-linf", lambda e: PGD(eps=e, steps=10), 0.1),
    ("pgd-l2", lambda e: PGD(eps=e, steps=10, norm="l2"), 0.8),
    ("pgd-dlr-restarts", lambda e: PGD(eps=e, steps=5, restarts=2, loss="dlr"), 0.1),
    ("apgd-ce", lambda e: APGD(eps=e, steps=10), 0.1),
    ("apgd-dlr", lambda e: APGD(eps=e, steps=10, loss="dlr"), 0.1),
    ("apgd-l2", lambda e: APGD(eps=e, steps=10, norm="l2"), 0.8),
]
ATTACKS = [pytest.param(make, id=name) for name, make, _ in CASES]
BALLS = [pytest.param(make, eps, id=name) for name, make, eps in CASES]


@pytest.mark.parametrize("make", ATTACKS)
def test_eps_zero_gives_clean_accuracy(mlp_xy, make):
    model, d, x, y = mlp_xy
    x_adv = make(0.0)(model, x, y, bounds=d.meta.bounds())
    assert torch.equal(x_adv, x)  # exact: no perturbation at all
    assert accuracy_on(model, x_adv, y) == accuracy_on(model, x, y)


@pytest.mark.parametrize("make,eps", BALLS)
def test_examples_stay_in_the_ball_and_the_valid_range(mlp_xy, make, eps):
    model, d, x, y = mlp_xy
    attack = make(eps)
    x_adv = attack(model, x, y, bounds=d.meta.bounds())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(perturbation_norm(x_adv, x, attack.config.norm).max()) <= eps + TOL
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert accuracy_on(model, x_adv, y) < accuracy_on(model, x, y)  # the attack changed something


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
def test_pgd_at_most_fgsm_at_most_clean(mlp_xy, eps):
    model, d, x, y = mlp_xy
    b = d.meta.bounds()
    clean = accuracy_on(model, x, y)
    fgsm = accuracy_on(model, FGSM(eps=eps)(model, x, y, bounds=b), y)
    pgd = accuracy_on(model, PGD(eps=eps, steps=10)(model, x, y, bounds=b), y)
    apgd = accuracy_on(model, APGD(eps=eps, steps=10)(model, x, y, bounds=b), y)
    assert pgd <= fgsm <= clean
    assert apgd <= fgsm + 1 / N  # APGD is at least as strong as a single step (one example of slack)


def test_more_pgd_steps_never_help_the_model_much(mlp_xy):
    model, d, x, y = mlp_xy
    b = d.meta.bounds()
    accs = [accuracy_on(model, PGD(eps=0.1, steps=s)(model, x, y, bounds=b), y) for s in (1, 5, 20)]
    # 2 points of slack: a fixed step size can overshoot on a few examples
    assert accs[1] <= accs[0] + 0.02 and accs[2] <= accs[1] + 0.02
    assert accs[2] < accs[0]  # and more steps do find more examples


def test_restarts_keep_the_worst_case(mlp_xy):
    model, d, x, y = mlp_xy
    one = accuracy_on(model, PGD(eps=0.1, steps=5, restarts=1)(model, x, y, bounds=d.meta.bounds()), y)
    three = accuracy_on(model, PGD(eps=0.1, steps=5, restarts=3)(model, x, y, bounds=d.meta.bounds()), y)
    assert three <= one  # exact: the first restart is the same run, others only replace it on success


def test_targeted_attacks_hit_their_targets(mlp_xy):
    model, d, x, y = mlp_xy
    target = random_targets(y, 10, seed=1)
    assert bool((target != y).all())
    x_adv = PGD(eps=0.3, steps=20)(model, x, y, target=target, bounds=d.meta.bounds())
    with torch.no_grad():
        hit = float((model(x_adv).argmax(1) == target).float().mean())
        before = float((model(x).argmax(1) == target).float().mean())
    assert before < 0.05 and hit > 0.8


def test_cw_finds_small_l2_perturbations(mlp_xy):
    model, d, x, y = mlp_xy
    xs, ys = x[:40], y[:40]
    x_adv = CW(steps=30, binary_search_steps=3, lr=0.1)(model, xs, ys, bounds=d.meta.bounds())
    assert accuracy_on(model, x_adv, ys) <= 0.1
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    dist = perturbation_norm(x_adv, xs, "l2")
    # a budgeted CW returns the clean input where the found perturbation is larger than eps
    budget = float(dist.median())
    capped = CW(eps=budget, steps=30, binary_search_steps=3, lr=0.1)(model, xs, ys, bounds=d.meta.bounds())
    assert float(perturbation_norm(capped, xs, "l2").max()) <= budget + TOL
    assert accuracy_on(model, capped, ys) > accuracy_on(model, x_adv, ys)


def test_model_mode_and_requires_grad_are_restored(mlp_xy):
    model, d, x, y = mlp_xy
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    model[2].weight.requires_grad_(False)
    flags[0] = False
    PGD(eps=0.1, steps=2)(model, x[:16], y[:16], bounds=d.meta.bounds())
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # attacks never leave gradients on weights
    model.eval()
    model[2].weight.requires_grad_(True)


def test_bounds_come_from_the_models_data_and_relative_eps(mlp_xy):
    model, d, x, y = mlp_xy
    a = PGD(eps=0.1, steps=3)(model, x, y)  # bounds taken from the model's recorded data
    b = PGD(eps=0.1, steps=3)(model, x, y, bounds=d.meta.bounds())
    c = PGD(eps=0.1, steps=3, relative=True)(model, x, y, bounds=d.meta)  # range width 1: the same ball
    assert torch.equal(a, b)
    assert torch.allclose(b, c, atol=1e-5)


def test_relative_eps_on_tabular_features_of_different_scales():
    from slimguard import data
    from slimguard.models import zoo

    d = data.load("breast-cancer")
    model = zoo.create("tabular-mlp")
    x, y = d.test.tensors
    low, high = d.meta.bounds()
    x_adv = PGD(eps=0.05, steps=3, relative=True)(model, x, y, bounds=(low, high))
    width = (high - low).clamp_min(1e-12)
    assert float(((x_adv - x).abs() / width).max()) <= 0.05 + 1e-4
    assert float((x_adv - low).min()) >= -1e-3 and float((high - x_adv).min()) >= -1e-3


BAD = [
    pytest.param(lambda: PGD(eps=-0.1), ConfigError, "eps", id="negative-eps"),
    pytest.param(lambda: FGSM(eps=float("nan")), ConfigError, "eps", id="nan-eps"),
    pytest.param(lambda: PGD(eps=0.1, steps=0), ConfigError, "steps", id="zero-steps"),
    pytest.param(lambda: PGD(eps=0.1, norm="l1"), ConfigError, "norm", id="bad-norm"),
    pytest.param(lambda: APGD(eps=0.1, loss="hinge"), ConfigError, "loss", id="bad-loss"),
    pytest.param(lambda: CW(norm="linf"), ConfigError, "norm", id="cw-linf"),
]


@pytest.mark.parametrize("make,err,word", BAD)
def test_bad_attack_settings_are_one_line_errors(make, err, word):
    with pytest.raises(err, match=word) as info:
        make()
    assert "\n" not in str(info.value)


BAD_CALLS = [
    pytest.param(lambda x, y: (PGD(eps=1.5), x, y, None), ConfigError, "beyond the input range",
                 id="eps-beyond-range"),
    pytest.param(lambda x, y: (PGD(eps=9.0, norm="l2"), x, y, None), ConfigError, "beyond",
                 id="l2-eps-beyond-range"),
    pytest.param(lambda x, y: (PGD(eps=0.1), x, y + 10, None), DataError, "labels", id="labels-out-of-range"),
    pytest.param(lambda x, y: (PGD(eps=0.1), x, y - 1 - y, None), DataError, "labels", id="negative-labels"),
    pytest.param(lambda x, y: (PGD(eps=0.1), x, y, y + 10), DataError, "targets", id="targets-out-of-range"),
    pytest.param(lambda x, y: (PGD(eps=0.1), x * 3, y, None), DataError, "outside the valid range",
                 id="unnormalised"),
    pytest.param(lambda x, y: (PGD(eps=0.1), x, y[:3], None), DataError, "labels", id="length-mismatch"),
]


@pytest.mark.parametrize("make,err,word", BAD_CALLS)
def test_bad_attack_inputs_are_one_line_errors(mlp_xy, make, err, word):
    model, d, x, y = mlp_xy
    attack, xx, yy, target = make(x[:8], y[:8])
    with pytest.raises(err, match=word) as info:
        attack(model, xx, yy, target=target, bounds=d.meta.bounds())
    assert "\n" not in str(info.value)


def test_unknown_bounds_ask_for_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(DataError, match="bounds="):
        PGD(eps=0.1)(model, torch.rand(2, 4), torch.tensor([0, 1]))


def test_int8_model_without_gradient_points_to_the_fake_quant_twin(mlp_xy):
    import copy

    from slimguard.quantize.dynamic import Int8DynamicConfig
    from slimguard.transforms import quantize_

    model, d, x, y = mlp_xy
    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicConfig())
    assert is_quantized(q) and not is_quantized(model)
    with pytest.raises(ModelError, match="fake_quant_twin") as info:
        PGD(eps=0.1, steps=2)(q, x[:8], y[:8], bounds=d.meta.bounds())
    assert "\n" not in str(info.value)
    twin = fake_quant_twin(q)
    assert not is_quantized(twin) and is_quantized(q)  # the original is untouched
    with torch.no_grad():  # the twin computes what the int8 model computes, up to activation rounding
        agree = float((twin(x).argmax(1) == q(x).argmax(1)).float().mean())
    assert agree >= 0.99
    x_adv = PGD(eps=0.1, steps=5)(twin, x, y, bounds=d.meta.bounds())
    transferred = accuracy_on(q, x_adv, y)
    assert transferred < accuracy_on(q, x, y) - 0.2  # the transferred examples hurt the int8 model


def test_apgd_checkpoints_follow_the_paper():
    ck = apgd_checkpoints(100)
    assert ck[:3] == [22, 41, 57]  # p = 0.22, 0.41, 0.57, ...
    assert ck == sorted(ck) and ck[-1] < 100


class _ToyInt8(nn.Module):
    """A stand-in quantized layer: rounds its output without a gradient, and knows its float twin."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.lin(x.flatten(1)).round()

    def fake_quant_twin(self) -> nn.Module:
        import copy

        return nn.Sequential(nn.Flatten(), copy.deepcopy(self.lin))


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.detach().flatten(1))


def test_fake_quant_twin_swaps_every_module_that_has_one(digits):
    inner = nn.Sequential(nn.Identity(), _ToyInt8())
    model = nn.Sequential(inner)
    twin = fake_quant_twin(model)
    assert isinstance(twin[0][1], nn.Sequential) and isinstance(model[0][1], _ToyInt8)  # original untouched
    assert is_quantized(model) and not is_quantized(twin)
    assert isinstance(fake_quant_twin(_ToyInt8()), nn.Sequential)  # a quantized root is swapped whole
    x, y = digits.test.x[:32], digits.test.y[:32]
    x_adv = PGD(eps=0.1, steps=3)(twin, x, y, bounds=digits.meta.bounds())
    assert float((x_adv - x).abs().max()) > 0
    with pytest.raises(ModelError, match="fake-quant twin"):
        PGD(eps=0.1)(model, x, y, bounds=digits.meta.bounds())


def test_a_model_that_cuts_the_gradient_is_a_clear_error(digits):
    with pytest.raises(ModelError, match="no gradient path") as info:
        FGSM(eps=0.1)(_Detached(), digits.test.x[:8], digits.test.y[:8], bounds=digits.meta.bounds())
    assert "\n" not in str(info.value)
