"""An int8 key/value cache for transformers decoders: a quarter of the float32 cache's memory.

Each new key and value vector (one per sequence, head and position) is stored as symmetric int8 codes
with its own float32 scale ``max|x| / 127``, so states append without re-quantizing what is stored (the
scale of a vector never depends on later tokens). Attention reads the dequantized states; the error per
element is at most half a step, ``max|x| / 254``. Memory per cached vector of ``head_dim`` values:
``head_dim + 4`` bytes instead of ``4 * head_dim`` (float32), e.g. 68 vs 256 bytes for ``head_dim = 64``.

This is KIVI-style per-token quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache", ICML 2024) at 8 bits, without its float residual window; transformers' own
``QuantizedCache`` needs the optimum-quanto or HQQ packages, this one only torch.

Example:
    >>> from slimguard.lm.generate import generate
    >>> ids, _ = generate(lm, prompt, 32, kv_cache="int8")
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from slimguard.lm.generate import KV_CACHES


def quantize_per_vector(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of every last-dimension vector of ``x`` and their scales ``(*, 1)`` float32.

    Shape:
        ``x (B, H, T, D)`` -> codes ``(B, H, T, D)`` int8, scales ``(B, H, T, 1)``.
    """
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_per_vector(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_per_vector` (``codes * scale``) in ``dtype``."""
    return (codes.float() * scale).to(dtype)


@functools.lru_cache(maxsize=1)
def _layer_class() -> type:
    """The cache layer class, defined on first use (transformers is imported only when a cache is made)."""
    from transformers.cache_utils import BaseQuantizedLayer

    class Int8KVLayer(BaseQuantizedLayer):
        """One decoder layer's cache: int8 codes and per-vector scales, appended along positions."""

        def _quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return quantize_per_vector(tensor)

        def _dequantize(self, qtensor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return dequantize_per_vector(qtensor[0], qtensor[1], self.dtype)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.cumulative_length += key_states.shape[-2]
            kq, vq = self._quantize(key_states), self._quantize(value_states)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.dtype = key_states.dtype
                self._quantized_keys, self._quantized_values = kq, vq
            else:
                self._quantized_keys = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._quantized_keys, kq,
                                                                                          strict=True))
                self._quantized_values = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._quantized_values, vq,
                                                                                            strict=True))
            return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.is_initialized:
                self._quantized_keys = tuple(t.index_select(0, beam_idx) for t in self._quantized_keys)
                self._quantized_values = tuple(t.index_select(0, beam_idx) for t in self._quantized_values)

        def nbytes(self) -> int:
            """Bytes held: the int8 codes and float32 scales of keys and values."""
            if not self.is_initialized:
                return 0
            return sum(t.numel() * t.element_size() for t in (*self._quantized_keys, *self._quantized_values))

    return Int8KVLayer


@KV_CACHES.register("int8")
def _int8_cache(_model: nn.Module) -> Any:
    return int8_kv_cache()


def int8_kv_cache() -> Any:
    """A new, empty int8 KV cache (a transformers ``Cache`` adding one int8 layer per decoder layer)."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_layer_class())
