"""Zoo models train on built-in data to real accuracy, are cached, and sources load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimguard import data as sgdata
from slimguard.core.errors import ModelError
from slimguard.evaluate import evaluate
from slimguard.models import zoo
from slimguard.models.sources import load_model
from slimguard.models.spec import info


@pytest.mark.parametrize(
    ("name", "min_acc"),
    # trained accuracy on the held-out test split; well above chance (0.1 / 0.5)
    [("digits-mlp", 0.95), ("digits-lenet5", 0.96), ("digits32-resnet", 0.95), ("tabular-mlp", 0.93)],
)
def test_zoo_models_are_trained(zoo_model, name, min_acc):
    model = zoo_model(name)
    bundle = sgdata.load(zoo.ZOO.get(name).data)
    acc = evaluate(model, bundle.test, measure_latency=False, measure_size=False)["accuracy"]
    assert acc >= min_acc
    assert info(model).source["name"] == name


def test_cache_is_reused(zoo_model):
    a = zoo_model("digits-mlp")
    b = zoo.load("digits-mlp", progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.fixture
def tiny_tab(tmp_path, monkeypatch):
    """A two-epoch zoo model cached under ``tmp_path``, registered for one test."""
    monkeypatch.setenv("SLIMGUARD_CACHE", str(tmp_path))
    zoo.register_zoo(zoo.ZooEntry("tiny-tab", "wine", zoo.tabular_mlp, "test", epochs=2))
    yield tmp_path
    zoo.ZOO.unregister("tiny-tab")


@pytest.mark.parametrize("damage", ["flip-weights", "flip-record", "drop-record", "truncate-weights"])
def test_damaged_cache_entry_is_rebuilt(tiny_tab, monkeypatch, damage):
    first = zoo.load("tiny-tab", progress=False)
    (weights,) = tiny_tab.glob("tiny-tab-*.safetensors")
    record = weights.with_suffix(".json")
    assert json.loads(record.read_text())["bytes"] == weights.stat().st_size
    target = record if damage.endswith("record") else weights
    blob = bytearray(target.read_bytes())
    if damage.startswith("flip"):
        blob[len(blob) // 2] ^= 0xFF
        target.write_bytes(bytes(blob))
    elif damage == "truncate-weights":
        target.write_bytes(bytes(blob[: len(blob) // 2]))
    else:
        target.unlink()
    trained = []
    monkeypatch.setattr(zoo, "train_zoo", lambda *a, **k: trained.append(a) or zoo.create("tiny-tab"))
    again = zoo.load("tiny-tab", progress=False)  # refused from the cache, built again
    assert trained == [("tiny-tab",)]
    assert not torch.equal(first[1].weight, again[1].weight)  # the untrained stand-in, not the damaged file
    assert zoo.load("tiny-tab", progress=False) is not again and trained == [("tiny-tab",)]  # cached again


def test_cached_entry_is_weights_and_record_only(tiny_tab):
    model = zoo.load("tiny-tab", progress=False)
    assert sorted(p.suffix for p in tiny_tab.iterdir()) == [".json", ".safetensors"]
    cached = zoo.load("tiny-tab", progress=False)
    assert info(cached).source == info(model).source  # the info comes from the factory, not the file
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), cached.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_zoo_name():
    with pytest.raises(ModelError, match="unknown zoo model 'nope'; allowed: digits-lenet5"):
        load_model("zoo:nope")


def test_unknown_source_kind():
    with pytest.raises(ModelError, match="unknown model source"):
        load_model("s3:bucket")


def test_python_source_with_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    ref = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    m = load_model(f"python:{tmp_path / 'net.py'}:make", weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(m[1].weight, ref[1].weight)
    with pytest.raises(ModelError, match="has no callable 'nope'"):
        load_model(f"python:{tmp_path / 'net.py'}:nope")
    with pytest.raises(ModelError, match="python model file not found"):
        load_model(f"python:{tmp_path / 'missing.py'}:make")


def test_minilm_embeds_offline():
    pytest.importorskip("transformers")
    m = load_model("minilm")
    emb = m.encode(["A cat sits on the mat.", "A dog lies on the rug.", "Quarterly tax filing rules."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # semantically closer sentences score higher


def test_fresh_and_cached_loads_agree(tiny_tab):
    fresh = zoo.load("tiny-tab", progress=False)
    cached = zoo.load("tiny-tab", progress=False)
    assert fresh.training is False and cached.training is False  # same mode whichever path ran
    assert torch.equal(fresh[1].weight, cached[1].weight)
