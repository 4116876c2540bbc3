"""The ``.dzip`` file: a compressed model that is really small on disk and loads back.

Layout (all integers little-endian)::

    magic  b"DZIP\\0\\r\\n\\x1a"   8 bytes
    version u16, reserved u16
    header_length u32, header_crc32 u32, data_crc32 u32
    header: zlib-compressed JSON (model spec; per tensor: name, shape, dtype, encoding
            and the fields that fix the size of each of its parts)
    data:   the parts, back to back in header order

One checksum covers the whole data area (version 1 had one per part: 40% of a small
model's header, about 3% of its file, for no extra safety). Version 4 stores no part
offsets either (versions 2 and 3 did: half of a ResNet-20 header): the reader derives
them and checks that the sizes add up to the data area exactly.

Encodings: ``raw`` (a plain array: BatchNorm, biases, unshared weights; float16 by
default, or ``intN``: N-bit levels on a uniform grid over the tensor's range), ``dense``
(one Huffman-coded cluster index per weight, zero being one more symbol) and ``sparse``
(Deep Compression's layout: for each nonzero, the run of zeros before it, bounded to
``2^gap_bits - 1`` with filler entries for longer runs, and its cluster index; both
streams Huffman-coded). Each shared tensor gets the cheaper layout.
A shared tensor is any floating tensor of 2+ dimensions with at most 256 distinct nonzero
values (Conv, Linear, Embedding, attention and RNN weights after weight sharing): the
codebook is those values, so decoded weights are bit-identical to the model saved.
``alias`` (version 3) records a tensor that is another one under a second name (tied
weights): stored once, given to both names on load.

There is no pickle anywhere. Every size and offset is checked against the file before
anything is allocated or sliced; a damaged or hostile file raises DeepzipFormatError.
The byte layout is in ``docs/format.md``.

This module needs only NumPy and bitarray: :func:`read_arrays` decodes a file to NumPy
arrays on a machine without PyTorch. The PyTorch side (``save``, ``load``, ``load_state``,
``inspect``, ``round_to_file_precision_`` ...) lives in :mod:`deepzip.dzip_torch` and is
reachable from here too (``deepzip.dzip.save``), imported on first use.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .atomic import atomic_write, read_limited
from .errors import DeepzipFormatError
from .huffman import HuffmanCode, decode, encode

__all__ = ["DeepzipFormatError", "decode_arrays", "folded_batchnorm", "read_arrays",
           "write_file"]  # and, through __getattr__, the PyTorch side's (dzip_torch)

MAGIC = b"DZIP\x00\r\n\x1a"
VERSION = 5
# 3 added the alias entry; 4 dropped the part offsets from the header (each part's size
# follows from its entry, parts lie back to back) and added the ``intN`` raw stores; 5
# deflates the header against a preset dictionary and allows ``intN`` codebooks
READS = (2, 3, 4, 5)
_PREAMBLE = struct.Struct("<8sHHIII")
MAX_CLUSTERS = 256
MAX_HEADER = 64 << 20
# dtype names a header may use -> NumPy's type (bfloat16 has none: NumPy readers get float32)
DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f4", "int64": "<i8",
          "int32": "<i4", "uint8": "u1", "bool": "?"}
_STORE = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4", "uint8": "u1",
          "bool": "?"}
RAW_INTS = {f"int{b}": b for b in range(2, 9)}  # uniform grids over a tensor's range
_STORES = (*_STORE, *RAW_INTS)
RAW_DTYPES = ("float16", "float32", *RAW_INTS)  # what a writer may store unshared floats as
BOOK_DTYPES = RAW_DTYPES  # and codebooks (an intN codebook: the k values on one grid)
# Version 5 headers are deflated against this preset dictionary (RFC 1950 FDICT): the JSON
# every header repeats, so a small model's header does not pay to spell it out once. Most
# frequent text last (deflate's nearer matches cost fewer bits). Part of the format: never
# change it without a new version.
HEADER_DICT = (
    b'"running_mean","running_var","num_batches_tracked",downsample.shortcut.features.'
    b'classifier.embeddings.attention.self_attn.q_proj.k_proj.v_proj.out_proj.mlp.fc1.fc2.'
    b'norm.ln.encoder.decoder.head.blocks.stem.weight_ih_l0","weight_hh_l0","bias_ih_l0",'
    b'"bias_hh_l0",{"name":"fc.weight","linear.weight",'
    b'"model":{"arch":"lenet5","num_classes":10,"mean":[0.1307],"std":[0.3081]},'
    b'"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]},"task":"mnist",'
    b'"model":{"arch":"resnet20","num_classes":10,"mean":[0.4914,0.4822,0.4465],'
    b'"std":[0.247,0.2435,0.2616]},"task":"cifar10","tensors":[{"name":"conv1.weight",'
    b'"shape":[16,3,3,3],"dtype":"float32","encoding":"raw","store":"float16"},'
    b'"encoding":"alias","of":"dtype":"int64","store":"int64"},{"name":"'
    b'"codebook_dtype":"int8","encoding":"dense","index_nbits":'
    b'"codebook_dtype":"float16","encoding":"sparse","gap_bits":5,"entries":'
    b',"gap_nbits":,"index_nbits":},{"name":"layer1.0.conv1.weight","shape":[16,16,3,3],'
    b'"dtype":"float32","clusters":},{"name":"layer1.0.bn1","shape":[16],"dtype":"float32",'
    b'"encoding":"bn","eps":1e-05,"store":"int8"},{"name":"layer1.0.conv2.weight",'
    b'"shape":[64,64,3,3],"dtype":"float32","clusters":,"codebook_dtype":"int8",'
    b'"encoding":"kernel","gap_bits":3,"entries":,"gap_nbits":,"count_nbits":,'
    b'"subset_nbits":,"index_nbits":')
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_TORCH_SIDE = {"save", "load", "load_state", "info", "inspect", "round_to_file_precision_",
               "precision_changes", "state_dict_bytes"}


def __getattr__(name: str) -> Any:
    """The PyTorch side, imported on first use, so reading with NumPy never needs torch."""
    if name in _TORCH_SIDE:
        from . import dzip_torch

        return getattr(dzip_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- tensor encodings
def _pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (0..15) as 4-bit nibbles."""
    x = np.asarray(lengths, dtype=np.uint8)
    if len(x) % 2:
        x = np.append(x, 0)
    return (x[0::2] << 4 | x[1::2]).astype(np.uint8).tobytes()


def _unpack_lengths(data: bytes, n: int) -> np.ndarray:
    if len(data) != (n + 1) // 2:
        raise DeepzipFormatError("code-length table has the wrong size")
    b = np.frombuffer(data, dtype=np.uint8)
    return np.stack([b >> 4, b & 15], 1).ravel()[:n].astype(np.int64)


def _grid(x: np.ndarray, bits: int) -> tuple[np.float16, np.float16] | None:
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
    g = _grid(x, bits)
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
    g = _grid(h, bits)
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
    return book.astype(_STORE[store]).astype(np.float32)


def _book_bytes(book: np.ndarray, store: str) -> tuple[str, bytes]:
    """(the store used, the bytes) of a codebook that :func:`book_round` rounded: a grid
    only where it gives back exactly these values, float32 otherwise."""
    if store in RAW_INTS:
        data = grid_encode(book, RAW_INTS[store])
        if data is not None and np.array_equal(grid_decode(data, len(book), RAW_INTS[store]),
                                               book):
            return store, data
        store = "float32"
    return store, book.astype(_STORE[store]).tobytes()


def _sparse_entries(nz: np.ndarray, idx: np.ndarray, numel: int, k: int,
                    gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(runs, symbols) covering all ``numel`` positions; symbol ``k`` marks a filler."""
    r_max = (1 << gap_bits) - 1
    span = r_max + 1
    gaps, tail = _gaps(nz, numel)
    fill = gaps >> gap_bits
    tail_fill, tail_rem = tail // span, tail % span
    n = int(fill.sum(dtype=np.int64)) + len(nz) + tail_fill + (tail_rem > 0)
    runs = np.full(n, r_max, dtype=np.uint8)  # gap_bits <= 8; symbols <= 256: small types
    syms = np.full(n, k, dtype=np.uint16)
    real = np.cumsum(fill + 1, dtype=np.int64) - 1
    runs[real], syms[real] = gaps & r_max, idx
    if tail_rem:
        runs[-1] = tail_rem - 1
    return runs, syms


def _sparse_codes(gaps: np.ndarray, tail: int, sym_counts: np.ndarray, k: int,
                  gap_bits: int) -> tuple[HuffmanCode, HuffmanCode, int, int]:
    """The run and symbol codes of the sparse layout at ``gap_bits`` and their streams'
    exact sizes in bits, from counts alone (what :func:`_sparse_entries` would build,
    without building it). ``gaps``: the zeros before each nonzero; ``tail``: after the
    last; ``sym_counts``: how often each real symbol occurs (length k)."""
    span = 1 << gap_bits
    tail_fill, tail_rem = divmod(tail, span)
    fillers = int((gaps >> gap_bits).sum()) + tail_fill
    runs = np.bincount(gaps & (span - 1), minlength=span)
    runs[span - 1] += fillers
    if tail_rem:
        runs[tail_rem - 1] += 1
    syms = np.zeros(k + 1, dtype=np.int64)
    syms[:k] = sym_counts
    syms[k] += fillers + (tail_rem > 0)
    gcode, icode = HuffmanCode.from_counts(runs), HuffmanCode.from_counts(syms)
    return gcode, icode, int(runs @ gcode.lengths), int(syms @ icode.lengths)


def _gaps(nz: np.ndarray, numel: int) -> tuple[np.ndarray, int]:
    """(zeros before each of the sorted positions ``nz``, zeros after the last)."""
    gaps = np.diff(nz, prepend=nz.dtype.type(-1))  # in the positions' own type
    gaps -= 1
    return gaps, numel - 1 - (int(nz[-1]) if len(nz) else -1)


@dataclass
class _Encoded:
    meta: dict[str, Any]
    parts: dict[str, bytes]
    nonzero: int

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts.values())


def _encode_shared(w: np.ndarray, codebook_dtype: str) -> _Encoded:
    flat = w.ravel()
    nz = np.flatnonzero(flat)
    if flat.size < 1 << 31:  # positions and cluster indices in the smallest types: a big
        nz = nz.astype(np.int32)  # layer's temporaries stay a fraction of the layer
    values = flat[nz]
    book = np.unique(values)
    idx = np.searchsorted(book, values).astype(np.uint16)
    del values
    k = len(book)
    codebook_dtype, book_bytes = _book_bytes(book, codebook_dtype)
    base = {"clusters": k, "codebook_dtype": codebook_dtype}

    # Every layout's exact size is known from its codes' lengths before anything is
    # encoded: only the cheapest is encoded (ties go to the earlier layout).
    counts = np.bincount(idx, minlength=k)
    dense_counts = np.append(counts, flat.size - len(nz))  # symbol k: a zero
    code = HuffmanCode.from_counts(dense_counts)
    lengths = _pack_lengths(code.lengths)
    best_size = len(book_bytes) + len(lengths) + (int(dense_counts @ code.lengths) + 7) // 8
    best: Any = ("dense", code, lengths)
    gaps, tail = _gaps(nz, flat.size)
    for gap_bits in range(1, 9):
        gcode, icode, gb, ib = _sparse_codes(gaps, tail, counts, k, gap_bits)
        if (gb + ib + 7) // 8 + 8 * 2 >= best_size:
            continue
        glen, ilen = _pack_lengths(gcode.lengths), _pack_lengths(icode.lengths)
        size = len(book_bytes) + len(glen) + len(ilen) + (gb + 7) // 8 + (ib + 7) // 8
        if size < best_size:
            best_size, best = size, ("sparse", gap_bits, gcode, icode, glen, ilen)
    if w.ndim >= 3 and 2 <= math.prod(w.shape[2:]) <= MAX_KERNEL and len(nz):
        cand = _encode_kernels(flat, w.shape, book_bytes, idx, base)
        if cand.nbytes < best_size:
            return cand
    if best[0] == "dense":
        dense_syms = np.full(flat.size, k, dtype=np.uint16)
        dense_syms[nz] = idx
        data, nbits = encode(dense_syms, code)
        return _Encoded({**base, "encoding": "dense", "index_nbits": nbits},
                        {"codebook": book_bytes, "index_lengths": lengths, "indices": data},
                        len(nz))
    _, gap_bits, gcode, icode, glen, ilen = best
    runs, syms = _sparse_entries(nz, idx, flat.size, k, gap_bits)
    gdata, gbits = encode(runs, gcode)
    idata, ibits = encode(syms, icode)
    return _Encoded({**base, "encoding": "sparse", "gap_bits": gap_bits, "entries": len(runs),
                     "gap_nbits": gbits, "index_nbits": ibits},
                    {"codebook": book_bytes, "gap_lengths": glen, "index_lengths": ilen,
                     "gaps": gdata, "indices": idata}, len(nz))


    if w.ndim >= 3 and 2 <= math.prod(w.shape[2:]) <= MAX_KERNEL and len(nz):
        cand = _encode_kernels(flat, w.shape, book_bytes, idx, base)
        if cand.nbytes < best.nbytes:
            best = cand
    return best


MAX_KERNEL = 16  # largest kernel (prod of the dims after the first two) the layout takes
_CHUNK = 32  # kernels per mixed-radix block of the subsets stream


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


def _pack_subsets(radices: np.ndarray, digits: np.ndarray) -> tuple[bytes, int]:
    """Digits (digit i < radices[i]) as mixed-radix numbers, one per block of ``_CHUNK``,
    each in the fewest bits that hold its product of radices, most significant first."""
    out = []
    for i in range(0, len(digits), _CHUNK):
        v, top = 0, 1
        for r, d in zip(radices[i:i + _CHUNK].tolist(), digits[i:i + _CHUNK].tolist(),
                        strict=True):
            v, top = v * r + d, top * r
        nbits = (top - 1).bit_length()
        if nbits:
            raw = np.frombuffer(v.to_bytes((nbits + 7) // 8, "big"), dtype=np.uint8)
            out.append(np.unpackbits(raw)[-nbits:])
    bits = np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)
    return np.packbits(bits).tobytes(), len(bits)


def _unpack_subsets(data: bytes, nbits: int, radices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_subsets`; the blocks must use exactly ``nbits`` bits."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    digits = np.zeros(len(radices), dtype=np.int64)
    pos = 0
    for i in range(0, len(radices), _CHUNK):
        block = radices[i:i + _CHUNK].tolist()
        n = (math.prod(block) - 1).bit_length()
        if pos + n > nbits:
            raise DeepzipFormatError("kernel subsets stream is shorter than its counts need")
        v = int.from_bytes(np.packbits(np.concatenate(
            [np.zeros(-n % 8, dtype=np.uint8), bits[pos:pos + n]])).tobytes(), "big")
        pos += n
        for j in range(len(block) - 1, -1, -1):
            v, digits[i + j] = divmod(v, block[j])
        if v:
            raise DeepzipFormatError("kernel subsets stream holds an impossible value")
    if pos != nbits:
        raise DeepzipFormatError("kernel subsets stream has bits left over")
    return digits


def _encode_kernels(flat: np.ndarray, shape: tuple[int, ...], book_bytes: bytes,
                    idx: np.ndarray, base: dict[str, Any]) -> _Encoded:
    """The kernel layout at its cheapest run width: for each kernel (the weights
    ``w[o, i]`` of a convolution) how many of its weights are nonzero, coded as the
    sparse layout codes values (Huffman-coded runs of empty kernels, then the count);
    which ones, as the rank of the pattern among those with that count (mixed-radix
    blocks: log2 C(size, n) bits each, no table); then the nonzeros' cluster indices."""
    size = math.prod(shape[2:])
    live_mask = (flat != 0).reshape(-1, size)
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
    gaps, tail = _gaps(live, len(counts))
    for gap_bits in range(1, 9):
        gcode, ccode, gb, cb = _sparse_codes(gaps, tail, count_counts, size, gap_bits)
        cost = (gb + 7) // 8 + (cb + 7) // 8 + (1 << gap_bits) // 2
        if out and cost >= out[0][0]:
            continue  # the streams' exact sizes, known before encoding: keep the cheapest
        out = [(cost, gap_bits, gcode, ccode)]
    _, gap_bits, gcode, ccode = out[0]
    runs, syms = _sparse_entries(live, counts[live] - 1, len(counts), size, gap_bits)
    gdata, gbits = encode(runs, gcode)
    cdata, cbits = encode(syms, ccode)
    return _Encoded(
            {**base, "encoding": "kernel", "gap_bits": gap_bits, "entries": len(runs),
             "gap_nbits": gbits, "count_nbits": cbits, "subset_nbits": sbits,
             "index_nbits": ibits},
            {"codebook": book_bytes, "index_lengths": _pack_lengths(icode.lengths),
             "indices": idata, "gap_lengths": _pack_lengths(gcode.lengths), "gaps": gdata,
             "count_lengths": _pack_lengths(ccode.lengths), "counts": cdata,
             "subsets": subsets}, int(counts.sum()))


def _decode_shared(meta: dict[str, Any], parts: dict[str, bytes], numel: int) -> np.ndarray:
    """Decode a dense, sparse or kernel-layout shared tensor whose entry
    :func:`_check_entry` accepted."""
    k = meta["clusters"]
    store = meta["codebook_dtype"]
    if store in RAW_INTS:
        book = grid_decode(parts["codebook"], k, RAW_INTS[store])
    else:
        book = np.frombuffer(parts["codebook"], dtype=_STORE[store]).astype(np.float32)
    icode = None if meta["encoding"] == "kernel" else HuffmanCode(  # k + 1: zero is a symbol
        _unpack_lengths(parts["index_lengths"], k + 1))
    if meta["encoding"] == "dense":
        syms = decode(parts["indices"], meta["index_nbits"], numel, icode)
        out = np.zeros(numel, dtype=np.float32)
        real = syms < k
        out[real] = book[syms[real]]
        return out
    gap_bits, entries = meta["gap_bits"], meta["entries"]
    gcode = HuffmanCode(_unpack_lengths(parts["gap_lengths"], 1 << gap_bits))
    runs = decode(parts["gaps"], meta["gap_nbits"], entries, gcode)
    pos = np.cumsum(runs + 1) - 1
    if meta["encoding"] == "kernel":
        return _decode_kernels(meta, parts, numel, book, runs, pos)
    syms = decode(parts["indices"], meta["index_nbits"], entries, icode)
    if (pos[-1] if entries else -1) != numel - 1:
        raise DeepzipFormatError("sparse entries do not cover the tensor exactly")
    out = np.zeros(numel, dtype=np.float32)
    real = syms < k
    out[pos[real]] = book[syms[real]]
    return out


def _decode_kernels(meta: dict[str, Any], parts: dict[str, bytes], numel: int,
                    book: np.ndarray, runs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The rest of a kernel-layout tensor, its runs of empty kernels decoded."""
    size = _kernel_size(meta["shape"])
    kernels, k = numel // size, meta["clusters"]
    if (pos[-1] if len(pos) else -1) != kernels - 1:
        raise DeepzipFormatError("kernel entries do not cover the tensor exactly")
    ccode = HuffmanCode(_unpack_lengths(parts["count_lengths"], size + 1))
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
    icode = HuffmanCode(_unpack_lengths(parts["index_lengths"], k))
    idx = decode(parts["indices"], meta["index_nbits"], nonzero, icode)
    rows = np.zeros((len(live), size), dtype=np.float32)
    rows[masks] = book[idx]
    out = np.zeros((kernels, size), dtype=np.float32)
    out[live] = rows
    return out.ravel()


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DeepzipFormatError(f"bad {key!r} in header: {v!r}")
    return v


def folded_batchnorm(scale: np.ndarray, shift: np.ndarray, eps: float
                      ) -> dict[str, np.ndarray]:
    """The BatchNorm state (by key suffix) that computes ``x * scale + shift`` in eval
    mode: running mean 0, running variance 1 - eps."""
    scale = np.asarray(scale, dtype=np.float32)
    return {"weight": scale, "bias": np.asarray(shift, dtype=np.float32),
            "running_mean": np.zeros_like(scale),
            "running_var": np.full_like(scale, np.float32(1 - eps)),
            "num_batches_tracked": np.array(0, dtype=np.int64)}


def pack_header(header: dict[str, Any] | bytes, version: int = VERSION) -> bytes:
    """The header (a dict, or JSON text) as a file of ``version`` stores it: compact JSON,
    deflated (against :data:`HEADER_DICT` from version 5 on)."""
    text = header if isinstance(header, bytes) else json.dumps(
        header, separators=(",", ":")).encode()
    z = zlib.compressobj(9, zdict=HEADER_DICT) if version >= 5 else zlib.compressobj(9)
    return z.compress(text) + z.flush()


def unpack_header(hdr: bytes | memoryview, version: int, limit: int = MAX_HEADER) -> bytes:
    """The JSON text of a header (zlib.error on bad data, DeepzipFormatError past
    ``limit``)."""
    d = zlib.decompressobj(zdict=HEADER_DICT) if version >= 5 else zlib.decompressobj()
    text = d.decompress(hdr, limit)
    if d.unconsumed_tail:
        raise DeepzipFormatError("header too large")
    return text


def write_file(path: str | os.PathLike[str], header: dict[str, Any],
               blobs: list[bytes]) -> int:
    """Preamble, compressed header and data, written atomically; returns the header's
    size (preamble included)."""
    hdr = pack_header(header)
    data_crc = 0
    for b in blobs:
        data_crc = zlib.crc32(b, data_crc)
    with atomic_write(path) as f:
        f.write(_PREAMBLE.pack(MAGIC, VERSION, 0, len(hdr), zlib.crc32(hdr), data_crc))
        f.write(hdr)
        for b in blobs:
            f.write(b)
    return _PREAMBLE.size + len(hdr)


MAX_FILE = 1 << 31  # 2 GiB: far above any model this format is for
MAX_ELEMENTS = 1 << 28  # decoded elements of a file with no model to check it against
_PARTS = {"raw": ("data",), "bn": ("data",), "alias": (),
          "dense": ("codebook", "index_lengths", "indices"),
          "sparse": ("codebook", "index_lengths", "indices", "gap_lengths", "gaps"),
          "kernel": ("codebook", "index_lengths", "indices", "gap_lengths", "gaps",
                     "count_lengths", "counts", "subsets")}
_STREAMS = (("indices", "index_nbits"), ("gaps", "gap_nbits"), ("counts", "count_nbits"),
            ("subsets", "subset_nbits"))


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], memoryview, int]:
    """Preamble, checksums and header of a file, read with a size limit (a device or a
    huge file is refused before it is read)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DeepzipFormatError(f"{path}: not a regular file")
    raw = read_limited(path, MAX_FILE, ".dzip file")
    if len(raw) < _PREAMBLE.size:
        raise DeepzipFormatError(f"{path}: too short to be a .dzip file")
    magic, version, _, hlen, hcrc, dcrc = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise DeepzipFormatError(f"{path}: not a .dzip file (bad magic bytes)")
    if version not in READS:
        raise DeepzipFormatError(f"{path}: format version {version}; this deepzip reads "
                                 f"{', '.join(map(str, READS))}")
    if hlen > len(raw) - _PREAMBLE.size:
        raise DeepzipFormatError(f"{path}: truncated header")
    hdr = raw[_PREAMBLE.size:_PREAMBLE.size + hlen]
    if zlib.crc32(hdr) != hcrc:
        raise DeepzipFormatError(f"{path}: header checksum mismatch")
    try:
        header = json.loads(unpack_header(hdr, version))
    except DeepzipFormatError as e:
        raise DeepzipFormatError(f"{path}: {e}") from None
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DeepzipFormatError(f"{path}: unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise DeepzipFormatError(f"{path}: header lacks a tensor list")
    if zlib.crc32(memoryview(raw)[_PREAMBLE.size + hlen:]) != dcrc:
        raise DeepzipFormatError(f"{path}: data checksum mismatch (damaged or truncated)")
    if version >= 4:
        try:
            _layout(header["tensors"], len(raw) - _PREAMBLE.size - hlen)
        except DeepzipFormatError as e:
            raise DeepzipFormatError(f"{path}: {e}") from None
    return header, memoryview(raw)[_PREAMBLE.size + hlen:], _PREAMBLE.size + hlen


def _choice(entry: dict[str, Any], key: str, allowed: Any) -> str:
    """A header string that must be one of ``allowed`` (checked as a string first, so a
    list or dict in its place is an error, not an unhashable-type crash)."""
    v = entry.get(key)
    if not isinstance(v, str) or v not in allowed:
        raise DeepzipFormatError(f"{entry.get('name')!r}: bad {key} {str(v)[:40]!r}")
    return v


def _shape(e: dict[str, Any], name: str) -> list[int]:
    shape = e.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31 for s in shape)):
        raise DeepzipFormatError(f"{name!r}: bad shape")
    return shape


def _fixed_sizes(e: dict[str, Any], name: str, enc: str, numel: int) -> dict[str, int]:
    """The sizes of the parts that an entry's fields fix: all but the coded streams."""
    if enc == "alias":
        return {}
    if enc in ("raw", "bn"):
        store = _choice(e, "store", _STORES)
        groups = 2 if enc == "bn" else 1
        if store in RAW_INTS:
            return {"data": groups * grid_bytes(numel, RAW_INTS[store])}
        return {"data": groups * numel * np.dtype(_STORE[store]).itemsize}
    k = _int(e, "clusters", 0, MAX_CLUSTERS)
    book = _choice(e, "codebook_dtype", BOOK_DTYPES)
    sizes = {"codebook": grid_bytes(k, RAW_INTS[book]) if book in RAW_INTS
             else k * np.dtype(_STORE[book]).itemsize, "index_lengths": (k + 2) // 2}
    if enc in ("sparse", "kernel"):
        sizes["gap_lengths"] = ((1 << _int(e, "gap_bits", 1, 8)) + 1) // 2
    if enc == "kernel":  # indices of the nonzeros only: k symbols, no zero symbol
        size = _kernel_size(e["shape"])
        if size is None:
            raise DeepzipFormatError(f"{name!r}: the kernel layout needs 3+ dimensions and "
                                     f"kernels of 2..{MAX_KERNEL} weights")
        sizes.update(index_lengths=(k + 1) // 2, count_lengths=(size + 2) // 2)
    return sizes


def _kernel_size(shape: list[int]) -> int | None:
    size = math.prod(shape[2:]) if len(shape) >= 3 else 0
    return size if 2 <= size <= MAX_KERNEL else None


def _layout(tensors: list[Any], data_len: int) -> None:
    """Version 4 records no offsets: each entry's parts lie back to back in the order
    ``_PARTS`` lists them, entries in header order, every size following from the entry
    (coded streams: ``ceil(nbits / 8)`` bytes). Fills in ``parts`` as version 3 had them,
    after checking that the sizes add up to the data area exactly."""
    offset = 0
    for e in tensors:
        if not isinstance(e, dict) or "parts" in e:
            raise DeepzipFormatError("bad tensor entry (version 4 entries list no parts)")
        name = _str(e, "name")
        enc = _choice(e, "encoding", _PARTS)
        sizes = _fixed_sizes(e, name, enc, math.prod(_shape(e, name)))
        for stream, bits in _STREAMS:
            if stream in _PARTS[enc]:
                sizes[stream] = (_int(e, bits, 0, 8 * data_len) + 7) // 8
        e["parts"] = {}
        for part in _PARTS[enc]:
            e["parts"][part] = [offset, sizes[part]]
            offset += sizes[part]
            if offset > data_len:
                raise DeepzipFormatError(f"{name!r}: its parts run past the end of the file "
                                         "(truncated?)")
    if offset != data_len:
        raise DeepzipFormatError(f"the data area holds {data_len - offset:,} bytes that no "
                                 "entry accounts for")


def _check_entry(e: Any, data_len: int, seen: dict[str, list[int]]) -> dict[str, list[int]]:
    """Validate one tensor entry completely, before anything is decoded: types, shape,
    encoding, every part inside the data area, and sizes that the stored bits can hold.
    Returns the state_dict keys it will produce, with their shapes."""
    if not isinstance(e, dict):
        raise DeepzipFormatError("bad tensor entry")
    name = _str(e, "name")
    shape = _shape(e, name)
    numel = math.prod(shape)
    enc = _choice(e, "encoding", _PARTS)
    _choice(e, "dtype", DTYPES)
    parts = e.get("parts", {}) if enc == "alias" else e.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(_PARTS[enc]):
        raise DeepzipFormatError(f"{name!r}: parts must be exactly {', '.join(_PARTS[enc])}")
    for pname, p in parts.items():
        if not (isinstance(p, list) and len(p) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in p)):
            raise DeepzipFormatError(f"{name!r}: bad part {pname!r}")
        if p[0] < 0 or p[1] < 0 or p[0] + p[1] > data_len:
            raise DeepzipFormatError(f"{name!r}: part {pname!r} lies outside the file "
                                     "(truncated?)")
    size = {k: v[1] for k, v in parts.items()}
    for pname, n in _fixed_sizes(e, name, enc, numel).items():
        if size[pname] != n:
            raise DeepzipFormatError(f"{name!r}: part {pname!r} has the wrong size for its "
                                     "entry")
    if enc == "alias":
        of = _str(e, "of")
        if seen.get(of) != shape:
            raise DeepzipFormatError(f"{name!r}: alias of {of!r}, which comes nowhere before "
                                     "it with that shape")
    elif enc == "bn":
        eps = e.get("eps")
        if not isinstance(eps, float) or not 0 < eps < 1 or len(shape) != 1:
            raise DeepzipFormatError(f"{name!r}: bad BatchNorm entry")
        return {f"{name}.{k}": (shape if k != "num_batches_tracked" else []) for k in _BN_KEYS}
    elif enc in ("dense", "sparse", "kernel"):
        _int(e, "index_nbits", 0, 8 * size["indices"])
        if enc == "dense":
            if numel > 8 * size["indices"]:  # every weight costs at least one bit
                raise DeepzipFormatError(f"{name!r}: more weights than bits in the file")
        else:
            gap_bits = e["gap_bits"]
            entries = _int(e, "entries", 0, 8 * min(  # each entry costs a bit per stream
                size["gaps"], size["counts"] if enc == "kernel" else size["indices"]))
            _int(e, "gap_nbits", 0, 8 * size["gaps"])
            units = numel if enc == "sparse" else numel // _kernel_size(shape)
            if units > entries << gap_bits:
                raise DeepzipFormatError(f"{name!r}: sparse entries cannot cover the tensor")
            if enc == "kernel":
                _int(e, "count_nbits", entries, 8 * size["counts"])
                _int(e, "subset_nbits", 0, 8 * size["subsets"])
    return {name: shape}


def _check_header(header: dict[str, Any], data_len: int,
                  expected: dict[str, list[int]] | None, where: str) -> int:
    """Validate every entry; check the keys and shapes against the model that will
    receive them (``expected``), or cap the total when there is none. Returns the number
    of elements the file decodes to: nothing is allocated before this passes."""
    out: dict[str, list[int]] = {}
    for e in header["tensors"]:
        for key, shape in _check_entry(e, data_len, out).items():
            if key in out:
                raise DeepzipFormatError(f"{where}: {key!r} appears twice")
            out[key] = shape
    if expected is not None:
        wrong = [f"{k} {tuple(v)} vs {tuple(expected[k])}" for k, v in out.items()
                 if k in expected and v != expected[k]]
        extra = [k for k in out if k not in expected]
        if wrong or extra:
            raise DeepzipFormatError(
                f"{where} does not fit the model: "
                + "; ".join(([f"shape mismatch: {', '.join(wrong[:5])}"] if wrong else [])
                            + ([f"unexpected keys: {', '.join(extra[:5])}"] if extra else [])))
    total = sum(math.prod(s) for s in out.values())
    if expected is None and total > MAX_ELEMENTS:
        raise DeepzipFormatError(f"{where}: declares {total:,} values, more than deepzip "
                                 f"decodes without a model to check them against")
    return total


def _part_bytes(entry: dict[str, Any], data: memoryview) -> dict[str, bytes]:
    return {n: bytes(data[off:off + length]) for n, (off, length) in entry["parts"].items()}


def _decode_entry(e: dict[str, Any], data: memoryview,
                  done: dict[str, tuple[np.ndarray, str]]) -> dict[str, tuple[np.ndarray, str]]:
    """Decode one entry that :func:`_check_entry` accepted: key -> (array, dtype name).
    Raw arrays keep their stored type (the PyTorch side converts to ``dtype``)."""
    name, shape, enc = e["name"], e["shape"], e["encoding"]
    if enc == "alias":
        return {name: done[e["of"]]}
    parts = _part_bytes(e, data)
    if enc in ("raw", "bn"):
        store, n = e["store"], math.prod(shape)
        if store in RAW_INTS:
            bits = RAW_INTS[store]
            size, data = grid_bytes(n, bits), parts["data"]
            arr = np.concatenate([grid_decode(data[i:i + size], n, bits)
                                  for i in range(0, len(data), size)])
        else:
            arr = np.frombuffer(parts["data"], dtype=_STORE[store]).copy()
        if enc == "bn":
            both = arr.astype(np.float32).reshape(2, *shape)
            return {f"{name}.{k}": (v, "int64" if k == "num_batches_tracked" else "float32")
                    for k, v in folded_batchnorm(both[0], both[1], e["eps"]).items()}
        return {name: (arr.reshape(shape), e["dtype"])}
    return {name: (_decode_shared(e, parts, math.prod(shape)).reshape(shape), e["dtype"])}


def decode_arrays(header: dict[str, Any], data: memoryview,
                  expected: dict[str, list[int]] | None, where: str
                  ) -> dict[str, tuple[np.ndarray, str]]:
    """Validate the whole header (against ``expected`` keys and shapes, if given), then
    decode: key -> (array, dtype name). Nothing is allocated for an invalid file."""
    _check_header(header, len(data), expected, where)
    out: dict[str, tuple[np.ndarray, str]] = {}
    for e in header["tensors"]:
        out.update(_decode_entry(e, data, out))
    return out


def read_arrays(path: str | os.PathLike[str], expected: dict[str, list[int]] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Decode a ``.dzip`` file with NumPy alone: (the plain state_dict as arrays, the
    recorded model spec as a dict or None). Needs no PyTorch (a device's loader, another
    language's test oracle). ``bfloat16`` tensors come back as float32, which NumPy lacks.

    >>> arrays, spec = read_arrays("model.dzip")  # doctest: +SKIP
    >>> arrays["linear.weight"].shape  # doctest: +SKIP
    (10, 64)
    """
    header, data, _ = _read(path)
    meta = header.get("model")
    if meta is not None and not isinstance(meta, dict):
        raise DeepzipFormatError(f"{path}: bad model spec")
    decoded = decode_arrays(header, data, expected, str(path))
    return {k: arr.astype(DTYPES[dtype], copy=False) for k, (arr, dtype) in decoded.items()}, meta


def _str(entry: dict[str, Any], key: str) -> str:
    v = entry.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= 1000:
        raise DeepzipFormatError(f"bad {key!r} in a tensor entry")
    return v


# Where a file's bytes go: zero-run positions of sparse layers, cluster indices (a dense
# layer's indices also say where its zeros are), codebooks, everything else.
_PART_KIND = {"gaps": "positions", "gap_lengths": "positions", "counts": "positions",
              "count_lengths": "positions", "subsets": "positions", "indices": "values",
              "index_lengths": "values", "codebook": "codebooks"}


def _nonzero_huffman_bits(flat: np.ndarray) -> int:
    """Huffman-coded bits of the nonzeros' cluster indices, code built on them alone."""
    values = flat[flat != 0]
    idx = np.searchsorted(np.unique(values), values)
    return HuffmanCode.from_symbols(idx, max(int(idx.max(initial=0)) + 1, 1)).bits(idx)
