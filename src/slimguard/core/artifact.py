"""The ``.slim`` artifact: one zip file, loaded without pickle, written atomically, verified on load.

Entries:
    ``manifest.json``      format version, model info (how to rebuild the architecture), replaced
                           modules and changed attributes, the codec of every tensor, metrics, recipe,
                           library versions, and the sha256 and size of every other entry.
    ``manifest.sha256``    sha256 of ``manifest.json``.
    ``tensors.safetensors`` every tensor payload (dense tensors, sparse bitmaps and values, coded blocks).
    ``signature.json``     optional HMAC-SHA256 of the manifest digest (``key=`` / ``SLIMGUARD_SIGNING_KEY``).
    any extra entries given to :func:`save` (for example ``model.onnx``).

Loading rebuilds the architecture from the model info, constructs replaced modules from an allowlist
(:mod:`slimguard.core.modules`), restores changed attributes and tensor shapes (so structurally pruned
models load), decodes every tensor, and re-attaches pruning masks. A truncated, corrupted or tampered
file, or one from a newer format, is refused with an :class:`ArtifactError` naming what failed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard._version import __version__
from slimguard.codec.base import Encoded, auto_encode, codec
from slimguard.core.errors import ArtifactError
from slimguard.core.modules import CONTAINERS, build_module, module_spec
from slimguard.models.spec import ATTR, ModelInfo, build, info
from slimguard.prune.masks import iter_masks, set_mask

FORMAT = "slimguard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
TENSORS = "tensors.safetensors"
SIGNATURE = "signature.json"
CODEC_HINTS = "_slimguard_codecs"
_RESERVED = {MANIFEST, MANIFEST_DIGEST, TENSORS, SIGNATURE}
_SCALARS = (int, float, bool, str, type(None))


# ---- what changed relative to the freshly built architecture -------------------------------------------
def _is_scalar_attr(v: Any) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (tuple, list)) and len(v) <= 16 and all(isinstance(e, (int, float, bool)) for e in v)


def _public_attrs(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and _is_scalar_attr(v)}


def _module_diff(model: nn.Module, base: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Modules to construct (parents first) and scalar attributes to set, so that ``base`` becomes
    structurally equal to ``model``."""
    records: dict[str, Any] = {}
    attrs: dict[str, Any] = {}

    def walk(path: str, mod: nn.Module, ref: nn.Module | None) -> None:
        replaced = (
            ref is None
            or type(mod) is not type(ref)
            or (isinstance(mod, CONTAINERS) and list(mod._modules) != list(ref._modules))
        )
        if replaced:
            spec = module_spec(mod)
            records[path] = spec
            ref = build_module(spec)
        mine, theirs = _public_attrs(mod), _public_attrs(ref)
        changed = {k: list(v) if isinstance(v, tuple) else v for k, v in mine.items() if theirs.get(k, object()) != v}
        if changed:
            attrs[path] = changed
        for name, child in mod._modules.items():
            if child is not None:
                walk(f"{path}.{name}" if path else name, child, ref._modules.get(name))

    walk("", model, base)
    return records, attrs


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, nn.ModuleList | nn.Sequential | nn.ModuleDict):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)
    return root


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mpath, _, tname = key.rpartition(".")
    mod = model.get_submodule(mpath) if mpath else model
    if tname in mod._parameters:
        old = mod._parameters[tname]
        mod._parameters[tname] = nn.Parameter(value, requires_grad=bool(old is None or old.requires_grad)
                                              and value.is_floating_point())
    elif tname in mod._buffers:
        mod._buffers[tname] = value
    else:
        raise ArtifactError(f"artifact tensor {key!r} has no place in the rebuilt model")


# ---- save -------------------------------------------------------------------------------------------------
def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _versions() -> dict[str, str]:
    import platform

    import safetensors

    return {"slimguard": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _signing_key(key: bytes | str | None) -> bytes | None:
    key = key if key is not None else os.environ.get("SLIMGUARD_SIGNING_KEY")
    if key is None or key == "":
        return None
    return key.encode() if isinstance(key, str) else key


def encode_state(model: nn.Module, hints: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Encoded]]:
    """Encode every state_dict tensor with its codec. Returns (tensor table, encoded)."""
    hints = {**getattr(model, CODEC_HINTS, {}), **(hints or {})}
    table: dict[str, Any] = {}
    encoded: dict[str, Encoded] = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if id(t) in seen and t.data_ptr() != 0:  # tied tensors are stored once
            table[key] = {"tied": seen[id(t)]}
            continue
        seen[id(t)] = key
        if key in hints:
            name, opts = hints[key]
            enc = codec(name).encode(t, **opts)
        else:
            name, enc = auto_encode(t)
        table[key] = {"codec": name, **enc.header}
        encoded[key] = enc
    return table, encoded


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    extra_entries: dict[str, bytes] | None = None,
    codec_hints: dict[str, Any] | None = None,
    key: bytes | str | None = None,
) -> Path:
    """Write ``model`` to a ``.slim`` file atomically and return its path.

    Args:
        model: a model carrying slimguard info (zoo, python, hf sources and their transforms).
        path: destination; its directory is created.
        metrics, recipe: JSON-able records stored in the manifest.
        extra_entries: more files to store (name -> bytes), e.g. ``{"model.onnx": ...}``.
        codec_hints: ``{tensor_name: (codec_name, options)}`` overriding the automatic choice.
        key: HMAC key to sign with (default ``$SLIMGUARD_SIGNING_KEY``; unsigned when neither is set).
    """
    from safetensors.torch import save as st_save

    mi = info(model)
    base = build(mi.source)
    records, attrs = _module_diff(model, base)
    table, encoded = encode_state(model, codec_hints)
    payload: dict[str, torch.Tensor] = {}
    for tkey, enc in encoded.items():
        for part, value in enc.parts.items():
            t = torch.frombuffer(bytearray(value), dtype=torch.uint8) if isinstance(value, bytes) else value
            payload[f"{tkey}::{part}"] = t.detach().contiguous().cpu()
            table[tkey].setdefault("parts", {})[part] = "bytes" if isinstance(value, bytes) else "tensor"
    tensor_bytes = st_save(payload) if payload else b""
    entries: dict[str, bytes] = {TENSORS: tensor_bytes}
    for name, blob in (extra_entries or {}).items():
        if name in _RESERVED or name.startswith("/") or ".." in name.split("/"):
            raise ArtifactError(f"extra entry name {name!r} is reserved or unsafe")
        entries[name] = blob
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "model": mi.to_dict(),
        "modules": records,
        "attrs": attrs,
        "tensors": table,
        "masked": [name for name, *_ in iter_masks(model)],
        "metrics": metrics or {},
        "recipe": recipe or {},
        "entries": {n: {"sha256": _sha256(b), "size": len(b)} for n, b in entries.items()},
    }
    mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    digest = _sha256(mbytes)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    skey = _signing_key(key)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                zf.writestr(MANIFEST, mbytes)
                zf.writestr(MANIFEST_DIGEST, digest.encode())
                for name, blob in entries.items():
                    zf.writestr(name, blob)
                if skey is not None:
                    mac = hmac.new(skey, digest.encode(), hashlib.sha256).hexdigest()
                    zf.writestr(SIGNATURE, json.dumps({"alg": "hmac-sha256", "mac": mac}).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---- load -------------------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read and verify every entry; return (manifest, entries)."""
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}; check the path")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable .slim file, it may be truncated ({exc})") from None
    blobs: dict[str, bytes] = {}
    with zf:
        names = zf.namelist()
        for required in (MANIFEST, MANIFEST_DIGEST):
            if required not in names:
                raise ArtifactError(f"{path}: entry {required!r} is missing; the file is damaged or not a .slim")
        for name in names:
            try:
                blobs[name] = zf.read(name)
            except Exception as exc:  # a bad CRC, a cut-off stream, a broken header: all corruption
                raise ArtifactError(f"{path}: entry {name!r} is corrupted ({exc})") from None
    mbytes = blobs[MANIFEST]
    digest = _sha256(mbytes)
    if blobs[MANIFEST_DIGEST].decode(errors="replace").strip() != digest:
        raise ArtifactError(f"{path}: entry {MANIFEST!r} failed its sha256 check; the file was altered")
    try:
        manifest = json.loads(mbytes)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: entry {MANIFEST!r} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a slimguard artifact (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: made with artifact format {version}, newer than this slimguard reads ({FORMAT_VERSION}); "
            "upgrade slimguard"
        )
    listed = manifest.get("entries", {})
    for name, meta in listed.items():
        if name not in blobs:
            raise ArtifactError(f"{path}: entry {name!r} is missing")
        if len(blobs[name]) != meta["size"] or _sha256(blobs[name]) != meta["sha256"]:
            raise ArtifactError(f"{path}: entry {name!r} failed its sha256 check; the file was altered")
    extra = sorted(set(blobs) - set(listed) - {MANIFEST, MANIFEST_DIGEST, SIGNATURE})
    if extra:
        raise ArtifactError(f"{path}: unexpected entry {extra[0]!r} not listed in the manifest; refusing it")
    blobs["__digest__"] = digest.encode()
    return manifest, blobs


def _verify_signature(path: Path, blobs: dict[str, bytes], key: bytes | str | None, require: bool) -> bool:
    skey = _signing_key(key)
    sig = blobs.get(SIGNATURE)
    if sig is None:
        if require or key is not None:
            raise ArtifactError(f"{path}: artifact is not signed, but a signature was required")
        return False
    if skey is None:
        if require:
            raise ArtifactError(f"{path}: a signature is present but no key was given to check it")
        return False
    try:
        mac = json.loads(sig)["mac"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{path}: entry {SIGNATURE!r} is malformed") from None
    want = hmac.new(skey, blobs["__digest__"], hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, want):
        raise ArtifactError(f"{path}: signature check failed; the file was tampered with or the key is wrong")
    return True


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest of an artifact (every entry checked)."""
    manifest, _ = _open(Path(path))
    return manifest


def read_entry(path: str | os.PathLike[str], name: str) -> bytes:
    """One verified extra entry (e.g. ``model.onnx``)."""
    manifest, blobs = _open(Path(path))
    if name not in manifest["entries"]:
        raise ArtifactError(f"{path}: no entry {name!r}; entries: {', '.join(sorted(manifest['entries']))}")
    return blobs[name]


def decode_tensors(manifest: dict[str, Any], tensor_blob: bytes, where: str = "") -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        payload = st_load(tensor_blob) if tensor_blob else {}
    except Exception as exc:
        raise ArtifactError(f"{where}: entry {TENSORS!r} cannot be decoded ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for key, meta in manifest["tensors"].items():
        if "tied" in meta:
            tied[key] = meta["tied"]
            continue
        parts: dict[str, Any] = {}
        for part, kind in meta.get("parts", {}).items():
            t = payload.get(f"{key}::{part}")
            if t is None:
                raise ArtifactError(f"{where}: payload of tensor {key!r} ({part}) is missing")
            parts[part] = t.numpy().tobytes() if kind == "bytes" else t
        header = {k: v for k, v in meta.items() if k not in ("codec", "parts")}
        try:
            t = codec(meta["codec"]).decode(header, parts)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: tensor {key!r}: {exc}") from None
        if list(t.shape) != list(meta["shape"]):
            raise ArtifactError(f"{where}: tensor {key!r} decoded to shape {list(t.shape)}, not {meta['shape']}")
        state[key] = t
    for key, src in tied.items():
        state[key] = state[src]
    return state


def load(
    path: str | os.PathLike[str], *, key: bytes | str | None = None, require_signature: bool = False
) -> nn.Module:
    """Load a ``.slim`` artifact into a model (eval mode) that carries its info, without pickle.

    Raises:
        ArtifactError: missing, truncated, corrupted, tampered, unsigned when a signature is required,
            or written by a newer format.
    """
    p = Path(path)
    manifest, blobs = _open(p)
    _verify_signature(p, blobs, key, require_signature)
    mi = ModelInfo.from_dict(manifest["model"])
    try:
        model = build(mi.source)
        for mpath, spec in manifest.get("modules", {}).items():
            model = _set_submodule(model, mpath, build_module(spec))
        for mpath, changed in manifest.get("attrs", {}).items():
            mod = model.get_submodule(mpath) if mpath else model
            for k, v in changed.items():
                setattr(mod, k, tuple(v) if isinstance(v, list) else v)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{p}: cannot rebuild the model ({type(exc).__name__}: {exc})") from None
    state = decode_tensors(manifest, blobs.get(TENSORS, b""), str(p))
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise ArtifactError(f"{p}: tensor {missing[0]!r} is missing from the artifact")
    for k, v in state.items():
        _assign(model, k, v)
    for qname in manifest.get("masked", []):
        mpath, _, pname = qname.rpartition(".")
        mod = model.get_submodule(mpath) if mpath else model
        set_mask(mod, pname, getattr(mod, pname) != 0)
    object.__setattr__(model, ATTR, mi)
    for hook in _LOAD_HOOKS:
        hook(model, manifest)
    model.eval()
    return model


_LOAD_HOOKS: list[Any] = []


def register_load_hook(fn: Any) -> Any:
    """``fn(model, manifest)`` runs after every load (e.g. to re-pack quantized weights)."""
    _LOAD_HOOKS.append(fn)
    return fn


def file_size(model: nn.Module, **save_kwargs: Any) -> int:
    """Bytes of the ``.slim`` file this model would be saved as (written to a temporary file)."""
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.slim", **save_kwargs).stat().st_size


