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

Encodings (:mod:`deepzip.codecs`): ``raw``, ``bn`` (a folded BatchNorm), ``dense``,
``sparse`` and ``kernel`` for shared tensors, and ``alias`` (version 3) for a tensor that
is another one under a second name (tied weights): stored once, given to both names.

There is no pickle anywhere. Every size and offset is checked against the file before
anything is allocated or sliced; a damaged or hostile file raises DeepzipFormatError.
The byte layout is in ``docs/format.md``.

This module and the codecs need only NumPy: :func:`read_arrays` decodes a file to NumPy
arrays on a machine without PyTorch. Models in and out (``deepzip.save``,
``deepzip.load``) are :mod:`deepzip.dzip_torch`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .atomic import atomic_write, read_limited
from .codecs import (
    BOOK_DTYPES,
    FLOAT_STORES,
    MAX_CLUSTERS,
    MAX_KERNEL,
    RAW_DTYPES,
    RAW_INTS,
    STORES,
    decode_shared,
    folded_batchnorm,
    grid_bytes,
    grid_decode,
    kernel_size,
)
from .deprecated import moved
from .errors import DeepzipFormatError

__all__ = ["BOOK_DTYPES", "RAW_DTYPES", "DeepzipFormatError", "check_arrays", "decode_arrays",
           "iter_arrays", "folded_batchnorm",
           "read_arrays", "read_container", "write_file"]

MAGIC = b"DZIP\x00\r\n\x1a"
VERSION = 5
# 3 added the alias entry; 4 dropped the part offsets from the header (each part's size
# follows from its entry, parts lie back to back) and added the ``intN`` raw stores; 5
# deflates the header against a preset dictionary and allows ``intN`` codebooks
READS = (2, 3, 4, 5)
_PREAMBLE = struct.Struct("<8sHHIII")
MAX_HEADER = 64 << 20
# dtype names a header may use -> NumPy's type (bfloat16 has none: NumPy readers get float32)
DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f4", "int64": "<i8",
          "int32": "<i4", "uint8": "u1", "bool": "?"}
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
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
__getattr__ = moved(__name__, {
    **{n: f"deepzip.dzip_torch:{n}" for n in (
        "save", "load", "load_state", "info", "round_to_file_precision_", "precision_changes",
        "state_dict_bytes")},
    "inspect": "deepzip.dzip_torch:info", "_read": "deepzip.dzip:read_container",
    "_nonzero_huffman_bits": "deepzip.codecs:nonzero_huffman_bits"})


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DeepzipFormatError(f"bad {key!r} in header: {v!r}")
    return v


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
PARTS = {"raw": ("data",), "bn": ("data",), "alias": (),
          "dense": ("codebook", "index_lengths", "indices"),
          "sparse": ("codebook", "index_lengths", "indices", "gap_lengths", "gaps"),
          "kernel": ("codebook", "index_lengths", "indices", "gap_lengths", "gaps",
                     "count_lengths", "counts", "subsets")}
_STREAMS = (("indices", "index_nbits"), ("gaps", "gap_nbits"), ("counts", "count_nbits"),
            ("subsets", "subset_nbits"))


def read_container(path: str | os.PathLike[str]) -> tuple[dict[str, Any], memoryview, int]:
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
        store = _choice(e, "store", STORES)
        groups = 2 if enc == "bn" else 1
        if store in RAW_INTS:
            return {"data": groups * grid_bytes(numel, RAW_INTS[store])}
        return {"data": groups * numel * np.dtype(FLOAT_STORES[store]).itemsize}
    k = _int(e, "clusters", 0, MAX_CLUSTERS)
    book = _choice(e, "codebook_dtype", BOOK_DTYPES)
    sizes = {"codebook": grid_bytes(k, RAW_INTS[book]) if book in RAW_INTS
             else k * np.dtype(FLOAT_STORES[book]).itemsize, "index_lengths": (k + 2) // 2}
    if enc in ("sparse", "kernel"):
        sizes["gap_lengths"] = ((1 << _int(e, "gap_bits", 1, 8)) + 1) // 2
    if enc == "kernel":  # indices of the nonzeros only: k symbols, no zero symbol
        size = kernel_size(e["shape"])
        if size is None:
            raise DeepzipFormatError(f"{name!r}: the kernel layout needs 3+ dimensions and "
                                     f"kernels of 2..{MAX_KERNEL} weights")
        sizes.update(index_lengths=(k + 1) // 2, count_lengths=(size + 2) // 2)
    return sizes


def _layout(tensors: list[Any], data_len: int) -> None:
    """Version 4 records no offsets: each entry's parts lie back to back in the order
    ``PARTS`` lists them, entries in header order, every size following from the entry
    (coded streams: ``ceil(nbits / 8)`` bytes). Fills in ``parts`` as version 3 had them,
    after checking that the sizes add up to the data area exactly."""
    offset = 0
    for e in tensors:
        if not isinstance(e, dict) or "parts" in e:
            raise DeepzipFormatError("bad tensor entry (version 4 entries list no parts)")
        name = _str(e, "name")
        enc = _choice(e, "encoding", PARTS)
        sizes = _fixed_sizes(e, name, enc, math.prod(_shape(e, name)))
        for stream, bits in _STREAMS:
            if stream in PARTS[enc]:
                sizes[stream] = (_int(e, bits, 0, 8 * data_len) + 7) // 8
        e["parts"] = {}
        for part in PARTS[enc]:
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
    enc = _choice(e, "encoding", PARTS)
    _choice(e, "dtype", DTYPES)
    parts = e.get("parts", {}) if enc == "alias" else e.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(PARTS[enc]):
        raise DeepzipFormatError(f"{name!r}: parts must be exactly {', '.join(PARTS[enc])}")
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
        return {f"{name}.{k}": (shape if k != "num_batches_tracked" else []) for k in BN_KEYS}
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
            units = numel if enc == "sparse" else numel // kernel_size(shape)
            if units > entries << gap_bits:
                raise DeepzipFormatError(f"{name!r}: sparse entries cannot cover the tensor")
            if enc == "kernel":
                _int(e, "count_nbits", entries, 8 * size["counts"])
                _int(e, "subset_nbits", 0, 8 * size["subsets"])
    return {name: shape}


Into = Callable[[str], "np.ndarray | None"]  # a key -> where to decode it, or None


def check_arrays(header: dict[str, Any], data_len: int,
                 expected: dict[str, list[int]] | None, where: str) -> dict[str, list[int]]:
    """Validate every entry; check the keys and shapes against the model that will
    receive them (``expected``), or cap the total when there is none. Returns the keys and
    shapes the file decodes to: nothing is allocated before this passes."""
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
    return out


def _part_bytes(entry: dict[str, Any], data: memoryview) -> dict[str, bytes]:
    return {n: bytes(data[off:off + length]) for n, (off, length) in entry["parts"].items()}


def _decode_entry(e: dict[str, Any], data: memoryview,
                  done: dict[str, tuple[np.ndarray, str]], into: Into | None = None
                  ) -> dict[str, tuple[np.ndarray, str]]:
    """Decode one entry that :func:`_check_entry` accepted: key -> (array, dtype name).
    Raw arrays keep their stored type (the PyTorch side converts to ``dtype``); a shared
    float32 weight goes into the array ``into`` gives for its key, if any."""
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
            arr = np.frombuffer(parts["data"], dtype=FLOAT_STORES[store]).copy()
            if store == "bool" and arr.view(np.uint8).max(initial=0) > 1:
                raise DeepzipFormatError(f"tensor {name!r}: a bool stored as a byte other "
                                         "than 0 or 1")
        if enc == "bn":
            both = arr.astype(np.float32).reshape(2, *shape)
            return {f"{name}.{k}": (v, "int64" if k == "num_batches_tracked" else "float32")
                    for k, v in folded_batchnorm(both[0], both[1], e["eps"]).items()}
        return {name: (arr.reshape(shape), e["dtype"])}
    out = into(name) if into is not None and e["dtype"] == "float32" else None
    return {name: (decode_shared(e, parts, math.prod(shape), out).reshape(shape), e["dtype"])}


def iter_arrays(header: dict[str, Any], data: memoryview, into: Into | None = None
                ) -> Iterator[dict[str, tuple[np.ndarray, str]]]:
    """Decode a header that :func:`check_arrays` accepted an entry at a time (key ->
    (array, dtype name)), so a reader can put each away before the next is decoded; only
    the arrays that aliases point to are kept. ``into(key)``: where a shared float32
    weight may be decoded straight to (a contiguous float32 array of its size; the
    array is then the one returned), or None."""
    targets = {e["of"] for e in header["tensors"] if e["encoding"] == "alias"}
    kept: dict[str, tuple[np.ndarray, str]] = {}
    for e in header["tensors"]:
        piece = _decode_entry(e, data, kept, into)
        kept.update({k: v for k, v in piece.items() if k in targets})
        yield piece


def decode_arrays(header: dict[str, Any], data: memoryview,
                  expected: dict[str, list[int]] | None, where: str
                  ) -> dict[str, tuple[np.ndarray, str]]:
    """Validate the whole header (against ``expected`` keys and shapes, if given), then
    decode: key -> (array, dtype name). Nothing is allocated for an invalid file."""
    check_arrays(header, len(data), expected, where)
    out: dict[str, tuple[np.ndarray, str]] = {}
    for piece in iter_arrays(header, data):
        out.update(piece)
    return out


def read_arrays(path: str | os.PathLike[str], expected: dict[str, list[int]] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Decode a ``.dzip`` file with NumPy alone: (the plain state_dict as arrays, the
    recorded model spec as a dict or None). Needs no PyTorch (a device's loader, another
    language's test oracle). ``bfloat16`` tensors come back as float32, which NumPy lacks.

    >>> arrays, spec = read_arrays("model.dzip")
    >>> arrays["linear.weight"].shape
    (10, 64)
    """
    header, data, _ = read_container(path)
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
PART_KIND = {"gaps": "positions", "gap_lengths": "positions", "counts": "positions",
              "count_lengths": "positions", "subsets": "positions", "indices": "values",
              "index_lengths": "values", "codebook": "codebooks"}
