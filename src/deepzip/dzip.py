"""The ``.dzip`` file: a compressed model that is really small on disk and loads back.

Layout (all integers little-endian)::

    magic  b"DZIP\\0\\r\\n\\x1a"   8 bytes
    version u16, reserved u16
    header_length u32, header_crc32 u32, data_crc32 u32
    header: zlib-compressed JSON (model spec; per tensor: name, shape, dtype, encoding,
            and per part [offset, length] into the data area)
    data:   the parts, back to back

One checksum covers the whole data area (version 1 had one per part: 40% of a small
model's header, about 3% of its file, for no extra safety).

Encodings: ``raw`` (a plain array: BatchNorm, biases, unshared weights; float16 by
default), ``dense`` (one Huffman-coded cluster index per weight, zero being one more
symbol) and ``sparse`` (Deep Compression's layout: for each nonzero, the run of zeros
before it, bounded to ``2^gap_bits - 1`` with filler entries for longer runs, and its
cluster index; both streams Huffman-coded). Each shared tensor gets the cheaper layout.
A shared tensor is any floating tensor of 2+ dimensions with at most 256 distinct nonzero
values (Conv, Linear, Embedding, attention and RNN weights after weight sharing): the
codebook is those values, so decoded weights are bit-identical to the model saved.
``alias`` (version 3) records a tensor that is another one under a second name (tied
weights): stored once, given to both names on load.

There is no pickle anywhere. Every size and offset is checked against the file before
anything is allocated or sliced; a damaged or hostile file raises DeepzipFormatError.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write, read_limited
from .errors import DeepzipError, DeepzipFormatError
from .huffman import HuffmanCode, decode, encode
from .models import ModelSpec, load_state_dict_strict
from .prune import bake_, is_pruned

__all__ = ["DeepzipFormatError", "inspect", "load", "round_to_file_precision_", "save"]

MAGIC = b"DZIP\x00\r\n\x1a"
VERSION = 3
READS = (2, 3)  # version 3 added the alias entry; a file without one is laid out as in 2
_PREAMBLE = struct.Struct("<8sHHIII")
MAX_CLUSTERS = 256
MAX_HEADER = 64 << 20
_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
           "bfloat16": (torch.bfloat16, None), "int64": (torch.int64, "<i8"),
           "int32": (torch.int32, "<i4"), "uint8": (torch.uint8, "u1"),
           "bool": (torch.bool, "?")}
_STORE = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4", "uint8": "u1",
          "bool": "?"}


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


def _sparse_entries(nz: np.ndarray, idx: np.ndarray, numel: int, k: int,
                    gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(runs, symbols) covering all ``numel`` positions; symbol ``k`` marks a filler."""
    r_max = (1 << gap_bits) - 1
    span = r_max + 1
    gaps = np.diff(np.concatenate([[-1], nz])) - 1
    fill, rem = gaps // span, gaps % span
    tail = numel - 1 - (int(nz[-1]) if len(nz) else -1)
    tail_fill, tail_rem = tail // span, tail % span
    n = int(fill.sum()) + len(nz) + tail_fill + (tail_rem > 0)
    runs = np.full(n, r_max, dtype=np.int64)
    syms = np.full(n, k, dtype=np.int64)
    real = np.cumsum(fill + 1) - 1
    runs[real], syms[real] = rem, idx
    if tail_rem:
        runs[-1] = tail_rem - 1
    return runs, syms


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
    values = flat[nz]
    book = np.unique(values)
    idx = np.searchsorted(book, values)
    k = len(book)
    book_bytes = book.astype(_STORE[codebook_dtype]).tobytes()
    base = {"clusters": k, "codebook_dtype": codebook_dtype}

    dense_syms = np.full(flat.size, k, dtype=np.int64)
    dense_syms[nz] = idx
    code = HuffmanCode.from_symbols(dense_syms, k + 1)
    data, nbits = encode(dense_syms, code)
    best = _Encoded({**base, "encoding": "dense", "index_nbits": nbits},
                    {"codebook": book_bytes, "index_lengths": _pack_lengths(code.lengths),
                     "indices": data}, len(nz))
    for gap_bits in range(1, 9):
        runs, syms = _sparse_entries(nz, idx, flat.size, k, gap_bits)
        gcode = HuffmanCode.from_symbols(runs, 1 << gap_bits)
        icode = HuffmanCode.from_symbols(syms, k + 1)
        est = (gcode.bits(runs) + icode.bits(syms) + 7) // 8 + 8 * 2
        if est >= best.nbytes:
            continue
        gdata, gbits = encode(runs, gcode)
        idata, ibits = encode(syms, icode)
        cand = _Encoded({**base, "encoding": "sparse", "gap_bits": gap_bits,
                         "entries": len(runs), "gap_nbits": gbits, "index_nbits": ibits},
                        {"codebook": book_bytes, "gap_lengths": _pack_lengths(gcode.lengths),
                         "index_lengths": _pack_lengths(icode.lengths), "gaps": gdata,
                         "indices": idata}, len(nz))
        if cand.nbytes < best.nbytes:
            best = cand
    return best


def _decode_shared(meta: dict[str, Any], parts: dict[str, bytes], numel: int) -> np.ndarray:
    """Decode a dense or sparse shared tensor whose entry :func:`_check_entry` accepted."""
    k = meta["clusters"]
    book = np.frombuffer(parts["codebook"], dtype=_STORE[meta["codebook_dtype"]]).astype(
        np.float32)
    icode = HuffmanCode(_unpack_lengths(parts["index_lengths"], k + 1))
    if meta["encoding"] == "dense":
        syms = decode(parts["indices"], meta["index_nbits"], numel, icode)
        out = np.zeros(numel, dtype=np.float32)
        real = syms < k
        out[real] = book[syms[real]]
        return out
    gap_bits, entries = meta["gap_bits"], meta["entries"]
    gcode = HuffmanCode(_unpack_lengths(parts["gap_lengths"], 1 << gap_bits))
    runs = decode(parts["gaps"], meta["gap_nbits"], entries, gcode)
    syms = decode(parts["indices"], meta["index_nbits"], entries, icode)
    pos = np.cumsum(runs + 1) - 1
    if (pos[-1] if entries else -1) != numel - 1:
        raise DeepzipFormatError("sparse entries do not cover the tensor exactly")
    out = np.zeros(numel, dtype=np.float32)
    real = syms < k
    out[pos[real]] = book[syms[real]]
    return out


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DeepzipFormatError(f"bad {key!r} in header: {v!r}")
    return v


# ---------------------------------------------------------------- model level
def _plain_state(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """State dict as the plain model would have it: pruning masks (``weight_orig`` /
    ``weight_mask``) and weight sharing (parametrizations) folded into ``weight``.

    Reads the effective weights instead of baking a deep copy: removing a
    parametrization from a copy would also strip it from the original's class. Keys come
    in a canonical order (by module, then name), so a model gives the same file whether
    it was pruned in this process or loaded from a checkpoint (PyTorch re-registers a
    pruned parameter last). ``copy=False``: the tensors as they are (meta ones too).
    """
    modules = dict(model.named_modules())
    position = {name: i for i, name in enumerate(modules)}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if ".parametrizations." in f".{key}":
            head, _, rest = key.partition("parametrizations.")
            mod = head.rstrip(".")
            attr, _, tail = rest.partition(".")
            if tail == "original":
                out[_join(mod, attr)] = getattr(modules[mod], attr)
            continue
        if leaf.endswith(("_orig", "_mask")) and is_pruned(modules[owner], leaf[:-5]):
            if leaf.endswith("_orig"):
                out[_join(owner, leaf[:-5])] = getattr(modules[owner], leaf[:-5])
            continue
        out[key] = t
    ordered = sorted(out.items(), key=lambda kv: (position.get(kv[0].rpartition(".")[0], -1),
                                                  kv[0]))
    if not copy:
        return dict(ordered)
    return {k: v.detach().cpu().contiguous() for k, v in ordered}


def _join(owner: str, attr: str) -> str:
    return f"{owner}.{attr}" if owner else attr


def _shared_names(state: dict[str, torch.Tensor]) -> set[str]:
    """Floating tensors of 2+ dimensions with at most 256 distinct nonzero values: stored
    shared (the codebook is exactly those values, so this is lossless)."""
    return {k for k, w in state.items() if w.is_floating_point() and w.dim() >= 2
            and w.numel() and bool(torch.isfinite(w).all())
            and torch.unique(w[w != 0]).numel() <= MAX_CLUSTERS}


def _aliases(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Keys that name a tensor already stored under an earlier one of ``keys`` (tied
    weights, buffers sharing storage): alias -> first key."""
    own = model.state_dict(keep_vars=True)
    first: dict[tuple, str] = {}
    out = {}
    for key in keys:
        t = own.get(key)
        if t is None:  # a pruned or shared weight: never tied (see prune.prunable)
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) \
            if t.numel() else (id(t),)
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise DeepzipError(f"cannot store tensors of dtype {t.dtype}")
    return name


def _raw_store(t: torch.Tensor, raw_dtype: str) -> str:
    if not t.is_floating_point():
        return _dtype_name(t)
    if raw_dtype == "float16" and torch.isfinite(t.float()).all() and \
            not torch.isfinite(t.float().to(torch.float16)).all():
        return "float32"  # would overflow in fp16
    return raw_dtype


_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _batchnorms(model: nn.Module) -> dict[str, float]:
    """BatchNorm layers that can be folded (affine, with running statistics): name -> eps."""
    return {name: m.eps for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
            and m.track_running_stats}


def _folded_var(like: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.full_like(like, 1 - eps)


def _bn_affine(state: dict[str, torch.Tensor], prefix: str, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode is ``x * scale + shift``: (scale, shift) of one layer.

    A layer folded before (mean 0, variance 1 - eps) is taken as it is, so folding twice
    changes nothing and a folded in-memory model matches its file bit for bit.
    """
    w, b, mean, var = (state[f"{prefix}.{k}"].float() for k in _BN_KEYS[:4])
    if torch.all(mean == 0) and torch.equal(var, _folded_var(var, eps)):
        return w, b
    scale = w / torch.sqrt(var + eps)
    return scale, b - mean * scale


def _bn_state(prefix: str, scale: torch.Tensor, shift: torch.Tensor, eps: float
              ) -> dict[str, torch.Tensor]:
    """The BatchNorm state that computes ``x * scale + shift`` in eval mode."""
    return {f"{prefix}.weight": scale, f"{prefix}.bias": shift,
            f"{prefix}.running_mean": torch.zeros_like(scale),
            f"{prefix}.running_var": _folded_var(scale, eps),
            f"{prefix}.num_batches_tracked": torch.tensor(0, dtype=torch.long)}


def round_to_file_precision_(model: nn.Module, raw_dtype: str = "float16",
                             codebook_dtype: str = "float32",
                             fold_batchnorm: bool = True) -> nn.Module:
    """Change ``model`` in place exactly as :func:`save` will store it, so the in-memory
    model and the decoded file give bit-identical outputs: bakes pruning masks, folds
    BatchNorm (if asked), rounds to the storage dtypes."""
    from .quantize import codebooks

    _check_dtypes(raw_dtype, codebook_dtype)
    bake_(model)
    state = _plain_state(model)
    shared = _shared_names(state)
    own = model.state_dict(keep_vars=True)
    folded = set()
    with torch.no_grad():
        if fold_batchnorm:
            for prefix, eps in _batchnorms(model).items():
                scale, shift = _bn_affine(state, prefix, eps)
                for key, value in _bn_state(prefix, scale, shift, eps).items():
                    own[key].copy_(value)
                folded.update(f"{prefix}.{k}" for k in _BN_KEYS[2:])  # rebuilt, not stored
        for cb in codebooks(model).values():
            cb.codebook.copy_(_round(cb.codebook, codebook_dtype))
        for key, t in own.items():
            if "parametrizations." in key or not t.is_floating_point() or key in folded:
                continue  # quantized layers: their codebooks were rounded above
            t.copy_(_round(t, codebook_dtype if key in shared else _raw_store(t, raw_dtype)))
    return model


def precision_changes(model: nn.Module, raw_dtype: str = "float16",
                      codebook_dtype: str = "float32", fold_batchnorm: bool = True) -> list[str]:
    """Names of the tensors that :func:`save` would store changed (rounded to float16,
    BatchNorm folded): empty when the file decodes to exactly this model."""
    import copy

    rounded = round_to_file_precision_(copy.deepcopy(model), raw_dtype, codebook_dtype,
                                       fold_batchnorm)
    before, after = _plain_state(model), _plain_state(rounded)
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def _round(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(_DTYPES[dtype][0]).to(t.dtype)


def _check_dtypes(raw_dtype: str, codebook_dtype: str) -> None:
    if raw_dtype not in ("float16", "float32"):
        raise DeepzipError(f"raw dtype must be float16 or float32, got {raw_dtype!r}")
    if codebook_dtype not in ("float16", "float32"):
        raise DeepzipError(f"codebook dtype must be float16 or float32, got {codebook_dtype!r}")


def save(model: nn.Module, path: str | os.PathLike[str], *, spec: ModelSpec | None = None,
         raw_dtype: str = "float16", codebook_dtype: str = "float32",
         fold_batchnorm: bool = True) -> dict[str, Any]:
    """Write ``model`` as a ``.dzip`` file (atomically); return the per-tensor size report.

    Pruned (masked) and quantized (parametrized) models are baked first; the model
    itself is not changed. With ``fold_batchnorm``, each BatchNorm layer is stored as the
    per-channel ``scale, shift`` it computes in eval mode (half the numbers; the loaded
    model has running mean 0 and variance 1 - eps, the same function). Call
    :func:`round_to_file_precision_` first if the in-memory model must match the file bit
    for bit (fp16 BatchNorm, fp16 codebooks, folding).

    >>> report = save(model, "resnet20.dzip", spec=spec)  # doctest: +SKIP
    >>> model = load("resnet20.dzip")  # doctest: +SKIP
    """
    _check_dtypes(raw_dtype, codebook_dtype)
    state = _plain_state(model)
    broken = [k for k, t in state.items() if t.is_floating_point() and bool(t.isnan().any())]
    if broken:
        raise DeepzipError(f"{', '.join(broken[:3])} hold NaN values: refusing to write a "
                           "model that cannot compute (did training diverge?)")
    aliases = _aliases(model, list(state))
    shared = _shared_names(state)
    bns = _batchnorms(model) if fold_batchnorm else {}
    owner = {f"{p}.{k}": p for p in bns for k in _BN_KEYS}
    blobs: list[bytes] = []
    offset = 0
    tensors, report = [], []
    for key, t in state.items():
        if key in owner and not key.endswith(".weight"):
            continue  # a folded BatchNorm is written once, at its weight
        entry: dict[str, Any] = {"name": key, "shape": list(t.shape), "dtype": _dtype_name(t)}
        if key in aliases and aliases[key] in state and key not in owner:
            tensors.append({**entry, "encoding": "alias", "of": aliases[key]})
            report.append({"name": key, "shape": list(t.shape), "params": 0,
                           "encoding": "alias", "bytes": 0, "nonzero": 0,
                           "of": aliases[key]})
            continue
        if key in owner:
            prefix = owner[key]
            scale, shift = _bn_affine(state, prefix, bns[prefix])
            store = _raw_store(torch.cat([scale, shift]), raw_dtype)
            entry = {"name": prefix, "shape": list(t.shape), "dtype": "float32",
                     "encoding": "bn", "eps": bns[prefix], "store": store}
            parts = {"data": torch.cat([scale, shift]).numpy().astype(_STORE[store]).tobytes()}
            info = {"nonzero": int(torch.count_nonzero(scale))}
        elif key in shared:
            enc = _encode_shared(_round(t.float(), codebook_dtype).numpy(), codebook_dtype)
            entry.update(enc.meta)
            parts = enc.parts
            info = {"nonzero": enc.nonzero, "clusters": enc.meta["clusters"]}
        else:
            store = _raw_store(t, raw_dtype)
            entry.update({"encoding": "raw", "store": store})
            conv = t.to(_DTYPES[store][0]) if t.is_floating_point() else t
            parts = {"data": conv.numpy().astype(_STORE[store]).tobytes()}
            info = {"nonzero": int(torch.count_nonzero(t))}
        entry["parts"] = {}
        for pname, blob in parts.items():
            entry["parts"][pname] = [offset, len(blob)]
            blobs.append(blob)
            offset += len(blob)
        tensors.append(entry)
        report.append({"name": entry["name"], "shape": list(t.shape), "params": t.numel(),
                       "encoding": entry["encoding"], "bytes": sum(len(b) for b in parts.values()),
                       **info})
    header = {"format": "deepzip", "version": VERSION,
              "model": spec.to_dict() if spec else None, "tensors": tensors}
    hdr = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    data_crc = 0
    for b in blobs:
        data_crc = zlib.crc32(b, data_crc)
    with atomic_write(path) as f:
        f.write(_PREAMBLE.pack(MAGIC, VERSION, 0, len(hdr), zlib.crc32(hdr), data_crc))
        f.write(hdr)
        for b in blobs:
            f.write(b)
    return {"tensors": report, "header_bytes": _PREAMBLE.size + len(hdr),
            "file_bytes": _PREAMBLE.size + len(hdr) + offset}


MAX_FILE = 1 << 31  # 2 GiB: far above any model this format is for
MAX_ELEMENTS = 1 << 28  # decoded elements of a file with no model to check it against
_PARTS = {"raw": ("data",), "bn": ("data",), "alias": (),
          "dense": ("codebook", "index_lengths", "indices"),
          "sparse": ("codebook", "index_lengths", "indices", "gap_lengths", "gaps")}


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
        d = zlib.decompressobj()
        text = d.decompress(hdr, MAX_HEADER)
        if d.unconsumed_tail:
            raise DeepzipFormatError(f"{path}: header too large")
        header = json.loads(text)
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DeepzipFormatError(f"{path}: unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise DeepzipFormatError(f"{path}: header lacks a tensor list")
    if zlib.crc32(memoryview(raw)[_PREAMBLE.size + hlen:]) != dcrc:
        raise DeepzipFormatError(f"{path}: data checksum mismatch (damaged or truncated)")
    return header, memoryview(raw)[_PREAMBLE.size + hlen:], _PREAMBLE.size + hlen


def _choice(entry: dict[str, Any], key: str, allowed: Any) -> str:
    """A header string that must be one of ``allowed`` (checked as a string first, so a
    list or dict in its place is an error, not an unhashable-type crash)."""
    v = entry.get(key)
    if not isinstance(v, str) or v not in allowed:
        raise DeepzipFormatError(f"{entry.get('name')!r}: bad {key} {str(v)[:40]!r}")
    return v


def _check_entry(e: Any, data_len: int, seen: dict[str, list[int]]) -> dict[str, list[int]]:
    """Validate one tensor entry completely, before anything is decoded: types, shape,
    encoding, every part inside the data area, and sizes that the stored bits can hold.
    Returns the state_dict keys it will produce, with their shapes."""
    if not isinstance(e, dict):
        raise DeepzipFormatError("bad tensor entry")
    name = _str(e, "name")
    shape = e.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31 for s in shape)):
        raise DeepzipFormatError(f"{name!r}: bad shape")
    numel = math.prod(shape)
    enc = _choice(e, "encoding", _PARTS)
    _choice(e, "dtype", _DTYPES)
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
    if enc == "alias":
        of = _str(e, "of")
        if seen.get(of) != shape:
            raise DeepzipFormatError(f"{name!r}: alias of {of!r}, which comes nowhere before "
                                     "it with that shape")
    elif enc in ("raw", "bn"):
        store = _choice(e, "store", _STORE)
        count = numel * (2 if enc == "bn" else 1)
        if size["data"] != count * np.dtype(_STORE[store]).itemsize:
            raise DeepzipFormatError(f"{name!r}: data size does not match its shape")
        if enc == "bn":
            eps = e.get("eps")
            if not isinstance(eps, float) or not 0 < eps < 1 or len(shape) != 1:
                raise DeepzipFormatError(f"{name!r}: bad BatchNorm entry")
            return {f"{name}.{k}": (shape if k != "num_batches_tracked" else [])
                    for k in _BN_KEYS}
    else:
        k = _int(e, "clusters", 0, MAX_CLUSTERS)
        _choice(e, "codebook_dtype", ("float32", "float16"))
        if size["codebook"] != k * np.dtype(_STORE[e["codebook_dtype"]]).itemsize:
            raise DeepzipFormatError(f"{name!r}: codebook has the wrong size")
        if size["index_lengths"] != (k + 2) // 2:
            raise DeepzipFormatError(f"{name!r}: code-length table has the wrong size")
        _int(e, "index_nbits", 0, 8 * size["indices"])
        if enc == "dense":
            if numel > 8 * size["indices"]:  # every weight costs at least one bit
                raise DeepzipFormatError(f"{name!r}: more weights than bits in the file")
        else:
            gap_bits = _int(e, "gap_bits", 1, 8)
            entries = _int(e, "entries", 0, min(8 * size["indices"], 8 * size["gaps"]))
            _int(e, "gap_nbits", 0, 8 * size["gaps"])
            if size["gap_lengths"] != ((1 << gap_bits) + 1) // 2:
                raise DeepzipFormatError(f"{name!r}: gap code table has the wrong size")
            if numel > entries << gap_bits:
                raise DeepzipFormatError(f"{name!r}: sparse entries cannot cover the tensor")
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


def _decode_entry(e: dict[str, Any], data: memoryview, state: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Decode one entry that :func:`_check_entry` accepted."""
    name, shape, enc = e["name"], e["shape"], e["encoding"]
    if enc == "alias":
        return {name: state[e["of"]]}
    parts = _part_bytes(e, data)
    if enc in ("raw", "bn"):
        t = torch.from_numpy(np.frombuffer(parts["data"], dtype=_STORE[e["store"]]).copy())
        if enc == "bn":
            both = t.float().view(2, *shape)
            return _bn_state(name, both[0].contiguous(), both[1].contiguous(), e["eps"])
    else:
        t = torch.from_numpy(_decode_shared(e, parts, math.prod(shape)))
    return {name: t.to(_DTYPES[e["dtype"]][0]).reshape(shape)}


def _plain_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in _plain_state_meta(model).items()}


def _plain_state_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state_dict's keys and shapes without copying any data."""
    return _plain_state(model, copy=False)


def _spec_of(header: dict[str, Any], where: str) -> ModelSpec | None:
    meta = header.get("model")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise DeepzipFormatError(f"{where}: bad model spec")
    try:
        return ModelSpec.from_dict(meta)
    except DeepzipError as e:
        raise DeepzipFormatError(f"{where}: {e}") from None


def _meta_model(spec: ModelSpec | None) -> nn.Module | None:
    """The recorded architecture built on the meta device (no memory for weights), to
    check a file's shapes before the real model or any tensor is allocated."""
    if spec is None:
        return None
    try:
        with torch.device("meta"):
            return spec.build()
    except Exception:  # noqa: BLE001 - not registered here, or a factory that needs memory
        return None


def load_state(path: str | os.PathLike[str], model: nn.Module | None = None
               ) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """Decode a ``.dzip`` file into a plain state_dict and its model spec (if recorded).

    Every entry is validated first, and its keys and shapes are checked against
    ``model`` (or the architecture the file records, built without memory), so a damaged
    or hostile file is refused before anything is allocated for it.
    """
    header, data, _ = _read(path)
    spec = _spec_of(header, str(path))
    target = model if model is not None else _meta_model(spec)
    expected = _plain_shapes(target) if target is not None else None
    _check_header(header, len(data), expected, str(path))
    state: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        state.update(_decode_entry(e, data, state))
    return state, spec


def _str(entry: dict[str, Any], key: str) -> str:
    v = entry.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= 1000:
        raise DeepzipFormatError(f"bad {key!r} in a tensor entry")
    return v


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model from a ``.dzip`` file, in eval mode.

    ``model``: an instance to fill (any architecture, no registration needed); without
    it, the architecture recorded in the file is built from deepzip's registry (after
    the file's shapes were checked against it).
    """
    state, spec = load_state(path, model)
    if model is None:
        if spec is None:
            raise DeepzipError(f"{path} records no architecture: pass model=YourModel()")
        try:
            model = spec.build()
        except DeepzipError:
            raise DeepzipFormatError(
                f"{path} records architecture {spec.arch!r}, which is not registered here: "
                "pass the model to fill (--arch NAME or package.module:Factory)") from None
    _fill(model, state, path)
    return model.eval()


def _fill(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    """Load a decoded state into ``model``; a file that lacks keys the model needs is a
    format error of that file."""
    try:
        load_state_dict_strict(model, state)
    except DeepzipError as e:
        raise DeepzipFormatError(f"{path}: {e}") from None


# Where a file's bytes go: zero-run positions of sparse layers, cluster indices (a dense
# layer's indices also say where its zeros are), codebooks, everything else.
_PART_KIND = {"gaps": "positions", "gap_lengths": "positions", "indices": "values",
              "index_lengths": "values", "codebook": "codebooks"}


def inspect(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Per-tensor and total sizes of a ``.dzip`` file, both ways, and ``bytes_by_kind``.

    ``formula``: the assignment's ratio, 32 bits x weights / sum(nonzero x Huffman bits of
    the nonzeros' cluster indices), over shared weights only. ``real``: bytes of the fp32
    ``state_dict`` written by ``torch.save`` over bytes of this file; the one we lead with.
    """
    header, data, head = _read(path)
    state, spec = load_state(path, model)
    rows, weights, coded_bits = [], 0, 0.0
    where = dict.fromkeys(("header", "positions", "values", "codebooks", "other"), 0)
    where["header"] = head
    for e in header["tensors"]:
        if e["encoding"] == "alias":
            rows.append({"name": e["name"], "shape": e["shape"], "params": 0,
                         "encoding": f"alias of {e['of']}", "bytes": 0, "nonzero": 0})
            continue
        t = state[e["name"] + ".weight" if e["encoding"] == "bn" else e["name"]]
        nbytes = 0
        for pname, (_, length) in e["parts"].items():
            where[_PART_KIND.get(pname, "other")] += length
            nbytes += length
        row = {"name": e["name"], "shape": e["shape"],
               "params": t.numel() * (2 if e["encoding"] == "bn" else 1),  # bn: scale, shift
               "encoding": e["encoding"], "bytes": nbytes,
               "nonzero": int(torch.count_nonzero(t))}
        if e["encoding"] in ("dense", "sparse"):
            k = e["clusters"]
            hbits = _nonzero_huffman_bits(t.float().numpy().ravel())
            row.update(clusters=k, bits=max(1, math.ceil(math.log2(max(k, 1)))),
                       huffman_avg=hbits / row["nonzero"] if row["nonzero"] else 0.0,
                       gap_bits=e.get("gap_bits", ""))
            weights += t.numel()
            coded_bits += hbits
        rows.append(row)
    if model is None and spec is not None:
        try:
            model = spec.build()
        except DeepzipError:  # an architecture not registered here: sizes from the file
            model = None
    if model is not None:
        _fill(model, state, path)
        fp32 = state_dict_bytes(model)
        params = sum(p.numel() for p in model.parameters())
    else:
        params = sum(r["params"] for r in rows)
        fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
                   for t in state.values())
    shared = [r for r in rows if "clusters" in r]
    nonzero = sum(r["nonzero"] for r in shared)
    return {
        "model": header.get("model"), "tensors": rows, "header_bytes": head, "bytes_by_kind": where,
        "file_bytes": head + len(data), "state_dict_bytes": fp32, "params": params,
        "real_ratio": fp32 / (head + len(data)),
        "shared_weights": weights, "shared_nonzero": nonzero,
        "huffman_avg": coded_bits / nonzero if nonzero else 0.0,
        "formula_ratio": 32 * weights / coded_bits if coded_bits else None,
    }


def _nonzero_huffman_bits(flat: np.ndarray) -> int:
    """Huffman-coded bits of the nonzeros' cluster indices, code built on them alone."""
    values = flat[flat != 0]
    idx = np.searchsorted(np.unique(values), values)
    return HuffmanCode.from_symbols(idx, max(int(idx.max(initial=0)) + 1, 1)).bits(idx)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the fp32 state_dict as ``torch.save`` writes it (the usual baseline)."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v
                for k, v in _plain_state(model).items()}, buf)
    return buf.tell()
