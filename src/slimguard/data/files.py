"""Loaders for user files: ``npz:FILE`` (arrays ``x`` and ``y``) and ``csv:FILE`` (a named label column).

Splits a user made are respected: separate files named with ``{split}`` (``npz:data-{split}.npz`` reads
``data-train.npz``, ``data-test.npz`` and, when present, ``data-val.npz``), or a ``split`` array in the npz.

Files are checked before their contents are trusted: an ``.npz`` must be a zip archive whose array
headers promise no more bytes than it holds (and at most :data:`MAX_NPZ_BYTES`), loaded without pickle;
a CSV must be UTF-8 text. Values must be finite and fit in float32, the dtype models see.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from slimguard.core.errors import DataError
from slimguard.data.core import (
    SPLIT_NAMES,
    DataBundle,
    announce_split,
    bundle_from_splits,
    make_bundle,
    register_prefix,
    user_split_indices,
)

MAX_NPZ_BYTES = 8 << 30  # uncompressed x and y together
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} file not found: {path}; check the path")
    return p


def validate_arrays(x: np.ndarray, y: np.ndarray, source: str, min_rows: int = 10) -> None:
    """Check shapes, dtypes, finiteness and labels; raise a one-line DataError otherwise. ``min_rows``: 10
    for a set slimguard splits, 1 for a split the user made."""
    if x.ndim < 2:
        raise DataError(f"{source}: x must have shape (N, features...) but has shape {tuple(x.shape)}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must have shape (N,) but has shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} rows but y has {len(y)}; they must match")
    if len(x) < min_rows:
        raise DataError(f"{source}: only {len(x)} rows; at least {min_rows} are needed"
                        + (" to split train/val/test" if min_rows > 1 else ""))
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: x has dtype {x.dtype}; it must be numeric")
    wide = x.astype(np.float64)
    bad = ~np.isfinite(wide)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{source}: x holds NaN or infinite values (first in row {row}); clean or impute them")
    huge = np.abs(wide) > _FLOAT32_MAX  # would become inf in float32, the dtype models see
    if huge.any():
        first = tuple(np.argwhere(huge)[0])
        raise DataError(f"{source}: x holds values beyond float32's range of +-3.4e38 (first in row "
                        f"{int(first[0])}: {wide[first]:.3g}); rescale them")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{source}: labels y must be integers 0..C-1, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be in 0..C-1 but the smallest is {int(y.min())}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _check_npz(p: Path, source: str) -> None:
    """Before loading: a zip archive holding ``x.npy`` and ``y.npy`` whose headers promise no more bytes
    than the archive declares for them, together at most :data:`MAX_NPZ_BYTES`."""
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if not magic:
        raise DataError(f"{source}: the file is empty; save arrays with numpy.savez(path, x=..., y=...)")
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise DataError(f"{source}: not an .npz archive (a zip of .npy arrays); save arrays with "
                        "numpy.savez(path, x=..., y=...)")
    try:
        with zipfile.ZipFile(p) as zf:
            members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
            if "x" not in members or "y" not in members:
                found = ", ".join(sorted(members)) or "nothing"
                raise DataError(f"{source}: needs arrays named 'x' and 'y'; found {found}")
            total = 0
            for key in ("x", "y", "split"):
                if key not in members:  # "split" is optional: the user's split of the rows
                    continue
                info = members[key]
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if need > info.file_size:
                    raise DataError(f"{source}: array {key!r} claims shape {shape} ({need:,} bytes) but "
                                    f"holds {info.file_size:,} bytes; the file is damaged")
                total += info.file_size
            if total > MAX_NPZ_BYTES:
                raise DataError(f"{source}: arrays of {total:,} bytes exceed the limit of "
                                f"{MAX_NPZ_BYTES:,} bytes; use a smaller sample")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
        # zipfile raises RuntimeError (encrypted) and NotImplementedError (unknown method or version)
        raise DataError(f"{source}: not a readable .npz file ({_one_line(exc)})") from None


def split_files(path: str, what: str) -> dict[str, Path] | None:
    """The files of a path written with ``{split}`` (``data-{split}.npz``): ``train`` and ``test`` must exist,
    ``val`` may; None for a path without the placeholder."""
    if "{split}" not in path:
        return None
    files = {k: Path(path.replace("{split}", k)).expanduser() for k in SPLIT_NAMES}
    for k in ("train", "test"):
        if not files[k].is_file():
            raise DataError(f"{what} file not found: {files[k]} (the {k} split of {path}); check the path")
    return {k: f for k, f in files.items() if f.is_file()}


def _read_npz(p: Path, source: str, min_rows: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    _check_npz(p, source)
    try:
        with np.load(p, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
            split = f["split"] if "split" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{source}: not a readable .npz file ({_one_line(exc)})") from None
    validate_arrays(x, y, source, min_rows)
    if split is not None and (split.ndim != 1 or len(split) != len(y)):
        raise DataError(f"{source}: 'split' must name one split per row ({len(y)} values), got shape {split.shape}")
    return x, y, split


@register_prefix("npz")
def load_npz(path: str, seed: int = 0, image: bool | None = None) -> DataBundle:
    """Arrays ``x`` (N, ...) and ``y`` (N,) from a ``.npz`` file (loaded without pickle).

    Splits the user made are kept as given: an array ``split`` (``train``/``val``/``test`` per row), or
    separate files named with ``{split}`` (``npz:digits-{split}.npz``). Otherwise the rows are split with a
    seed, stratified 60/20/20, and ``meta.splits`` says so.
    """
    files = split_files(path, "npz")
    source = f"npz:{path}"
    if files is not None:
        parts = {k: _read_npz(f, f"npz:{f}", min_rows=1)[:2] for k, f in files.items()}
        x = parts["train"][0]
    else:
        p = _existing(path, "npz")
        x, y, split = _read_npz(p, source)
    is_image = x.ndim >= 3 if image is None else image
    xs = [v[0] for v in parts.values()] if files is not None else [x]
    low = float(min(a.min() for a in xs)) if is_image else np.min([a.min(axis=0) for a in xs], axis=0).tolist()
    high = float(max(a.max() for a in xs)) if is_image else np.max([a.max(axis=0) for a in xs], axis=0).tolist()
    meta = dict(name=source, task="classification", low=low, high=high, kind="image" if is_image else "tabular",
                description=f"arrays from {Path(path).name}")
    if files is not None:
        return bundle_from_splits(parts, meta, seed)
    if split is not None:
        idx = user_split_indices([str(v) for v in split.tolist()], source)
        return bundle_from_splits({k: (x[i], y[i]) for k, i in idx.items()}, meta, seed)
    announce_split(source, seed, "add a 'split' array (train/val/test per row) or give FILE-{split}.npz files")
    return make_bundle(x.astype(np.float32), y.astype(np.int64), meta, seed)


@register_prefix("csv")
def load_csv(path: str, seed: int = 0, label: str = "label") -> DataBundle:
    """Numeric columns from a CSV with a header; ``label`` names the label column."""
    import csv

    p = _existing(path, "csv")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(f"csv:{path}: not UTF-8 text (byte {exc.start}); "
                        "save the table as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"csv:{path}: not a readable CSV file ({_one_line(exc)})") from None
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
    announce_split(f"csv:{path}", seed, "give FILE-{split}.csv files (train, val, test)")
    return make_bundle(
        x, y.astype(np.int64),
        dict(name=f"csv:{path}", task="classification", low=x.min(axis=0).tolist(),
             high=x.max(axis=0).tolist(), kind="tabular", description=f"columns {', '.join(names)} of {p.name}"),
        seed,
    )
