"""zoo:docs-lm: the Llama architecture, its byte-level BPE tokenizer, zoo registration and caching."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimguard.core.errors import ModelError
from slimguard.lm import docs_lm
from slimguard.models import zoo


def test_docs_lm_is_a_llama_of_10_to_30_million_parameters():
    model = docs_lm.DocsLM(**docs_lm.DOCS_LM.model_kwargs())
    cfg = model.model.config
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 <= n <= 30e6
    assert cfg.model_type == "llama" and cfg.hidden_act == "silu"  # SwiGLU MLP
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert type(model.model.model.norm).__name__ == "LlamaRMSNorm"
    assert "zoo:docs-lm" and "docs-lm" in zoo.ZOO


def test_tokenizer_is_byte_level_and_round_trips_any_text(tiny_lm):
    model = tiny_lm[0]
    tok = model.tokenizer
    text = "Return the 3 largest items (ünïcode ✓) of the queue."
    ids = model.encode(text)
    assert tok.get_vocab_size() == 512 and tok.token_to_id(docs_lm.EOS) == 0
    assert tok.decode(ids.tolist()) == text
    assert len(ids) < len(text.encode())  # merges were learnt
    batch = model.tokenize(["a b", "a longer text here"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_encode_documents_ends_each_with_end_of_text(tiny_lm):
    tok = tiny_lm[0].tokenizer
    stream = docs_lm.encode_documents(tok, ["first doc.", "second doc."])
    assert int((stream == 0).sum()) == 2 and int(stream[-1]) == 0


def test_tiny_zoo_entry_trains_once_then_loads_identical_weights_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGUARD_CACHE", str(tmp_path))
    spec = docs_lm.tiny_spec(steps=2)
    calls = []

    def train(model, seed=0, progress=True):
        calls.append(seed)
        docs_lm.train_lm(model, torch.arange(200) % 512, spec, seed=seed, progress=False)

    entry = zoo.ZooEntry("docs-lm-test", "docs-corpus", docs_lm.DocsLM, "test entry",
                         kwargs={"spec": dataclasses.asdict(spec)},
                         create_fn=lambda seed=0, **_: docs_lm.create_docs_lm(spec, seed, name="docs-lm-test"),
                         train_fn=train, key_fn=lambda seed: "fixed")
    zoo.register_zoo(entry)
    try:
        first = zoo.load("docs-lm-test", progress=False)
        second = zoo.load("docs-lm-test", progress=False)
    finally:
        zoo.ZOO.unregister("docs-lm-test")
    assert calls == [0]  # trained once; the second load came from the cache
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert list(tmp_path.glob("docs-lm-test-*.safetensors"))


def test_bad_shapes_are_model_errors():
    with pytest.raises(ModelError, match="num_kv_heads"):
        docs_lm.DocsLM(vocab_size=300, hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ModelError, match="at least 257"):
        docs_lm.train_tokenizer(["some text"], 100)
