"""Zoo models train on built-in data to real accuracy, are cached, and sources load."""

from __future__ import annotations

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
    bundle = sgdata.load(zoo.ZOO[name].data)
    acc = evaluate(model, bundle.test, measure_latency=False, measure_size=False)["accuracy"]
    assert acc >= min_acc
    assert info(model).source["name"] == name


def test_cache_is_reused(zoo_model):
    a = zoo_model("digits-mlp")
    b = zoo.load("digits-mlp", progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGUARD_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "tiny-tab", zoo.ZooEntry("tiny-tab", "wine", zoo.tabular_mlp, "test", epochs=2))
    first = zoo.load("tiny-tab", progress=False)
    (path,) = tmp_path.glob("tiny-tab-*.slim")
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    again = zoo.load("tiny-tab", progress=False)  # refused from cache, retrained deterministically
    assert torch.equal(first[1].weight, again[1].weight)


def test_unknown_zoo_name():
    with pytest.raises(ModelError, match="unknown zoo model 'nope'; available: digits-lenet5"):
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


def test_fresh_and_cached_loads_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGUARD_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "tiny-tab", zoo.ZooEntry("tiny-tab", "wine", zoo.tabular_mlp, "test", epochs=2))
    fresh = zoo.load("tiny-tab", progress=False)
    cached = zoo.load("tiny-tab", progress=False)
    assert fresh.training is False and cached.training is False  # same mode whichever path ran
    assert torch.equal(fresh[1].weight, cached[1].weight)
