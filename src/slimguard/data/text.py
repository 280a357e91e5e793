"""Text data for embedding models, from what ships locally (nothing downloaded).

``docs-text``: English sentences and short paragraphs taken from the docstrings of the Python
standard library (a fixed list of modules) and the data set descriptions that scikit-learn ships.
Real technical prose, 6 to ~120 words; deduplicated, sorted, then split with a seed into
train (60%), val (10%) and test (30%). Exact contents follow the installed Python and scikit-learn.

``text:FILE``: one text per line of a UTF-8 file.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from pathlib import Path

import numpy as np

from slimguard.core.errors import DataError
from slimguard.data.core import DataBundle, DataMeta, Split, register_dataset, register_prefix

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
