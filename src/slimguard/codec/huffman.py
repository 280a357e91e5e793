"""Canonical Huffman coding and the ``huffman`` tensor codec (the last stage of Deep Compression).

Paper: Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding", ICLR 2016. A pruned and clustered layer holds few distinct values;
it is stored as a small codebook, the Huffman-coded codebook index of every kept weight, and the
Huffman-coded *relative positions* of the kept weights (the gap to the previous kept weight). A gap that
does not fit its bit width is split with *filler* entries, as in the paper.

Block format, version 1 (one ``bytes`` part named ``block`` per tensor; varint = unsigned LEB128)::

    magic      4 bytes  b"SGHC"
    version    u8       1
    layout     u8       0 = dense (every element is coded), 1 = sparse (only nonzeros are coded)
    cb_dtype   u8       dtype code of the codebook (index into CODEBOOK_DTYPES)
    numel      varint   number of elements of the tensor
    K          varint   codebook size, then K values (little-endian, cb_dtype)
    index table         Huffman code lengths of the K index symbols (see _write_table)
    n_index    varint   number of coded values (numel when dense, nonzeros when sparse)
    sparse only:
      gap_bits u8       bit width b of a gap symbol (1..8); symbols 0..2^b-2 mean "the next kept
                        weight is s+1 positions after the previous one"; the symbol 2^b-1 is a filler:
                        "advance 2^b-1 positions, no value here"
      gap table         Huffman code lengths of the 2^b gap symbols
      n_gap    varint   number of gap symbols (n_index + fillers)
    index stream        varint bit count, then the bits (MSB first, zero-padded to a byte)
    sparse only:
      gap stream        varint bit count, then the bits
    crc32      u32      zlib.crc32 of every byte before it (little-endian)

A Huffman table is stored as: ``nsym`` varint, ``lenbits`` u8 (bits per stored length), then ``nsym``
code lengths of ``lenbits`` bits each (MSB first, zero-padded). Codes are canonical: the decoder rebuilds
them from the lengths alone (symbols sorted by (length, symbol), codes counted upwards). A code length
of 0 marks an unused symbol; a single used symbol gets a 1-bit code.

Every length in a block is checked while decoding; a block whose length or checksum does not match is
refused with an :class:`~slimguard.core.errors.ArtifactError` (the artifact loader adds the tensor name).

Example:
    >>> enc = codec("huffman").encode(clustered_weight)
    >>> torch.equal(codec("huffman").decode(enc.header, enc.parts), clustered_weight)
    True
"""

from __future__ import annotations

import heapq
import math
import zlib
from typing import Any

import numpy as np
import torch

from slimguard.codec.base import Encoded, Part, dtype_name, dtype_of, register_codec
from slimguard.core.errors import ArtifactError

MAGIC = b"SGHC"
BLOCK_VERSION = 1
DENSE, SPARSE = 0, 1
MAX_SYMBOLS = 256
CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                   torch.int16, torch.int32, torch.int64)
_TABLE_BITS = 16  # table-driven decoding when the longest code fits this many bits


# ---- canonical Huffman ----------------------------------------------------------------------------
def code_lengths(counts: np.ndarray | list[int]) -> np.ndarray:
    """Optimal (Huffman) code length of each symbol from its count; 0 for symbols that never occur.

    A single used symbol gets length 1. Ties are broken by symbol order, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) == 1:
        lengths[used[0]] = 1
    if len(used) <= 1:
        return lengths
    # heap items: (weight, tie-break, symbols in the subtree)
    heap: list[tuple[int, int, list[int]]] = [(int(counts[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1:
            lengths[s] += 1
        for s in s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, order, s1 + s2))
        order += 1
    return lengths


def canonical_codes(lengths: np.ndarray | list[int]) -> np.ndarray:
    """Canonical codes (as integers, read MSB first over ``lengths[s]`` bits) from code lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths > 0).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    if lengths.max(initial=0) > 0 and code > (1 << prev):
        raise ArtifactError("Huffman code lengths do not form a prefix code (Kraft sum above 1)")
    return codes


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Pack the canonical codes of ``symbols`` MSB first. Returns (bytes, number of bits)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    codes = canonical_codes(lengths)
    ln = lengths[symbols]
    if (ln == 0).any():
        raise ValueError("a symbol to code has no code (count 0)")
    cd = codes[symbols]
    width = int(ln.max())
    j = np.arange(width, dtype=np.int64)
    shift = ln[:, None] - 1 - j[None, :]
    bits = (cd[:, None] >> np.maximum(shift, 0).astype(np.uint64)) & np.uint64(1)
    bits = bits[shift >= 0]
    return np.packbits(bits.astype(np.uint8)).tobytes(), int(bits.size)


def decode_symbols(data: bytes, nbits: int, count: int, lengths: np.ndarray) -> np.ndarray:
    """Decode ``count`` symbols from ``nbits`` bits of ``data``; every length is checked."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        if nbits:
            raise ArtifactError(f"coded stream has {nbits} bits but no symbols")
        return np.zeros(0, dtype=np.int64)
    if len(data) != (nbits + 7) // 8:
        raise ArtifactError(f"coded stream is {len(data)} bytes, its header says {(nbits + 7) // 8}")
    used = np.flatnonzero(lengths > 0)
    if len(used) == 0:
        raise ArtifactError("coded stream has symbols but its Huffman table is empty")
    codes = canonical_codes(lengths)
    maxlen = int(lengths.max())
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=nbits).astype(np.int64)
    if maxlen <= _TABLE_BITS:
        out = _decode_table(bits, nbits, count, lengths, codes, used, maxlen)
    else:
        out = _decode_canonical(bits, nbits, count, lengths, used)
    return out


def _decode_table(bits: np.ndarray, nbits: int, count: int, lengths: np.ndarray, codes: np.ndarray,
                  used: np.ndarray, maxlen: int) -> np.ndarray:
    sym_of = np.full(1 << maxlen, -1, dtype=np.int64)
    len_of = np.zeros(1 << maxlen, dtype=np.int64)
    for s in used.tolist():
        lo = int(codes[s]) << (maxlen - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (maxlen - int(lengths[s]))
        sym_of[lo:hi] = s
        len_of[lo:hi] = lengths[s]
    padded = np.concatenate([bits, np.zeros(maxlen, dtype=np.int64)])
    window = np.zeros(nbits, dtype=np.int64)
    for i in range(maxlen):  # window[p] = the maxlen bits starting at p
        window = (window << 1) | padded[i : i + nbits]
    step = len_of[window]
    sym = sym_of[window]
    pos = _chain(step, nbits, count)
    bad = pos >= nbits
    if bad.any():
        raise ArtifactError(f"coded stream ends after {int(np.argmax(bad))} of {count} symbols")
    out = sym[pos]
    if (out < 0).any():
        raise ArtifactError(f"invalid Huffman code at bit {int(pos[np.argmax(out < 0)])}")
    end = int(pos[-1] + step[pos[-1]])
    if end != nbits:
        raise ArtifactError(f"coded stream length mismatch: decoding used {end} bits, header says {nbits}")
    return out


def _chain(step: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Start bit of each of ``count`` codes, by pointer doubling (vectorised, O(nbits log count)).

    ``step[p]`` is the length of the code starting at bit ``p``; position ``nbits`` is absorbing, and so
    is an invalid code (step 0), which the caller then reports.
    """
    jump = np.append(np.minimum(np.arange(nbits, dtype=np.int64) + step, nbits), nbits)
    seq = np.zeros(1, dtype=np.int64)
    while len(seq) < count:
        seq = np.concatenate([seq, jump[seq]])  # jump = step applied len(seq) times
        if len(seq) < count:
            jump = jump[jump]
    return seq[:count]


def _decode_canonical(bits: np.ndarray, nbits: int, count: int, lengths: np.ndarray,
                      used: np.ndarray) -> np.ndarray:
    """Bit-serial canonical decoding (first code and count per length), for codes longer than 16 bits."""
    maxlen = int(lengths.max())
    order = sorted(used.tolist(), key=lambda s: (lengths[s], s))
    per_len = np.bincount(lengths[used], minlength=maxlen + 1).tolist()
    first, offset = [0] * (maxlen + 1), [0] * (maxlen + 1)
    code = idx = 0
    for n in range(1, maxlen + 1):
        code <<= 1
        first[n], offset[n] = code, idx
        code += per_len[n]
        idx += per_len[n]
    b = bits.tolist()
    out = [0] * count
    p = 0
    for k in range(count):
        code, n = 0, 0
        while True:
            if p >= nbits:
                raise ArtifactError(f"coded stream ends after {k} of {count} symbols")
            code = (code << 1) | b[p]
            p += 1
            n += 1
            if n > maxlen:
                raise ArtifactError(f"invalid Huffman code at bit {p}")
            if code - first[n] < per_len[n]:
                out[k] = order[offset[n] + code - first[n]]
                break
    if p != nbits:
        raise ArtifactError(f"coded stream length mismatch: decoding used {p} bits, header says {nbits}")
    return np.asarray(out, dtype=np.int64)


# ---- relative positions with fillers -----------------------------------------------------------------
def gaps_to_symbols(positions: np.ndarray, gap_bits: int) -> np.ndarray:
    """Gap symbols (with fillers) for sorted distinct ``positions``; see the block format."""
    m = (1 << gap_bits) - 1
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return np.zeros(0, dtype=np.int64)
    d = np.diff(positions, prepend=-1)
    fillers = (d - 1) // m
    out = np.full(int(fillers.sum()) + len(d), m, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = (d - 1) % m
    return out


def symbols_to_positions(symbols: np.ndarray, gap_bits: int) -> np.ndarray:
    m = (1 << gap_bits) - 1
    symbols = np.asarray(symbols, dtype=np.int64)
    advance = np.where(symbols == m, m, symbols + 1)
    return (np.cumsum(advance) - 1)[symbols != m]


# ---- byte helpers -------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(f"coded block is truncated: needs {self.pos + n} bytes, has {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.u8()
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
            if shift > 63:
                raise ArtifactError("coded block holds a malformed varint")


def _write_table(lengths: np.ndarray) -> bytes:
    nsym = len(lengths)
    lenbits = max(1, int(lengths.max(initial=0)).bit_length())
    j = np.arange(lenbits)
    bits = ((lengths[:, None] >> (lenbits - 1 - j)[None, :]) & 1).astype(np.uint8).reshape(-1)
    return _varint(nsym) + bytes([lenbits]) + np.packbits(bits).tobytes()


def _read_table(r: _Reader, max_symbols: int) -> np.ndarray:
    nsym = r.varint()
    if nsym > max_symbols:
        raise ArtifactError(f"Huffman table has {nsym} symbols, more than the {max_symbols} allowed")
    lenbits = r.u8()
    if not 1 <= lenbits <= 6:
        raise ArtifactError(f"Huffman table stores lengths in {lenbits} bits; allowed 1..6")
    raw = r.take((nsym * lenbits + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=nsym * lenbits).astype(np.int64)
    return (bits.reshape(nsym, lenbits) << (lenbits - 1 - np.arange(lenbits))[None, :]).sum(axis=1)


def _stream(symbols: np.ndarray, nsym: int) -> tuple[np.ndarray, bytes, int]:
    lengths = code_lengths(np.bincount(symbols, minlength=nsym)) if symbols.size else np.zeros(nsym, np.int64)
    data, nbits = encode_symbols(symbols, lengths)
    return lengths, data, nbits


def _coded_bits(symbols: np.ndarray, nsym: int) -> int:
    counts = np.bincount(symbols, minlength=nsym)
    lengths = code_lengths(counts)
    return int((counts * lengths).sum()) + 8 * len(_write_table(lengths))


# ---- the codec ----------------------------------------------------------------------------------------
def _codebook_dtype(values: torch.Tensor) -> torch.dtype:
    """The tensor's dtype, or float16 when every float32 value is exactly a float16 (smaller, lossless)."""
    if values.dtype == torch.float32 and values.numel() and bool(
            (values.to(torch.float16).to(torch.float32) == values).all()):
        return torch.float16
    return values.dtype


class HuffmanCodec:
    """``huffman``: codebook + Huffman-coded indices (+ Huffman-coded relative positions when sparse).

    Options:
        layout: ``auto`` (default: the smaller of the two), ``dense`` or ``sparse``.
        gap_bits: bit width of a relative position, 1..8, or ``auto`` (default: the width that gives the
            fewest bytes; the paper used 8 for conv and 5 for fc layers).

    The tensor must hold at most 256 distinct values (a clustered layer). Decoding is exact.
    """

    name = "huffman"

    def encode(self, tensor: torch.Tensor, layout: str = "auto", gap_bits: int | str = "auto",
               **options: Any) -> Encoded:
        t = tensor.detach().contiguous().cpu()
        if t.dtype == torch.bool or t.dtype not in CODEBOOK_DTYPES:
            raise ArtifactError(f"the huffman codec does not code {dtype_name(t.dtype)} tensors")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError("the huffman codec needs finite values; this tensor holds NaN or inf")
        if layout not in ("auto", "dense", "sparse"):
            raise ArtifactError(f"huffman layout {layout!r} is not allowed; allowed: auto, dense, sparse")
        if gap_bits != "auto" and (not isinstance(gap_bits, int) or not 1 <= gap_bits <= 8):
            raise ArtifactError(f"huffman gap_bits {gap_bits!r} is out of range; allowed: 1..8 or auto")
        flat = t.reshape(-1)
        candidates = []
        if layout in ("auto", "dense"):
            candidates.append(self._encode_dense(flat))
        if layout in ("auto", "sparse"):
            candidates.append(self._encode_sparse(flat, gap_bits))
        block = min(candidates, key=len)
        header = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        return Encoded(header, {"block": block})

    # -- encoding
    def _codebook(self, values: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        book, inverse = torch.unique(values, sorted=True, return_inverse=True)
        if book.numel() > MAX_SYMBOLS:
            raise ArtifactError(
                f"tensor holds {book.numel()} distinct values; the huffman codec codes at most {MAX_SYMBOLS} "
                "(share its weights first with sg.cluster_(model, sg.WeightSharingConfig(bits=5)))"
            )
        return book, inverse.numpy().astype(np.int64)

    def _head(self, layout: int, numel: int, book: torch.Tensor) -> bytes:
        cb_dtype = _codebook_dtype(book)
        raw = book.to(cb_dtype).contiguous().view(torch.uint8).numpy().tobytes() if book.numel() else b""
        return (MAGIC + bytes([BLOCK_VERSION, layout, CODEBOOK_DTYPES.index(cb_dtype)]) + _varint(numel)
                + _varint(book.numel()) + raw)

    def _encode_dense(self, flat: torch.Tensor) -> bytes:
        book, idx = self._codebook(flat)
        lengths, data, nbits = _stream(idx, book.numel())
        body = self._head(DENSE, flat.numel(), book) + _write_table(lengths) + _varint(idx.size)
        body += _varint(nbits) + data
        return body + zlib.crc32(body).to_bytes(4, "little")

    def _encode_sparse(self, flat: torch.Tensor, gap_bits: int | str) -> bytes:
        nz = (flat != 0).numpy()
        positions = np.flatnonzero(nz)
        book, idx = self._codebook(flat[torch.from_numpy(nz)])
        if gap_bits == "auto":
            gap_bits = min(range(1, 9), key=lambda b: (_coded_bits(gaps_to_symbols(positions, b), 1 << b), b))
        gsym = gaps_to_symbols(positions, int(gap_bits))
        lengths, data, nbits = _stream(idx, book.numel())
        glengths, gdata, gnbits = _stream(gsym, 1 << int(gap_bits))
        body = (self._head(SPARSE, flat.numel(), book) + _write_table(lengths) + _varint(idx.size)
                + bytes([int(gap_bits)]) + _write_table(glengths) + _varint(gsym.size)
                + _varint(nbits) + data + _varint(gnbits) + gdata)
        return body + zlib.crc32(body).to_bytes(4, "little")

    # -- decoding
    def decode(self, header: dict[str, Any], parts: dict[str, Part]) -> torch.Tensor:
        block = parts.get("block")
        if not isinstance(block, bytes | bytearray):
            raise ArtifactError("huffman tensor has no coded block")
        info = parse_block(bytes(block))
        dtype = dtype_of(header["dtype"])
        shape = header["shape"]
        numel = math.prod(shape)
        if info["numel"] != numel:
            raise ArtifactError(f"coded block holds {info['numel']} elements, the tensor has {numel}")
        book = info["codebook"].to(dtype)
        idx = torch.from_numpy(info["indices"])
        if idx.numel() and int(idx.max()) >= book.numel():
            raise ArtifactError("coded block refers to a codebook entry it does not have")
        if info["layout"] == "dense":
            return book[idx].reshape(shape)
        out = torch.zeros(numel, dtype=dtype)
        out[torch.from_numpy(info["positions"])] = book[idx]
        return out.reshape(shape)

    def describe(self, encoded: Encoded) -> dict[str, Any]:
        """Per-tensor statistics for ``slimguard inspect`` (like the tables of the paper)."""
        block = encoded.parts["block"]
        assert isinstance(block, bytes)
        info = parse_block(block, decode=False)
        return {k: v for k, v in info.items() if k not in ("codebook", "indices", "positions")}


def parse_block(block: bytes, decode: bool = True) -> dict[str, Any]:
    """Check and (optionally) decode one coded block. Raises ArtifactError naming what does not match."""
    if len(block) < 4 + 3 + 4:
        raise ArtifactError(f"coded block is truncated ({len(block)} bytes)")
    body, crc = block[:-4], int.from_bytes(block[-4:], "little")
    if block[:4] != MAGIC:
        raise ArtifactError("coded block does not start with the huffman magic bytes")
    if zlib.crc32(body) != crc:
        raise ArtifactError("coded block failed its crc32 checksum; the payload is corrupted")
    r = _Reader(body)
    r.take(4)
    version, layout, cbcode = r.u8(), r.u8(), r.u8()
    if version != BLOCK_VERSION:
        raise ArtifactError(f"coded block version {version} is not supported (this slimguard reads "
                            f"{BLOCK_VERSION}); upgrade slimguard")
    if layout not in (DENSE, SPARSE) or cbcode >= len(CODEBOOK_DTYPES):
        raise ArtifactError(f"coded block has an unknown layout {layout} or codebook type {cbcode}")
    numel, k = r.varint(), r.varint()
    if k > MAX_SYMBOLS:
        raise ArtifactError(f"coded block has {k} codebook entries; at most {MAX_SYMBOLS} are allowed")
    cb_dtype = CODEBOOK_DTYPES[cbcode]
    size = torch.empty(0, dtype=cb_dtype).element_size()
    raw = r.take(k * size)
    book = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(cb_dtype).clone() if k else \
        torch.zeros(0, dtype=cb_dtype)
    lengths = _read_table(r, MAX_SYMBOLS)
    n_index = r.varint()
    info: dict[str, Any] = {"layout": "dense" if layout == DENSE else "sparse", "numel": numel,
                            "clusters": k, "bits": max(1, math.ceil(math.log2(k))) if k else 0,
                            "codebook_dtype": dtype_name(cb_dtype), "codebook_bytes": len(raw),
                            "kept": n_index, "codebook": book}
    gap_bits = n_gap = 0
    glengths = np.zeros(0, np.int64)
    if layout == SPARSE:
        gap_bits = r.u8()
        if not 1 <= gap_bits <= 8:
            raise ArtifactError(f"coded block has gap_bits {gap_bits}; allowed 1..8")
        glengths = _read_table(r, 1 << gap_bits)
        n_gap = r.varint()
        if n_gap < n_index:
            raise ArtifactError(f"coded block has {n_gap} gap symbols for {n_index} values")
    elif n_index != numel:
        raise ArtifactError(f"dense coded block holds {n_index} values for {numel} elements")
    nbits = r.varint()
    data = r.take((nbits + 7) // 8)
    info.update(index_bits_total=nbits, gap_bits=gap_bits, fillers=max(0, n_gap - n_index))
    gnbits, gdata = 0, b""
    if layout == SPARSE:
        gnbits = r.varint()
        gdata = r.take((gnbits + 7) // 8)
    if r.pos != len(body):
        raise ArtifactError(f"coded block length mismatch: {len(body) - r.pos} unexplained bytes at its end")
    info["position_bits_total"] = gnbits
    info["block_bytes"] = len(block)
    if not decode:
        return info
    info["indices"] = decode_symbols(data, nbits, n_index, lengths)
    if layout == SPARSE:
        gsym = decode_symbols(gdata, gnbits, n_gap, glengths)
        positions = symbols_to_positions(gsym, gap_bits)
        if len(positions) != n_index or (len(positions) and positions[-1] >= numel):
            raise ArtifactError(f"coded block positions do not match: {len(positions)} positions for "
                                f"{n_index} values in {numel} elements")
        info["positions"] = positions
    return info


register_codec(HuffmanCodec())
