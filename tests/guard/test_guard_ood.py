"""OOD detectors separate far-OOD images from digits; calibration, metrics and the built-in OOD sets."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import ConfigError, NotFittedError
from slimguard.guard.ood import (
    auroc,
    detector_names,
    evaluate_detectors,
    fpr_at_tpr,
    make_detector,
    threshold_at_tpr,
)

ALL = ["energy", "knn", "mahalanobis", "max-logit", "msp", "odin"]


@pytest.fixture(scope="module")
def mlp():
    from slimguard.models import zoo

    return zoo.load("digits-mlp", progress=False)


@pytest.fixture(scope="module")
def far():
    from slimguard import data

    return data.load("digits-ood")


@pytest.fixture(scope="module")
def results(mlp, digits, far):
    from slimguard import data

    near = data.load("digits-ood-near")
    return evaluate_detectors(mlp, digits.train, digits.val, digits.test, {"far": far.test, "near": near.test})


def test_every_detector_is_registered():
    assert detector_names() == ALL


@pytest.mark.parametrize("name", ALL)
def test_detectors_separate_far_ood_from_digits(results, name):
    r = results[name]["far"]
    # measured on digits-mlp (seed 0): 0.974 (msp) to 0.999 (mahalanobis); 0.95 leaves room for BLAS noise
    assert r["auroc"] >= 0.95, r
    assert r["fpr95"] <= 0.30, r
    assert r["ood_flagged"] >= 0.70, r


def test_best_detector_reaches_the_target_and_near_ood_is_harder(results):
    best_far = max(r["far"]["auroc"] for r in results.values())
    best_near = max(r["near"]["auroc"] for r in results.values())
    assert best_far >= 0.98
    assert 0.6 < best_near < best_far


def test_calibrated_threshold_accepts_the_target_share_of_validation(mlp, digits):
    det = make_detector("energy", mlp).fit(digits.train).calibrate(digits.val, tpr=0.9)
    accepted = (~det.predict(digits.val)).double().mean().item()
    assert accepted >= 0.9 and accepted <= 0.9 + 2 / len(digits.val)
    assert det.state()["tpr"] == 0.9


@pytest.mark.parametrize("name", ALL)
def test_detector_before_fit_is_a_clear_error(mlp, digits, name):
    det = make_detector(name, mlp)
    with pytest.raises(NotFittedError, match=r"not fitted; call \.fit"):
        det.score(digits.test.x[:4])
    det.fit(digits.train.subset(200))
    with pytest.raises(NotFittedError, match="no threshold"):
        det.predict(digits.test.x[:4])


def test_detectors_restore_mode_and_requires_grad(mlp, digits):
    mlp.train()
    try:
        make_detector("odin", mlp).fit(digits.train.subset(100)).score(digits.test.x[:8])
        assert mlp.training and all(p.requires_grad for p in mlp.parameters())
    finally:
        mlp.eval()


def _odin_by_hand(w: torch.Tensor, x: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
    """ODIN on logits ``x @ w.T``, derived by hand. With ``p = softmax(x w^T / T)`` and ``c = argmax p``, the
    gradient of ``-log p_c`` in ``x`` is ``-(w_c - p @ w) / T``; stepping against its sign,
    ``x~ = x + epsilon * sign(w_c - p @ w)``, raises ``p_c``. The score is ``-max softmax(x~ w^T / T)``."""
    p = torch.softmax(x @ w.T / temperature, -1)
    x_tilde = x + epsilon * (w[p.argmax(-1)] - p @ w).sign()
    return -torch.softmax(x_tilde @ w.T / temperature, -1).amax(-1)


@pytest.mark.parametrize(("temperature", "epsilon"), [(1.0, 0.0), (1.0, 0.1), (4.0, 0.1), (1000.0, 0.002)])
def test_odin_matches_its_definition_on_a_linear_model(temperature, epsilon):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3, 4, generator=g), torch.randn(16, 4, generator=g)
    model = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    got = make_detector("odin", model, temperature=temperature, epsilon=epsilon).fit(x).score(x)
    torch.testing.assert_close(got, _odin_by_hand(w, x, temperature, epsilon), atol=1e-6, rtol=1e-5)
    if epsilon > 0:  # the perturbation raises every max softmax: scores fall (by 0.004 to 0.11 at T = 1)
        plain = make_detector("odin", model, temperature=temperature, epsilon=0.0).fit(x).score(x)
        assert bool((got < plain).all()), (got, plain)


def test_odin_perturbation_and_temperature_each_separate_far_ood_better(mlp, digits, far):
    """The paper's two ingredients, measured on digits-mlp (far-OOD AUROC): epsilon 0.05 at T = 1 gives
    0.992 against 0.974 without the step; T = 1000 without the step gives 0.996."""
    def far_auroc(temperature: float, epsilon: float) -> float:
        det = make_detector("odin", mlp, temperature=temperature, epsilon=epsilon).fit(digits.train)
        return auroc(det.score(digits.test), det.score(far.test))

    plain = far_auroc(1.0, 0.0)
    assert far_auroc(1.0, 0.05) >= plain + 0.01  # in-distribution inputs gain more from the step than OOD ones
    assert far_auroc(1000.0, 0.0) >= plain + 0.01


def test_mahalanobis_on_a_named_layer_and_output_scores_reuse_logits(mlp, digits, far):
    det = make_detector("mahalanobis", mlp, layer="3").fit(digits.train)  # output of the first ReLU
    assert det.means.shape == (10, 300) and det.precision.shape == (300, 300)
    assert auroc(det.score(digits.test), det.score(far.test)) > 0.95
    energy = make_detector("energy", mlp).fit(digits.train)
    with torch.no_grad():
        logits = mlp(digits.test.x[:16])
    torch.testing.assert_close(energy.score_logits(logits), energy.score(digits.test.x[:16]))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [("knn", {"k": 0}, "k: 0 is out of range"), ("odin", {"temperature": -1.0}, "temperature"),
     ("mahalanobis", {"layer": "nope"}, "layer: 'nope' is not a module"),
     ("lof", {}, "unknown OOD detector 'lof'"),
     ("knn", {"kk": 3}, "knn: unknown key 'kk'; allowed: batch_size, k, layer, max_bank")],
)
def test_bad_detector_options(mlp, name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_detector(name, mlp, **options)


def test_auroc_and_fpr_match_definitions():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), torch.randn(200, generator=g) + 1.0
    a[:20] = 0.5
    b[:20] = 0.5  # ties
    want = roc_auc_score([0] * 300 + [1] * 200, torch.cat([a, b]).numpy())
    assert auroc(a, b) == pytest.approx(want, abs=1e-12)
    assert auroc(torch.zeros(5), torch.ones(5)) == 1.0
    assert auroc(torch.ones(5), torch.zeros(5)) == 0.0
    ids = torch.arange(100.0)
    assert threshold_at_tpr(ids, 0.95) == 94.0  # 95 of 100 scores are <= 94
    assert fpr_at_tpr(ids, torch.tensor([10.0, 94.0, 95.0, 200.0]), 0.95) == 0.5


def test_builtin_ood_sets_are_shaped_like_their_digits_and_deterministic():
    from slimguard import data

    far = data.load("digits-ood")
    near = data.load("digits-ood-near")
    assert far.test.x.shape == (400, 1, 8, 8) and far.test.y is None
    assert near.test.x.shape == data.load("digits").test.x.shape
    for b in (far, near):
        assert float(b.test.x.min()) >= 0.0 and float(b.test.x.max()) <= 1.0
        assert b.meta.input_shape == (1, 8, 8)
    assert torch.equal(data.load("digits-ood").test.x, far.test.x)
    assert not torch.equal(far.train.x, far.test.x)
    assert data.load("digits32-ood").val.x.shape == (400, 1, 32, 32)
