"""Per-tensor view of a model or artifact: shape, params, sparsity, codec, bits per weight, bytes.

Codecs that define ``describe(encoded) -> dict`` add their own columns (the ``huffman`` codec adds the
columns of the Deep Compression tables: kept weights, cluster bits, index and position bits per weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

if TYPE_CHECKING:
    from slimguard.artifact import LoadPolicy


def inspect_model(source: str | nn.Module, *, policy: LoadPolicy | None = None) -> dict[str, Any]:
    """Per-tensor rows and totals of a model, a model source, or a ``.slim`` file (loaded under ``policy``:
    see :class:`~slimguard.artifact.LoadPolicy`; a python-source artifact needs ``trust_code``)."""
    from slimguard.artifact import encode_state
    from slimguard.codec.base import codec
    from slimguard.models.sources import load_model

    file_bytes = None
    if isinstance(source, nn.Module):
        model = source
    else:
        model = load_model(source, progress=False, policy=policy)
        if str(source).endswith(".slim"):
            file_bytes = Path(source).stat().st_size
    modules = dict(model.named_modules())
    table, encoded = encode_state(model)
    rows = []
    for key, meta in table.items():
        if "tied" in meta:
            continue
        t = model.state_dict()[key]
        mpath = key.rpartition(".")[0]
        enc = encoded[key]
        nnz = int((t != 0).sum())
        rows.append({
            "tensor": key, "module_type": type(modules.get(mpath, model)).__name__, "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."), "params": t.numel(), "nonzero": nnz,
            "sparsity": 1 - nnz / max(1, t.numel()), "codec": meta["codec"],
            "bits_per_weight": round(8 * enc.nbytes() / max(1, t.numel()), 3), "stored_bytes": enc.nbytes(),
            **({"bits": meta["bits"]} if "bits" in meta else {}),
            **_described(codec(meta["codec"]), enc, t.numel(), nnz),
        })
    totals = {"params": sum(r["params"] for r in rows), "nonzero": sum(r["nonzero"] for r in rows),
              "stored_bytes": sum(r["stored_bytes"] for r in rows), "file_bytes": file_bytes}
    return {"tensors": rows, "totals": totals}


def _described(c: Any, enc: Any, numel: int, nonzero: int) -> dict[str, Any]:
    """Extra columns from a codec's ``describe`` (if it has one); per-kept-weight bits count nonzeros."""
    describe = getattr(c, "describe", None)
    if describe is None:
        return {}
    d = describe(enc)
    kept = max(1, nonzero)
    return {
        "kept_percent": round(100 * nonzero / max(1, numel), 2), "bits": d.get("bits"),
        "clusters": d.get("clusters"), "layout": d.get("layout"), "gap_bits": d.get("gap_bits"),
        "index_bits_per_weight": round(d.get("index_bits_total", 0) / kept, 3),
        "position_bits_per_weight": round(d.get("position_bits_total", 0) / kept, 3),
        "bits_per_kept_weight": round(8 * enc.nbytes() / kept, 3),
        "compression": round(32 * numel / max(1, 8 * enc.nbytes()), 1),
    }
