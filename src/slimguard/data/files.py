"""Loaders for user files: ``npz:FILE`` (arrays ``x`` and ``y``) and ``csv:FILE`` (a named label column)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimguard.core.errors import DataError
from slimguard.data.core import DataBundle, make_bundle, register_prefix


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} file not found: {path}; check the path")
    return p


def validate_arrays(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """Check shapes, dtypes, finiteness and labels; raise a one-line DataError otherwise."""
    if x.ndim < 2:
        raise DataError(f"{source}: x must have shape (N, features...) but has shape {tuple(x.shape)}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must have shape (N,) but has shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} rows but y has {len(y)}; they must match")
    if len(x) < 10:
        raise DataError(f"{source}: only {len(x)} rows; at least 10 are needed to split train/val/test")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: x has dtype {x.dtype}; it must be numeric")
    bad = ~np.isfinite(x.astype(np.float64))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{source}: x holds NaN or infinite values (first in row {row}); clean or impute them")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{source}: labels y must be integers 0..C-1, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be in 0..C-1 but the smallest is {int(y.min())}")


@register_prefix("npz")
def load_npz(path: str, seed: int = 0, image: bool | None = None) -> DataBundle:
    """Arrays ``x`` (N, ...) and ``y`` (N,) from a ``.npz`` file (loaded without pickle)."""
    p = _existing(path, "npz")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"npz:{path}: needs arrays named 'x' and 'y'; found {', '.join(f.files)}")
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"npz:{path}: not a readable .npz file ({exc})") from None
    validate_arrays(x, y, f"npz:{path}")
    is_image = x.ndim >= 3 if image is None else image
    x = x.astype(np.float32)
    low, high = (float(x.min()), float(x.max())) if is_image else (x.min(axis=0).tolist(), x.max(axis=0).tolist())
    return make_bundle(
        x, y.astype(np.int64),
        dict(name=f"npz:{path}", task="classification", low=low, high=high,
             kind="image" if is_image else "tabular", description=f"arrays from {p.name}"),
        seed,
    )


@register_prefix("csv")
def load_csv(path: str, seed: int = 0, label: str = "label") -> DataBundle:
    """Numeric columns from a CSV with a header; ``label`` names the label column."""
    import csv

    p = _existing(path, "csv")
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError(f"csv:{path}: the file is empty")
    header, body = rows[0], rows[1:]
    if label not in header:
        raise DataError(f"csv:{path}: no label column {label!r}; columns: {', '.join(header)}")
    li = header.index(label)
    try:
        data = np.array([[float(v) if v.strip() else np.nan for v in r] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"csv:{path}: non-numeric value ({exc}); encode categories as numbers") from None
    if data.ndim != 2 or data.shape[1] != len(header):
        raise DataError(f"csv:{path}: rows have differing numbers of columns")
    y = data[:, li]
    x = np.delete(data, li, axis=1)
    validate_arrays(x, y, f"csv:{path}")
    x = x.astype(np.float32)
    names = [h for i, h in enumerate(header) if i != li]
    return make_bundle(
        x, y.astype(np.int64),
        dict(name=f"csv:{path}", task="classification", low=x.min(axis=0).tolist(),
             high=x.max(axis=0).tolist(), kind="tabular", description=f"columns {', '.join(names)} of {p.name}"),
        seed,
    )
