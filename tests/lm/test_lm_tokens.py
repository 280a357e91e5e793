"""Causal-LM training windows: documents packed into one stream and cut, tokenised only as far as needed."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import DataError, ModelError
from slimguard.lm.tokens import text_windows, token_windows


class Chars(torch.nn.Module):
    """A character 'tokenizer' with ``encode_texts`` (ids = code points, 0 ends each text) that counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.texts_seen = 0

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts_seen += len(texts)
        return torch.tensor([c for t in texts for c in [*map(ord, t), 0]], dtype=torch.long)


class Padded(torch.nn.Module):
    """A ``tokenize``-only model (right-padded batches, like an ``hf:`` LM) whose tokenizer ends texts with 0."""

    class _Tok:
        eos_token_id = 0

    tokenizer = _Tok()

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        width = max(len(t) for t in texts)
        ids = torch.full((len(texts), width), 7, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor([ord(c) for c in t])
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_documents_are_packed_with_end_of_text_and_cut_into_windows():
    got = text_windows(Chars(), ["abc", "de", "fghij"], 4)
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]  # 13 tokens -> 3 windows of 4, tail dropped
    assert got.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert got.dtype == torch.long


def test_a_tokenize_only_model_packs_the_same_without_its_padding():
    assert text_windows(Padded(), ["abc", "de", "fghij"], 4).tolist() == text_windows(Chars(), ["abc", "de",
                                                                                              "fghij"], 4).tolist()


def test_a_window_limit_tokenises_only_what_it_needs_in_a_seeded_order():
    texts = [chr(ord("a") + i % 26) * 9 for i in range(1000)]  # 10 tokens each
    model = Chars()
    got = text_windows(model, texts, 10, max_windows=3, seed=1)
    assert got.shape == (3, 10) and model.texts_seen == 64  # one chunk of documents, not all 1000
    assert torch.equal(got, text_windows(Chars(), texts, 10, max_windows=3, seed=1))
    assert not torch.equal(got, text_windows(Chars(), texts, 10, max_windows=3, seed=2))


def test_token_ids_stream_or_batch():
    assert token_windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert token_windows(torch.arange(12).reshape(2, 6), 3).shape == (2, 6)  # a batch keeps its own rows
    assert token_windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)


@pytest.mark.parametrize(("ids", "match"), [
    (torch.arange(5), "fewer than one window"),
    (torch.rand(10), "integer token ids"),
    (torch.zeros(2, 1, dtype=torch.long), "at least 2"),
    (torch.tensor([1, -1, 2, 3, 4, 5]), "negative"),
])
def test_bad_token_data_is_refused(ids, match):
    with pytest.raises(DataError, match=match):
        token_windows(ids, 6 if ids.ndim == 1 and ids.numel() == 5 else 2)


def test_a_model_without_tokenizer_is_refused():
    with pytest.raises(ModelError, match="no tokenizer"):
        text_windows(torch.nn.Linear(2, 2), ["abc"], 2)
