"""Weight sharing (k-means, centroid fine-tuning), HashedNets layers, and coded artifacts end to end."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.core.errors import ArtifactError, ConfigError
from slimguard.share.cluster import kmeans_1d
from slimguard.share.hashing import HashedLinear, hash_indices


def _distinct_nonzero(t: torch.Tensor) -> int:
    return int(torch.unique(t[t != 0]).numel())


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"bits": 0}, "bits"),
    ({"bits": 9}, "bits"),
    ({"bits_by_type": {"conv": 12}}, "bits_by_type.conv"),
    ({"bits_by_type": {"rnn": 4}}, "bits_by_type"),
    ({"overrides": {"2": -1}}, "overrides.2"),
    ({"bias_bits": 9}, "bias_bits"),
])
def test_bits_outside_1_to_8_are_refused(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        sg.WeightSharingConfig(**kwargs)


def test_recipe_field_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"weight-sharing\.bits"):
        sg.WeightSharingConfig.from_fields({"bits": "five"}, where="weight-sharing")
    with pytest.raises(ConfigError, match="gap_bits"):
        sg.HuffmanCodingConfig(gap_bits=12)


def test_kmeans_linear_init_and_few_distinct_values():
    v = torch.tensor([0.1, 0.1, 0.2, -0.3])
    c, idx = kmeans_1d(v, 8)  # 3 distinct values, 8 clusters: exact
    assert torch.equal(c[idx], v) and c.numel() == 3
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5000, generator=g)
    c, idx = kmeans_1d(v, 16)
    assert c.numel() <= 16 and bool((c[1:] > c[:-1]).all())
    assert float(c.min()) < -2.0 and float(c.max()) > 2.0  # linear init keeps the rare large weights
    mse = float(((c[idx] - v) ** 2).mean())
    assert mse < 0.015  # 16 levels over N(0,1): near the Lloyd-Max optimum (0.0095), far below the variance 1


@pytest.mark.parametrize(("config", "bits"), [
    (sg.WeightSharingConfig(bits=3), {"2.weight": 3, "4.weight": 3, "6.weight": 3}),
    (sg.WeightSharingConfig(bits=5, bits_by_type={"linear": 4}, overrides={"6": 2}),
     {"2.weight": 4, "4.weight": 4, "6.weight": 2}),
    (sg.WeightSharingConfig(bits=4, bias_bits=2), {"2.weight": 4, "2.bias": 2, "6.bias": 2}),
])
def test_clustering_shares_weights_and_keeps_zeros(zoo_model, config, bits):
    model = zoo_model("digits-mlp")
    sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8))
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters()}
    result = sg.cluster_(model, config)
    params = dict(model.named_parameters())
    for name, b in bits.items():
        assert _distinct_nonzero(params[name]) <= 2 ** b
        assert result["layers"][name]["bits"] == b
    for name, p in params.items():
        if name.endswith("weight"):
            assert torch.equal(p == 0, zeros[name]), f"{name}: zeros changed"


def test_layer_with_fewer_distinct_weights_than_clusters(zoo_model):
    model = zoo_model("digits-mlp")
    with torch.no_grad():
        model[6].weight.copy_(torch.tensor([0.0, 0.5, -0.5]).repeat(334)[:1000].reshape(10, 100))
    before = model[6].weight.clone()
    result = sg.cluster_(model, sg.WeightSharingConfig(bits=8))
    assert torch.equal(model[6].weight, before)  # nothing to lose: kept exactly
    assert result["layers"]["6.weight"]["clusters"] == 2


def test_centroid_finetuning_keeps_sharing_and_zeros(zoo_model, digits):
    model = zoo_model("digits-mlp")
    sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.8))
    sg.cluster_(model, sg.WeightSharingConfig(bits=4, bias_bits=4))
    w_before = model[2].weight.detach().clone()
    zeros = model[4].weight == 0
    sg.finetune(model, digits, sg.FinetuneConfig(epochs=2, lr=1e-3, patience=0, restore_best=False),
                progress=False)
    assert not torch.equal(model[2].weight, w_before)  # the centroids moved
    for layer in (model[2], model[4], model[6]):
        assert _distinct_nonzero(layer.weight) <= 16
        assert _distinct_nonzero(layer.bias) <= 16
    assert torch.equal(model[4].weight == 0, zeros)
    # weights of one cluster moved together: the cluster structure is unchanged
    idx = model[2].weight_cluster.long()
    for k in range(int(idx.max()) + 1):
        assert torch.unique(model[2].weight[idx == k]).numel() == 1


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    from slimguard.models import zoo

    data = sg.data.load("digits")
    model = zoo.load("digits-mlp", progress=False)
    fp32 = sg.save(model, tmp_path_factory.mktemp("fp32") / "fp32.slim")
    sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.9))
    sg.cluster_(model, sg.WeightSharingConfig(bits=5, bias_bits=6))
    sg.finetune(model, data, sg.FinetuneConfig(epochs=1, lr=3e-4, patience=0), progress=False)
    sg.cluster_(model, sg.HuffmanCodingConfig())
    path = sg.save(model, tmp_path_factory.mktemp("coded") / "m.slim")
    return model, path, data, fp32


def test_coded_artifact_loads_and_predicts_exactly(coded, tmp_path):
    model, path, data, fp32 = coded
    manifest = sg.read_manifest(path)
    assert {manifest["tensors"][k]["codec"] for k in ("2.weight", "4.weight", "6.weight", "2.bias")} == {"huffman"}
    loaded = sg.load(path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(data.test.x), model(data.test.x))
    assert path.stat().st_size * 20 < fp32.stat().st_size  # 90% pruned + 5 bits + Huffman: far smaller
    # loaded tensors are shared again: saving once more codes them the same way
    again = sg.save(loaded, tmp_path / "again.slim")
    assert sg.read_manifest(again)["tensors"]["2.weight"]["codec"] == "huffman"


def test_coded_artifact_exports_to_onnx(coded):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    _, path, data, _ = coded
    loaded = sg.load(path)
    x = data.test.x[:16]
    buf = io.BytesIO()
    torch.onnx.export(loaded, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), loaded(x), atol=1e-5, rtol=1e-5)


def _rewrite(path, out, tensor_key, mutate):
    """Damage one coded block but keep every sha256 consistent: only the block checks can catch it."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    with zipfile.ZipFile(path) as zf:
        blobs = {n: zf.read(n) for n in zf.namelist()}
    payload = st_load(blobs["tensors.safetensors"])
    block = payload[f"{tensor_key}::block"].numpy().tobytes()
    payload[f"{tensor_key}::block"] = torch.frombuffer(bytearray(mutate(block)), dtype=torch.uint8)
    blobs["tensors.safetensors"] = st_save(payload)
    manifest = json.loads(blobs["manifest.json"])
    manifest["entries"]["tensors.safetensors"] = {"sha256": hashlib.sha256(blobs["tensors.safetensors"]).hexdigest(),
                                                  "size": len(blobs["tensors.safetensors"])}
    blobs["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    blobs["manifest.sha256"] = hashlib.sha256(blobs["manifest.json"]).hexdigest().encode()
    with zipfile.ZipFile(out, "w") as zf:
        for n, b in blobs.items():
            zf.writestr(n, b)
    return out


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:-7], "crc32|truncated"),
    (lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:], "crc32"),
])
def test_damaged_block_in_artifact_names_the_layer(coded, tmp_path, mutate, message):
    _, path, _, _ = coded
    bad = _rewrite(path, tmp_path / "bad.slim", "4.weight", mutate)
    with pytest.raises(ArtifactError, match=rf"tensor '4\.weight'.*({message})"):
        sg.load(bad)


def test_huffman_coding_needs_shared_weights(zoo_model):
    with pytest.raises(ConfigError, match="weight-sharing first"):
        sg.cluster_(zoo_model("digits-mlp"), sg.HuffmanCodingConfig())


# ---- HashedNets ----------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser on Python integers (the reference the numpy version must equal)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _hash_by_hand(out_features: int, in_features: int, buckets: int, seed: int) -> tuple[list, list]:
    """The documented scheme, one weight at a time: for key ``k = i * in_features + j`` the bucket is
    ``fmix32(k ^ fmix32(2 seed + 1)) % buckets`` and the sign is ``-1`` when ``fmix32(fmix32(k ^ 0x5BD1E995)
    ^ fmix32(2 seed))`` is odd."""
    index_salt, sign_salt = _fmix32(2 * seed + 1), _fmix32(2 * seed)
    index, sign = [], []
    for i in range(out_features):
        index.append([_fmix32((i * in_features + j) ^ index_salt) % buckets for j in range(in_features)])
        sign.append([-1.0 if _fmix32(_fmix32((i * in_features + j) ^ 0x5BD1E995) ^ sign_salt) & 1 else 1.0
                     for j in range(in_features)])
    return index, sign


def test_hash_is_deterministic_and_seeded():
    # pinned values: the same on every platform and version (saved artifacts store only the seed)
    assert [t.tolist() for t in hash_indices(2, 3, 97, seed=3)] == [[[46, 57, 28], [18, 28, 6]],
                                                                    [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]]
    assert [t.tolist() for t in hash_indices(2, 3, 97, seed=4)] == [[[3, 37, 83], [59, 48, 94]],
                                                                    [[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]]
    maps = {}
    for seed in (0, 3, 4, 2**31 - 1):
        a, sa = hash_indices(30, 40, 97, seed=seed)
        assert (a.dtype, sa.dtype, a.shape, sa.shape) == (torch.int64, torch.float32, (30, 40), (30, 40))
        assert [a.tolist(), sa.tolist()] == list(_hash_by_hand(30, 40, 97, seed))
        counts = torch.bincount(a.reshape(-1), minlength=97).float()
        # buckets evenly used: 1200 weights in 97 buckets, uniform gives std / mean ~ 1 / sqrt(12.4) = 0.28
        assert float(counts.std() / counts.mean()) < 0.4, seed
        assert 0.4 < float((sa > 0).float().mean()) < 0.6
        maps[seed] = (a, sa)
    for s, t in [(0, 3), (3, 4), (4, 2**31 - 1)]:  # each seed its own map: few weights share bucket and sign
        same = (maps[s][0] == maps[t][0]) & (maps[s][1] == maps[t][1])
        assert float(same.float().mean()) < 0.05, (s, t)  # chance agreement: 1 / (2 * 97) ~ 0.005


def test_hashed_linear_trains_saves_and_exports(zoo_model, digits, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = zoo_model("digits-mlp")
    result = sg.cluster_(model, sg.HashingConfig(compression=0.25, ignore=["6"]))
    assert isinstance(model[2], HashedLinear) and isinstance(model[6], nn.Linear)
    assert result["layers"]["4"] == {"virtual": 30000, "buckets": 7500}
    pool = model[4].weight_pool.detach().clone()
    sg.finetune(model, digits, sg.FinetuneConfig(epochs=3, lr=1e-3, patience=0), progress=False)
    assert not torch.equal(pool, model[4].weight_pool)  # the small vector is what trains
    from slimguard.train.loop import accuracy

    acc = accuracy(model, digits.test)
    assert acc > 0.85  # 4x fewer weights in two layers still classifies digits
    path = sg.save(model, tmp_path / "hashed.slim")
    loaded = sg.load(path)
    assert isinstance(loaded[2], HashedLinear) and loaded[2].buckets == model[2].buckets
    x = digits.test.x[:32]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    buf = io.BytesIO()
    torch.onnx.export(loaded, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    (y,) = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), loaded(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"compression": 0.0}, "compression"),
    ({"compression": 1.5}, "compression"),
    ({"overrides": {"2": 0.0}}, "overrides.2"),
])
def test_hashing_bad_config(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        sg.HashingConfig(**kwargs)


def test_hashing_unknown_layer_is_refused(zoo_model):
    with pytest.raises(ConfigError, match="not a Linear"):
        sg.cluster_(zoo_model("digits-mlp"), sg.HashingConfig(ignore=["nope"]))


# ---- recipe, inspect, counters ---------------------------------------------------------------------------
def test_shipped_recipe_is_valid_and_ends_with_sharing_and_coding():
    from importlib import resources

    path = resources.files("slimguard") / "recipes" / "deep-compression.yaml"
    recipe = sg.load_recipe(str(path))
    names = [s.config_name for s in recipe.steps]
    assert names[:3] == ["channel", "distill", "magnitude"]
    assert names[-3:] == ["weight-sharing", "distill", "huffman-coding"]
    assert isinstance(recipe.steps[-3], sg.WeightSharingConfig) and recipe.steps[-3].bits == 3


def test_inspect_shows_the_paper_columns(coded):
    _, path, _, _ = coded
    rows = {r["tensor"]: r for r in sg.inspect_model(str(path))["tensors"]}
    fc2 = rows["4.weight"]
    # bits of the codebook in use
    assert fc2["codec"] == "huffman" and 1 <= fc2["bits"] <= 5 and fc2["layout"] == "sparse"
    assert fc2["kept_percent"] == pytest.approx(100 * fc2["nonzero"] / fc2["params"], abs=0.01)
    assert fc2["index_bits_per_weight"] <= 5.0  # Huffman never needs more than the fixed-width bits
    assert fc2["position_bits_per_weight"] > 0 and fc2["compression"] > 20
    assert rows["0.mean"]["codec"] == "dense" and "kept_percent" not in rows["0.mean"]


def test_cluster_indices_are_not_counted_as_weights(zoo_model):
    from slimguard.runtime.measure import count_params

    model = zoo_model("digits-mlp")
    before = count_params(model)
    sg.cluster_(model, sg.WeightSharingConfig(bits=4, bias_bits=4))
    assert count_params(model) == before


def test_neuron_pruned_model_is_shared_coded_and_loads_exactly(zoo_model, digits, tmp_path):
    # Deep Compression after neuron pruning (the shrunk modules of the benchmark): sharing and coding work on
    # the smaller shapes, the artifact loads them back exactly, and the denser layers pay fewer position bits
    model = zoo_model("digits-mlp")
    sg.prune_(model, sg.ChannelPruningConfig(ratio=0.0, ratios={"2": 0.6, "4": 0.5}), example_inputs=digits.train.x[:2])
    sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.0, scope="layer", overrides={"2": 0.8, "4": 0.8}))
    sg.cluster_(model, sg.WeightSharingConfig(bits=3, bias_bits=4))
    sg.cluster_(model, sg.HuffmanCodingConfig())
    path = sg.save(model, tmp_path / "m.slim")
    loaded = sg.load(path)
    assert tuple(loaded[2].weight.shape) == (120, 64) and tuple(loaded[4].weight.shape) == (50, 120)
    for layer in (loaded[2], loaded[4], loaded[6]):
        assert _distinct_nonzero(layer.weight) <= 8 and _distinct_nonzero(layer.bias) <= 16
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(digits.test.x), model(digits.test.x))
    rows = {r["tensor"]: r for r in sg.inspect_model(str(path))["tensors"]}
    # 20% density: H(0.2) / 0.2 = 3.6 bits per kept weight (a 5%-dense layer would pay 5.7)
    assert rows["2.weight"]["kept_percent"] == pytest.approx(20, abs=0.1)
    assert rows["2.weight"]["codec"] == "huffman" and rows["2.weight"]["position_bits_per_weight"] < 4.0
