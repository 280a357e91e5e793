"""``docs-prose``: a large English text set for distilling sentence embedders, disjoint from what they are
judged on.

``docs-text`` (:mod:`slimguard.data.text`) is small (about 2,000 training texts): enough to score an
embedder, too little to distill one. ``docs-prose`` adds the built-in corpus (:mod:`slimguard.data.corpus`,
installed packages' docstrings and READMEs):

* **train**: the corpus's TRAIN documents cut into passages of 1 to :data:`MAX_SENTENCES` consecutive
  sentences of one paragraph (at most :data:`MAX_WORDS` words), plus ``docs-text``'s train texts;
* **val**, **test**, **calib**: ``docs-text``'s own (same seed), so a score on ``docs-prose`` is a score on
  ``docs-text``.

Both sources read the standard library's docstrings, so a ``docs-text`` validation or test sentence can also
sit in a corpus document. :func:`held_out_sentences` collects every sentence of the val and test texts, and
:func:`passages` drops every sentence in that set before it builds passages (a ``docs-text`` train text
holding one is dropped whole), so no text the student trains on contains a sentence it is selected or
judged on. Sentences are cut as ``docs-text`` cuts them (:func:`split_sentences`) and compared with their
whitespace collapsed.

Example:
    >>> bundle = sg.data.load("docs-prose")
    >>> len(bundle.train) > 10 * len(sg.data.load("docs-text").train)
    True
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import numpy as np

from slimguard.data.core import DataBundle, DataMeta, Split, register_dataset

MAX_SENTENCES = 4
MAX_WORDS = 120
MIN_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """``text`` with its whitespace collapsed, cut into sentences where ``docs-text`` cuts them (after
    ``.``, ``!`` or ``?`` and whitespace, before a capital letter)."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s] if flat else []


def held_out_sentences(*splits: Iterable[str]) -> frozenset[str]:
    """Every sentence (and every whole text) of the given splits' texts, whitespace collapsed."""
    out: set[str] = set()
    for texts in splits:
        for text in texts:
            out.add(" ".join(text.split()))
            out.update(split_sentences(text))
    return frozenset(out)


def passages(documents: Iterable[str], held_out: frozenset[str], seed: int = 0) -> list[str]:
    """Documents cut into passages of consecutive sentences of one paragraph, none of them in ``held_out``.

    A paragraph (text between blank lines) is cut into sentences (:func:`split_sentences`); sentences in
    ``held_out`` are removed, and the rest are grouped in order into passages of a seeded random 1 to
    :data:`MAX_SENTENCES` sentences, cut short at :data:`MAX_WORDS` words. A passage never spans a removed
    sentence. Passages under :data:`MIN_WORDS` words are dropped; the result is deduplicated, in order.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}

    def emit(run: list[str]) -> None:
        i = 0
        while i < len(run):
            want, words, j = int(rng.integers(1, MAX_SENTENCES + 1)), 0, i
            while j < len(run) and j - i < want and (j == i or words + len(run[j].split()) <= MAX_WORDS):
                words += len(run[j].split())
                j += 1
            text = " ".join(run[i:j])
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                out.setdefault(text, None)
            i = j

    for doc in documents:
        for para in re.split(r"\n\s*\n", doc):
            run: list[str] = []
            for sentence in split_sentences(para):
                if sentence in held_out:
                    emit(run)
                    run = []
                else:
                    run.append(sentence)
            emit(run)
    return list(out)


def clean_texts(texts: Iterable[str], held_out: frozenset[str]) -> list[str]:
    """``texts`` without those that are, or contain a sentence, in ``held_out``."""
    return [t for t in texts if " ".join(t.split()) not in held_out
            and not any(s in held_out for s in split_sentences(t))]


@functools.lru_cache(maxsize=2)
def _train_texts(seed: int) -> tuple[str, ...]:
    from slimguard.data.corpus import load_corpus
    from slimguard.data.text import docs_text

    ref = docs_text(seed)
    held = held_out_sentences(ref.val.x, ref.test.x)
    texts = dict.fromkeys(passages(load_corpus("train", seed=seed), held, seed=seed))
    texts.update(dict.fromkeys(clean_texts(ref.train.x, held)))
    return tuple(texts)


@register_dataset("docs-prose", "docs-text plus the built-in corpus as passages, held-out sentences removed "
                                "(distilling embedders)")
def docs_prose(seed: int = 0) -> DataBundle:
    """train: corpus passages + docs-text train, minus every val/test sentence; val/test/calib: docs-text's."""
    from slimguard.data.text import docs_text

    ref = docs_text(seed)
    meta = DataMeta(name="docs-prose", task="embedding", input_shape=(), num_classes=0, mean=[], std=[], low=0.0,
                    high=0.0, seed=seed, kind="text",
                    description="passages of installed packages' docstrings and READMEs plus docs-text train "
                                "(no sentence of docs-text val/test); val/test are docs-text's")
    train = Split("train", list(_train_texts(seed)), None, meta)
    return DataBundle(meta=meta, train=train, val=Split("val", list(ref.val.x), None, meta),
                      test=Split("test", list(ref.test.x), None, meta),
                      calib=Split("calib", list(ref.calib.x), None, meta))
