"""The ``.dzip`` format's tensor codecs: how one tensor becomes bytes and back, in NumPy.

``raw`` floats or ``intN`` grids (N-bit levels on a uniform grid over a tensor's range)
for what is not shared; for a shared tensor (at most 256 distinct nonzero values, the
codebook) the cheapest of three layouts: ``dense`` (one Huffman-coded cluster index per
weight, zero one more symbol), ``sparse`` (Deep Compression's: per nonzero the run of
zeros before it, bounded to ``2^gap_bits - 1`` with filler entries for longer runs, and
its cluster index; both streams Huffman-coded) and ``kernel`` (per small kernel its
count of nonzeros and which subset of positions they take, then the indices). Decoders
trust only sizes that :mod:`deepzip.dzip` (the container) checked first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DeepzipFormatError
from .huffman import HuffmanCode, decode, encode

MAX_CLUSTERS = 256
FLOAT_STORES = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4",
                "uint8": "u1", "bool": "?"}
RAW_INTS = {f"int{b}": b for b in range(2, 9)}  # uniform grids over a tensor's range
STORES = (*FLOAT_STORES, *RAW_INTS)
RAW_DTYPES = ("float16", "float32", *RAW_INTS)  # what a writer may store unshared floats as
BOOK_DTYPES = RAW_DTYPES  # and codebooks (an intN codebook: the k values on one grid)


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (0..15) as 4-bit nibbles."""
    x = np.asarray(lengths, dtype=np.uint8)
    if len(x) % 2:
        x = np.append(x, 0)
    return (x[0::2] << 4 | x[1::2]).astype(np.uint8).tobytes()


def unpack_lengths(data: bytes, n: int) -> np.ndarray:
    if len(data) != (n + 1) // 2:
        raise DeepzipFormatError("code-length table has the wrong size")
    b = np.frombuffer(data, dtype=np.uint8)
    return np.stack([b >> 4, b & 15], 1).ravel()[:n].astype(np.int64)


def grid_params(x: np.ndarray, bits: int) -> tuple[np.float16, np.float16] | None:
    """(lo, step) of a uniform grid of ``2^bits`` levels over ``x``'s range, as float16;
    None when float16 cannot hold them well (then the tensor is stored as floats)."""
    if x.size == 0:
        return np.float16(0), np.float16(0)
    if not np.isfinite(x).all():
        return None
    with np.errstate(over="ignore"):
        lo = np.float16(x.min())
        if np.isfinite(lo) and float(x.max()) - float(lo) <= abs(float(lo)) / 1024:
            return lo, np.float16(0)  # constant to float16's precision: one value
        exact = (float(x.max()) - float(lo)) / ((1 << bits) - 1)
        step = np.float16(exact)
    if not (np.isfinite(lo) and np.isfinite(step)) or abs(float(step) - exact) > exact / 512:
        return None  # out of float16's range, or a step so small it lost its precision
    return lo, step


def grid_bytes(n: int, bits: int) -> int:
    """Size of one stored group of ``n`` values on a ``bits``-bit grid."""
    return 4 + (n * bits + 7) // 8


def grid_encode(x: np.ndarray, bits: int) -> bytes | None:
    """``x`` on a uniform ``bits``-bit grid over its range: float16 lo and step, then the
    level of each value, ``bits`` bits each, most significant first. None when the range
    does not fit float16 (see :func:`_grid`)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    g = grid_params(x, bits)
    if g is None:
        return None
    lo, step = g
    if step == 0:
        q = np.zeros(x.size, dtype=np.int64)
    else:
        q = np.clip(np.rint((x - np.float32(lo)) / np.float32(step)), 0, (1 << bits) - 1)
    levels = np.unpackbits(q.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]  # n x bits
    return np.array([lo, step], dtype="<f2").tobytes() + np.packbits(levels).tobytes()


def grid_decode(data: bytes, n: int, bits: int) -> np.ndarray:
    """Values of one group that :func:`grid_encode` wrote (``grid_bytes(n, bits)`` bytes)."""
    lo, step = np.frombuffer(data[:4], dtype="<f2").astype(np.float32)
    if not (np.isfinite(lo) and np.isfinite(step)):  # never written: a damaged file
        raise DeepzipFormatError("a grid's lo or step is not a finite number")
    levels = np.unpackbits(np.frombuffer(data[4:], dtype=np.uint8))[:n * bits]
    q = np.packbits(levels.reshape(n, bits), axis=1)[:, 0] >> (8 - bits)  # uint8 levels
    return lo + q.astype(np.float32) * step


def grid_round(x: np.ndarray, bits: int) -> np.ndarray | None:
    """``x`` exactly as the file will hold it on a ``bits``-bit grid (None: it cannot)."""
    data = grid_encode(x, bits)
    if data is None:
        return None
    return grid_decode(data, np.asarray(x).size, bits).reshape(np.shape(x))


GRID_TOLERANCE = 0.1  # the coarsest grid step a raw tensor takes, per median |value|


def grid_too_coarse(x: np.ndarray, bits: int) -> bool:
    """True when a ``bits``-bit grid over ``x``'s range steps more than
    :data:`GRID_TOLERANCE` times the median magnitude: one outlier stretches the range
    for every value (folded BatchNorm scales of nearly empty channels reach 290x the
    median; measured on a kernel-pruned ResNet-20, an int8 grid everywhere cost 2.3
    points, bn1's scale alone, its step 2.3x the median, 2 of them; see
    docs/pipeline.md). Such a tensor is better stored as floats. Judged on the
    float16-rounded values, and a tensor already on its grid stays there, so rounding
    a model to the file's precision and saving the result choose the same stores."""
    x = np.asarray(x, dtype=np.float32).ravel()
    on_grid = grid_round(x, bits)
    if x.size == 0 or (on_grid is not None and np.array_equal(on_grid, x)):
        return False
    with np.errstate(over="ignore"):
        h = x.astype(np.float16).astype(np.float32)
    g = grid_params(h, bits)
    return g is not None and float(g[1]) > GRID_TOLERANCE * float(np.median(np.abs(h)))


def book_round(book: np.ndarray, store: str) -> np.ndarray:
    """A codebook (distinct values, ascending) as ``store`` keeps it; a grid codebook that
    cannot hold them (see :func:`_grid`) stays float32. Rounding may merge neighbours."""
    book = np.asarray(book, dtype=np.float32)
    if store in RAW_INTS:  # kept only if rounding it again changes nothing (idempotent)
        r = grid_round(book, RAW_INTS[store])
        ok = r is not None and np.all(r != 0) and np.array_equal(
            grid_round(r, RAW_INTS[store]), r)
        return r if ok else book
    return book.astype(FLOAT_STORES[store]).astype(np.float32)


def _book_bytes(book: np.ndarray, store: str) -> tuple[str, bytes]:
    """(the store used, the bytes) of a codebook that :func:`book_round` rounded: a grid
    only where it gives back exactly these values, float32 otherwise."""
    if store in RAW_INTS:
        data = grid_encode(book, RAW_INTS[store])
        if data is not None and np.array_equal(grid_decode(data, len(book), RAW_INTS[store]),
                                               book):
            return store, data
        store = "float32"
    return store, book.astype(FLOAT_STORES[store]).tobytes()


def _sparse_entries(nz: np.ndarray, idx: np.ndarray, numel: int, k: int,
                    gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(runs, symbols) covering all ``numel`` positions; symbol ``k`` marks a filler."""
    r_max = (1 << gap_bits) - 1
    span = r_max + 1
    gaps, tail = _gaps(nz, numel)
    fill = gaps >> gap_bits
    tail_fill, tail_rem = tail // span, tail % span
    ends = [np.full(tail_fill, r_max, dtype=np.uint8)] + (
        [np.array([tail_rem - 1], dtype=np.uint8)] if tail_rem else [])
    end_syms = np.full(tail_fill + (tail_rem > 0), k, dtype=np.uint16)
    if not fill.any():  # no gap needs a filler: one entry per nonzero, then the tail's
        return (np.concatenate([(gaps & r_max).astype(np.uint8), *ends]),
                np.concatenate([idx.astype(np.uint16), end_syms]))
    n = int(fill.sum(dtype=np.int64)) + len(nz)
    runs = np.full(n, r_max, dtype=np.uint8)  # gap_bits <= 8; symbols <= 256: small types
    syms = np.full(n, k, dtype=np.uint16)
    real = np.cumsum(fill + 1, dtype=np.int64) - 1
    runs[real], syms[real] = gaps & r_max, idx
    return np.concatenate([runs, *ends]), np.concatenate([syms, end_syms])


def _sparse_codes(gaps: GapCounts, sym_counts: np.ndarray, k: int, gap_bits: int
                  ) -> tuple[HuffmanCode, HuffmanCode, int, int]:
    """The run and symbol codes of the sparse layout at ``gap_bits`` and their streams'
    exact sizes in bits, from counts alone (what :func:`_sparse_entries` would build,
    without building it). ``gaps``: the zeros before each nonzero and after the last;
    ``sym_counts``: how often each real symbol occurs (length k)."""
    span = 1 << gap_bits
    tail_fill, tail_rem = divmod(gaps.tail, span)
    fillers = int(gaps.small @ (np.arange(256) >> gap_bits)) \
        + int((gaps.big >> gap_bits).sum()) + tail_fill
    runs = gaps.small.reshape(-1, span).sum(0) + np.bincount(gaps.big & (span - 1),
                                                             minlength=span)
    runs[span - 1] += fillers
    if tail_rem:
        runs[tail_rem - 1] += 1
    syms = np.zeros(k + 1, dtype=np.int64)
    syms[:k] = sym_counts
    syms[k] += fillers + (tail_rem > 0)
    gcode, icode = HuffmanCode.from_counts(runs), HuffmanCode.from_counts(syms)
    return gcode, icode, int(runs @ gcode.lengths), int(syms @ icode.lengths)


@dataclass(frozen=True)
class GapCounts:
    """The zeros before each nonzero, counted once for every run width :func:`_sparse_codes`
    tries: ``small[v]`` gaps of each length ``v`` < 256, the longer ones as they are, and
    the zeros after the last nonzero (``tail``)."""

    small: np.ndarray
    big: np.ndarray
    tail: int

    @classmethod
    def of(cls, gaps: np.ndarray, tail: int) -> GapCounts:
        small = np.bincount(np.minimum(gaps, 256), minlength=257).astype(np.int64)
        big = gaps[gaps >= 256].astype(np.int64) if small[256] else np.zeros(0, np.int64)
        return cls(small[:256], big, tail)


def _gaps(nz: np.ndarray, numel: int) -> tuple[np.ndarray, int]:
    """(zeros before each of the sorted positions ``nz``, zeros after the last)."""
    gaps = np.diff(nz, prepend=nz.dtype.type(-1))  # in the positions' own type
    gaps -= 1
    return gaps, numel - 1 - (int(nz[-1]) if len(nz) else -1)


@dataclass
class Encoded:
    meta: dict[str, Any]
    parts: dict[str, bytes]
    nonzero: int

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts.values())


def encode_shared(w: np.ndarray, codebook_dtype: str) -> Encoded:
    """A tensor of at most 256 distinct nonzero values, its codebook exactly those."""
    flat = w.ravel()
    nz = np.flatnonzero(flat)
    if flat.size < 1 << 31:  # positions and cluster indices in the smallest types: a big
        nz = nz.astype(np.int32)  # layer's temporaries stay a fraction of the layer
    values = flat[nz]
    book = np.unique(values)
    idx = np.searchsorted(book, values).astype(np.uint16)
    del values
    return encode_positions(nz, idx, book, w.shape, codebook_dtype)


def encode_indexed(codebook: np.ndarray, indices: np.ndarray, mask: np.ndarray,
                   codebook_dtype: str) -> Encoded:
    """What :func:`encode_shared` writes of ``codebook[indices] * mask`` (its distinct
    nonzero values rounded to ``codebook_dtype``), read straight from the indices and the
    mask: the weights are never computed nor sorted, only the (at most 256) centroids."""
    nz = np.flatnonzero(mask.ravel())
    if mask.size < 1 << 31:
        nz = nz.astype(np.int32)
    ids = indices.ravel()[nz]
    used = (np.bincount(ids, minlength=len(codebook)) > 0) & (codebook != 0)
    values = np.unique(codebook[used])
    rounded = values if codebook_dtype == "float32" else book_round(values, codebook_dtype)
    book = np.unique(rounded[rounded != 0])  # rounding may merge centroids or reach zero
    of = rounded[np.searchsorted(values, codebook[used])]
    sym = np.full(len(codebook), -1, dtype=np.int32)
    sym[np.flatnonzero(used)] = np.where(of != 0, np.searchsorted(book, of), -1)
    idx = sym[ids]
    del ids
    if (idx < 0).any():
        live = idx >= 0
        nz, idx = nz[live], idx[live]
    return encode_positions(nz, idx.astype(np.uint16), book, mask.shape, codebook_dtype)


def encode_positions(nz: np.ndarray, idx: np.ndarray, book: np.ndarray,
                     shape: tuple[int, ...], codebook_dtype: str) -> Encoded:
    """The cheapest layout of a shared tensor of ``shape`` whose nonzeros, at the sorted
    flat positions ``nz``, take the values ``book[idx]`` (``book``: ascending, nonzero)."""
    numel = math.prod(shape)
    k = len(book)
    codebook_dtype, book_bytes = _book_bytes(book, codebook_dtype)
    base = {"clusters": k, "codebook_dtype": codebook_dtype}

    # Every layout's exact size is known from its codes' lengths before anything is
    # encoded: only the cheapest is encoded (ties go to the earlier layout).
    counts = np.bincount(idx, minlength=k)
    dense_counts = np.append(counts, numel - len(nz))  # symbol k: a zero
    code = HuffmanCode.from_counts(dense_counts)
    lengths = pack_lengths(code.lengths)
    best_size = len(book_bytes) + len(lengths) + (int(dense_counts @ code.lengths) + 7) // 8
    best: Any = ("dense", code, lengths)
    counted = GapCounts.of(*_gaps(nz, numel))
    for gap_bits in range(1, 9):
        gcode, icode, gb, ib = _sparse_codes(counted, counts, k, gap_bits)
        if (gb + ib + 7) // 8 + 8 * 2 >= best_size:
            continue
        glen, ilen = pack_lengths(gcode.lengths), pack_lengths(icode.lengths)
        size = len(book_bytes) + len(glen) + len(ilen) + (gb + 7) // 8 + (ib + 7) // 8
        if size < best_size:
            best_size, best = size, ("sparse", gap_bits, gcode, icode, glen, ilen)
    if kernel_size(list(shape)) and len(nz):
        cand = _encode_kernels(nz, shape, book_bytes, idx, base)
        if cand.nbytes < best_size:
            return cand
    if best[0] == "dense":
        dense_syms = np.full(numel, k, dtype=np.uint16)
        dense_syms[nz] = idx
        data, nbits = encode(dense_syms, code)
        return Encoded({**base, "encoding": "dense", "index_nbits": nbits},
                        {"codebook": book_bytes, "index_lengths": lengths, "indices": data},
                        len(nz))
    _, gap_bits, gcode, icode, glen, ilen = best
    runs, syms = _sparse_entries(nz, idx, numel, k, gap_bits)
    gdata, gbits = encode(runs, gcode)
    idata, ibits = encode(syms, icode)
    return Encoded({**base, "encoding": "sparse", "gap_bits": gap_bits, "entries": len(runs),
                     "gap_nbits": gbits, "index_nbits": ibits},
                    {"codebook": book_bytes, "gap_lengths": glen, "index_lengths": ilen,
                     "gaps": gdata, "indices": idata}, len(nz))



MAX_KERNEL = 16  # largest kernel (prod of the dims after the first two) the layout takes
_CHUNK = 32  # kernels per mixed-radix block of the subsets stream


def kernel_size(shape: list[int]) -> int | None:
    """Weights per kernel of a tensor of ``shape`` if the kernel layout takes it."""
    size = math.prod(shape[2:]) if len(shape) >= 3 else 0
    return size if 2 <= size <= MAX_KERNEL else None


@functools.lru_cache(maxsize=MAX_KERNEL)
def _subset_tables(size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """For kernels of ``size`` weights: each of the 2^size patterns' rank among the
    patterns with as many ones (ascending), and per count n the patterns in rank order,
    as (C(size, n), size) booleans. Bit j of a pattern is weight j of the kernel."""
    pats = np.arange(1 << size)
    bits = (pats[:, None] >> np.arange(size)) & 1
    ones = bits.sum(1)
    rank = np.zeros(1 << size, dtype=np.int64)
    by_count = []
    for n in range(size + 1):
        members = pats[ones == n]
        rank[members] = np.arange(len(members))
        by_count.append(bits[members].astype(bool))
    return rank, by_count


def _blocks(radices: np.ndarray) -> np.ndarray:
    """Radices as (blocks of ``_CHUNK``, groups, digits per group), padded with radix 1 (a
    digit that adds nothing): each group's product fits 63 bits, so a group's number is
    one uint64 and only its few groups per block need Python's big integers."""
    r = np.asarray(radices, dtype=np.uint64)
    per = max(1, 63 // int(r.max()).bit_length())
    blocks = -(-len(r) // _CHUNK)
    out = np.ones((blocks, -(-_CHUNK // per) * per), dtype=np.uint64)
    flat = np.ones(blocks * _CHUNK, dtype=np.uint64)
    flat[:len(r)] = r
    out[:, :_CHUNK] = flat.reshape(blocks, _CHUNK)
    return out.reshape(blocks, -1, per)


def _pack_subsets(radices: np.ndarray, digits: np.ndarray) -> tuple[bytes, int]:
    """Digits (digit i < radices[i]) as mixed-radix numbers, one per block of ``_CHUNK``,
    each in the fewest bits that hold its product of radices, most significant first."""
    if len(digits) == 0:
        return b"", 0
    r = _blocks(radices)
    d = np.zeros(r.size, dtype=np.uint64)
    d.reshape(len(r), -1)[:, :_CHUNK].flat[:len(digits)] = np.asarray(digits, np.uint64)
    d = d.reshape(r.shape)
    value = np.zeros(r.shape[:2], dtype=np.uint64)
    top = np.ones(r.shape[:2], dtype=np.uint64)
    for j in range(r.shape[2]):  # within a group: vectorized over every group at once
        value = value * r[:, :, j] + d[:, :, j]
        top *= r[:, :, j]
    text = []
    for values, tops in zip(value.tolist(), top.tolist(), strict=True):
        v, t = 0, 1
        for a, p in zip(values, tops, strict=True):
            v, t = v * p + a, t * p
        if (n := (t - 1).bit_length()):
            text.append(format(v, f"0{n}b"))
    bits = np.frombuffer("".join(text).encode("ascii"), dtype=np.uint8) - ord("0")
    return np.packbits(bits).tobytes(), len(bits)


def _unpack_subsets(data: bytes, nbits: int, radices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_subsets`; the blocks must use exactly ``nbits`` bits."""
    if len(radices) == 0:
        if nbits:
            raise DeepzipFormatError("kernel subsets stream has bits left over")
        return np.zeros(0, dtype=np.int64)
    r = _blocks(radices)
    top = r.prod(axis=2)
    bits = (np.unpackbits(np.frombuffer(data, dtype=np.uint8)) + ord("0")).tobytes()
    value = np.zeros(r.shape[:2], dtype=np.uint64)
    pos = 0
    for b, tops in enumerate(top.tolist()):
        n = (math.prod(tops) - 1).bit_length()
        if pos + n > nbits:
            raise DeepzipFormatError("kernel subsets stream is shorter than its counts need")
        v = int(bits[pos:pos + n], 2) if n else 0
        pos += n
        for k in range(len(tops) - 1, -1, -1):
            v, value[b, k] = divmod(v, tops[k])
        if v:
            raise DeepzipFormatError("kernel subsets stream holds an impossible value")
    if pos != nbits:
        raise DeepzipFormatError("kernel subsets stream has bits left over")
    digits = np.zeros(r.shape, dtype=np.uint64)
    for j in range(r.shape[2] - 1, -1, -1):
        value, digits[:, :, j] = np.divmod(value, r[:, :, j])
    return digits.reshape(len(r), -1)[:, :_CHUNK].reshape(-1)[:len(radices)].astype(np.int64)


def _encode_kernels(nz: np.ndarray, shape: tuple[int, ...], book_bytes: bytes,
                    idx: np.ndarray, base: dict[str, Any]) -> Encoded:
    """The kernel layout at its cheapest run width: for each kernel (the weights
    ``w[o, i]`` of a convolution) how many of its weights are nonzero, coded as the
    sparse layout codes values (Huffman-coded runs of empty kernels, then the count);
    which ones, as the rank of the pattern among those with that count (mixed-radix
    blocks: log2 C(size, n) bits each, no table); then the nonzeros' cluster indices."""
    size = math.prod(shape[2:])
    live_mask = np.zeros(math.prod(shape), dtype=bool)
    live_mask[nz] = True
    live_mask = live_mask.reshape(-1, size)
    counts = live_mask.sum(1)
    live = np.flatnonzero(counts)
    rank, _ = _subset_tables(size)
    patterns = (live_mask[live].astype(np.int64) << np.arange(size)).sum(1)
    combs = np.array([math.comb(size, n) for n in range(size + 1)], dtype=object)
    subsets, sbits = _pack_subsets(combs[counts[live]], rank[patterns])
    icode = HuffmanCode.from_symbols(idx, base["clusters"])
    idata, ibits = encode(idx, icode)
    out = []
    count_counts = np.bincount(counts[live] - 1, minlength=size)
    counted = GapCounts.of(*_gaps(live, len(counts)))
    for gap_bits in range(1, 9):
        gcode, ccode, gb, cb = _sparse_codes(counted, count_counts, size, gap_bits)
        cost = (gb + 7) // 8 + (cb + 7) // 8 + (1 << gap_bits) // 2
        if out and cost >= out[0][0]:
            continue  # the streams' exact sizes, known before encoding: keep the cheapest
        out = [(cost, gap_bits, gcode, ccode)]
    _, gap_bits, gcode, ccode = out[0]
    runs, syms = _sparse_entries(live, counts[live] - 1, len(counts), size, gap_bits)
    gdata, gbits = encode(runs, gcode)
    cdata, cbits = encode(syms, ccode)
    return Encoded(
            {**base, "encoding": "kernel", "gap_bits": gap_bits, "entries": len(runs),
             "gap_nbits": gbits, "count_nbits": cbits, "subset_nbits": sbits,
             "index_nbits": ibits},
            {"codebook": book_bytes, "index_lengths": pack_lengths(icode.lengths),
             "indices": idata, "gap_lengths": pack_lengths(gcode.lengths), "gaps": gdata,
             "count_lengths": pack_lengths(ccode.lengths), "counts": cdata,
             "subsets": subsets}, int(counts.sum()))


def decode_shared(meta: dict[str, Any], parts: dict[str, bytes], numel: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Decode a dense, sparse or kernel-layout shared tensor whose entry
    :func:`_check_entry` accepted, into ``out`` (float32, ``numel`` values, contiguous:
    a model's own tensor, written once) where given."""
    if out is None:
        out = np.empty(numel, dtype=np.float32)
    out = out.reshape(-1)
    k = meta["clusters"]
    store = meta["codebook_dtype"]
    if store in RAW_INTS:
        book = grid_decode(parts["codebook"], k, RAW_INTS[store])
    else:
        book = np.frombuffer(parts["codebook"], dtype=FLOAT_STORES[store]).astype(np.float32)
    icode = None if meta["encoding"] == "kernel" else HuffmanCode(  # k + 1: zero is a symbol
        unpack_lengths(parts["index_lengths"], k + 1))
    # Symbol k (zero, or a sparse run's filler) looks up 0.0: one gather, no mask.
    values = np.append(book, np.float32(0))
    if meta["encoding"] == "dense":
        return np.take(values, decode(parts["indices"], meta["index_nbits"], numel, icode),
                       out=out)
    gap_bits, entries = meta["gap_bits"], meta["entries"]
    gcode = HuffmanCode(unpack_lengths(parts["gap_lengths"], 1 << gap_bits))
    runs = decode(parts["gaps"], meta["gap_nbits"], entries, gcode)
    pos = np.cumsum(runs, dtype=np.int64)  # each entry's position: its run, and one
    pos += np.arange(len(runs))  # more for each entry before it
    if meta["encoding"] == "kernel":
        return decode_kernels(meta, parts, out, book, runs, pos)
    syms = decode(parts["indices"], meta["index_nbits"], entries, icode)
    if (pos[-1] if entries else -1) != numel - 1:
        raise DeepzipFormatError("sparse entries do not cover the tensor exactly")
    out.fill(0)
    out[pos] = values[syms]  # a filler's position holds a zero, and writes one
    return out


def decode_kernels(meta: dict[str, Any], parts: dict[str, bytes], out: np.ndarray,
                    book: np.ndarray, runs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The rest of a kernel-layout tensor into ``out``, its runs of empty kernels
    decoded."""
    size = kernel_size(meta["shape"])
    kernels, k = len(out) // size, meta["clusters"]
    if (pos[-1] if len(pos) else -1) != kernels - 1:
        raise DeepzipFormatError("kernel entries do not cover the tensor exactly")
    ccode = HuffmanCode(unpack_lengths(parts["count_lengths"], size + 1))
    syms = decode(parts["counts"], meta["count_nbits"], len(runs), ccode)
    real = syms < size
    live, counts = pos[real], syms[real] + 1
    radices = np.array([math.comb(size, int(n)) for n in counts], dtype=object)
    digits = _unpack_subsets(parts["subsets"], meta["subset_nbits"], radices)
    _, by_count = _subset_tables(size)
    masks = np.zeros((len(live), size), dtype=bool)
    for n in np.unique(counts):
        sel = counts == n
        masks[sel] = by_count[n][digits[sel]]
    nonzero = int(counts.sum())
    if nonzero and not k:
        raise DeepzipFormatError("nonzero weights but an empty codebook")
    icode = HuffmanCode(unpack_lengths(parts["index_lengths"], k))
    idx = decode(parts["indices"], meta["index_nbits"], nonzero, icode)
    rows = np.zeros((len(live), size), dtype=np.float32)
    rows[masks] = book[idx]
    out.fill(0)
    out.reshape(kernels, size)[live] = rows
    return out


def folded_batchnorm(scale: np.ndarray, shift: np.ndarray, eps: float
                      ) -> dict[str, np.ndarray]:
    """The BatchNorm state (by key suffix) that computes ``x * scale + shift`` in eval
    mode: running mean 0, running variance 1 - eps."""
    scale = np.asarray(scale, dtype=np.float32)
    return {"weight": scale, "bias": np.asarray(shift, dtype=np.float32),
            "running_mean": np.zeros_like(scale),
            "running_var": np.full_like(scale, np.float32(1 - eps)),
            "num_batches_tracked": np.array(0, dtype=np.int64)}


def nonzero_huffman_bits(flat: np.ndarray) -> int:
    """Huffman-coded bits of the nonzeros' cluster indices, code built on them alone."""
    values = flat[flat != 0]
    idx = np.searchsorted(np.unique(values), values)
    return HuffmanCode.from_symbols(idx, max(int(idx.max(initial=0)) + 1, 1)).bits(idx)
