"""Storage coding of shared weights (the last stage of Deep Compression; Han et al., ICLR 2016).

After weight sharing (:mod:`slimguard.share.cluster`), the step ``huffman-coding`` rounds each codebook
(to float16 by default) and marks every shared tensor for the ``huffman`` codec
(:mod:`slimguard.codec.huffman`): canonical Huffman codes of the cluster indices and of the relative gaps
between nonzero positions, stored inside the ``.slim`` artifact.

Example:
    >>> sg.cluster_(model, sg.WeightSharingConfig(bits=4))
    >>> sg.cluster_(model, sg.HuffmanCodingConfig())          # fp16 codebooks, coded artifact
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from slimguard.core.config import Config, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.registry import register_handler
from slimguard.share.cluster import SUFFIX, _check_bits, _set_hint, centroids_of, iter_shared, share_


@register_config("huffman-coding")
@dataclasses.dataclass
class HuffmanCodingConfig(Config):
    """Finish weight sharing for storage: round codebooks and code shared tensors with ``huffman``.

    Args:
        codebook_dtype: ``float16`` (default: every centroid is rounded to the nearest float16, so the
            codebook takes 2 bytes per entry) or ``float32`` (centroids kept as they are).
        gap_bits: bit width of relative positions, 1..8, or 0 to pick the smallest per layer (default 0).
    """

    codebook_dtype: Literal["float16", "float32"] = "float16"
    gap_bits: int = 0

    def validate(self) -> None:
        if self.gap_bits != 0:
            _check_bits("gap_bits", self.gap_bits)


@register_handler("cluster", HuffmanCodingConfig)
def _huffman_coding(model: nn.Module, config: HuffmanCodingConfig, **_: Any) -> dict[str, Any]:
    shared = iter_shared(model)
    if not shared:
        raise ConfigError("huffman-coding: the model has no shared weights; run weight-sharing first")
    options = {} if config.gap_bits == 0 else {"gap_bits": config.gap_bits}
    report: dict[str, Any] = {}
    for qualified, module, pname in shared:
        c = centroids_of(module, pname)
        if config.codebook_dtype == "float16":
            c = c.to(torch.float16).to(c.dtype)
        share_(module, pname, c, module.get_buffer(pname + SUFFIX))
        _set_hint(model, qualified, options)
        report[qualified] = {"clusters": int(torch.unique(c).numel())}
    return {"layers": report}
