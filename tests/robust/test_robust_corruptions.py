"""Corruptions: five severities, seeded, inside the valid range, stronger with severity."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimguard.core.errors import ConfigError, DataError
from slimguard.robust import SEVERITIES, corrupt, names_for

IMAGE = ["blur", "brightness", "contrast", "gaussian_noise", "occlusion", "salt_pepper"]
TABULAR = ["feature_noise", "missing_values"]


@pytest.fixture(scope="module")
def cancer():
    from slimguard import data

    return data.load("breast-cancer")


def test_each_kind_has_its_corruptions():
    assert names_for("image") == IMAGE
    assert names_for("tabular") == TABULAR
    assert names_for("text") == ["typos"]


def _change(x: torch.Tensor, xc: torch.Tensor) -> float:
    return float((xc - x).abs().mean())


@pytest.mark.parametrize("name", IMAGE)
def test_image_corruptions(digits32, name):
    x = digits32.test.x[:64]
    low, high = digits32.meta.bounds()
    changes = []
    for s in SEVERITIES:
        xc = corrupt(x, name, s, digits32.meta, seed=0)
        assert xc.shape == x.shape and xc.dtype == x.dtype
        assert float(xc.min()) >= float(low) and float(xc.max()) <= float(high)
        assert torch.equal(xc, corrupt(x, name, s, digits32.meta, seed=0))  # seeded
        changes.append(_change(x, xc))
    assert changes[0] > 0  # the corruption changes something even at severity 1
    # stronger with severity (the mean absolute change grows from level 1 to level 5)
    assert changes[-1] > changes[0]
    assert torch.equal(x, digits32.test.x[:64])  # the input is not modified in place


@pytest.mark.parametrize("name", TABULAR)
def test_tabular_corruptions(cancer, name):
    x = cancer.test.x
    low, high = cancer.meta.bounds()
    changes = []
    for s in SEVERITIES:
        xc = corrupt(x, name, s, cancer.meta, seed=3)
        assert xc.shape == x.shape
        assert bool((xc >= low - 1e-4).all()) and bool((xc <= high + 1e-4).all())
        changes.append(_change(x, xc))
    assert all(a < b for a, b in itertools.pairwise(changes))  # strictly stronger


def test_missing_values_are_imputed_with_the_training_mean(cancer):
    x = cancer.test.x
    xc = corrupt(x, "missing_values", 5, cancer.meta, seed=0)
    mean = torch.tensor(cancer.meta.mean)
    changed = xc != x
    frac = float(changed.float().mean())
    assert 0.35 < frac < 0.55  # severity 5 removes about half the values
    assert torch.allclose(xc[changed], mean.expand_as(x)[changed])


def test_typos_change_words_at_the_severity_rate():
    from slimguard import data

    meta = data.load("docs-text").meta
    texts = ["the quick brown fox jumps over the lazy dog again and again"] * 40
    words = sum(len(t.split()) for t in texts)
    rates = []
    for s in SEVERITIES:
        out = corrupt(texts, "typos", s, meta, seed=0)
        assert out == corrupt(texts, "typos", s, meta, seed=0) and len(out) == len(texts)
        changed = sum(a != b for t, o in zip(texts, out, strict=True)
                      for a, b in zip(t.split(), o.split(), strict=False))
        rates.append(changed / words)
    assert rates[0] < 0.12 and 0.35 < rates[-1] < 0.65  # levels 0.05 ... 0.5 of the words
    assert rates == sorted(rates)


BAD = [
    pytest.param("gaussian_noise", 0, ConfigError, "severity", id="severity-0"),
    pytest.param("gaussian_noise", 6, ConfigError, "severity", id="severity-6"),
    pytest.param("fog", 1, ConfigError, "unknown corruption", id="unknown"),
    pytest.param("feature_noise", 1, DataError, "for tabular data", id="wrong-kind"),
]


@pytest.mark.parametrize("name,severity,err,word", BAD)
def test_bad_corruption_requests(digits, name, severity, err, word):
    with pytest.raises(err, match=word) as info:
        corrupt(digits.test.x[:4], name, severity, digits.meta)
    assert "\n" not in str(info.value)
