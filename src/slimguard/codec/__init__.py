"""Tensor codecs for artifacts: ``dense``, ``sparse`` (bitmap + values), and entropy coders.

A codec turns one tensor into named payload parts (tensors or bytes) plus a small JSON header, and back,
exactly. Artifacts pick a codec per tensor: the one named in the model's codec hints, otherwise
``sparse`` when it is smaller than ``dense``.
"""

from slimguard.codec.base import Codec, Encoded, codec, codec_names, register_codec

__all__ = ["Codec", "Encoded", "codec", "codec_names", "register_codec"]
