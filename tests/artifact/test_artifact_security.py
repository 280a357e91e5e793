"""Loading untrusted ``.slim`` files: no code named by a file runs, signatures hold once a key is set,
limits are checked before work, and a malformed manifest is one ArtifactError naming its field.

Every crafted file here recomputes ``manifest.sha256`` and every entry hash, as an attacker would, so the
integrity checks pass and the attack reaches the part of the loader under test.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from slimguard.artifact import archive
from slimguard.artifact import slim as artifact
from slimguard.cli import build_app
from slimguard.core.errors import ArtifactError, ConfigError, UserError

runner = CliRunner()
APP = build_app()


# ---- crafting files ---------------------------------------------------------------------------------------
def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _recompose(src: Path, dst: Path, edit: Any = None, entries: dict[str, bytes | None] | None = None,
               unlisted: dict[str, bytes] | None = None) -> Path:
    """Copy ``src`` with the manifest edited (``edit(manifest)``) and entries replaced (None drops one);
    entry hashes, sizes and the manifest digest are recomputed. ``unlisted`` entries are added as they are."""
    blobs = _entries(src)
    manifest = json.loads(blobs.pop("manifest.json"))
    blobs.pop("manifest.sha256")
    for name, blob in (entries or {}).items():
        if blob is None:
            blobs.pop(name, None)
            manifest["entries"].pop(name, None)
        else:
            blobs[name] = blob
    for name, blob in blobs.items():
        if name in manifest["entries"] or name in (entries or {}):
            manifest["entries"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    if edit is not None:
        manifest = edit(manifest) or manifest
    mbytes = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", mbytes)
        zf.writestr("manifest.sha256", hashlib.sha256(mbytes).hexdigest().encode())
        for name, blob in {**blobs, **(unlisted or {})}.items():
            zf.writestr(name, blob)
    return dst


def _set(*path_value: Any):
    *path, value = path_value

    def edit(m: dict[str, Any]) -> None:
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _one_line_exit_2(result: Any, *messages: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(m in lines[0] for m in messages), result.output
    return lines[0]


@pytest.fixture
def saved(zoo_model, tmp_path) -> Path:
    return artifact.save(zoo_model("digits-mlp"), tmp_path / "ok.slim")


# ---- 1. code: only a file the caller names runs --------------------------------------------------------------
@pytest.fixture
def canary(tmp_path) -> tuple[Path, Path]:
    """A Python file that leaves a marker when imported and when its ``build`` is called."""
    marker = tmp_path / "ran"
    code = tmp_path / "canary.py"
    code.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
                    "def build(**kw):\n"
                    f"    Path({str(marker)!r}).write_text('called')\n"
                    "    import torch.nn as nn\n    return nn.Identity()\n"
                    "from os import system\n")
    return code, marker


def _python_source(file: Path, factory: str = "build", **extra: Any) -> dict[str, Any]:
    return {"kind": "python", "file": str(file), "factory": factory, "kwargs": {}, **extra}


def test_python_source_runs_nothing_without_trust_code(saved, tmp_path, canary):
    code, marker = canary
    bad = _recompose(saved, tmp_path / "bad.slim", _set("model", "source", _python_source(code)))
    with pytest.raises(ArtifactError, match=r"model\.source names Python code .*trust_code='model\.py'"):
        artifact.load(bad)
    with pytest.raises(ArtifactError, match=r"model\.source"):
        import slimguard as sg

        sg.load(bad)
    for command in ("inspect", "evaluate"):
        _one_line_exit_2(runner.invoke(APP, [command, str(bad)]), "model.source", "--trust-code")
    assert not marker.exists()  # nothing was imported, nothing was called


def test_os_system_factory_is_refused_even_from_a_trusted_file(saved, tmp_path, canary):
    code, marker = canary
    source = _python_source(code, "system", sha256=hashlib.sha256(code.read_bytes()).hexdigest())
    source["kwargs"] = {"command": f"touch {marker}.system"}
    bad = _recompose(saved, tmp_path / "bad.slim", _set("model", "source", source))
    with pytest.raises(ArtifactError, match="no callable 'system' defined in it"):
        artifact.load(bad, trust_code=code)  # imported (the caller trusts it), but `system` is not its own
    assert not Path(f"{marker}.system").exists()


@pytest.mark.parametrize(("source", "message"), [
    ({"factory": "os.system"}, "manifest.model.source.factory: value error, 'os.system' is not a plain"),
    ({"factory": "__import__"}, "is not a plain Python identifier"),
    ({"kwargs": {"command": ["rm", "-rf"]}}, "manifest.model.source.kwargs['command']: not an allowed type"),
])
def test_python_source_fields_are_checked(saved, tmp_path, canary, source, message):
    code, marker = canary
    bad = _recompose(saved, tmp_path / "bad.slim", _set("model", "source", {**_python_source(code), **source}))
    with pytest.raises(ArtifactError) as err:
        artifact.load(bad, trust_code=code)
    assert message in str(err.value)
    assert not marker.exists()


NET = """import torch
import torch.nn as nn


class Scale(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.w


def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Scale())
"""


@pytest.fixture
def python_model(tmp_path):
    from slimguard.models.sources import load_model

    net = tmp_path / "net.py"
    net.write_text(NET)
    model = load_model(f"python:{net}:make")
    with torch.no_grad():
        model[2].w.mul_(2)  # a trained value, not the factory's
    return net, model, artifact.save(model, tmp_path / "net.slim")


def test_trust_code_loads_the_callers_file(python_model, tmp_path, digits):
    net, model, path = python_model
    recorded = artifact.read_manifest(path)["model"]["source"]
    assert recorded["sha256"] == hashlib.sha256(net.read_bytes()).hexdigest()
    back = artifact.load(path, trust_code=net)
    assert type(back[2]) is type(model[2])  # the file was imported once: its classes keep their identity
    assert torch.equal(back(digits.test.x[:5]), model(digits.test.x[:5]))
    assert back._slimguard_info.source["file"] == str(net.resolve())
    r = runner.invoke(APP, ["inspect", str(path), "--trust-code", str(net), "--json"])
    assert r.exit_code == 0, r.output
    assert {row["tensor"] for row in json.loads(r.output)["tensors"]} == {"1.weight", "1.bias", "2.w"}


def test_trust_code_comes_from_the_caller_not_the_manifest(python_model, tmp_path, canary):
    net, model, path = python_model
    code, marker = canary
    # the manifest now points at the canary; the caller names net.py: net.py is what runs
    moved = _recompose(path, tmp_path / "moved.slim", _set("model", "source", "file", str(code)))
    back = artifact.load(moved, trust_code=net)
    assert torch.equal(back[2].w, model[2].w)
    assert not marker.exists()


def test_trust_code_with_another_hash_is_refused_naming_both(python_model, tmp_path):
    net, _, path = python_model
    recorded = hashlib.sha256(net.read_bytes()).hexdigest()
    other = tmp_path / "other.py"
    other.write_text(NET + "\n# edited\n")
    with pytest.raises(ArtifactError) as err:
        artifact.load(path, trust_code=other)
    assert recorded in str(err.value) and hashlib.sha256(other.read_bytes()).hexdigest() in str(err.value)
    for command in ("inspect", "evaluate"):
        _one_line_exit_2(runner.invoke(APP, [command, str(path), "--trust-code", str(other)]), recorded)


def test_module_classes_and_hf_configs_cannot_name_code(saved, tmp_path):
    bad = _recompose(saved, tmp_path / "m.slim", _set("modules", "2", {"class": "os.system",
                                                                       "init": {"command": "true"}}))
    with pytest.raises(ArtifactError, match=r"module class 'os\.system', which is not on"):
        artifact.load(bad)
    pytest.importorskip("transformers")
    source = {"kind": "hf", "pooling": "mean", "config": {"model_type": "bert", "auto_map": {
        "AutoModel": "evil--evil.Model"}}}
    bad = _recompose(saved, tmp_path / "hf.slim", _set("model", "source", source))
    with pytest.raises(ArtifactError, match="auto_map names code to run"):
        artifact.load(bad)


def test_hf_tokenizer_dir_never_runs_remote_code(tmp_path, canary):
    transformers = pytest.importorskip("transformers")
    from slimguard.models.sources import _build_hf

    code, marker = canary
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "canary.py").write_text(code.read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Canary", "auto_map": {"AutoTokenizer": ["canary.Canary", None]}}))
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    with pytest.raises(UserError, match="tokenizer_dir"):
        _build_hf({"kind": "hf", "config": cfg.to_dict(), "tokenizer_dir": str(tok)})
    assert not marker.exists()


# ---- 2. signatures: once a key is configured, unsigned or stripped files are refused -----------------------
@pytest.fixture
def stripped(zoo_model, tmp_path) -> Path:
    """A file signed with 'k1' whose signature was deleted and whose weights were changed."""
    signed = artifact.save(zoo_model("digits-mlp"), tmp_path / "signed.slim", key="k1")
    m = zoo_model("digits-mlp")
    with torch.no_grad():
        m[2].weight.add_(1.0)
    changed = _entries(artifact.save(m, tmp_path / "changed.slim"))["tensors.safetensors"]
    return _recompose(signed, tmp_path / "stripped.slim",
                      entries={"signature.json": None, "tensors.safetensors": changed})


def test_stripped_signature_is_refused_once_a_key_is_configured(stripped, monkeypatch):
    artifact.load(stripped)  # no key anywhere: an unsigned file is accepted (nothing to check it against)
    with pytest.raises(ArtifactError, match="not signed, but a signing key is configured"):
        artifact.load(stripped, key="k1")
    monkeypatch.setenv("SLIMGUARD_SIGNING_KEY", "k1")
    with pytest.raises(ArtifactError, match="unsigned or stripped files are refused"):
        artifact.load(stripped)
    _one_line_exit_2(runner.invoke(APP, ["evaluate", str(stripped)]), "not signed")
    monkeypatch.delenv("SLIMGUARD_SIGNING_KEY")
    monkeypatch.setenv("MY_KEYS", "k2, k1")
    for command in ("evaluate", "inspect"):
        _one_line_exit_2(runner.invoke(APP, [command, str(stripped), "--key-env", "MY_KEYS"]), "not signed")
        _one_line_exit_2(runner.invoke(APP, [command, str(stripped), "--require-signature"]), "not signed")
    _one_line_exit_2(runner.invoke(APP, ["inspect", str(stripped), "--key-env", "UNSET_VAR"]),
                     "--key-env UNSET_VAR", "unset or empty")


def test_keys_from_the_environment_and_key_env_check_the_signature(zoo_model, tmp_path, monkeypatch):
    """The key read from ``$SLIMGUARD_SIGNING_KEY`` or ``--key-env`` is the one the MAC is checked with: a
    wrong key and a file changed after signing are refused; ``--require-signature`` needs a key to check."""
    monkeypatch.delenv("SLIMGUARD_SIGNING_KEY", raising=False)
    signed = artifact.save(zoo_model("digits-mlp"), tmp_path / "signed.slim", key="k1")
    m = zoo_model("digits-mlp")
    with torch.no_grad():
        m[2].weight.add_(1.0)
    changed = _entries(artifact.save(m, tmp_path / "changed.slim"))["tensors.safetensors"]
    tampered = _recompose(signed, tmp_path / "tampered.slim", entries={"tensors.safetensors": changed})
    assert "signature.json" in _entries(tampered)  # the old signature is still there
    artifact.load(tampered)  # no key anywhere: nothing to check the signature against
    monkeypatch.setenv("SLIMGUARD_SIGNING_KEY", "k9")
    with pytest.raises(ArtifactError, match="signature check failed"):
        artifact.load(signed)
    monkeypatch.setenv("SLIMGUARD_SIGNING_KEY", "k1")
    artifact.load(signed, require_signature=True)
    with pytest.raises(ArtifactError, match="signature check failed"):
        artifact.load(tampered)
    monkeypatch.delenv("SLIMGUARD_SIGNING_KEY")
    monkeypatch.setenv("WRONG_KEY", "k9")
    monkeypatch.setenv("RIGHT_KEY", "k1")
    for command in ("evaluate", "inspect"):
        _one_line_exit_2(runner.invoke(APP, [command, str(signed), "--key-env", "WRONG_KEY"]),
                         "signature check failed")
        _one_line_exit_2(runner.invoke(APP, [command, str(tampered), "--key-env", "RIGHT_KEY"]),
                         "signature check failed")
        _one_line_exit_2(runner.invoke(APP, [command, str(signed), "--require-signature"]),
                         "no key was given to check it")
    r = runner.invoke(APP, ["inspect", str(signed), "--key-env", "RIGHT_KEY", "--require-signature", "--json"])
    assert r.exit_code == 0, r.output


def test_key_rotation_accepts_any_configured_key(zoo_model, tmp_path, monkeypatch):
    old = artifact.save(zoo_model("digits-mlp"), tmp_path / "old.slim", key="k1")
    new = artifact.save(zoo_model("digits-mlp"), tmp_path / "new.slim", key=["k2", "k1"])  # the first signs
    for path in (old, new):
        artifact.load(path, key=["k2", "k1"], require_signature=True)
    with pytest.raises(ArtifactError, match="signature check failed"):
        artifact.load(new, key="k1")
    monkeypatch.setenv("SLIMGUARD_SIGNING_KEY", " k2 , k1 ")
    artifact.load(old, require_signature=True)
    monkeypatch.setenv("ROTATED", "k2,k1")
    r = runner.invoke(APP, ["inspect", str(old), "--key-env", "ROTATED", "--require-signature", "--json"])
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError, match="non-empty key"):
        artifact.load(old, key=[])


# ---- 3. limits: checked before the work they guard ------------------------------------------------------------
def _opened_members(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = zipfile.ZipFile.open

    def spy(self, name, *a, **k):
        opened.append(name if isinstance(name, str) else name.filename)
        return real(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def test_unlisted_entry_is_refused_before_anything_is_inflated(saved, tmp_path, monkeypatch):
    bomb = _recompose(saved, tmp_path / "bomb.slim", unlisted={"padding.bin": bytes(32 * 2**20)})
    assert bomb.stat().st_size < 2**20  # 32 MiB of zeros deflate to a few tens of KB
    opened = _opened_members(monkeypatch)
    with pytest.raises(ArtifactError, match=r"unexpected entry 'padding\.bin' not listed"):
        artifact.load(bomb)
    assert "padding.bin" not in opened and "tensors.safetensors" not in opened


def test_declared_sizes_are_checked_against_the_limit_before_inflating(saved, tmp_path, monkeypatch):
    big = _recompose(saved, tmp_path / "big.slim", entries={"padding.bin": bytes(8 * 2**20)})
    artifact.load(big)  # listed: fine under the default limit
    opened = _opened_members(monkeypatch)
    with pytest.raises(ArtifactError, match="over the limit of 4,194,304"):
        artifact.load(big, max_bytes=4 * 2**20)
    assert opened == ["manifest.json", "manifest.sha256"]
    monkeypatch.setenv("SLIMGUARD_MAX_ARTIFACT_BYTES", "4MiB")
    with pytest.raises(ArtifactError, match="SLIMGUARD_MAX_ARTIFACT_BYTES"):
        artifact.load(big)
    monkeypatch.setenv("SLIMGUARD_MAX_ARTIFACT_BYTES", "lots")
    with pytest.raises(ConfigError, match="SLIMGUARD_MAX_ARTIFACT_BYTES: 'lots' is not a positive byte count"):
        artifact.load(big)


def test_a_lying_size_header_cannot_inflate_more_than_declared(saved):
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("tensors.safetensors")
        info.file_size = 100  # the header now understates the member
        with pytest.raises(ArtifactError, match=r"entry 'tensors\.safetensors' is corrupted"):
            archive.read_member(zf, info, 10**9, saved)


def _no_real_build(monkeypatch) -> list[str]:
    """Record the device of every rebuild; decoding must not start."""
    devices: list[str] = []
    real = artifact._rebuild

    def spy(*a, **k):
        devices.append(torch.empty(0).device.type)
        return real(*a, **k)

    def no_decode(*a, **k):
        raise AssertionError("tensors were decoded")

    monkeypatch.setattr(artifact, "_rebuild", spy)
    monkeypatch.setattr(artifact, "decode_tensors", no_decode)
    return devices


@pytest.mark.parametrize(("edit", "message"), [
    (_set("model", "source", "kwargs", "hidden", [20000, 20000]), "manifest.tensors['2.bias'].shape is [300]"),
    (_set("model", "source", "kwargs", "hidden", [10**12, 1]), "parameters and buffers take"),
    (_set("modules", "2", {"class": "torch.nn.Linear", "init": {"in_features": 20000, "out_features": 20000}}),
     "manifest.tensors['2.bias'].shape is [300], but the rebuilt model's tensor is [20000]"),
    (_set("tensors", "2.weight", "shape", [20000, 20000]), "manifest.tensors['2.weight'].shape is [20000, 20000]"),
    (_set("tensors", "2.weight", "dtype", "int64"), "manifest.tensors['2.weight'].dtype is int64"),
])
def test_sizes_are_checked_on_the_meta_structure_before_allocating(saved, tmp_path, monkeypatch, edit, message):
    bad = _recompose(saved, tmp_path / "bad.slim", edit)
    devices = _no_real_build(monkeypatch)
    with pytest.raises(ArtifactError) as err:
        artifact.load(bad)
    assert message in str(err.value)
    assert devices == ["meta"]  # refused before the real build and before decoding


def test_module_count_is_bounded(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "MAX_MODULES", 200)
    deep = _recompose(saved, tmp_path / "deep.slim", _set("model", "source", {
        "kind": "zoo", "name": "x", "factory": "resnet", "kwargs": {"mean": [0.5], "std": [0.2], "blocks": 10**6}}))
    with pytest.raises(ArtifactError, match="would have over 200 modules"):
        artifact.load(deep)


def test_payload_parts_are_bounded_by_the_manifest(zoo_model, tmp_path):
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.transforms import prune_

    m = zoo_model("digits-mlp")
    prune_(m, MagnitudePruningConfig(sparsity=0.9))
    pruned = artifact.save(m, tmp_path / "p.slim")
    bad = _recompose(pruned, tmp_path / "nnz.slim", _set("tensors", "2.weight", "nnz", 10**12))
    with pytest.raises(ArtifactError, match=r"tensor '2.weight' \(sparse\): nnz 1000000000000 is not a count"):
        artifact.load(bad)


def test_huffman_counts_are_checked_before_decoding(zoo_model, tmp_path, monkeypatch):
    import slimguard as sg
    from slimguard.codec.huffman import HuffmanCodec, _varint

    m = zoo_model("digits-mlp")
    sg.prune_(m, sg.MagnitudePruningConfig(sparsity=0.9))
    sg.cluster_(m, sg.WeightSharingConfig(bits=4))
    coded = artifact.save(m, tmp_path / "c.slim")
    blob = _entries(coded)["tensors.safetensors"]
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    start, end = header["2.weight::block"]["data_offsets"]
    block = blob[8 + n + start : 8 + n + end]
    numel = _varint(300 * 64)  # right after the magic, version, layout and codebook type bytes
    assert block[7 : 7 + len(numel)] == numel
    body = block[:7] + _varint(2**40) + block[7 + len(numel) : -4]
    forged = body + zlib.crc32(body).to_bytes(4, "little")
    header["2.weight::block"].update(data_offsets=[start, start + len(forged)], shape=[len(forged)])
    shift = len(forged) - len(block)
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] + shift, v["data_offsets"][1] + shift]
    data = blob[8 + n :]
    hbytes = json.dumps(header).encode()
    new = len(hbytes).to_bytes(8, "little") + hbytes + data[:start] + forged + data[end:]
    bad = _recompose(coded, tmp_path / "forged.slim", entries={"tensors.safetensors": new})
    monkeypatch.setattr(HuffmanCodec, "decode", lambda *a: pytest.fail("decoded a forged block"))
    with pytest.raises(ArtifactError, match="block holds 1099511627776 elements, the shape needs 19200"):
        artifact.load(bad)


# ---- 4. malformed manifests: one ArtifactError naming the field ------------------------------------------------
MALFORMED = [
    (lambda m: m.pop("model") and None, "manifest.model: field required"),
    (_set("entries", []), "manifest.entries: input should be a valid dictionary"),
    (lambda m: m["tensors"]["2.weight"].pop("shape") and None, "manifest.tensors['2.weight'].shape: field required"),
    (_set("tensors", "2.weight", "shape", [300, 65]), "manifest.tensors['2.weight'].shape is [300, 65]"),
    (_set("masked", ["9.weight"]), "manifest.masked names '9.weight'"),
    (_set("masked", [5]), "manifest.masked[0]: input should be a valid string"),
    (_set("tensors", "2.weight", {"tied": "nothing"}), "tensor '2.weight' is tied to 'nothing'"),
    (_set("tensors", "2.weight", [1, 2]), "manifest.tensors['2.weight']: input should be a valid dictionary"),
    (_set("attrs", {"2": {"forward": 1}}), "sets 'forward', which is not a plain data attribute"),
    (_set("attrs", {"2": {"_parameters": 1}}), "sets '_parameters'"),
    (_set("modules", {"2.__class__": {"class": "torch.nn.ReLU"}}), "module path '2.__class__' is not a plain"),
    (_set("model", "source", "zoo:digits-mlp"), "manifest.model.source: input should be a valid dictionary"),
    (_set("model", "source", "kwargs", "hidden", [-1, -1]), "cannot rebuild the model"),
    (_set("modules", "2", {"class": "torch.nn.Linear", "init": {"in_features": 64, "evil": 1}}),
     "cannot rebuild the model (TypeError"),
    (_set("modules", "2", {"class": "slimguard.DynamicInt8Linear",
                           "init": {"in_features": 64, "out_features": 300, "activations": "__import__('os')"}}),
     "activations must be one of ['row', 'tensor']"),
    (_set("format_version", float("nan")), "manifest.format_version: input should be a valid integer"),
    (_set("tensors", "2.weight", "codec", "pickle"), "unknown tensor codec 'pickle'"),
]


@pytest.mark.parametrize(("edit", "message"), MALFORMED)
def test_malformed_manifest_is_one_artifact_error(saved, tmp_path, edit, message):
    bad = _recompose(saved, tmp_path / "bad.slim", edit)
    with pytest.raises(ArtifactError) as err:
        artifact.load(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_prints_a_malformed_manifest_as_one_line(saved, tmp_path):
    bad = _recompose(saved, tmp_path / "bad.slim", lambda m: m["tensors"]["2.weight"].pop("shape") and None)
    for command in ("inspect", "evaluate"):
        _one_line_exit_2(runner.invoke(APP, [command, str(bad)]), "manifest.tensors['2.weight'].shape: field")


# ---- 5. a small seeded fuzz: only ArtifactError (or another UserError) for damaged input --------------------
def _mutate(node: Any, rng: random.Random) -> Any:
    """Replace one randomly chosen value somewhere in a JSON tree by a hostile one."""
    hostile = [None, -1, 0, 2**40, 1.5, float("nan"), "", "x" * 200, [], {}, [1, 2], {"a": 1}, True, "os.system"]
    if isinstance(node, dict) and node and rng.random() < 0.8:
        k = rng.choice(sorted(node))
        node[k] = _mutate(node[k], rng)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        node[i] = _mutate(node[i], rng)
        return node
    return rng.choice(hostile)


def test_fuzzed_manifests_raise_only_artifact_errors(saved, tmp_path):
    rng = random.Random(0)
    refused = 0
    for i in range(60):
        bad = _recompose(saved, tmp_path / f"f{i % 4}.slim", lambda m, r=rng: _mutate(m, r))
        try:
            model = artifact.load(bad)
        except ArtifactError as exc:
            assert "\n" not in str(exc)
            refused += 1
            continue
        man = artifact.read_manifest(bad)
        for key, t in model.state_dict().items():  # what loads is what the manifest declares
            meta = man["tensors"][key]
            meta = man["tensors"][meta["tied"]] if "tied" in meta else meta
            assert list(t.shape) == meta["shape"]
    assert refused >= 30  # most hostile values are refused; harmless ones (metrics, versions) load
