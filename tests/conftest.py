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
