"""Decoder language models: the ``zoo:docs-lm`` Llama and its tokenizer (:mod:`.docs_lm`), perplexity
(:mod:`.metrics`) and generation throughput with a KV cache (:mod:`.generate`).

The metrics work on any causal LM whose ``forward(input_ids)`` returns ``(N, L, vocab)`` logits (or an
object with ``.logits``): docs-lm, an ``hf:DIR`` causal LM, or a quantized copy of either.
"""

from slimguard.lm.metrics import perplexity

__all__ = ["perplexity"]
