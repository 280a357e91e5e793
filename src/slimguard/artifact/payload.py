"""Tensor payloads of a ``.slim`` artifact: encoding, and decoding with every size checked first.

All tensors live in one ``tensors.safetensors`` entry as named parts (``<tensor>::<part>``). Before a
single tensor is allocated, the safetensors header is read on its own and every part is checked against
the manifest: a ``dense`` part holds exactly ``numel * itemsize`` bytes of the manifest's dtype, a
``sparse`` bitmap has ``ceil(numel / 8)`` bytes and ``nnz <= numel`` values, a ``huffman`` block declares
the manifest's element count and at most that many coded values and gaps; every coded part is at most
``2 * numel * itemsize + 64 KiB`` bytes, and the decoded total is under the artifact byte limit. So the
memory a decode takes is bounded by the tensors the manifest declares, which the loader has already
matched against the rebuilt model's parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from slimguard.artifact.archive import MAX_BYTES_ENV, max_artifact_bytes
from slimguard.codec.base import DTYPES, Encoded, auto_encode, codec
from slimguard.core.errors import ArtifactError, UserError
from slimguard.core.registry import Registry

CODEC_HINTS = "_slimguard_codecs"
CODED_SLACK = 64 * 1024  # bytes a coded tensor may take beyond twice its raw size (tables, codebooks)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors JSON header
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def encode_state(model: nn.Module,
                 hints: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Encoded]]:
    """Encode every state_dict tensor with its codec. Returns (tensor table, encoded)."""
    hints = {**getattr(model, CODEC_HINTS, {}), **(hints or {})}
    table: dict[str, Any] = {}
    encoded: dict[str, Encoded] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        # tied tensors (GPT-2's lm_head and embedding) are stored once: the same memory, shape and strides
        view = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.data_ptr() != 0 else (id(t),)
        if view in seen:
            table[key] = {"tied": seen[view]}
            continue
        seen[view] = key
        if key in hints:
            name, opts = hints[key]
            enc = codec(name).encode(t, **opts)
        else:
            name, enc = auto_encode(t)
        table[key] = {"codec": name, **enc.header}
        encoded[key] = enc
    return table, encoded


# ---- the payload's index, read without loading a tensor ------------------------------------------------
class Part:
    """One stored part as its safetensors header declares it (``nbytes`` = numel * itemsize)."""

    def __init__(self, dtype: torch.dtype, shape: list[int], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end
        self.numel = math.prod(shape)
        self.nbytes = self.numel * torch.empty(0, dtype=dtype).element_size()


def payload_index(blob: bytes, where: str) -> dict[str, Part]:
    """Names, dtypes, shapes and byte ranges of the parts in a safetensors blob, from its header only."""
    if not blob:
        return {}
    if len(blob) < 8:
        raise ArtifactError(f"{where}: entry 'tensors.safetensors' is truncated ({len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n > min(len(blob) - 8, MAX_HEADER_BYTES):
        raise ArtifactError(f"{where}: entry 'tensors.safetensors' declares a {n}-byte header it lacks")
    try:
        header = json.loads(blob[8 : 8 + n])
        parts: dict[str, Part] = {}
        data_len = len(blob) - 8 - n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = (int(v) for v in meta["data_offsets"])
            shape = [int(d) for d in meta["shape"]]
            part = Part(_ST_DTYPES[meta["dtype"]], shape, start, end)
            if min(shape, default=0) < 0 or not 0 <= start <= end <= data_len or end - start != part.nbytes:
                raise ValueError(f"part {name!r} has inconsistent offsets")
            parts[name] = part
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ArtifactError(f"{where}: entry 'tensors.safetensors' has a malformed header ({exc})") from None
    return parts


# ---- per-codec size checks, before decoding ------------------------------------------------------------
PayloadCheck = Callable[[dict[str, Any], dict[str, Part], memoryview, int], None]
PAYLOAD_CHECKS: Registry[PayloadCheck] = Registry("payload check", error=ArtifactError)
"""Codec name -> the check of its parts' sizes, run before anything is decoded."""


def register_payload_check(codec_name: str) -> Callable[[PayloadCheck], PayloadCheck]:
    """Decorator: ``fn(meta, parts, data, numel)`` raises ValueError when a coded tensor's parts cannot
    decode to ``numel`` elements (``data`` is the blob's data section; ``parts[p].start/end`` index it)."""
    return PAYLOAD_CHECKS.register(codec_name)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


@register_payload_check("dense")
def _check_dense(meta: dict[str, Any], parts: dict[str, Part], data: memoryview, numel: int) -> None:
    d = parts["data"]
    _expect(d.dtype == DTYPES[meta["dtype"]], f"data is {d.dtype}, the manifest says {meta['dtype']}")
    _expect(d.numel == numel, f"data holds {d.numel} elements, the shape needs {numel}")


@register_payload_check("sparse")
def _check_sparse(meta: dict[str, Any], parts: dict[str, Part], data: memoryview, numel: int) -> None:
    bitmap, values, nnz = parts["bitmap"], parts["values"], meta.get("nnz")
    _expect(bitmap.dtype == torch.uint8 and bitmap.numel == (numel + 7) // 8,
            f"bitmap holds {bitmap.numel} bytes, the shape needs {(numel + 7) // 8}")
    _expect(type(nnz) is int and 0 <= nnz <= numel, f"nnz {nnz!r} is not a count of at most {numel}")
    _expect(values.dtype == DTYPES[meta["dtype"]] and values.numel == nnz,
            f"values hold {values.numel} {values.dtype} elements, the header says {nnz} {meta['dtype']}")


@register_payload_check("huffman")
def _check_huffman(meta: dict[str, Any], parts: dict[str, Part], data: memoryview, numel: int) -> None:
    from slimguard.codec.huffman import parse_block

    block = parts["block"]
    info = parse_block(bytes(data[block.start : block.end]), decode=False)  # header, tables, crc32
    _expect(info["numel"] == numel, f"block holds {info['numel']} elements, the shape needs {numel}")
    kept = info["kept"] + info["fillers"]  # every coded value and gap advances at least one place
    _expect(kept <= numel, f"block codes {kept} values and gaps for {numel} elements")
    # at most 256 symbols: an optimal (Huffman) code never needs more than 8 bits a symbol
    _expect(info["index_bits_total"] <= 8 * info["kept"] and info["position_bits_total"] <= 8 * kept,
            "block declares more coded bits than an optimal code of its symbols needs")


_PARTS = {"dense": {"data": "tensor"}, "sparse": {"bitmap": "tensor", "values": "tensor"},
          "huffman": {"block": "bytes"}}


def check_payload(manifest: dict[str, Any], blob: bytes, where: str, max_bytes: int) -> dict[str, Part]:
    """Check every tensor's parts against the manifest before anything is decoded; return the index.

    Raises ArtifactError naming the tensor when a part is missing, unexpected, of the wrong dtype or size,
    or when the decoded tensors would take more than ``max_bytes``.
    """
    index = payload_index(blob, where)
    data = memoryview(blob)[8 + int.from_bytes(blob[:8], "little"):] if blob else memoryview(b"")
    used: set[str] = set()
    total = 0
    for key, meta in manifest["tensors"].items():
        if "tied" in meta:
            continue
        numel = math.prod(meta["shape"])
        raw = numel * torch.empty(0, dtype=DTYPES[meta["dtype"]]).element_size()
        total += raw
        if total > max_bytes:
            raise ArtifactError(f"{where}: decoded tensors would take more than {max_bytes:,} bytes at "
                                f"{key!r}; raise max_bytes= or {MAX_BYTES_ENV} if the file is trusted")
        declared = meta.get("parts", {})
        expected = _PARTS.get(meta["codec"])
        try:
            codec(meta["codec"])
            if expected is not None and declared != expected:
                raise ValueError(f"parts {sorted(declared)} are not the codec's {sorted(expected)}")
            parts = {}
            for part, kind in declared.items():
                name = f"{key}::{part}"
                if name not in index:
                    raise ValueError(f"part {part!r} is missing from the payload")
                if kind == "bytes" and (index[name].dtype != torch.uint8 or len(index[name].shape) != 1):
                    raise ValueError(f"part {part!r} is not a byte string")
                parts[part] = index[name]
                used.add(name)
            stored = sum(p.nbytes for p in parts.values())
            if stored > 2 * raw + CODED_SLACK:
                raise ValueError(f"parts take {stored} bytes for a {raw}-byte tensor")
            if meta["codec"] in PAYLOAD_CHECKS:
                PAYLOAD_CHECKS.get(meta["codec"])(meta, parts, data, numel)
        except (ValueError, ArtifactError) as exc:
            raise ArtifactError(f"{where}: tensor {key!r} ({meta['codec']}): {exc}") from None
    extra = sorted(set(index) - used)
    if extra:
        raise ArtifactError(f"{where}: payload part {extra[0]!r} is not in the manifest; refusing it")
    return index


def decode_tensors(manifest: dict[str, Any], tensor_blob: bytes, where: str = "",
                   max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Decode every tensor of a (schema-checked) manifest from the ``tensors.safetensors`` entry.

    Sizes are checked by :func:`check_payload` first; ``max_bytes`` defaults to the artifact limit
    (``SLIMGUARD_MAX_ARTIFACT_BYTES``, see :mod:`slimguard.artifact.archive`).
    """
    from safetensors.torch import load as st_load

    check_payload(manifest, tensor_blob, where, max_artifact_bytes(max_bytes))
    try:
        payload = st_load(tensor_blob) if tensor_blob else {}
    except Exception as exc:
        raise ArtifactError(f"{where}: entry 'tensors.safetensors' cannot be decoded ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for key, meta in manifest["tensors"].items():
        if "tied" in meta:
            tied[key] = meta["tied"]
            continue
        header = {k: v for k, v in meta.items() if k not in ("codec", "parts")}
        try:
            parts = {part: payload[f"{key}::{part}"].numpy().tobytes() if kind == "bytes"
                     else payload[f"{key}::{part}"] for part, kind in meta.get("parts", {}).items()}
            t = codec(meta["codec"]).decode(header, parts)
        except UserError as exc:
            raise ArtifactError(f"{where}: tensor {key!r}: {exc}") from None
        except Exception as exc:  # a payload the checks let through but the codec cannot read
            raise ArtifactError(
                f"{where}: tensor {key!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if list(t.shape) != list(meta["shape"]) or t.dtype != DTYPES[meta["dtype"]]:
            raise ArtifactError(f"{where}: tensor {key!r} decoded to {list(t.shape)} {t.dtype}, "
                                f"not {meta['shape']} {meta['dtype']}")
        state[key] = t
    for key, src in tied.items():
        if src not in state:
            raise ArtifactError(f"{where}: tensor {key!r} is tied to {src!r}, which the artifact lacks")
        state[key] = state[src]
    return state
