"""Fuzzing the ``.slim`` loader with real artifacts (hypothesis).

Five real artifacts are written with :func:`slimguard.artifact.save`: a dense MLP (with an extra
entry, metrics and a recipe), a magnitude-pruned one (sparse codec, masks), a pruned + clustered +
Huffman-coded one, an int8 one (replaced modules) and a signed one. Each property mutates them and loads
the result in a child process capped with ``resource.setrlimit(RLIMIT_AS)`` (see ``tests/fuzz_support.py``).

Two kinds of mutation, two properties:

* byte level (flips, truncation, duplicated / renamed / dropped / extra zip entries): nothing was
  recomputed, so the file must load **bit-identically** (the mutation hit bytes that do not matter) or
  raise :class:`ArtifactError`;
* content level (manifest JSON mutations, raw manifest bytes, tensor payloads, forged Huffman counts),
  with ``manifest.sha256`` and every entry hash **recomputed** so the mutation reaches the parser and the
  rebuilder, as a real attacker would: the file must raise :class:`ArtifactError` or load a model whose
  tensors have the dtype and shape the manifest declares. A signed artifact must refuse every such change
  when its signature is required.

In both, no other exception type may escape, no load may pass the memory cap or the time cap, and
refusals must be one-line messages. Targeted cases (huge shapes, a zip bomb, code named by the manifest,
forged counts) run once each. Everything is seeded (``derandomize=True``).
"""

from __future__ import annotations

import copy
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fuzz_support as fz

KEY = "fuzz-signing-key"
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
MANIFEST, DIGEST, TENSORS, SIGNATURE = "manifest.json", "manifest.sha256", "tensors.safetensors", "signature.json"


# =========================================================================================================
# child side: the references, the mutations and the properties
# =========================================================================================================
class Ref:
    """One reference artifact: its bytes, entries, manifest and the fingerprint of its clean load."""

    def __init__(self, name: str, path: Path) -> None:
        from slimguard.artifact import slim as artifact

        self.name, self.path = name, path
        self.blob = path.read_bytes()
        self.entries = fz.zip_entries(self.blob)
        self.manifest = json.loads(dict(self.entries)[MANIFEST])
        self.fp = fz.fingerprint(artifact.load(path))


REFS: dict[str, Ref] = {}
WORK = Path(".")
CANARY_MARKER = Path("canary-ran")


def _load(path: Path, **kwargs: Any):
    from slimguard.artifact import slim as artifact

    return artifact.load(path, **kwargs)


def _write(name: str, blob: bytes) -> Path:
    path = WORK / f"{name}.slim"
    path.write_bytes(blob)
    return path


def _identical(ref: Ref):
    return lambda m: None if fz.fingerprint(m) == ref.fp else "weights changed silently: the file loaded " \
        "into a model that is not bit-identical to the original"


def _consistent(manifest: Any, same_as: Ref | None = None):
    def check(model: Any) -> str | None:
        if same_as is not None and fz.fingerprint(model) != same_as.fp:
            return "weights changed silently: an unchanged payload loaded into a different model"
        return fz.disagreement(model, manifest)

    return check


def _expect(case: str, path: Path, allowed: type, check: Any, **load_kwargs: Any) -> None:
    fz.progress(case)
    fz.judge(case, fz.attempt(lambda: _load(path, **load_kwargs)), allowed, path, check)


def _artifact_error() -> type:
    from slimguard.core.errors import ArtifactError

    return ArtifactError


def _rebuild(ref: Ref, entries: dict[str, bytes], manifest: Any | bytes) -> bytes:
    """The artifact with ``entries`` replaced, every entry hash recomputed into ``manifest`` (when it is
    still a mapping with a mapping of entries) and ``manifest.sha256`` recomputed."""
    if isinstance(manifest, dict) and isinstance(manifest.get("entries"), dict):
        for name in list(manifest["entries"]):
            if name in entries and isinstance(manifest["entries"][name], dict):
                manifest["entries"][name] = {"sha256": fz.sha256(entries[name]), "size": len(entries[name])}
    mbytes = manifest if isinstance(manifest, bytes) else _dump(manifest)
    out = {**entries, MANIFEST: mbytes, DIGEST: fz.sha256(mbytes).encode()}
    return fz.zip_bytes([(n, out[n]) for n, _ in ref.entries if n in out])


DEEP = "@@deeply-nested@@"


def _dump(tree: Any) -> bytes:
    raw = json.dumps(tree, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return raw.replace(json.dumps(DEEP), "[" * 5_000 + "]" * 5_000).encode()


# ---- a generic JSON mutation: delete / replace / add / scale at a random depth ------------------------
SPECIAL = [20000, 10**12, -1, 0, 2**63, -(2**63) - 1, 10**100, 1e308, -0.0, math.nan, math.inf,
           [20000, 20000], [10**12], [-1], [0], [10**6, 10**6], [], {}, "", None, True, False, "x" * 5000,
           DEEP, [[[[[[]]]]]], {"kind": "zoo"}, "torch.nn.Linear", "float64", "bfloat16", "huffman", "sparse"]
_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12))
JSON = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                    max_size=4), max_leaves=8)
VALUES = st.sampled_from(SPECIAL) | JSON


def _scaled(node: Any, factor: int) -> Any:
    if isinstance(node, bool):
        return node
    if isinstance(node, (int, float)):
        return node * factor
    if isinstance(node, list):
        return [_scaled(v, factor) for v in node]
    return node


def mutate_json(data: Any, tree: Any, label: str) -> tuple[Any, str]:
    """A copy of ``tree`` with one mutation drawn by hypothesis, and a description of it."""
    tree = copy.deepcopy(tree)
    depth = data.draw(st.sampled_from([3, 2, 4, 1, 5, 0, 6]), label=f"{label} depth")
    path: list[Any] = []
    node = tree
    for _ in range(depth):
        if isinstance(node, dict) and node:
            k = data.draw(st.sampled_from(sorted(node)), label=f"{label} key")
        elif isinstance(node, list) and node:
            k = data.draw(st.integers(0, len(node) - 1), label=f"{label} index")
        else:
            break
        path.append(k)
        node = node[k]
    op = data.draw(st.sampled_from(["replace", "scale", "delete", "add"]), label=f"{label} op")
    if op == "scale":
        factor = data.draw(st.sampled_from([20000, 10**6, -1, 0, 10**12]), label=f"{label} factor")
        new, what = _scaled(node, factor), f"scale {path} by {factor}"
    elif op == "delete" and path:
        new, what = None, f"delete {path}"
    elif op == "add" and isinstance(node, (dict, list)):
        value = data.draw(VALUES, label=f"{label} value")
        if isinstance(node, dict):
            k = data.draw(st.sampled_from(["shape", "dtype", "codec", "tied", "kind", "class", "init", "size"])
                          | st.text(max_size=6), label=f"{label} new key")
            new, what = {**node, k: value}, f"add {path}[{k!r}] = {_brief(value)}"
        else:
            new, what = [*node, value], f"append to {path}: {_brief(value)}"
    else:
        value = data.draw(VALUES, label=f"{label} value")
        new, what = value, f"replace {path} with {_brief(value)}"
    if not path:
        return ({} if op == "delete" else new), what
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return tree, what


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- byte-level properties ------------------------------------------------------------------------------
@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def fuzz_byte_flips(data: Any) -> None:
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    flips = data.draw(st.lists(st.tuples(fz.zip_offsets(ref.blob), fz.XORS), min_size=1, max_size=6),
                      label="(offset, xor)")
    blob = bytearray(ref.blob)
    for off, x in flips:
        blob[off] ^= x
    _expect(f"{ref.name}: xor bytes {flips}", _write("flip", bytes(blob)), _artifact_error(), _identical(ref))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def fuzz_truncation(data: Any) -> None:
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    cut = data.draw(fz.zip_offsets(ref.blob), label="keep bytes")
    tail = data.draw(st.binary(max_size=40), label="appended")
    blob = ref.blob[:cut] + tail
    _expect(f"{ref.name}: keep {cut} of {len(ref.blob)} bytes, append {tail!r}", _write("cut", blob),
            _artifact_error(), _identical(ref))


_NAMES = st.sampled_from([MANIFEST, DIGEST, TENSORS, SIGNATURE, "model.onnx", "../" + TENSORS, "/" + TENSORS,
                          "a/" + TENSORS, TENSORS.upper(), TENSORS + "/", "evil.bin", "manifest.json.bak"])


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def fuzz_entries(data: Any) -> None:
    """Duplicated, renamed, dropped, reordered, extra and re-compressed entries (valid zip CRCs)."""
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    entries = list(ref.entries)
    ops = []
    for _ in range(data.draw(st.integers(1, 3), label="number of ops")):
        op = data.draw(st.sampled_from(["duplicate", "rename", "drop", "extra", "reorder"]), label="op")
        i = data.draw(st.integers(0, len(entries) - 1), label="entry") if entries else 0
        if op == "duplicate" and entries:
            name, blob = entries[i]
            variant = data.draw(st.sampled_from(["same", "tampered", "other"]), label="duplicate content")
            other = entries[(i + 1) % len(entries)][1]
            dup = {"same": blob, "tampered": blob[:-1] + bytes([(blob[-1:] or b"\0")[0] ^ 1]), "other": other}
            at = data.draw(st.sampled_from([len(entries), 0, i]), label="duplicate at")
            entries.insert(at, (name, dup[variant]))
            ops.append(f"duplicate {name!r} ({variant}) at {at}")
        elif op == "rename" and entries:
            new = data.draw(_NAMES | st.text(min_size=1, max_size=12), label="new name")
            ops.append(f"rename {entries[i][0]!r} to {new!r}")
            entries[i] = (new, entries[i][1])
        elif op == "drop" and entries:
            ops.append(f"drop {entries[i][0]!r}")
            del entries[i]
        elif op == "extra":
            name = data.draw(_NAMES | st.text(min_size=1, max_size=12), label="extra name")
            blob = data.draw(st.binary(max_size=64), label="extra bytes")
            entries.append((name, blob))
            ops.append(f"add {name!r} = {blob!r}")
        else:
            order = data.draw(st.permutations(range(len(entries))), label="order")
            entries = [entries[j] for j in order]
            ops.append(f"reorder {order}")
    stored = data.draw(st.booleans(), label="stored (no compression)")
    try:
        blob = fz.zip_bytes(entries, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    except (ValueError, OSError, IndexError):  # zipfile itself refuses the name (the input can't even be written)
        assume(False)
    case = f"{ref.name}: {'; '.join(ops)}{'; stored' if stored else ''}"
    _expect(case, _write("entries", blob), _artifact_error(), _identical(ref))


# ---- content-level properties (hashes recomputed) -------------------------------------------------------
@settings(max_examples=160, **SETTINGS)
@given(data=st.data())
def fuzz_manifest(data: Any) -> None:
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    manifest, whats = ref.manifest, []
    for _ in range(data.draw(st.integers(1, 3), label="number of mutations")):
        manifest, what = mutate_json(data, manifest, "manifest")
        whats.append(what)
    blob = _rebuild(ref, dict(ref.entries), manifest)
    same = ref if _dump(manifest) == _dump(ref.manifest) else None
    _expect(f"{ref.name}: {'; '.join(whats)} (hashes recomputed)", _write("manifest", blob),
            _artifact_error(), _consistent(manifest, same))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def fuzz_manifest_bytes(data: Any) -> None:
    """Raw manifest bytes (bad UTF-8, broken JSON, cut, spliced) with the digest recomputed."""
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    raw = bytearray(dict(ref.entries)[MANIFEST])
    op = data.draw(st.sampled_from(["xor", "cut", "insert", "replace"]), label="op")
    if op == "xor":
        edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                   max_size=4), label="(offset, xor)")
        for off, x in edits:
            raw[off] ^= x
        what = f"xor manifest bytes {edits}"
    elif op == "cut":
        n = data.draw(st.integers(0, len(raw) - 1), label="keep")
        raw, what = raw[:n], f"keep {n} manifest bytes"
    elif op == "insert":
        at = data.draw(st.integers(0, len(raw)), label="at")
        junk = data.draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"\xff", b"\x00", b"NaN,"]),
                         label="insert")
        raw, what = raw[:at] + junk + raw[at:], f"insert {junk!r} at {at}"
    else:
        raw = bytearray(data.draw(st.binary(max_size=64), label="manifest"))
        what = f"manifest is {bytes(raw)!r}"
    _expect(f"{ref.name}: {what} (digest recomputed)", _write("mbytes", _rebuild(ref, dict(ref.entries),
            bytes(raw))), _artifact_error(), _consistent(_parse_or_none(bytes(raw))))


def _parse_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
             "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _mutate_payload(data: Any, blob: bytes) -> tuple[bytes, str]:
    """One drawn change to ``tensors.safetensors``: its JSON header, its data, or a coded block."""
    header, body = fz.safetensors_split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    blocks = [k for k in names if k.endswith("::block")]
    ops = ["retype", "reshape", "header", "data"] + (["block-field", "block-bytes"] if blocks else [])
    op = data.draw(st.sampled_from(ops), label="payload op")
    if op in ("retype", "reshape"):
        name = data.draw(st.sampled_from(names), label="tensor")
        meta = dict(header[name])
        start, end = meta["data_offsets"]
        nbytes = end - start
        if op == "retype":
            fits = [d for d, size in ST_DTYPES.items() if nbytes % size == 0]
            dt = data.draw(st.sampled_from(fits), label="dtype")
            meta["dtype"], meta["shape"] = dt, [nbytes // ST_DTYPES[dt]]
        else:
            meta["shape"] = data.draw(st.sampled_from([[1, *meta["shape"]], [*meta["shape"], 1], [20000, 20000],
                                                       [10**12], [-1], [0]]) | st.lists(st.integers(-2, 10**6),
                                                                                        max_size=3), label="shape")
        return fz.safetensors_join({**header, name: meta}, body), f"{op} {name} to {meta}"
    if op == "header":
        new, what = mutate_json(data, header, "safetensors header")
        return fz.safetensors_join(_dump(new), body), f"safetensors header: {what}"
    if op == "data":
        if not body:
            assume(False)
        edits = data.draw(st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(1, 255)), min_size=1,
                                   max_size=4), label="(offset, xor)")
        out = bytearray(body)
        for off, x in edits:
            out[off] ^= x
        return fz.safetensors_join(header, bytes(out)), f"xor tensor data bytes {edits}"
    name = data.draw(st.sampled_from(blocks), label="block")
    start, end = header[name]["data_offsets"]
    block = body[start:end]
    if op == "block-field":
        field, a, b = data.draw(st.sampled_from(fz.block_fields(block, _codebook_sizes())), label="field")
        u8 = field == "gap_bits" or field.endswith("lenbits")
        old = block[a] if u8 else fz.read_varint(block, a)
        value = data.draw(st.sampled_from([0, 1, 2, 255, 256, 2**20, 10**12, 2**62, old + 1, max(0, old - 1),
                                           old * 20000]), label="value")
        enc = bytes([value & 0xFF]) if u8 else fz.varint(value)
        new_block, what = fz.fix_block_crc(block[:a] + enc + block[b:-4]), f"forge {name} {field}={value}"
    else:
        body_bytes = bytearray(block[:-4])
        kind = data.draw(st.sampled_from(["xor", "cut"]), label="block op")
        if kind == "xor":
            edits = data.draw(st.lists(st.tuples(st.integers(4, max(4, len(body_bytes) - 1)), st.integers(1, 255)),
                                       min_size=1, max_size=3), label="(offset, xor)")
            for off, x in edits:
                if off < len(body_bytes):
                    body_bytes[off] ^= x
            what = f"xor {name} bytes {edits}"
        else:
            n = data.draw(st.integers(7, len(body_bytes)), label="keep")
            body_bytes, what = body_bytes[:n], f"cut {name} to {n} bytes"
        new_block = fz.fix_block_crc(bytes(body_bytes))
        what += " (crc fixed)"
    return _replace_part(blob, name, new_block), what


def _codebook_sizes() -> list[int]:
    import torch

    from slimguard.codec.huffman import CODEBOOK_DTYPES

    return [torch.empty(0, dtype=d).element_size() for d in CODEBOOK_DTYPES]


def _replace_part(blob: bytes, name: str, new: bytes) -> bytes:
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    payload = st_load(blob)
    payload[name] = torch.frombuffer(bytearray(new), dtype=torch.uint8) if new else torch.zeros(0, dtype=torch.uint8)
    return st_save(payload)


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def fuzz_payload(data: Any) -> None:
    """Tensor payloads (safetensors header, data, coded blocks with their crc fixed), hashes recomputed."""
    ref = REFS[data.draw(st.sampled_from(sorted(REFS)), label="artifact")]
    entries = dict(ref.entries)
    entries[TENSORS], what = _mutate_payload(data, entries[TENSORS])
    manifest = copy.deepcopy(ref.manifest)
    same = ref if entries[TENSORS] == dict(ref.entries)[TENSORS] else None
    _expect(f"{ref.name}: {what} (hashes recomputed)", _write("payload", _rebuild(ref, entries, manifest)),
            _artifact_error(), _consistent(manifest, same))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def fuzz_signed(data: Any) -> None:
    """A signed artifact with a changed manifest or signature must be refused when the key is given."""
    ref = REFS["signed"]
    entries = dict(ref.entries)
    target = data.draw(st.sampled_from(["manifest", "signature", "drop signature"]), label="target")
    manifest: Any = copy.deepcopy(ref.manifest)
    if target == "manifest":
        manifest, what = mutate_json(data, manifest, "manifest")
    elif target == "signature":
        new, what = mutate_json(data, json.loads(entries[SIGNATURE]), "signature")
        entries[SIGNATURE] = _dump(new)
    else:
        del entries[SIGNATURE]
        what = "signature.json removed"
    blob = _rebuild(ref, entries, manifest)
    _expect(f"signed: {what}; loaded with key and require_signature", _write("signed", blob),
            _artifact_error(), _identical(ref), key=KEY, require_signature=True)


# ---- targeted cases: each runs once -----------------------------------------------------------------------
def _manifest_case(ref_name: str, edit: Any, what: str, check: Any = None) -> None:
    ref = REFS[ref_name]
    manifest = copy.deepcopy(ref.manifest)
    manifest = edit(manifest) or manifest
    path = _write("targeted", _rebuild(ref, dict(ref.entries), manifest))
    _expect(f"{ref_name}: {what}", path, _artifact_error(), check or _consistent(manifest))


def _set(path: list[Any], value: Any):
    def edit(m: Any) -> Any:
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _first_tensor(ref_name: str, codec: str) -> str:
    return next(k for k, v in sorted(REFS[ref_name].manifest["tensors"].items()) if v.get("codec") == codec)


def _canary_check(model: Any) -> str | None:
    return "code named by the manifest ran: the canary file was imported" if CANARY_MARKER.exists() else None


def _canary_case(edit: Any, what: str) -> None:
    CANARY_MARKER.unlink(missing_ok=True)
    try:
        _manifest_case("dense", edit, what, check=_canary_check)
    finally:  # also when the load was refused or failed otherwise, but only after running the code
        ran = CANARY_MARKER.exists()
        CANARY_MARKER.unlink(missing_ok=True)
        if ran:
            fz.fail("code named by the manifest ran", what, "the canary file was imported during the load")


def _zip_bomb() -> None:
    ref = REFS["dense"]
    path = fz.write_bomb(WORK / "bomb.slim", "padding.bin", 200, ref.entries)
    _expect("dense + unlisted 'padding.bin' of 200 MB zeros (deflated to ~0.2 MB)", path, _artifact_error(),
            lambda m: "an unlisted entry was accepted")


def _forged_counts() -> None:
    """A coded block whose counts claim 2**40 values (crc fixed): must be refused before allocating."""
    ref = REFS["coded"]
    entries = dict(ref.entries)
    header, body = fz.safetensors_split(entries[TENSORS])
    name = sorted(k for k in header if k.endswith("::block"))[0]
    start, end = header[name]["data_offsets"]
    block = body[start:end]
    fields = {f: (a, b) for f, a, b in fz.block_fields(block, _codebook_sizes())}
    out = block[:-4]
    for field in sorted(("numel", "n_index", "n_gap"), key=lambda f: -fields.get(f, (0, 0))[0]):
        if field in fields:
            a, b = fields[field]
            out = out[:a] + fz.varint(2**40) + out[b:]
    entries[TENSORS] = _replace_part(entries[TENSORS], name, fz.fix_block_crc(out))
    manifest = copy.deepcopy(ref.manifest)
    manifest["tensors"][name.split("::")[0]]["shape"] = [2**20, 2**20]
    _expect(f"coded: {name} counts forged to 2**40 and its manifest shape to [2**20, 2**20] (crc and hashes "
            "fixed)", _write("forged", _rebuild(ref, entries, manifest)), _artifact_error(), _consistent(manifest))


def _bf16_block() -> None:
    ref = REFS["coded"]
    entries = dict(ref.entries)
    header, body = fz.safetensors_split(entries[TENSORS])
    name = next(k for k in sorted(header) if k.endswith("::block") and
                (header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) % 2 == 0)
    n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    header[name] = {**header[name], "dtype": "BF16", "shape": [n // 2]}
    entries[TENSORS] = fz.safetensors_join(header, body)
    manifest = copy.deepcopy(ref.manifest)
    _expect(f"coded: payload {name} retyped U8 -> BF16 (hashes recomputed)",
            _write("bf16", _rebuild(ref, entries, manifest)), _artifact_error(), _consistent(manifest))


def _raw_manifest(ref_name: str, raw: bytes, what: str) -> None:
    ref = REFS[ref_name]
    _expect(f"{ref_name}: {what}", _write("raw", _rebuild(ref, dict(ref.entries), raw)), _artifact_error(),
            _consistent(None))


def _signature_case(sig: Any, what: str) -> None:
    ref = REFS["signed"]
    entries = {**dict(ref.entries), SIGNATURE: json.dumps(sig).encode()}
    _expect(f"signed: {what}", _write("sig", _rebuild(ref, entries, copy.deepcopy(ref.manifest))),
            _artifact_error(), _identical(ref), key=KEY, require_signature=True)


def _zip_field(offset: int, value: int, what: str) -> None:
    """The dense artifact with one central directory field of 'tensors.safetensors' set."""
    ref = REFS["dense"]
    index = [n for n, _ in ref.entries].index(TENSORS)
    _expect(f"dense: central directory of {TENSORS!r}: {what}",
            _write("field", fz.patch_central(ref.blob, index, offset, value)), _artifact_error(), _identical(ref))


def _targeted() -> dict[str, Any]:
    w2 = ["tensors", "2.weight"]
    pyfile = str(WORK / "canary.py")
    return {
        "zip_bomb_unlisted_member": _zip_bomb,
        "zip_encrypted_flag": lambda: _zip_field(8, 0x0001, "flags = encrypted"),
        "zip_patched_data_flag": lambda: _zip_field(8, 0x0020, "flags = compressed patched data"),
        "zip_version_needed_too_high": lambda: _zip_field(6, 0x0094, "version needed = 14.8"),
        "zip_unknown_compression": lambda: _zip_field(10, 99, "compression method = 99"),
        "source_python_file_runs_no_code": lambda: _canary_case(
            _set(["model", "source"], {"kind": "python", "file": pyfile, "factory": "build", "kwargs": {}}),
            "model.source names a python file (canary)"),
        "module_class_outside_allowlist": lambda: _canary_case(
            _set(["modules", "2"], {"class": "os.system", "init": {"command": f"touch {CANARY_MARKER}"}}),
            "modules['2'] names os.system"),
        "source_hidden_20000x20000": lambda: _manifest_case(
            "dense", _set(["model", "source", "kwargs", "hidden"], [20000, 20000]), "hidden = [20000, 20000]"),
        "source_hidden_10e12": lambda: _manifest_case(
            "dense", _set(["model", "source", "kwargs", "hidden"], [10**12, 1]), "hidden = [10**12, 1]"),
        "source_hidden_negative": lambda: _manifest_case(
            "dense", _set(["model", "source", "kwargs", "hidden"], [-1, -1]), "hidden = [-1, -1]"),
        "source_not_a_mapping": lambda: _manifest_case(
            "dense", _set(["model", "source"], "zoo:digits-mlp"), "model.source is a string"),
        "model_info_missing": lambda: _manifest_case(
            "dense", lambda m: m.pop("model") and None, "manifest has no 'model'"),
        "model_info_not_a_mapping": lambda: _manifest_case(
            "dense", _set(["model"], []), "manifest 'model' is a list"),
        "module_linear_20000x20000": lambda: _manifest_case("dense", _set(["modules", "2"], {
            "class": "torch.nn.Linear", "init": {"in_features": 20000, "out_features": 20000}}),
            "modules['2'] = Linear(20000, 20000)"),
        "module_init_unknown_kwarg": lambda: _manifest_case("dense", _set(["modules", "2"], {
            "class": "torch.nn.Linear", "init": {"in_features": 64, "out_features": 300, "evil": 1}}),
            "modules['2'] has an unknown constructor argument"),
        "tensor_shape_20000x20000_dense": lambda: _manifest_case(
            "dense", _set([*w2, "shape"], [20000, 20000]), "tensors['2.weight'].shape = [20000, 20000]"),
        "tensor_shape_20000x20000_sparse": lambda: _manifest_case(
            "pruned", _set(["tensors", _first_tensor("pruned", "sparse"), "shape"], [20000, 20000]),
            "sparse tensor shape = [20000, 20000]"),
        "tensor_shape_10e12_sparse": lambda: _manifest_case(
            "pruned", _set(["tensors", _first_tensor("pruned", "sparse"), "shape"], [10**12]),
            "sparse tensor shape = [10**12]"),
        "tensor_shape_10e12_huffman": lambda: _manifest_case(
            "coded", _set(["tensors", _first_tensor("coded", "huffman"), "shape"], [10**12]),
            "huffman tensor shape = [10**12]"),
        "tensor_shape_not_a_list": lambda: _manifest_case(
            "dense", _set([*w2, "shape"], "300x64"), "tensors['2.weight'].shape is a string"),
        "tensor_dtype_unknown": lambda: _manifest_case(
            "dense", _set([*w2, "dtype"], "banana"), "tensors['2.weight'].dtype = 'banana'"),
        "tensor_tied_to_missing": lambda: _manifest_case(
            "dense", _set(w2, {"tied": "nothing"}), "tensors['2.weight'] tied to a missing tensor"),
        "tensor_codec_unknown": lambda: _manifest_case(
            "dense", _set([*w2, "codec"], "pickle"), "tensors['2.weight'].codec = 'pickle'"),
        "tensor_meta_not_a_mapping": lambda: _manifest_case(
            "dense", _set(w2, [1, 2]), "tensors['2.weight'] is a list"),
        "tensors_not_a_mapping": lambda: _manifest_case(
            "dense", _set(["tensors"], []), "manifest 'tensors' is a list"),
        "sparse_nnz_huge": lambda: _manifest_case(
            "pruned", _set(["tensors", _first_tensor("pruned", "sparse"), "nnz"], 10**12), "sparse nnz = 10**12"),
        "entries_not_a_mapping": lambda: _manifest_case(
            "dense", _set(["entries"], []), "manifest 'entries' is a list"),
        "entry_meta_without_size": lambda: _manifest_case(
            "dense", _set(["entries", TENSORS], {}), "entries['tensors.safetensors'] = {}"),
        "masked_unknown_parameter": lambda: _manifest_case(
            "pruned", _set(["masked"], ["2.nothing"]), "masked = ['2.nothing']"),
        "masked_not_strings": lambda: _manifest_case(
            "pruned", _set(["masked"], [5]), "masked = [5]"),
        "attrs_not_a_mapping": lambda: _manifest_case(
            "dense", _set(["attrs"], {"2": [1]}), "attrs['2'] is a list"),
        "format_version_nan": lambda: _manifest_case(
            "dense", _set(["format_version"], math.nan), "format_version = NaN"),
        "manifest_top_level_list": lambda: _raw_manifest("dense", b"[]", "manifest.json is []"),
        "manifest_deeply_nested": lambda: _raw_manifest("dense", b"[" * 5_000 + b"]" * 5_000,
                                                        "manifest.json nests 5000 lists"),
        "manifest_not_utf8": lambda: _raw_manifest("dense", b'{"format": "\xff\xfe"}', "manifest.json not UTF-8"),
        "huffman_counts_forged": _forged_counts,
        "payload_block_as_bf16": _bf16_block,
        "signature_mac_not_a_string": lambda: _signature_case({"alg": "hmac-sha256", "mac": 5}, "mac = 5"),
        "signature_mac_not_ascii": lambda: _signature_case({"alg": "hmac-sha256", "mac": "\u00e9" * 64},
                                                           "mac is 64 non-ASCII characters"),
        "signature_not_a_mapping": lambda: _signature_case(["mac"], "signature.json is a list"),
    }


# ---- self-checks: the harness itself must report escapes, cap hits and silent changes -----------------------
def _selfcheck(what: str) -> None:
    ref = REFS["dense"]

    def broken_loader():
        if what == "escape":
            return {}["no such key"]
        if what == "memory":
            return bytearray(400 * 2**20)  # past the headroom of one case
        import torch

        model = _load(ref.path)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1.0
        return model

    fz.progress(f"selfcheck {what}")
    fz.judge(f"selfcheck {what}", fz.attempt(broken_loader), _artifact_error(), "", _identical(ref))


PROPERTIES = ["byte_flips", "truncation", "entries", "manifest", "manifest_bytes", "payload", "signed"]
SELF_CHECKS = {"selfcheck_escape": "escaped KeyError", "selfcheck_memory": "memory cap hit",
               "selfcheck_identity": "loaded but weights changed silently"}


def child_setup(context: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child before the memory cap: load the references once, return the runnable cases."""
    global WORK, CANARY_MARKER
    import torch

    torch.set_num_threads(1)
    WORK = Path(context["workdir"])
    CANARY_MARKER = WORK / "canary-ran"
    (WORK / "canary.py").write_text(
        f"from pathlib import Path\nPath({str(CANARY_MARKER)!r}).write_text('ran')\n\n"
        "def build(**kwargs):\n    import torch.nn as nn\n    return nn.Identity()\n")
    for name, path in context["refs"].items():
        REFS[name] = Ref(name, Path(path))
    cases: dict[str, Any] = {name: globals()[f"fuzz_{name}"] for name in PROPERTIES}
    cases.update(_targeted())
    cases.update({name: (lambda w=name.split("_", 1)[1]: _selfcheck(w)) for name in SELF_CHECKS})
    return cases


# =========================================================================================================
# parent side: build the references, run the child once, one test per property
# =========================================================================================================
TARGETED = [
    "zip_bomb_unlisted_member", "zip_encrypted_flag", "zip_patched_data_flag", "zip_version_needed_too_high",
    "zip_unknown_compression", "source_python_file_runs_no_code", "module_class_outside_allowlist",
    "source_hidden_20000x20000", "source_hidden_10e12", "source_hidden_negative", "source_not_a_mapping",
    "model_info_missing", "model_info_not_a_mapping", "module_linear_20000x20000", "module_init_unknown_kwarg",
    "tensor_shape_20000x20000_dense", "tensor_shape_20000x20000_sparse", "tensor_shape_10e12_sparse",
    "tensor_shape_10e12_huffman", "tensor_shape_not_a_list", "tensor_dtype_unknown", "tensor_tied_to_missing",
    "tensor_codec_unknown", "tensor_meta_not_a_mapping", "tensors_not_a_mapping", "sparse_nnz_huge",
    "entries_not_a_mapping", "entry_meta_without_size", "masked_unknown_parameter", "masked_not_strings",
    "attrs_not_a_mapping", "format_version_nan", "manifest_top_level_list", "manifest_deeply_nested",
    "manifest_not_utf8", "huffman_counts_forged", "payload_block_as_bf16", "signature_mac_not_a_string",
    "signature_mac_not_ascii", "signature_not_a_mapping",
]


def build_refs(work: Path) -> dict[str, Path]:
    """The five reference artifacts, saved from real (zoo) models."""
    import slimguard as sg
    from slimguard.artifact import slim as artifact
    from slimguard.models import zoo
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.quantize.dynamic import Int8DynamicConfig
    from slimguard.transforms import prune_, quantize_

    base = zoo.load("digits-mlp", progress=False)
    refs: dict[str, Path] = {}
    refs["dense"] = artifact.save(copy.deepcopy(base), work / "dense.slim", metrics={"accuracy": 0.97},
                                  recipe={"model": "zoo:digits-mlp"}, extra_entries={"model.onnx": b"\x08\x07onnx"})
    pruned = copy.deepcopy(base)
    prune_(pruned, MagnitudePruningConfig(sparsity=0.9))
    refs["pruned"] = artifact.save(pruned, work / "pruned.slim")
    coded = copy.deepcopy(base)
    prune_(coded, MagnitudePruningConfig(sparsity=0.8))
    sg.cluster_(coded, sg.WeightSharingConfig(bits=4, bias_bits=4))
    sg.cluster_(coded, sg.HuffmanCodingConfig())
    refs["coded"] = artifact.save(coded, work / "coded.slim")
    int8 = copy.deepcopy(base)
    quantize_(int8, Int8DynamicConfig())
    refs["int8"] = artifact.save(int8, work / "int8.slim")
    refs["signed"] = artifact.save(copy.deepcopy(base), work / "signed.slim", key=KEY)
    codecs = {v.get("codec") for v in artifact.read_manifest(refs["coded"])["tensors"].values()}
    assert {"huffman", "sparse"} <= codecs | {"sparse"} and "huffman" in codecs
    assert "sparse" in {v.get("codec") for v in artifact.read_manifest(refs["pruned"])["tensors"].values()}
    assert artifact.read_manifest(refs["int8"])["modules"], "the int8 reference must replace modules"
    return refs


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("fuzz_artifact")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SLIMGUARD_SIGNING_KEY", raising=False)  # only the "signed" reference is signed
        refs = build_refs(work)
    return fz.run_child(__file__, work / "child", [*PROPERTIES, *TARGETED, *SELF_CHECKS],
                        {"workdir": str(work / "child"), "refs": {k: str(v) for k, v in refs.items()}})


@pytest.mark.parametrize("name", PROPERTIES)
def test_mutated_artifact_loads_identically_or_raises_artifact_error(report, name):
    """byte_flips / truncation / entries: bit-identical or ArtifactError; manifest / manifest_bytes /
    payload (hashes recomputed): ArtifactError or a model matching its manifest; signed: ArtifactError."""
    fz.assert_clean(report, name)


@pytest.mark.parametrize("name", TARGETED)
def test_targeted_attack_is_refused_inside_the_caps(report, name):
    fz.assert_clean(report, name)


@pytest.mark.parametrize(("name", "expected"), sorted(SELF_CHECKS.items()))
def test_the_harness_reports_what_breaks_the_property(report, name, expected):
    """A loader that leaks a KeyError, allocates past the cap, or changes weights is caught and named."""
    failures = report["results"][name]["failures"]
    assert [f["key"].split(" at ")[0].split(" in ")[0] for f in failures] == [expected], failures
    assert not report["results"][name]["harness"]


def test_fuzzing_ran_many_cases_under_a_memory_cap(report):
    results = report["results"]
    assert report["child"]["ok"], report["child"]
    assert 0 < report["cap_bytes"] < 4 * 2**30  # the cap was set (torch + headroom, far below the machine)
    assert sum(results[p]["cases"] for p in PROPERTIES) >= 400
