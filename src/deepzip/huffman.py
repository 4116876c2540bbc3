"""Canonical Huffman coding on integer symbols (the core of the ``.dzip`` size).

Only code lengths are stored; codes are rebuilt canonically (shorter codes first, ties by
symbol value, as in DEFLATE). Coding the symbols is the per-symbol floor of saving and
loading a file, so it runs in C where the package was built with a compiler
(``deepzip._huffman``; its decoder is the C reader's ``c/huffman.h``), a few nanoseconds
a symbol; else the encoder is vectorized NumPy and the decoder ``bitarray``'s
``canonical_decode``, whose iterator through ``np.fromiter`` takes about 35.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, int2ba

from .errors import DeepzipError, DeepzipFormatError

try:
    from . import _huffman as _native
except ImportError:  # built without a C compiler: bitarray decodes
    _native = None

__all__ = ["MAX_CODE_LENGTH", "HuffmanCode", "code_lengths", "decode", "encode"]

MAX_CODE_LENGTH = 15  # lengths fit in 4 bits; plenty for alphabets of a few hundred symbols


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length per symbol (0 for unused symbols), at most ``max_length``.

    A lone used symbol gets length 1 (a code must have at least one bit). If the optimal
    code is too deep, counts are halved (rounding up) until it fits: a small, rare loss.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise DeepzipError("symbol counts must be a 1-D array of non-negative integers")
    used = np.flatnonzero(counts)
    if len(used) > 2 ** max_length:
        raise DeepzipError(f"{len(used)} symbols cannot have codes of <= {max_length} bits")
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used] = 1
    c = counts[used]
    while len(used) > 1:
        depth = _huffman_depths(c)
        if depth.max() <= max_length:
            lengths[used] = depth
            break
        c = (c + 1) // 2
    return lengths


def _huffman_depths(counts: np.ndarray) -> np.ndarray:
    """Each symbol's depth in Huffman's tree: merge the two lightest nodes (ties by the
    order nodes were made: symbols first, by value), then walk each node to the root.
    A node is made after its children, so one backward pass gives every depth."""
    n = len(counts)
    heap = [(int(w), i) for i, w in enumerate(counts)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    made = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = made
        heapq.heappush(heap, (w1 + w2, made))
        made += 1
    depth = [0] * made
    for node in range(made - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return np.array(depth[:n], dtype=np.int64)


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical code, fully determined by ``lengths`` (0 = symbol unused)."""

    lengths: np.ndarray

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> HuffmanCode:
        return cls(code_lengths(counts))

    @classmethod
    def from_symbols(cls, symbols: np.ndarray, alphabet: int) -> HuffmanCode:
        return cls.from_counts(np.bincount(symbols, minlength=alphabet))

    def tables(self) -> tuple[list[int], list[int]]:
        """(count per length, symbols in canonical order): bitarray's decoding tables."""
        lengths = np.asarray(self.lengths)
        if lengths.ndim != 1 or (lengths < 0).any() or (lengths > MAX_CODE_LENGTH).any():
            raise DeepzipFormatError("bad Huffman code lengths")
        used = np.flatnonzero(lengths)
        order = used[np.lexsort((used, lengths[used]))]
        count = np.bincount(lengths[used], minlength=MAX_CODE_LENGTH + 1)
        count[0] = 0
        # Kraft: a prefix code exists iff sum 2^-l <= 1.
        if sum(int(c) << (MAX_CODE_LENGTH - i) for i, c in enumerate(count)) \
                > 1 << MAX_CODE_LENGTH:
            raise DeepzipFormatError("Huffman code lengths violate the Kraft inequality")
        return count.tolist(), order.tolist()

    def codes(self) -> dict[int, bitarray]:
        """Canonical code words: codes of each length are consecutive integers."""
        count, order = self.tables()
        out, code, k = {}, 0, 0
        for length in range(1, len(count)):
            for _ in range(count[length]):
                out[order[k]] = int2ba(code, length)
                code += 1
                k += 1
            code <<= 1
        return out

    def values(self) -> np.ndarray:
        """Each symbol's canonical code word as an integer (uint16; 0 where unused)."""
        count, order = self.tables()
        out = np.zeros(len(self.lengths), dtype=np.uint16)
        code, k = 0, 0
        for length in range(1, len(count)):
            out[order[k:k + count[length]]] = code + np.arange(count[length], dtype=np.uint16)
            code += count[length]
            k += count[length]
            code <<= 1
        return out

    def bits(self, symbols: np.ndarray) -> int:
        """Encoded size of ``symbols`` in bits, without encoding them."""
        return int(np.bincount(symbols, minlength=len(self.lengths)) @ np.asarray(
            self.lengths, dtype=np.int64)) if len(symbols) else 0

    def average_length(self, symbols: np.ndarray) -> float:
        return self.bits(symbols) / len(symbols) if len(symbols) else 0.0


def encode(symbols: np.ndarray, code: HuffmanCode) -> tuple[bytes, int]:
    """Encode integer ``symbols`` -> (bytes, number of bits), MSB first.

    In C where ``deepzip._huffman`` was built. Else vectorized in NumPy, a block of
    symbols at a time: every code word's bits stand back to back in one small table, and
    each output bit is gathered from it (its symbol's code word, its place in it) in one
    pass; the bits are packed once. Memory beyond the output: about 10 bytes per output
    bit of one block plus one byte per output bit.
    """
    symbols = np.asarray(symbols)
    if len(symbols) == 0:
        return b"", 0
    lengths = np.asarray(code.lengths, dtype=np.int64)
    if symbols.min() < 0 or symbols.max() >= len(lengths):
        raise DeepzipError("symbol without a Huffman code")
    counts = np.bincount(symbols, minlength=len(lengths))
    if (counts[lengths == 0] > 0).any():
        raise DeepzipError("symbol without a Huffman code")
    small = lengths.astype(np.uint8)
    total = int(counts @ lengths)
    if _native is not None:
        out = np.empty((total + 7) // 8, dtype=np.uint8)
        _native.encode(np.ascontiguousarray(symbols), small, code.values(), out)
        return out.tobytes(), total
    first = np.cumsum(lengths) - lengths  # where each symbol's code word starts in table
    first32 = first.astype(np.int32)
    within = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
    shift = np.repeat(lengths, lengths) - 1 - within
    table = ((np.repeat(code.values().astype(np.int64), lengths) >> shift) & 1).astype(np.uint8)
    bits = np.empty(total, dtype=np.uint8)
    at = 0
    for i in range(0, len(symbols), _BLOCK):
        block = symbols[i:i + _BLOCK]
        n = small[block]
        start = np.cumsum(n, dtype=np.int32)  # a block's bits fit an int32
        size = int(start[-1])
        start -= n  # each code word's first bit in the block's output
        src = np.repeat(first32[block] - start, n)
        src += np.arange(size, dtype=np.int32)
        bits[at:at + size] = table[src]
        at += size
    return np.packbits(bits).tobytes(), total


_BLOCK = 1 << 20  # symbols per block of the encoder


def _symbol_type(alphabet: int) -> type[np.unsignedinteger]:
    """The smallest type of an alphabet's symbols: the decoded arrays are as large as the
    tensor's entries, and everything after the decoder reads them."""
    return np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint64


def decode(data: bytes, nbits: int, count: int, code: HuffmanCode) -> np.ndarray:
    """Decode exactly ``count`` symbols from the first ``nbits`` bits of ``data``.

    Raises :class:`DeepzipError` if the stream is short, has bits left over, or holds a
    bit pattern that is no code word: a corrupt stream never decodes silently.
    """
    if not 0 <= nbits <= 8 * len(data) or count < 0 or count > max(nbits, 0):
        raise DeepzipFormatError("Huffman stream sizes are inconsistent")
    if count == 0:
        if nbits:
            raise DeepzipFormatError("Huffman stream has bits but no symbols")
        return np.zeros(0, dtype=_symbol_type(len(code.lengths)))
    counts, order = code.tables()
    dtype = _symbol_type(len(code.lengths))
    if _native is not None:
        out = np.empty(count, dtype=dtype)
        try:
            _native.decode(data, nbits, count, counts, order, out)
        except ValueError as e:
            raise DeepzipFormatError(str(e)) from None
        return out
    a = bitarray(endian="big")
    a.frombytes(data)
    del a[nbits:]
    try:
        out = np.fromiter(canonical_decode(a, counts, order), dtype=dtype, count=count)
    except (ValueError, IndexError) as e:
        raise DeepzipFormatError(f"corrupt Huffman stream ({e})") from None
    if code.bits(out) != nbits:
        raise DeepzipFormatError("corrupt Huffman stream (bits left over)")
    return out
