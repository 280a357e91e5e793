"""Artifacts: exact round trips without pickle, atomic writes, and refusal of damaged files."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
import torch.nn as nn

from slimguard.artifact import slim as artifact
from slimguard.core.errors import ArtifactError
from slimguard.core.masks import get_mask
from slimguard.evaluate import predict
from slimguard.prune.magnitude import MagnitudePruningConfig
from slimguard.quantize.dynamic import DynamicInt8Linear, Int8DynamicConfig
from slimguard.transforms import prune_, quantize_


def _same_predictions(a, b, x):
    return torch.equal(predict(a, x), predict(b, x))


def test_round_trip_is_exact(zoo_model, digits, tmp_path):
    m = zoo_model("digits-mlp")
    p = artifact.save(m, tmp_path / "m.slim", metrics={"accuracy": 0.9})
    m2 = artifact.load(p)
    assert _same_predictions(m, m2, digits.test.x)
    man = artifact.read_manifest(p)
    assert man["format_version"] == artifact.FORMAT_VERSION
    assert man["metrics"] == {"accuracy": 0.9}
    assert set(man["entries"]) == {"tensors.safetensors"}
    assert all(len(e["sha256"]) == 64 for e in man["entries"].values())
    assert {"torch", "slimguard", "safetensors"} <= set(man["versions"])


def test_pruned_model_masks_survive_and_file_shrinks(zoo_model, digits, tmp_path):
    m = zoo_model("digits-mlp")
    dense = artifact.save(m, tmp_path / "dense.slim").stat().st_size
    prune_(m, MagnitudePruningConfig(sparsity=0.9))
    p = artifact.save(m, tmp_path / "sparse.slim")
    m2 = artifact.load(p)
    for name in ("2", "4", "6"):
        assert torch.equal(get_mask(m2.get_submodule(name), "weight"), get_mask(m.get_submodule(name), "weight"))
    assert _same_predictions(m, m2, digits.test.x)
    assert p.stat().st_size < dense / 3  # 10% density: bitmap + values


def test_int8_model_round_trips(zoo_model, digits, tmp_path):
    m = zoo_model("digits-mlp")
    quantize_(m, Int8DynamicConfig())
    m2 = artifact.load(artifact.save(m, tmp_path / "q.slim"))
    assert isinstance(m2[2], DynamicInt8Linear)
    assert torch.equal(m2[2].weight_int8, m[2].weight_int8)
    assert _same_predictions(m, m2, digits.test.x)


def test_structurally_shrunk_model_loads(zoo_model, digits, tmp_path):
    m = zoo_model("digits-mlp")
    keep = torch.arange(0, 300, 2)  # drop half the hidden units of the first layer, for real
    fc1, fc2 = m[2], m[4]
    new1 = nn.Linear(64, len(keep))
    new1.weight.data, new1.bias.data = fc1.weight.data[keep].clone(), fc1.bias.data[keep].clone()
    fc2.weight = nn.Parameter(fc2.weight.data[:, keep].clone())
    fc2.in_features = len(keep)
    m[2] = new1
    p = artifact.save(m, tmp_path / "shrunk.slim")
    m2 = artifact.load(p)
    assert m2[2].weight.shape == (150, 64) and m2[4].in_features == 150
    assert _same_predictions(m, m2, digits.test.x)


def test_load_never_unpickles(zoo_model, tmp_path, monkeypatch):
    p = artifact.save(zoo_model("digits-mlp"), tmp_path / "m.slim")

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    artifact.load(p)


def test_signature(zoo_model, tmp_path):
    p = artifact.save(zoo_model("digits-mlp"), tmp_path / "s.slim", key="secret")
    artifact.load(p, key="secret", require_signature=True)
    with pytest.raises(ArtifactError, match="signature check failed"):
        artifact.load(p, key="wrong")
    unsigned = artifact.save(zoo_model("digits-mlp"), tmp_path / "u.slim")
    with pytest.raises(ArtifactError, match="not signed"):
        artifact.load(unsigned, require_signature=True)


def _rewrite(src, dst, change):
    """Copy a zip, letting ``change(name, bytes) -> bytes`` alter entries (keeps valid zip CRCs)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))
    return dst


def _flip_byte(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))
    return path


@pytest.fixture
def saved(zoo_model, tmp_path):
    return artifact.save(zoo_model("digits-mlp"), tmp_path / "ok.slim")


def _newer(name, blob):
    if name != "manifest.json":
        return blob
    return json.dumps({**json.loads(blob), "format_version": 99}).encode()


def test_newer_format_is_refused(saved, tmp_path):
    import hashlib

    def change(name, blob):
        if name == "manifest.json":
            return _newer(name, blob)
        if name == "manifest.sha256":
            with zipfile.ZipFile(saved) as z:
                return hashlib.sha256(_newer("manifest.json", z.read("manifest.json"))).hexdigest().encode()
        return blob

    bad = _rewrite(saved, tmp_path / "new.slim", change)
    with pytest.raises(ArtifactError, match="artifact format 99, newer than this slimguard reads"):
        artifact.load(bad)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "may be truncated"),
        ("flip_payload", "entry 'tensors.safetensors'"),
        ("tamper_tensors", "entry 'tensors.safetensors' failed its sha256 check"),
        ("tamper_manifest", "entry 'manifest.json' failed its sha256 check"),
        ("extra_entry", "unexpected entry 'evil.bin'"),
        ("missing", "artifact not found"),
    ],
)
def test_damaged_artifacts_are_refused(saved, tmp_path, damage, message):
    path = tmp_path / "bad.slim"
    if damage == "truncate":
        path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    elif damage == "flip_payload":
        with zipfile.ZipFile(saved) as z:
            info = z.getinfo("tensors.safetensors")
        path.write_bytes(saved.read_bytes())
        _flip_byte(path, info.header_offset + 30 + len(info.filename) + info.compress_size // 2)
    elif damage == "tamper_tensors":
        _rewrite(saved, path, lambda n, b: (b[:-1] + bytes([b[-1] ^ 1])) if n == "tensors.safetensors" else b)
    elif damage == "tamper_manifest":
        _rewrite(saved, path, lambda n, b: b.replace(b'"metrics":{}', b'"metrics":{"x":1}')
                 if n == "manifest.json" else b)
    elif damage == "extra_entry":
        _rewrite(saved, path, lambda n, b: b)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("evil.bin", b"x")
    else:
        path = tmp_path / "nothing.slim"
    with pytest.raises(ArtifactError) as err:
        artifact.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_single_byte_flip_in_payload_is_caught(saved, tmp_path):
    """Flip one byte at many offsets across the whole file; never load silently changed weights."""
    ref = artifact.load(saved)
    size = saved.stat().st_size
    for offset in range(0, size, max(1, size // 40)):
        p = tmp_path / "f.slim"
        p.write_bytes(saved.read_bytes())
        _flip_byte(p, offset)
        try:
            m = artifact.load(p)
        except ArtifactError:
            continue
        for a, b in zip(ref.state_dict().values(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"byte {offset} changed weights silently"


def test_save_is_atomic(zoo_model, tmp_path, monkeypatch):
    m = zoo_model("digits-mlp")
    target = tmp_path / "m.slim"
    artifact.save(m, target)
    before = target.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail)
    with pytest.raises(OSError):
        artifact.save(m, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slim"]  # no temp left behind


def test_unregistered_module_class_is_named(zoo_model, tmp_path):
    class Mine(nn.Module):
        def forward(self, x):
            return x

    m = zoo_model("digits-mlp")
    m[3] = Mine()
    with pytest.raises(ArtifactError, match="Mine that replaced part of the model; register it"):
        artifact.save(m, tmp_path / "x.slim")
    assert not (tmp_path / "x.slim").exists()


def test_file_size_is_the_bytes_on_disk(zoo_model, tmp_path):
    m = zoo_model("digits-mlp")
    assert artifact.file_size(m) == artifact.save(m, tmp_path / "a.slim").stat().st_size




@pytest.mark.parametrize("name", ["manifest.json", "../escape.bin", "/abs.bin", "a/../../b"])
def test_unsafe_extra_entry_names_are_refused(zoo_model, tmp_path, name):
    with pytest.raises(ArtifactError, match="reserved or unsafe"):
        artifact.save(zoo_model("digits-mlp"), tmp_path / "m.slim", extra_entries={name: b"x"})
    assert not (tmp_path / "m.slim").exists()
