"""``docs-prose``: the distillation text set never holds a sentence of ``docs-text``'s val or test split."""

from __future__ import annotations

import pytest

import slimguard.data.corpus as corpus_mod
import slimguard.data.prose as prose
import slimguard.data.text as text_mod
from slimguard.data.core import DataBundle, DataMeta, Split

HELD_VAL = "The parser reads one token at a time."
HELD_TEST = "Sockets are closed when the context ends."
DOCS = [
    # a paragraph whose middle sentence is held out, then a clean paragraph
    "Open the file first. " + HELD_VAL + " Then close it again when done.\n\n"
    "A queue keeps its items in order. It is safe to share between threads.",
    "Sockets are   closed when\nthe context ends. Every call returns a new object to the caller.",  # other spacing
]


def _sentences(texts: list[str]) -> set[str]:
    return {s for t in texts for s in prose.split_sentences(t)}


def test_passages_never_hold_a_held_out_sentence() -> None:
    held = prose.held_out_sentences([HELD_VAL], [HELD_TEST])
    out = prose.passages(DOCS, held, seed=0)
    kept = _sentences(out)
    assert HELD_VAL not in kept and HELD_TEST not in kept
    assert not any(HELD_VAL in p or "Sockets are closed" in p for p in out)
    # everything else survives, each sentence exactly once, and no passage spans the removed sentence
    assert kept == {"Open the file first.", "Then close it again when done.", "A queue keeps its items in order.",
                    "It is safe to share between threads.", "Every call returns a new object to the caller."}
    assert sum(len(prose.split_sentences(p)) for p in out) == len(kept)
    assert not any("first. Then" in p for p in out)


def test_without_held_out_sentences_every_sentence_is_kept() -> None:
    out = prose.passages(DOCS, frozenset(), seed=0)
    assert HELD_VAL in _sentences(out) and HELD_TEST in _sentences(out)


def test_passages_are_capped_in_sentences_and_words() -> None:
    doc = " ".join(f"Sentence number {i} says a few more words here." for i in range(60))
    out = prose.passages([doc], frozenset(), seed=1)
    assert all(1 <= len(prose.split_sentences(p)) <= prose.MAX_SENTENCES for p in out)
    assert all(len(p.split()) <= prose.MAX_WORDS for p in out)
    assert len({len(prose.split_sentences(p)) for p in out}) > 1  # lengths vary (seeded)


def test_clean_texts_drops_a_text_holding_a_held_out_sentence() -> None:
    held = prose.held_out_sentences([HELD_VAL])
    texts = ["A clean sentence stays here.", "Before it. " + HELD_VAL, HELD_VAL]
    assert prose.clean_texts(texts, held) == ["A clean sentence stays here."]


def test_docs_prose_trains_on_neither_val_nor_test_and_scores_on_docs_text(monkeypatch) -> None:
    meta = DataMeta(name="docs-text", task="embedding", input_shape=(), num_classes=0, mean=[], std=[], low=0.0,
                    high=0.0, kind="text")
    train = Split("train", ["A training sentence of docs text.", "Open the file first. " + HELD_VAL], None, meta)
    fake = DataBundle(meta=meta, train=train, val=Split("val", [HELD_VAL], None, meta),
                      test=Split("test", [HELD_TEST + " Another test sentence follows here."], None, meta),
                      calib=train)
    monkeypatch.setattr(text_mod, "docs_text", lambda seed=0: fake)
    monkeypatch.setattr(corpus_mod, "load_corpus", lambda split, seed=0: list(DOCS) if split == "train" else [])
    prose._train_texts.cache_clear()
    try:
        bundle = prose.docs_prose(seed=0)
    finally:
        prose._train_texts.cache_clear()
    kept = _sentences(list(bundle.train.x))
    assert not kept & prose.held_out_sentences(fake.val.x, fake.test.x)
    assert "A training sentence of docs text." in kept  # docs-text train joins the corpus passages
    assert "It is safe to share between threads." in kept
    assert list(bundle.val.x) == list(fake.val.x) and list(bundle.test.x) == list(fake.test.x)
    assert bundle.task == "embedding"


@pytest.mark.parametrize("text, expected", [
    ("One.  Two words here.", ["One.", "Two words here."]),
    ("See e.g. the manual. It helps.", ["See e.g. the manual.", "It helps."]),
    ("", []),
])
def test_split_sentences_cuts_like_docs_text(text, expected) -> None:
    assert prose.split_sentences(text) == expected
