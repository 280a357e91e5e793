"""The ``.slim`` artifact: one zip file, loaded without pickle, written atomically, verified on load.

Entries:
    ``manifest.json``      format version, model info (how to rebuild the architecture), replaced
                           modules and changed attributes, the codec of every tensor, metrics, recipe,
                           library versions, and the sha256 and size of every other entry.
    ``manifest.sha256``    sha256 of ``manifest.json``.
    ``tensors.safetensors`` every tensor payload (dense tensors, sparse bitmaps and values, coded blocks).
    ``signature.json``     optional HMAC-SHA256 of the manifest digest (see *Signatures*).
    any extra entries given to :func:`save` (for example ``model.onnx``).

Loading rebuilds the architecture from the model info, constructs replaced modules from an allowlist
(:mod:`slimguard.core.modules`), restores changed attributes and tensor shapes (so structurally pruned
models load), decodes every tensor, and re-attaches pruning masks. A truncated, corrupted, tampered,
oversized or malformed file, or one from a newer format, is refused with an :class:`ArtifactError`
naming what failed; :func:`load` raises nothing else for a bad file.

Code (``trust_code``):
    A file never names code to run. Module classes, zoo factories and codecs are looked up by name in
    allowlists; Hugging Face sources build only transformers' own classes (no remote code). A model
    source of kind ``python`` (a user factory) is rebuilt **only** from a file the caller names:
    ``load(path, trust_code="model.py")`` (CLI: ``--trust-code model.py``). The factory is imported from
    that file, never from the path in the manifest; its name must be a plain identifier of a function
    defined in the file, its keyword arguments JSON scalars, and the file's sha256 must equal the one
    recorded at save time. Without ``trust_code`` such a file is refused, naming ``model.source``.

Signatures (``key``):
    ``save`` signs with ``key=`` (one key, or a sequence: the first signs) or else the first key in
    ``$SLIMGUARD_SIGNING_KEY`` (several keys separated by commas, whitespace around each ignored). ``load``
    accepts a signature made with *any* of the configured keys (rotation: put the new key first, keep the
    old ones after it). Once a key is configured (argument or environment), unsigned files, and signed
    files whose signature was stripped, are refused. ``require_signature=True`` refuses unsigned files even
    without a key.

Limits (``max_bytes``):
    One byte limit, ``max_bytes=`` or ``$SLIMGUARD_MAX_ARTIFACT_BYTES`` (default 64 GiB, see
    :mod:`slimguard.artifact.archive`), bounds, each checked before the work it guards: the declared
    uncompressed size of all zip entries (read from the central directory; unlisted entries are refused
    before anything is inflated; ``manifest.json`` is capped at 64 MiB), the parameters and buffers of
    the model structure (rebuilt first on the ``meta`` device, which allocates nothing, with at most
    100,000 modules), and the decoded tensors (every tensor's shape and dtype must fit the rebuilt
    parameter, and every payload part its size, before anything is decoded; see
    :mod:`slimguard.artifact.payload`).

Example:
    >>> path = save(model, "m.slim", key="k2")
    >>> model = load(path, key=["k2", "k1"])          # accepts files signed with either key
    >>> model = load("net.slim", trust_code="net.py")  # a python-source model, from your own file
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard._version import __version__
from slimguard.artifact.archive import MAX_BYTES_ENV, check_members, max_artifact_bytes, open_zip, read_member
from slimguard.artifact.manifest import validate_manifest
from slimguard.artifact.payload import CODEC_HINTS, decode_tensors, encode_state
from slimguard.codec.base import DTYPES
from slimguard.core.errors import ArtifactError, ConfigError, UserError
from slimguard.core.masks import iter_masks, set_mask
from slimguard.core.modules import (
    CONTAINERS,
    LOAD_HOOKS,
    build_module,
    is_allowlisted,
    module_spec,
    set_submodule,
)
from slimguard.core.outputs import set_default_mode
from slimguard.models.sources import SOURCES, file_sha256
from slimguard.models.spec import ATTR, ModelInfo, build, info

__all__ = ["CODEC_HINTS", "FORMAT_VERSION", "TENSORS", "LoadPolicy", "code_file", "decode_tensors",
           "encode_state", "file_size", "load", "parse_keys", "read_entry", "read_manifest", "save",
           "signing_keys"]

FORMAT = "slimguard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
TENSORS = "tensors.safetensors"
SIGNATURE = "signature.json"
SIGNING_KEY_ENV = "SLIMGUARD_SIGNING_KEY"
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_DIGEST_BYTES = 256
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_MODULES = 100_000
_RESERVED = {MANIFEST, MANIFEST_DIGEST, TENSORS, SIGNATURE}
_SCALARS = (int, float, bool, str, type(None))
Key = bytes | str | Sequence[bytes | str] | None


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
        if (
            ref is None
            or type(mod) is not type(ref)
            or (isinstance(mod, CONTAINERS) and list(mod._modules) != list(ref._modules))
        ):  # replaced: built from its spec
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


def _check_path(mpath: str) -> None:
    """A module path from a manifest: dotted names, none of them private or an nn.Module attribute."""
    for seg in mpath.split(".") if mpath else ():
        if not seg.replace("_", "a").isalnum() or seg.startswith("__") or seg in _MODULE_ATTRS:
            raise ArtifactError(f"module path {mpath!r} is not a plain dotted name of submodules")


def _check_attr(mod: nn.Module, mpath: str, name: str, value: Any) -> None:
    """An attribute a manifest may set: public plain data, not a method or property; a child module,
    parameter or buffer only to None (the model dropped it, e.g. a pooler)."""
    on_class = getattr(type(mod), name, None)
    held = name in mod._modules or name in mod._parameters or name in mod._buffers
    if (not name.isidentifier() or name.startswith("_") or name == "training"
            or (on_class is not None and not isinstance(on_class, _SCALARS)) or (held and value is not None)):
        raise ArtifactError(f"manifest.attrs[{mpath!r}] sets {name!r}, which is not a plain data attribute")


_MODULE_ATTRS = frozenset(dir(nn.Module))


# ---- signing keys ---------------------------------------------------------------------------------------
def parse_keys(text: str) -> list[bytes]:
    """Keys from one string: comma-separated, whitespace around each ignored, empty pieces dropped."""
    return [k.strip().encode() for k in text.split(",") if k.strip()]


def signing_keys(key: Key = None) -> list[bytes]:
    """The keys in force: ``key`` (one key or a sequence; the first signs), else ``$SLIMGUARD_SIGNING_KEY``
    (comma-separated), else none. An explicitly empty key is a ConfigError (it would silently not sign)."""
    if key is None:
        return parse_keys(os.environ.get(SIGNING_KEY_ENV, ""))
    keys = [key] if isinstance(key, (bytes, str)) else list(key)
    out = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
    if not out or any(not k for k in out):
        raise ConfigError("key: give a non-empty key or a sequence of non-empty keys, or leave it unset")
    return out


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """How artifacts a user names are loaded (the CLI builds one from ``--trust-code``, ``--key-env`` and
    ``--require-signature``); every field means what the :func:`load` argument of the same name means."""

    trust_code: str | None = None
    key: Key = None
    require_signature: bool = False
    max_bytes: int | None = None

    def load(self, path: str | os.PathLike[str]) -> nn.Module:
        return load(path, key=self.key, require_signature=self.require_signature, trust_code=self.trust_code,
                    max_bytes=self.max_bytes)


# ---- save -------------------------------------------------------------------------------------------------
def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _versions() -> dict[str, str]:
    import platform

    import safetensors

    return {"slimguard": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _model_record(mi: ModelInfo) -> dict[str, Any]:
    record = mi.to_dict()
    src = record["source"]
    if src.get("kind") == "python" and not src.get("sha256"):  # a source made before hashes were recorded
        src["sha256"] = file_sha256(src["file"])
    return record


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    extra_entries: dict[str, bytes] | None = None,
    codec_hints: dict[str, Any] | None = None,
    key: Key = None,
) -> Path:
    """Write ``model`` to a ``.slim`` file atomically and return its path.

    Args:
        model: a model carrying slimguard info (zoo, python, hf sources and their transforms). A python
            source records the sha256 of its file, checked when the file is trusted at load time.
        path: destination; its directory is created.
        metrics, recipe: JSON-able records stored in the manifest.
        extra_entries: more files to store (name -> bytes), e.g. ``{"model.onnx": ...}``.
        codec_hints: ``{tensor_name: (codec_name, options)}`` overriding the automatic choice.
        key: HMAC key, or keys (the first signs); default the first of ``$SLIMGUARD_SIGNING_KEY``;
            unsigned when neither is set.
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
        "model": _model_record(mi),
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
    keys = signing_keys(key)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                zf.writestr(MANIFEST, mbytes)
                zf.writestr(MANIFEST_DIGEST, digest.encode())
                for name, blob in entries.items():
                    zf.writestr(name, blob)
                if keys:
                    mac = hmac.new(keys[0], digest.encode(), hashlib.sha256).hexdigest()
                    zf.writestr(SIGNATURE, json.dumps({"alg": "hmac-sha256", "mac": mac}).encode())
            fh.flush()
            os.fsync(fh.fileno())
        set_default_mode(tmp)  # mkstemp made it 0600; give it the umask's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---- open: limits, hashes, schema -------------------------------------------------------------------------
def _parse_manifest(path: Path, mbytes: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(mbytes)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: entry {MANIFEST!r} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ArtifactError(f"{path}: not a slimguard artifact (format {got!r})")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: made with artifact format {version}, newer than this slimguard reads ({FORMAT_VERSION}); "
            "upgrade slimguard"
        )
    manifest = validate_manifest(raw, str(path))
    version = manifest["format_version"]  # an int now: the schema is strict
    if version < 1:
        raise ArtifactError(f"{path}: manifest.format_version: {version} is not a format slimguard wrote")
    return manifest


def _open(path: Path | str, max_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read and verify every entry, limits first (see the module docstring); return (manifest, entries)."""
    path = Path(path)
    limit = max_artifact_bytes(max_bytes)
    zf, infos = open_zip(path)
    with zf:
        for required in (MANIFEST, MANIFEST_DIGEST):
            if required not in infos:
                raise ArtifactError(f"{path}: entry {required!r} is missing; the file is damaged or not a .slim")
        mcap = min(MAX_MANIFEST_BYTES, limit)
        mbytes = read_member(zf, infos[MANIFEST], mcap, path)
        dbytes = read_member(zf, infos[MANIFEST_DIGEST], MAX_DIGEST_BYTES, path)
        digest = _sha256(mbytes)
        if dbytes.decode(errors="replace").strip() != digest:
            raise ArtifactError(f"{path}: entry {MANIFEST!r} failed its sha256 check; the file was altered")
        manifest = _parse_manifest(path, mbytes)
        listed = manifest["entries"]
        clash = sorted(set(listed) & {MANIFEST, MANIFEST_DIGEST, SIGNATURE})
        if clash:
            raise ArtifactError(f"{path}: manifest.entries lists the reserved entry {clash[0]!r}")
        check_members(path, infos, {n: m["size"] for n, m in listed.items()},
                      {MANIFEST: mcap, MANIFEST_DIGEST: MAX_DIGEST_BYTES, SIGNATURE: MAX_SIGNATURE_BYTES},
                      limit)
        blobs: dict[str, bytes] = {MANIFEST: mbytes, MANIFEST_DIGEST: dbytes}
        for name, meta in listed.items():
            blob = read_member(zf, infos[name], meta["size"], path)
            if len(blob) != meta["size"] or _sha256(blob) != meta["sha256"]:
                raise ArtifactError(f"{path}: entry {name!r} failed its sha256 check; the file was altered")
            blobs[name] = blob
        if SIGNATURE in infos:
            blobs[SIGNATURE] = read_member(zf, infos[SIGNATURE], MAX_SIGNATURE_BYTES, path)
    blobs["__digest__"] = digest.encode()
    return manifest, blobs


def _verify_signature(path: Path, blobs: dict[str, bytes], keys: list[bytes], require: bool) -> bool:
    """True when verified; see *Signatures* in the module docstring for the policy."""
    sig = blobs.get(SIGNATURE)
    if sig is None:
        if keys:
            raise ArtifactError(f"{path}: artifact is not signed, but a signing key is configured (key=, "
                                f"--key-env or {SIGNING_KEY_ENV}); unsigned or stripped files are refused")
        if require:
            raise ArtifactError(f"{path}: artifact is not signed, but a signature was required")
        return False
    if not keys:
        if require:
            raise ArtifactError(f"{path}: a signature is present but no key was given to check it; pass "
                                f"key=, --key-env or set {SIGNING_KEY_ENV}")
        return False
    try:
        record = json.loads(sig)
        if record["alg"] != "hmac-sha256":
            raise ValueError(record["alg"])
        mac = str(record["mac"]).encode("ascii")
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeError):
        raise ArtifactError(f"{path}: entry {SIGNATURE!r} is malformed") from None
    for k in keys:
        if hmac.compare_digest(mac, hmac.new(k, blobs["__digest__"], hashlib.sha256).hexdigest().encode()):
            return True
    raise ArtifactError(f"{path}: signature check failed; the file was tampered with or the key is wrong")


def read_manifest(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> dict[str, Any]:
    """The verified, schema-checked manifest of an artifact (every entry checked, limits applied)."""
    manifest, _ = _open(Path(path), max_bytes)
    return manifest


def read_entry(path: str | os.PathLike[str], name: str, *, max_bytes: int | None = None) -> bytes:
    """One verified entry (e.g. ``model.onnx``)."""
    manifest, blobs = _open(Path(path), max_bytes)
    if name not in manifest["entries"]:
        raise ArtifactError(f"{path}: no entry {name!r}; entries: {', '.join(sorted(manifest['entries']))}")
    return blobs[name]


# ---- load: trust, structure, sizes, then tensors ------------------------------------------------------
def _trusted_source(path: Path, source: dict[str, Any],
                    trust_code: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The source to build from: a python source gets the caller's file, checked against its sha256."""
    if source["kind"] != "python":
        return source
    if trust_code is None:
        raise ArtifactError(
            f"{path}: manifest entry model.source names Python code ({source['file']}:{source['factory']}), "
            "which runs only from a file you name: load(path, trust_code='model.py') or --trust-code model.py"
        )
    file = Path(trust_code).expanduser().resolve()
    try:
        digest, recorded = file_sha256(file), source.get("sha256")
    except OSError:
        msg = f"trust_code: {trust_code} is not a readable file; name the model's .py file"
        raise ArtifactError(msg) from None
    if recorded is not None and recorded != digest:
        raise ArtifactError(f"{path}: trust_code file {file} has sha256 {digest}, but the artifact recorded "
                            f"{recorded} for {source['file']}; pass the file the model was saved from")
    return {**source, "file": str(file), "sha256": digest}


@contextlib.contextmanager
def _module_budget(where: Path) -> Iterator[None]:
    """Refuse to construct more than MAX_MODULES submodules (in this thread) while the block runs."""
    from torch.nn.modules.module import register_module_module_registration_hook

    count, me = 0, threading.get_ident()

    def hook(module: nn.Module, name: str, submodule: nn.Module) -> None:
        nonlocal count
        if threading.get_ident() == me:
            count += 1
            if count > MAX_MODULES:
                raise ArtifactError(f"{where}: the model would have over {MAX_MODULES:,} modules; refused")

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _rebuild(where: Path, manifest: dict[str, Any], source: dict[str, Any]) -> nn.Module:
    """The architecture with replaced modules and changed attributes (tensors not loaded yet).

    A leaf module of an allowlisted class whose attributes changed (a Linear whose ``out_features`` was
    pruned) is constructed again from its new attributes, so its tensors have exactly the stored shapes.
    """
    with _module_budget(where):
        model = build(source)
        for mpath, spec in manifest["modules"].items():
            _check_path(mpath)
            model = set_submodule(model, mpath, build_module(spec))
        for mpath, changed in manifest["attrs"].items():
            _check_path(mpath)
            mod = model.get_submodule(mpath) if mpath else model
            for k, v in changed.items():
                _check_attr(mod, mpath, k, v)
                setattr(mod, k, tuple(v) if isinstance(v, list) else v)
            if is_allowlisted(mod) and not mod._modules:
                new = build_module(module_spec(mod))
                for k, v in changed.items():
                    setattr(new, k, tuple(v) if isinstance(v, list) else v)
                model = set_submodule(model, mpath, new)
    return model


def _check_structure(where: Path, manifest: dict[str, Any], skeleton: nn.Module, limit: int) -> None:
    """Before any tensor is allocated: parameter bytes under the limit, and every manifest tensor, tie and
    mask matching a parameter or buffer of the rebuilt module by name, shape and dtype. Shapes are exact
    for modules of allowlisted classes (rebuilt from their stored arguments); a tensor of another class
    (a user layer pruned in place) may be smaller in each dimension, never larger. Floating dtypes may
    differ (half precision)."""
    total = sum(t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()])
    if total > limit:
        raise ArtifactError(f"{where}: the model's parameters and buffers take {total:,} bytes, over the "
                            f"limit of {limit:,}; raise max_bytes= or {MAX_BYTES_ENV} if the file is trusted")
    state, tensors = skeleton.state_dict(), manifest["tensors"]
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise ArtifactError(f"{where}: tensor {missing[0]!r} is missing from the artifact")
    extra = sorted(set(tensors) - set(state))
    if extra:
        raise ArtifactError(f"{where}: artifact tensor {extra[0]!r} has no place in the rebuilt model")
    for key, meta in tensors.items():
        want = list(state[key].shape)
        src = tensors.get(meta["tied"]) if "tied" in meta else meta
        if src is None or "tied" in src:
            raise ArtifactError(f"{where}: tensor {key!r} is tied to {meta['tied']!r}, not a stored tensor")
        mpath = key.rpartition(".")[0]
        exact = is_allowlisted(skeleton.get_submodule(mpath) if mpath else skeleton)
        if src["shape"] != want and (exact or len(src["shape"]) != len(want)
                                     or any(a > b for a, b in zip(src["shape"], want, strict=True))):
            raise ArtifactError(f"{where}: manifest.tensors[{key!r}].shape is {src['shape']}, but the "
                                f"rebuilt model's tensor is {want}")
        dtype, ref = DTYPES[src["dtype"]], state[key].dtype
        if dtype != ref and not (dtype.is_floating_point and ref.is_floating_point):
            raise ArtifactError(f"{where}: manifest.tensors[{key!r}].dtype is {src['dtype']}, the rebuilt "
                                f"model holds {str(ref).removeprefix('torch.')}")
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for qname in manifest["masked"]:
        if qname not in params:
            raise ArtifactError(f"{where}: manifest.masked names {qname!r}, not a parameter of the model")


def _skeleton(where: Path, manifest: dict[str, Any], source: dict[str, Any]) -> nn.Module | None:
    """The structure built on the meta device (allocates nothing); None for a trusted python factory that
    cannot build there (its structure is then checked right after the real build)."""
    try:
        with torch.device("meta"):
            return _rebuild(where, manifest, source)
    except ArtifactError:
        raise
    except Exception:
        if source["kind"] == "python":
            return None
        raise


def load(
    path: str | os.PathLike[str],
    *,
    key: Key = None,
    require_signature: bool = False,
    trust_code: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
) -> nn.Module:
    """Load a ``.slim`` artifact into a model (eval mode) that carries its info, without pickle.

    Args:
        path: the ``.slim`` file.
        key: key, or keys, a signature may be made with (default ``$SLIMGUARD_SIGNING_KEY``, comma-separated).
            Once any key is configured, an unsigned (or stripped) file is refused.
        require_signature: refuse unsigned files even when no key is configured.
        trust_code: the Python file to rebuild a ``python`` model source from (its sha256 must match the
            recorded one); such files are refused without it. Ignored for other sources.
        max_bytes: byte limit for entries, parameters and decoded tensors (default
            ``$SLIMGUARD_MAX_ARTIFACT_BYTES`` or 64 GiB).

    Raises:
        ArtifactError: missing, truncated, corrupted, tampered, malformed, over a limit, unsigned when a
            signature is required, python code without ``trust_code``, or written by a newer format.
            Nothing else is raised for a bad file.

    Example:
        >>> model = load("model.slim", key=os.environ["MY_KEYS"].split(","), max_bytes=2**30)
    """
    p = Path(path)
    limit = max_artifact_bytes(max_bytes)
    keys = signing_keys(key)
    manifest, blobs = _open(p, limit)
    _verify_signature(p, blobs, keys, require_signature)
    source = _trusted_source(p, manifest["model"]["source"], trust_code)
    try:
        skeleton = _skeleton(p, manifest, source)
        if skeleton is not None:
            _check_structure(p, manifest, skeleton, limit)
        del skeleton
        model = _rebuild(p, manifest, source)
        if source["kind"] == "python":
            _check_structure(p, manifest, model, limit)
        state = decode_tensors(manifest, blobs.get(TENSORS, b""), str(p), limit)
        for k, v in state.items():
            _assign(model, k, v)
        for qname in manifest["masked"]:
            mpath, _, pname = qname.rpartition(".")
            mod = model.get_submodule(mpath) if mpath else model
            set_mask(mod, pname, getattr(mod, pname) != 0)
        mi = ModelInfo.from_dict({**manifest["model"], "source": source})
        object.__setattr__(model, ATTR, mi)
        for _, hook in LOAD_HOOKS.items():
            hook(model, manifest)
    except ArtifactError:
        raise
    except Exception as exc:  # a file these checks let through but the model cannot take
        detail = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise ArtifactError(f"{p}: cannot rebuild the model ({detail})".replace("\n", " ")) from None
    model.eval()
    return model


def code_file(model: nn.Module) -> str | None:
    """The Python file a model of a ``python`` source was built from (a file its user named), to pass as
    ``trust_code`` when reloading that model's own artifact; None for other sources."""
    source = info(model).source
    return str(source["file"]) if source.get("kind") == "python" else None


@SOURCES.register("slim")
def _slim_source(path: str, *, policy: LoadPolicy | None = None, **_: Any) -> nn.Module:
    """The model source for a ``.slim`` path (see :func:`slimguard.models.sources.load_model`)."""
    return (policy or LoadPolicy()).load(path)


def file_size(model: nn.Module, **save_kwargs: Any) -> int:
    """Bytes of the ``.slim`` file this model would be saved as (written to a temporary file)."""
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.slim", **save_kwargs).stat().st_size
