"""The built-in English corpus for language models, from what is installed here (nothing downloaded).

Documents, each kept whole:

* docstrings of Python's standard library (the modules :mod:`slimguard.data.text` reads, one document per
  module, class or function docstring) and the scikit-learn data set descriptions it ships;
* for every installed distribution (``importlib.metadata``): its long description (the README that
  ``METADATA`` carries) and the docstrings of its Python files, read with :mod:`ast` (no package is
  imported, no code runs), at most :data:`MAX_FILES_PER_DIST` files of at most :data:`MAX_FILE_BYTES`
  each, in path order.

Cleaning: paragraphs of licence boilerplate (copyright lines, "Permission is hereby granted", Apache /
MIT / BSD / GPL notices, SPDX tags, warranty disclaimers) are removed, as are paragraphs that are mostly
code, markup or tables (doctest prompts, badges, HTML, few letters); paragraphs are deduplicated across the
whole corpus (first one kept, in a sorted document order), then documents shorter than
:data:`MIN_DOC_CHARS` are dropped and identical documents are kept once.

The cleaned documents are cached as JSON (``corpus-KEY.json`` under ``$SLIMGUARD_CACHE`` or the user
cache directory; ``KEY`` hashes the Python version, the installed distributions and their versions, and
the settings here), since reading them takes about half a minute; a cache file that does not parse or
check out is rebuilt.

Split: BY DOCUMENT (never a document in two splits) with a seeded permutation: 90% train, 5% val,
5% test. slimguard's own package is left out, so editing this project never changes the corpus. The exact
text follows the installed Python and packages; :func:`corpus_fingerprint` hashes it, so caches built on
it (tokenizer, ``zoo:docs-lm``) notice a change.

The split documents are also the data set ``docs-corpus`` (task ``causal-lm``; ``zoo:docs-lm`` is trained on
it): ``slimguard evaluate zoo:docs-lm --data docs-corpus`` scores the test documents by perplexity.

Example:
    >>> train = load_corpus("train")            # list of documents (str)
    >>> len(load_corpus("test")) > 0
    True
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from slimguard.core.errors import DataError
from slimguard.core.outputs import write_json_atomic
from slimguard.data import text as _text
from slimguard.data.core import DataBundle, DataMeta, Split, register_dataset

SPLITS = ("train", "val", "test")
FRACTIONS = (0.90, 0.05, 0.05)
CORPUS_VERSION = 1
CACHE_FORMAT = "slimguard-corpus"
MAX_CACHE_BYTES = 256 << 20
MAX_FILES_PER_DIST = 80
MAX_FILE_BYTES = 400_000
MIN_DOC_CHARS = 80
DEFAULT_SEED = 0
_SKIP_DISTS = frozenset({"slimguard"})

_LICENCE = re.compile(
    r"copyright\s*(\(c\)|©|\d{4})|all rights reserved|permission is hereby granted|licensed under|"
    r"apache license|mit license|bsd license|gnu (lesser |affero )?general public license|spdx-license|"
    r"without warranties or conditions|warranties of merchantability|\"as is\"|'as is'|as is basis|"
    r"redistribution and use in source|this program is free software|license-file|"
    r"you may not use this file except|the above copyright notice|liable for any claim",
    re.IGNORECASE)
_MARKUP = re.compile(r">>>|\[!\[|<img|<a |</|^\s*[|+]-|```|\.\. (code|image|figure|raw|toctree)|^\s*\$ ",
                     re.MULTILINE)


_UNDERLINE = re.compile(r"^\s*[-=~^*]{3,}\s*$", re.MULTILINE)


def _clean_paragraph(para: str) -> str | None:
    """One paragraph as a single line of prose, or None when it is licence text, code, markup or a table."""
    flat = " ".join(_UNDERLINE.sub("", para).split())
    if len(flat) < 20 or _LICENCE.search(flat) or _MARKUP.search(para):
        return None
    letters = sum(c.isalpha() or c == " " for c in flat)
    if letters < 0.8 * len(flat) or len(flat.split()) < 4:
        return None
    return flat


def _file_docstrings(path: Path) -> list[str]:
    """Docstrings of a Python file's module, classes and functions (parsed, never imported)."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError, RecursionError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
    return out


def _distribution_documents() -> list[tuple[str, str]]:
    """``(key, text)`` of every installed distribution's description and file docstrings."""
    docs: list[tuple[str, str]] = []
    seen: set[str] = set()
    dists = sorted(md.distributions(), key=lambda d: (str(d.metadata["Name"] or "").lower(), str(d.version)))
    for dist in dists:
        name = str(dist.metadata["Name"] or "").lower()
        if not name or name in _SKIP_DISTS or name in seen:
            continue
        seen.add(name)
        meta: Any = dist.metadata  # an email.message.Message underneath: the README is its payload
        desc = meta.get_payload() or meta.get("Description") or ""
        if isinstance(desc, str) and desc.strip():
            docs.append((f"{name}:README", desc))
        files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".py") and "/tests/" not in str(f)
                       and not str(f).startswith(("..", "/")))
        for rel in files[:MAX_FILES_PER_DIST]:
            path = Path(str(dist.locate_file(rel)))
            for i, doc in enumerate(_file_docstrings(path)):
                docs.append((f"{name}:{rel}:{i}", doc))
    return docs


def _stdlib_documents() -> list[tuple[str, str]]:
    return [(f"stdlib:{i}", doc) for i, doc in enumerate(_text._docstrings()) if doc]


def _cache_dir() -> Path:
    env = os.environ.get("SLIMGUARD_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("slimguard"))


def _environment_key() -> str:
    """Hash of everything the corpus text depends on: Python, the distributions, the settings here."""
    dists = sorted((str(d.metadata["Name"] or "").lower(), str(d.version)) for d in md.distributions())
    blob = json.dumps([CORPUS_VERSION, sys.version, dists, MAX_FILES_PER_DIST, MAX_FILE_BYTES, MIN_DOC_CHARS,
                       sorted(_SKIP_DISTS), _text._MODULES])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_cache(path: Path, key: str) -> tuple[str, ...] | None:
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return None
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    docs = payload.get("documents")
    if (payload.get("format") != CACHE_FORMAT or payload.get("key") != key or not isinstance(docs, list)
            or not all(isinstance(d, str) for d in docs)):
        return None
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def corpus_documents() -> tuple[str, ...]:
    """Every cleaned, deduplicated document of the corpus, in a fixed (sorted-key) order (cached on disk)."""
    key = _environment_key()
    path = _cache_dir() / f"corpus-{key}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    docs = _build_documents()
    try:
        write_json_atomic(path, {"format": CACHE_FORMAT, "key": key, "documents": list(docs)})
    except OSError:  # a read-only cache only costs the rebuild next time
        pass
    return docs


def _build_documents() -> tuple[str, ...]:
    raw = sorted(_stdlib_documents() + _distribution_documents())
    seen_paras: set[str] = set()
    seen_docs: set[str] = set()
    docs: list[str] = []
    for _key, doc in raw:
        paras = []
        for para in re.split(r"\n\s*\n", doc.replace("\r\n", "\n")):
            flat = _clean_paragraph(para)
            if flat is None:
                continue
            norm = flat.lower()
            if norm in seen_paras:
                continue
            seen_paras.add(norm)
            paras.append(flat)
        text = "\n\n".join(paras)
        if len(text) >= MIN_DOC_CHARS and text not in seen_docs:
            seen_docs.add(text)
            docs.append(text)
    return tuple(docs)


@functools.lru_cache(maxsize=4)
def _splits(seed: int) -> dict[str, tuple[str, ...]]:
    docs = corpus_documents()
    if len(docs) < 20:
        raise DataError(f"the built-in corpus has only {len(docs)} documents; at least 20 are needed "
                        "(is the Python standard library installed with its docstrings?)")
    idx = np.random.default_rng(seed).permutation(len(docs))
    n_tr = int(FRACTIONS[0] * len(docs))
    n_va = int(FRACTIONS[1] * len(docs))
    parts = {"train": idx[:n_tr], "val": idx[n_tr : n_tr + n_va], "test": idx[n_tr + n_va :]}
    return {k: tuple(docs[i] for i in sorted(v.tolist())) for k, v in parts.items()}


def load_corpus(split: str, *, seed: int = DEFAULT_SEED) -> list[str]:
    """The documents of one split of the built-in English corpus (see the module docstring).

    Args:
        split: ``"train"`` (90% of the documents), ``"val"`` (5%) or ``"test"`` (5%).
        seed: the seed of the document split (default 0); each seed gives a disjoint train/val/test.

    Returns:
        A new list of documents (paragraphs separated by a blank line), in corpus order.

    Raises:
        DataError: an unknown split name, or a corpus too small to split.
    """
    if split not in SPLITS:
        raise DataError(f"corpus split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
    return list(_splits(seed)[split])


def corpus_fingerprint(seed: int = DEFAULT_SEED) -> str:
    """A short sha256 of the split corpus: changes when the installed packages change its text."""
    h = hashlib.sha256()
    for name in SPLITS:
        for doc in _splits(seed)[name]:
            h.update(name.encode())
            h.update(doc.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()[:16]


@register_dataset("docs-corpus", "English documents from installed docstrings and READMEs (language models)")
def docs_corpus(seed: int = DEFAULT_SEED) -> DataBundle:
    """The corpus as a data bundle of text splits (one document per example); calib: 64 train documents."""
    meta = DataMeta(name="docs-corpus", task="causal-lm", input_shape=(), num_classes=0, mean=[], std=[], low=0.0,
                    high=0.0, seed=seed, kind="text",
                    description="documents (docstrings, README descriptions) of the installed Python packages")
    parts = {name: Split(name, load_corpus(name, seed=seed), None, meta) for name in SPLITS}
    return DataBundle(meta=meta, train=parts["train"], val=parts["val"], test=parts["test"],
                      calib=parts["train"].subset(64, seed=seed, name="calib"))
