"""The built-in English corpus: split by document, deterministic, clean, deduplicated."""

from __future__ import annotations

import re

import pytest

from slimguard.core.errors import DataError
from slimguard.data import corpus


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    return {s: corpus.load_corpus(s) for s in corpus.SPLITS}


def test_splits_are_disjoint_documents_in_the_stated_proportions(splits):
    sizes = {k: len(v) for k, v in splits.items()}
    total = sum(sizes.values())
    assert total == len(corpus.corpus_documents()) > 1000
    assert abs(sizes["train"] / total - 0.90) < 0.01 and abs(sizes["test"] / total - 0.05) < 0.01
    sets = {k: set(v) for k, v in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]


def test_same_seed_same_split_other_seed_other_split(splits):
    assert corpus.load_corpus("val") == splits["val"]
    assert corpus.load_corpus("val", seed=1) != splits["val"]
    assert sorted(corpus.load_corpus("train", seed=1) + corpus.load_corpus("val", seed=1)
                  + corpus.load_corpus("test", seed=1)) == sorted(corpus.corpus_documents())


def test_no_licence_boilerplate_and_no_repeated_paragraph(splits):
    docs = corpus.corpus_documents()
    licence = re.compile(r"permission is hereby granted|licensed under the apache|all rights reserved|"
                         r"redistribution and use in source", re.IGNORECASE)
    assert not [d for d in docs if licence.search(d)]
    paragraphs = [p.lower() for d in docs for p in d.split("\n\n")]
    assert len(paragraphs) == len(set(paragraphs))
    assert len(set(docs)) == len(docs)


def test_documents_are_english_prose(splits):
    words = " ".join(splits["test"]).lower().split()
    common = sum(w in {"the", "a", "of", "to", "is", "and", "in"} for w in words)
    assert common / len(words) > 0.08  # English prose: about 1 word in 5 is one of these
    assert all(len(d) >= corpus.MIN_DOC_CHARS for d in splits["test"])


def test_licence_and_code_paragraphs_are_dropped():
    assert corpus._clean_paragraph("Copyright (c) 2020 The Authors. All rights reserved.") is None
    assert corpus._clean_paragraph(">>> import os\n>>> os.getcwd()") is None
    assert corpus._clean_paragraph("Return the number of items\nin the queue.") == \
        "Return the number of items in the queue."


def test_unknown_split_is_a_one_line_user_error():
    with pytest.raises(DataError, match="allowed: train, val, test"):
        corpus.load_corpus("dev")


def test_damaged_cache_is_rebuilt_not_trusted(tmp_path):
    key = "k"
    bad = tmp_path / "corpus-k.json"
    bad.write_text('{"format": "slimguard-corpus", "key": "k", "documents": [1, 2]}')
    assert corpus._read_cache(bad, key) is None
    bad.write_text("[]")
    assert corpus._read_cache(bad, key) is None
    bad.write_text('{"format": "slimguard-corpus", "key": "k", "documents": ["a", "b"]}')
    assert corpus._read_cache(bad, key) == ("a", "b")
    assert corpus._read_cache(bad, "other") is None


def test_docs_corpus_data_set_holds_the_same_splits(splits):
    from slimguard import data as sgdata

    bundle = sgdata.load("docs-corpus")
    assert bundle.meta.task == "causal-lm" and bundle.meta.kind == "text"
    assert bundle.test.x == splits["test"] and len(bundle.calib) == 64
    assert set(bundle.calib.x) <= set(splits["train"])
