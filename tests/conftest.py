"""Shared fixtures. Zoo models train once into ``.cache/zoo`` (reused across runs) and are handed to
tests as deep copies, so no test sees another's changes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SLIMGUARD_QUIET", "1")

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _zoo_cache() -> dict:
    return {}


@pytest.fixture
def zoo_model(_zoo_cache):
    """``zoo_model("digits-mlp")`` -> a fresh deep copy of the trained zoo model."""
    from slimguard.models import zoo

    def get(name: str):
        if name not in _zoo_cache:
            _zoo_cache[name] = zoo.load(name, progress=False)
        return copy.deepcopy(_zoo_cache[name])

    return get


@pytest.fixture(scope="session")
def digits():
    from slimguard import data

    return data.load("digits")


@pytest.fixture(scope="session")
def digits32():
    from slimguard import data

    return data.load("digits32")


@pytest.fixture(scope="session")
def _tiny_lm():
    """A tiny docs-lm (vocabulary 512, hidden 64, 2 layers) trained once on the built-in corpus through the
    same functions as ``zoo:docs-lm``, with train and test token streams."""
    from slimguard.data.corpus import load_corpus
    from slimguard.lm.docs_lm import create_docs_lm, encode_documents, tiny_spec, train_lm

    spec = tiny_spec()
    model = create_docs_lm(spec, seed=0)
    train = encode_documents(model.tokenizer, load_corpus("train")[:300])
    test = encode_documents(model.tokenizer, load_corpus("test")[:40])
    train_lm(model, train, spec, seed=0, progress=False)
    return model, train, test


@pytest.fixture
def tiny_lm(_tiny_lm):
    """``(model, train_stream, test_stream)``: a fresh copy of the trained tiny LM and 1-D token streams."""
    model, train, test = _tiny_lm
    return copy.deepcopy(model), train, test


@pytest.fixture
def token_batches(_tiny_lm):
    """Calibration token ids ``(8, 64)``: consecutive windows of the train stream."""
    train = _tiny_lm[1]
    return torch.stack([train[i * 64 : (i + 1) * 64] for i in range(8)])
