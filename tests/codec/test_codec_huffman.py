"""Canonical Huffman coding and the ``huffman`` tensor codec: optimality, prefix property, exact round
trips (property-based), gap overflow with fillers, and refusal of damaged blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimguard.codec.base import codec
from slimguard.codec.huffman import (
    canonical_codes,
    code_lengths,
    decode_symbols,
    encode_symbols,
    gaps_to_symbols,
    parse_block,
    symbols_to_positions,
)
from slimguard.core.errors import ArtifactError

HUFF = codec("huffman")


def _is_prefix_free(lengths: np.ndarray) -> bool:
    codes = canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)]
    return not any(a != b and b.startswith(a) for a in words for b in words)


# known distributions and their optimal (Huffman) expected code length in bits per symbol
KNOWN = [
    ([1, 1, 1, 1], [2, 2, 2, 2]),                       # uniform: 2 bits each
    ([8, 4, 2, 1, 1], [1, 2, 3, 4, 4]),                 # dyadic: lengths = -log2(p)
    ([45, 13, 12, 16, 9, 5], [1, 3, 3, 3, 4, 4]),       # CLRS textbook example, 224 bits in total
    ([5, 0, 0, 3], [1, 0, 0, 1]),                       # unused symbols get no code
    ([7], [1]),                                         # one symbol: a 1-bit code
]


@pytest.mark.parametrize(("counts", "want"), KNOWN)
def test_code_lengths_optimal_on_known_distributions(counts, want):
    lengths = code_lengths(counts)
    assert int((np.array(counts) * lengths).sum()) == int((np.array(counts) * np.array(want)).sum())
    assert _is_prefix_free(lengths)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=64))
@settings(max_examples=60, deadline=None)
def test_code_lengths_prefix_free_kraft_and_near_entropy(counts):
    counts = np.array(counts)
    lengths = code_lengths(counts)
    used = counts > 0
    assert (lengths[used] > 0).all() and (lengths[~used] == 0).all()
    assert _is_prefix_free(lengths)
    assert sum(2.0 ** -int(n) for n in lengths[used]) <= 1.0 + 1e-12  # Kraft
    if used.sum() > 1:  # Huffman is within one bit of the entropy
        p = counts[used] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        mean_len = float((counts * lengths).sum() / counts.sum())
        assert entropy - 1e-9 <= mean_len < entropy + 1


@given(st.lists(st.integers(0, 40), min_size=0, max_size=400))
@settings(max_examples=60, deadline=None)
def test_symbol_stream_round_trip(symbols):
    symbols = np.array(symbols, dtype=np.int64)
    lengths = code_lengths(np.bincount(symbols, minlength=41)) if symbols.size else np.zeros(41, np.int64)
    data, nbits = encode_symbols(symbols, lengths)
    assert nbits == int(lengths[symbols].sum())
    np.testing.assert_array_equal(decode_symbols(data, nbits, symbols.size, lengths), symbols)


def test_long_codes_use_the_bit_serial_decoder():
    fib = [1, 1]
    while len(fib) < 22:
        fib.append(fib[-1] + fib[-2])
    symbols = np.repeat(np.arange(22), fib)  # Fibonacci counts: the deepest possible Huffman tree
    lengths = code_lengths(np.bincount(symbols))
    assert lengths.max() == 21  # > 16: table decoding is not used
    data, nbits = encode_symbols(symbols, lengths)
    np.testing.assert_array_equal(decode_symbols(data, nbits, symbols.size, lengths), symbols)


@pytest.mark.parametrize(("positions", "gap_bits", "fillers"), [
    ([0, 1, 2], 1, 0),
    ([5], 1, 5),              # gap 6 with 1-bit gaps: 5 fillers then a kept weight
    ([0, 40], 3, 5),          # gap 40 with 3-bit gaps (max 7 per entry): 39 // 7 = 5 fillers
    ([7, 8, 300], 8, 1),      # gap 292 > 255: one filler
    ([], 4, 0),
])
def test_gap_overflow_inserts_fillers(positions, gap_bits, fillers):
    symbols = gaps_to_symbols(np.array(positions, dtype=np.int64), gap_bits)
    filler = (1 << gap_bits) - 1
    assert int((symbols == filler).sum()) == fillers
    assert symbols.max(initial=0) <= filler
    np.testing.assert_array_equal(symbols_to_positions(symbols, gap_bits), positions)


@st.composite
def clustered_tensors(draw):
    shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (20, 30), (2, 3, 4, 5)]))
    n = math.prod(shape)
    k = draw(st.integers(1, 256))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    book = torch.randn(k, generator=g)
    values = book[torch.randint(0, k, (n,), generator=g)]
    keep = torch.rand(n, generator=g) < density
    return torch.where(keep, values, torch.zeros(())).reshape(shape)


@given(clustered_tensors(), st.sampled_from(["auto", "dense", "sparse"]),
       st.sampled_from(["auto", 1, 2, 5, 8]))
@settings(max_examples=80, deadline=None)
def test_codec_round_trip_is_exact(t, layout, gap_bits):
    enc = HUFF.encode(t, layout=layout, gap_bits=gap_bits)
    out = HUFF.decode(enc.header, enc.parts)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("t", [
    torch.zeros(1000),                                                  # nothing kept
    torch.cat([torch.zeros(5000), torch.tensor([1.5])]),                # one weight after a huge gap
    torch.tensor([0.1, -0.1] * 500),                                    # dense, two values
    torch.arange(256, dtype=torch.float32) - 100,                       # 256 distinct: the maximum
    (torch.arange(60, dtype=torch.int64) % 3).reshape(3, 4, 5),         # integer tensor
    torch.tensor([1e-30, 3e38, -3e38, 0.0]),                             # extreme float32 values
])
def test_codec_adversarial_inputs(t):
    enc = HUFF.encode(t)
    assert torch.equal(HUFF.decode(enc.header, enc.parts), t)


def test_codec_refuses_too_many_distinct_values():
    with pytest.raises(ArtifactError, match=r"257 distinct values.*WeightSharing"):
        HUFF.encode(torch.arange(257, dtype=torch.float32))


def test_codebook_stored_as_float16_only_when_exact():
    half = torch.tensor([0.5, -0.25, 0.0, 0.5])
    assert parse_block(HUFF.encode(half).parts["block"], decode=False)["codebook_dtype"] == "float16"
    full = torch.tensor([0.1, -0.25, 0.0, 0.1])
    assert parse_block(HUFF.encode(full).parts["block"], decode=False)["codebook_dtype"] == "float32"


def _block(t=None):
    t = t if t is not None else torch.tensor([0.0, 0.5, 0.0, 0.0, -0.5, 0.25] * 50)
    return t, HUFF.encode(t, layout="sparse")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:-1], "crc32|truncated"),
    (lambda b: b[:20], "crc32|truncated"),
    (lambda b: b[:30] + bytes([b[30] ^ 0x01]) + b[31:], "crc32"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b + b"\x00", "crc32"),
])
def test_damaged_block_is_refused(damage, message):
    _, enc = _block()
    with pytest.raises(ArtifactError, match=message):
        HUFF.decode(enc.header, {"block": damage(enc.parts["block"])})


def test_block_with_valid_crc_but_wrong_length_is_refused():
    import zlib

    _, enc = _block()
    body = enc.parts["block"][:-4] + b"\x00\x00"  # extra bytes after the last stream, crc recomputed
    block = body + zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(ArtifactError, match="length mismatch"):
        HUFF.decode(enc.header, {"block": block})


def test_block_for_another_shape_is_refused():
    _, enc = _block()
    with pytest.raises(ArtifactError, match="elements"):
        HUFF.decode({"shape": [7], "dtype": "float32"}, enc.parts)


@pytest.mark.parametrize(("count_delta", "bits_delta", "message"), [
    (+1, 0, "ends after"),          # asks for one symbol more than the stream holds
    (-1, 0, "length mismatch"),     # leaves bits unused
    (0, +8, "bytes"),               # header bit count disagrees with the data length
])
def test_stream_length_checks(count_delta, bits_delta, message):
    symbols = np.array([0, 1, 1, 2, 2, 2, 2, 3] * 10)
    lengths = code_lengths(np.bincount(symbols))
    data, nbits = encode_symbols(symbols, lengths)
    with pytest.raises(ArtifactError, match=message):
        decode_symbols(data, nbits + bits_delta, symbols.size + count_delta, lengths)


@pytest.mark.parametrize("density", [0.08, 0.2, 0.4, 0.6])
def test_relative_positions_cost_about_the_mask_entropy(density):
    # a random mask of density d carries H(d) / d bits per kept weight; the Huffman-coded gaps (with the
    # gap width chosen per tensor) stay within 0.15 bits of it, so a denser layer pays fewer position bits
    g = torch.Generator().manual_seed(0)
    n = 40_000
    keep = torch.rand(n, generator=g) < density
    t = torch.where(keep, torch.randint(1, 9, (n,), generator=g).float(), torch.zeros(()))
    info = parse_block(HUFF.encode(t, layout="sparse").parts["block"], decode=False)
    per_kept = info["position_bits_total"] / info["kept"]
    entropy = -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) / density
    assert entropy - 0.05 <= per_kept <= entropy + 0.15, (per_kept, entropy)
