"""Text data for embedding models, from what ships locally (nothing downloaded).

``docs-text``: English sentences and short paragraphs taken from the docstrings of the Python
standard library (a fixed list of modules) and the data set descriptions that scikit-learn ships.
Real technical prose, 6 to ~120 words; deduplicated, sorted, then split with a seed into
train (60%), val (10%) and test (30%). Exact contents follow the installed Python and scikit-learn.

``text:FILE``: one text per line of a UTF-8 file.

``jsonl:FILE`` (objects with ``text`` and ``label``) and ``tsv:FILE`` (a header with ``text`` and ``label``):
labelled texts for text classifiers. A ``split`` field or column, or files named with ``{split}``
(``jsonl:reviews-{split}.jsonl``), keep the user's splits.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from slimguard.core.errors import DataError
from slimguard.data.core import (
    SPLIT_NAMES,
    DataBundle,
    DataMeta,
    Split,
    announce_split,
    bundle_from_splits,
    register_dataset,
    register_prefix,
    stratified_split,
    user_split_indices,
)

_MODULES = (
    "json collections itertools functools os pathlib re string textwrap argparse logging subprocess threading "
    "asyncio email http.client urllib.parse unittest typing dataclasses decimal fractions random statistics "
    "datetime calendar csv sqlite3 zipfile tarfile shutil tempfile heapq bisect enum abc contextlib inspect ast "
    "dis pickle copy pprint difflib io socket ssl select selectors signal queue sched base64 hashlib hmac "
    "secrets uuid xml.etree.ElementTree html.parser configparser gettext locale codecs unicodedata struct array "
    "weakref gc traceback warnings operator math cmath numbers glob fnmatch linecache tokenize shlex optparse "
    "getopt platform smtplib imaplib ftplib poplib mailbox mimetypes wave colorsys pdb timeit trace cProfile "
    "profile pstats doctest concurrent.futures multiprocessing ipaddress zlib gzip bz2 lzma"
).split()
_BAD = re.compile(r"[{}\[\]=<>|\\`]")


def _docstrings() -> list[str]:
    docs: list[str] = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from this Python build
            continue
        docs.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for a2, o2 in sorted(vars(obj).items()):
                    if not a2.startswith("_") and inspect.isfunction(o2):
                        docs.append(inspect.getdoc(o2) or "")
    try:
        import sklearn.datasets

        descr = Path(sklearn.datasets.__file__).parent / "descr"
        for f in sorted(descr.glob("*.rst")):
            docs.append(f.read_text(errors="ignore"))
    except ImportError:
        pass
    return docs


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """All texts of ``docs-text``, deduplicated and sorted."""
    texts: set[str] = set()
    for doc in _docstrings():
        for para in re.split(r"\n\s*\n", doc):
            if ">>>" in para or para.strip().startswith(("..", ":", "-", "*", "=", "|")):
                continue
            flat = " ".join(para.split())
            sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
                         if 6 <= len(s.split()) <= 80 and s[0].isupper() and s.endswith((".", "?", "!"))
                         and not _BAD.search(s)]
            texts.update(sentences)
            if len(sentences) >= 3:  # a longer paragraph as well, for long inputs
                chunk = " ".join(sentences)
                if len(chunk.split()) <= 120:
                    texts.add(chunk)
    return tuple(sorted(texts))


def _text_bundle(texts: list[str], name: str, seed: int, description: str) -> DataBundle:
    if len(texts) < 10:
        raise DataError(f"{name}: only {len(texts)} texts; at least 10 are needed to split train/val/test")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))
    n_tr, n_va = int(0.6 * len(texts)), int(0.1 * len(texts))
    meta = DataMeta(name=name, task="embedding", input_shape=(), num_classes=0, mean=[], std=[], low=0.0,
                    high=0.0, seed=seed, description=description, kind="text")

    def split(n: str, ids: np.ndarray) -> Split:
        return Split(n, [texts[i] for i in ids], None, meta)

    train = split("train", idx[:n_tr])
    return DataBundle(meta=meta, train=train, val=split("val", idx[n_tr : n_tr + n_va]),
                      test=split("test", idx[n_tr + n_va :]), calib=train.subset(256, seed=seed, name="calib"))


@register_dataset("docs-text", "English sentences/paragraphs from stdlib docstrings and sklearn docs (embedding)")
def docs_text(seed: int = 0) -> DataBundle:
    return _text_bundle(list(corpus()), "docs-text", seed,
                        "sentences and short paragraphs from Python standard-library docstrings and "
                        "scikit-learn data set descriptions")


@register_prefix("text")
def load_text(path: str, seed: int = 0) -> DataBundle:
    """One text per line of a UTF-8 file (blank lines skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file not found: {path}; check the path")
    raw = p.read_bytes()
    fix = "give a UTF-8 text file, one text per line"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"text:{path}: not UTF-8 text (byte {exc.start}); {fix}") from None
    if b"\x00" in raw:  # valid UTF-8 can still be a binary file
        raise DataError(f"text:{path}: a binary file (NUL byte at {raw.index(0)}), not text; {fix}")
    lines = [ln.strip() for ln in text.splitlines()]
    return _text_bundle([ln for ln in lines if ln], f"text:{path}", seed, f"lines of {p.name}")


# ---- labelled text: jsonl:FILE and tsv:FILE --------------------------------------------------------------
MAX_TEXT_FILE_BYTES = 1 << 30


def _read_utf8(p: Path, source: str) -> str:
    if p.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise DataError(f"{source}: over {MAX_TEXT_FILE_BYTES:,} bytes; use a smaller sample")
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _jsonl_rows(p: Path, source: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_utf8(p, source).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{source}: line {n} is not JSON; write one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise DataError(f"{source}: line {n} needs a string 'text' and a 'label'; got {line[:60]!r}")
        rows.append(row)
    return rows


def _tsv_rows(p: Path, source: str) -> list[dict[str, Any]]:
    lines = [ln for ln in _read_utf8(p, source).splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{source}: the file is empty")
    header = lines[0].split("\t")
    for col in ("text", "label"):
        if col not in header:
            raise DataError(f"{source}: no {col!r} column in the header row; columns: {', '.join(header)}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise DataError(f"{source}: line {n} has {len(cells)} columns, the header {len(header)}")
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _labelled_text(path: str, seed: int, kind: str, read: Any) -> DataBundle:
    """Texts with labels, split as the user split them (files named with ``{split}``, or a ``split`` field),
    else seeded and stratified 60/20/20. Labels are integers 0..C-1, or names (sorted into ids)."""
    source = f"{kind}:{path}"
    if "{split}" in path:
        files = {k: Path(path.replace("{split}", k)).expanduser() for k in SPLIT_NAMES}
        for k in ("train", "test"):
            if not files[k].is_file():
                raise DataError(f"{kind} file not found: {files[k]} (the {k} split of {path}); check the path")
        per_split = {k: read(f, source) for k, f in files.items() if f.is_file()}
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"{kind} file not found: {path}; check the path")
        rows = read(p, source)
        if rows and "split" in rows[0]:
            idx = user_split_indices([str(r.get("split", "")) for r in rows], source)
            per_split = {k: [rows[i] for i in v.tolist()] for k, v in idx.items()}
        else:
            per_split = {"all": rows}
    labels = [r["label"] for rows in per_split.values() for r in rows]
    if len(labels) < 10:
        raise DataError(f"{source}: only {len(labels)} rows; at least 10 are needed")
    numeric = all((isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                  or (isinstance(v, str) and v.strip().isdigit()) for v in labels)
    names = sorted({str(v) for v in labels}, key=lambda v: int(v) if numeric else v)
    names = [n.strip() for n in names] if numeric else names
    ids = {n: int(n) for n in names} if numeric else {n: i for i, n in enumerate(names)}
    meta = dict(name=source, task="classification", low=0.0, high=0.0, kind="text",
                description=f"labelled texts of {Path(path).name}",
                class_names=[str(i) for i in range(max(ids.values()) + 1)] if numeric else names)

    def arrays(rows: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
        keys = [str(r["label"]).strip() if numeric else str(r["label"]) for r in rows]
        return [str(r["text"]) for r in rows], np.array([ids[k] for k in keys], dtype=np.int64)

    if "all" in per_split:
        announce_split(source, seed, f"add a 'split' field (train/val/test) or give FILE-{{split}}.{kind} files")
        texts, y = arrays(per_split["all"])
        tr, va, te = stratified_split(y, seed)
        parts = {"train": ([texts[i] for i in tr], y[tr]), "val": ([texts[i] for i in va], y[va]),
                 "test": ([texts[i] for i in te], y[te])}
        bundle = bundle_from_splits(parts, meta, seed)
        bundle.meta.splits = f"seeded stratified 60/20/20 (seed {seed})"
        return bundle
    return bundle_from_splits({k: arrays(v) for k, v in per_split.items()}, meta, seed)


@register_prefix("jsonl")
def load_jsonl(path: str, seed: int = 0) -> DataBundle:
    """Labelled texts, one JSON object per line with ``text`` and ``label`` (and optionally ``split``:
    train, val or test); or separate files named with ``{split}`` (``jsonl:reviews-{split}.jsonl``)."""
    return _labelled_text(path, seed, "jsonl", _jsonl_rows)


@register_prefix("tsv")
def load_tsv(path: str, seed: int = 0) -> DataBundle:
    """Labelled texts from a tab-separated file whose header names ``text`` and ``label`` columns (and
    optionally ``split``); or separate files named with ``{split}``."""
    return _labelled_text(path, seed, "tsv", _tsv_rows)
