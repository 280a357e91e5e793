"""The codec registry and the two basic codecs, ``dense`` and ``sparse``."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import torch

from slimguard.core.errors import ArtifactError
from slimguard.core.registry import Registry

Part = torch.Tensor | bytes


@dataclasses.dataclass
class Encoded:
    """A coded tensor: a JSON-able ``header`` (must hold ``shape`` and ``dtype``) and payload ``parts``."""

    header: dict[str, Any]
    parts: dict[str, Part]

    def nbytes(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.numel() * p.element_size() for p in self.parts.values())


class Codec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor, **options: Any) -> Encoded: ...

    def decode(self, header: dict[str, Any], parts: dict[str, Part]) -> torch.Tensor: ...


CODECS: Registry[Codec] = Registry("tensor codec", error=ArtifactError)
"""Codec name (as a manifest records it) -> codec."""


def register_codec(c: Codec) -> Codec:
    """Make ``c`` known under ``c.name``; another codec under a taken name is refused (ValueError)."""
    return CODECS.register(c.name, c)


def codec(name: str) -> Codec:
    """The codec named ``name``; ArtifactError naming the known codecs otherwise."""
    return CODECS.get(name)


def codec_names() -> list[str]:
    return CODECS.names()


DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


def dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ArtifactError(f"unsupported tensor dtype {name!r} in artifact")
    return DTYPES[name]


class DenseCodec:
    name = "dense"

    def encode(self, tensor: torch.Tensor, **options: Any) -> Encoded:
        t = tensor.detach().contiguous().cpu()
        return Encoded({"shape": list(t.shape), "dtype": dtype_name(t.dtype)}, {"data": t})

    def decode(self, header: dict[str, Any], parts: dict[str, Part]) -> torch.Tensor:
        t = parts["data"]
        assert torch.is_tensor(t)
        return t.reshape(header["shape"])


class SparseCodec:
    """Bitmap of nonzeros (1 bit per entry, packed) plus the nonzero values in their own dtype."""

    name = "sparse"

    def encode(self, tensor: torch.Tensor, **options: Any) -> Encoded:
        t = tensor.detach().contiguous().cpu()
        flat = t.reshape(-1)
        nz = flat != 0
        bitmap = np.packbits(nz.numpy().astype(np.uint8))
        header = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "nnz": int(nz.sum())}
        return Encoded(header, {"bitmap": torch.from_numpy(bitmap), "values": flat[nz].clone()})

    def decode(self, header: dict[str, Any], parts: dict[str, Part]) -> torch.Tensor:
        shape = header["shape"]
        n = int(np.prod(shape)) if shape else 1
        bitmap, values = parts["bitmap"], parts["values"]
        assert torch.is_tensor(bitmap) and torch.is_tensor(values)
        nz = torch.from_numpy(np.unpackbits(bitmap.numpy(), count=n).astype(bool))
        if int(nz.sum()) != values.numel() or values.numel() != header["nnz"]:
            raise ArtifactError("sparse tensor payload does not match its bitmap")
        out = torch.zeros(n, dtype=dtype_of(header["dtype"]))
        out[nz] = values
        return out.reshape(shape)


register_codec(DenseCodec())
register_codec(SparseCodec())


def auto_encode(tensor: torch.Tensor) -> tuple[str, Encoded]:
    """``sparse`` when it saves at least 10% over ``dense``, else ``dense``."""
    dense = codec("dense").encode(tensor)
    if tensor.numel() >= 64 and tensor.dtype != torch.bool:
        density = float((tensor != 0).float().mean())
        if density < 0.9 - 1.0 / (8 * tensor.element_size()):
            return "sparse", codec("sparse").encode(tensor)
    return "dense", dense
