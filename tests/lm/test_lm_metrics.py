"""Sliding-window perplexity: each token scored once, exact on known models, errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ConfigError, DataError
from slimguard.lm.metrics import perplexity, windows


class Uniform(nn.Module):
    """Equal logits over ``vocab`` tokens: perplexity is exactly ``vocab``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """Logits depend on the previous token only, so any window gives the same per-token loss."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 2), (10, 4, 4), (9, 4, 3), (2, 4, 2), (100, 16, 1),
                                                    (33, 8, 5)])
def test_windows_score_every_token_after_the_first_exactly_once(n, window, stride):
    scored = []
    for begin, end, k in windows(n, window, stride):
        assert end - begin <= window and 0 < k <= end - begin - 1
        scored += list(range(end - k, end))
    assert scored == list(range(1, n))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    out = perplexity(Uniform(37), torch.randint(0, 37, (101,)), window=16, stride=8, batch_size=3)
    assert out["perplexity"] == pytest.approx(37.0, rel=1e-5)
    assert out["tokens"] == 100


def test_matches_the_direct_computation_whatever_the_window():
    torch.manual_seed(0)
    model, ids = Bigram(11), torch.randint(0, 11, (57,))
    direct = math.exp(float(F.cross_entropy(model.table[ids[:-1]], ids[1:])))
    for window, stride, bs in [(57, 57, 1), (8, 8, 2), (8, 3, 4), (5, 1, 16)]:
        got = perplexity(model, ids, window=window, stride=stride, batch_size=bs)["perplexity"]
        assert got == pytest.approx(direct, rel=1e-5), (window, stride)


def test_training_lowers_perplexity(tiny_lm):
    from slimguard.lm.docs_lm import create_docs_lm, tiny_spec

    model, _, test = tiny_lm
    trained = perplexity(model, test[:1024], window=64, stride=32)["perplexity"]
    untrained = perplexity(create_docs_lm(tiny_spec(), seed=1), test[:1024], window=64, stride=32)["perplexity"]
    assert trained < 0.5 * untrained  # untrained: about the vocabulary size (512)


@pytest.mark.parametrize(("kwargs", "ids", "error"), [
    ({"window": 1}, torch.arange(10), ConfigError),
    ({"window": 8, "stride": 9}, torch.arange(10), ConfigError),
    ({"batch_size": 0}, torch.arange(10), ConfigError),
    ({}, torch.arange(10).reshape(2, 5), DataError),
    ({}, torch.rand(10), DataError),
    ({}, torch.tensor([3]), DataError),
    ({}, torch.tensor([1, 99]), DataError),
    ({}, torch.tensor([1, -1]), DataError),
])
def test_bad_arguments_are_user_errors(kwargs, ids, error):
    with pytest.raises(error):
        perplexity(Uniform(10), ids, **kwargs)


def test_window_beyond_the_model_positions_is_refused(tiny_lm):
    model, _, test = tiny_lm
    with pytest.raises(ConfigError, match="positions"):
        perplexity(model, test[:300], window=model.max_positions + 1)
