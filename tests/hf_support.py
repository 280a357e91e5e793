"""Tiny Hugging Face models of every family slimguard supports, built from transformers configs with
random weights (nothing downloaded), saved as local folders with a word-level tokenizer.

``build_family(name, folder)`` writes one; :data:`FAMILIES` names them with their expected task.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a film was good bad great awful movie plot actor scene story fine dull long short and of is it this "
         "that with end").split()
VOCAB = 40

FAMILIES = {  # folder name -> task slimguard should infer from config.architectures
    "bert": "sequence-classification",
    "distilbert": "sequence-classification",
    "roberta": "sequence-classification",
    "llama": "causal-lm",
    "gpt2": "causal-lm",
    "vit": "image-classification",
    "bert-embed": "embedding",
}


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` (padding, unknown and end-of-text tokens)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="</s>").save_pretrained(str(folder))


def save_tiny_bert(folder: Path, words: list[str], layers: int, **config: float) -> Path:
    """A BERT encoder folder (hidden 32, 4 heads, FFN 64, ``layers`` layers, random weights seeded with 0)
    with a WordPiece tokenizer whose vocabulary is the special tokens and ``words``; ``config`` overrides
    other ``BertConfig`` fields (e.g. ``initializer_range``)."""
    import transformers

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, **config)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_family(name: str, folder: Path, *, tokenizer: bool = True) -> Path:
    """Write the tiny model ``name`` (a key of :data:`FAMILIES`) to ``folder``; seeded."""
    import transformers as T

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, max_position_embeddings=64)
    made = {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3,
            architectures=["BertForSequenceClassification"], **text)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3,
            architectures=["DistilBertForSequenceClassification"], **text)),
        "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3,
            pad_token_id=0, architectures=["RobertaForSequenceClassification"], vocab_size=VOCAB,
            max_position_embeddings=70)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            architectures=["LlamaForCausalLM"], bos_token_id=2, eos_token_id=2, pad_token_id=0, **text)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=2, eos_token_id=2,
            architectures=["GPT2LMHeadModel"])),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_channels=1, num_labels=10, architectures=["ViTForImageClassification"])),
        "bert-embed": lambda: T.BertModel(T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            architectures=["BertModel"], **text)),
    }
    model = made[name]()
    model.save_pretrained(str(folder))
    if tokenizer and FAMILIES[name] != "image-classification":
        save_tokenizer(folder)
    return folder
