"""Weights that stay compressed inside an ONNX graph, rebuilt by standard operators.

A shared weight has at most 256 distinct values, so the graph stores what the ``.dzip``
stores before its entropy coding: per weight a codebook (fp32), and per nonzero its index
into it and its gap from the nonzero before, packed at the bits they need (Deep
Compression's relative indices). A few standard operators (BitShift, Mod, CumSum, Gather,
ScatterND, Reshape) rebuild the fp32 tensors; all their inputs are constants, so
onnxruntime folds them once when the session starts and then runs the same kernels as on
an fp32 file. No custom operator: any ONNX runtime reads the file.

The exporter folds each BatchNorm into the convolution before it, which scales every
output channel of the weight: the tensor then has up to 256 values *per channel*. Given
the model's own (unscaled) weight, :func:`row_scales` finds each channel's fp32 scale
``s`` with ``fl(w * s) == exported`` exactly, so the codebook stays shared and the graph
multiplies by ``s`` (one float per channel). Every rebuilt tensor is checked bit for bit
against the exported one before it replaces it.

>>> report = pack_initializers(proto, {"conv1.weight": w})  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Packed", "PackReport", "pack_bits", "pack_initializers", "pack_weight",
           "row_scales", "unpack_bits"]

MAX_CODEBOOK = 256
MIN_ELEMENTS = 256  # smaller tensors (biases, norms) stay as they are


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2**bits as a little-endian bit stream: value i holds bits
    ``[i*bits, (i+1)*bits)``, least significant first; uint8 bytes."""
    v = np.asarray(values, dtype=np.int64).ravel()
    stream = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (what the graph computes, in NumPy, for the check)."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    return (stream[:n * bits].reshape(n, bits).astype(np.int64)
            << np.arange(bits)).sum(1)


def row_scales(exported: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """The fp32 scale per output channel (row) with ``fl(weight[c] * s[c]) ==
    exported[c]`` bit for bit, or None where some row has none. A scale is searched a
    few ulps around the quotient of the row's largest entry."""
    if exported.shape != weight.shape or exported.dtype != np.float32:
        return None
    rows_e = exported.reshape(len(exported), -1)
    rows_w = weight.astype(np.float32).reshape(len(weight), -1)
    scales = np.ones(len(rows_e), dtype=np.float32)
    for c, (e, w) in enumerate(zip(rows_e, rows_w, strict=True)):
        j = int(np.abs(w).argmax())
        if w[j] == 0:
            if e.any():
                return None
            continue
        s = np.float32(e[j] / w[j])
        for candidate in _near(s):
            if np.array_equal(w * candidate, e):
                scales[c] = candidate
                break
        else:
            return None
    return scales


def _near(s: np.float32, ulps: int = 4) -> list[np.float32]:
    out, up, down = [s], s, s
    for _ in range(ulps):
        up = np.nextafter(up, np.float32(np.inf), dtype=np.float32)
        down = np.nextafter(down, np.float32(-np.inf), dtype=np.float32)
        out += [up, down]
    return out


@dataclass
class Packed:
    """One weight as the graph keeps it: its ``codebook`` (fp32; the last entry 0.0),
    each element's ``index`` into it, the row ``scales`` (None: none), its ``shape``.
    The graph stores only the nonzeros: their indices and the gaps between them."""

    shape: tuple[int, ...]
    codebook: np.ndarray
    index: np.ndarray
    scales: np.ndarray | None = None

    @property
    def bits(self) -> int:
        """Bits of one stored index (the zero entry too: a filler stores it)."""
        return _bits(len(self.codebook))

    @property
    def live(self) -> np.ndarray:
        return self.index != len(self.codebook) - 1

    @property
    def nbytes(self) -> int:
        """About what it adds to the file: codebook, scales, and per nonzero its index
        and a 4-bit gap (the graph packs the gaps of all weights at one width)."""
        k = int(self.live.sum())
        return (self.codebook.nbytes + (k * (self.bits + 4) + 7) // 8
                + (self.scales.nbytes if self.scales is not None else 0))

    def decode(self) -> np.ndarray:
        """The fp32 tensor the graph rebuilds, computed as the graph computes it."""
        out = self.codebook[self.index].reshape(self.shape)
        if self.scales is not None:
            out = out * self.scales.reshape((-1,) + (1,) * (len(self.shape) - 1))
        return out.astype(np.float32)


def pack_weight(exported: np.ndarray, weight: np.ndarray | None = None) -> Packed | None:
    """``exported`` (an fp32 initializer) as a codebook and indices, if it is a shared
    weight (at most 256 values, or that many once each row's scale is divided out, given
    the model's own ``weight``) and that makes it smaller; else None. The result decodes
    to ``exported`` bit for bit (a -0.0 as +0.0)."""
    if exported.dtype != np.float32 or exported.size < MIN_ELEMENTS:
        return None
    values, scales = exported, None
    if len(np.unique(exported)) > MAX_CODEBOOK:
        if weight is None or exported.ndim < 2 or len(np.unique(weight)) > MAX_CODEBOOK:
            return None
        scales = row_scales(exported, weight)
        if scales is None:
            return None
        values = weight.astype(np.float32)
    flat = values.ravel()
    live = flat != 0
    book = np.append(np.unique(flat[live]), np.float32(0)).astype(np.float32)
    index = np.full(flat.shape, len(book) - 1, dtype=np.int64)
    index[live] = np.searchsorted(book[:-1], flat[live])
    packed = Packed(exported.shape, book, index, scales)
    if packed.nbytes >= exported.nbytes * 0.9 or not np.array_equal(
            _canonical(packed.decode()).view(np.uint32), _canonical(exported).view(np.uint32)):
        return None
    return packed


WIDTHS = (1, 2, 4, 8)  # bits a stored value may take: a divisor of 8, so unpacking
# is a shift and a remainder per byte


def _bits(k: int) -> int:
    """The width that holds the integers below ``k``."""
    need = max(1, math.ceil(math.log2(k)))
    return next(w for w in WIDTHS if w >= need)


def _canonical(a: np.ndarray) -> np.ndarray:
    """``a`` with -0.0 as +0.0: the rebuilt tensor's zeros are +0.0 (the same product
    and sum everywhere; the bit check must not refuse them)."""
    return np.where(a == 0, np.float32(0), a).astype(np.float32)


@dataclass
class PackReport:
    """What :func:`pack_initializers` did: the packed tensors' names, their bytes before
    and after, and those it left as they were."""

    packed: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return sum(before - after for before, after in self.packed.values())


def pack_initializers(proto: Any, weights: dict[str, np.ndarray] | None = None) -> PackReport:
    """Replace every shared-weight initializer of an ONNX ``proto`` (in place) by its
    packed form and the nodes that rebuild it under the same name. ``weights``: the
    model's own tensors by initializer name, for the weights the exporter scaled.

    All the gaps are one packed stream and all the indices of one bit width another, so
    the graph unpacks each once: a few nodes per weight (Slice, Gather, Reshape), and a
    runtime folds a few hundred nodes, not thousands, when the session starts."""
    from onnx import numpy_helper

    graph, report, weights = proto.graph, PackReport(), weights or {}
    packed: dict[str, Packed] = {}
    keep = []
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        p = pack_weight(a, weights.get(init.name))
        if p is None:
            keep.append(init)
            if a.size >= MIN_ELEMENTS:
                report.kept.append(init.name)
        else:
            packed[init.name] = p
            report.packed[init.name] = (a.nbytes, p.nbytes)
    build = _Builder(graph)
    build.rebuild(packed)
    del graph.initializer[:]
    graph.initializer.extend(keep + build.inits)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(build.nodes + old)  # the rebuilt weights first: the graph stays sorted
    return report


class _Builder:
    """The nodes and constants that rebuild packed weights, with short generated names
    and no node names (a file of many small nodes is mostly names otherwise). Only
    fixed-shape operators (no NonZero), so a runtime can fold every one."""

    def __init__(self, graph: Any) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.inits: list[Any] = []
        self.nodes: list[Any] = []
        self.small: dict[tuple, str] = {}
        self.taken = {t.name for t in graph.initializer} | {
            o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        self.count = 0

    def _name(self) -> str:
        while True:
            self.count += 1
            name = f"dz{self.count}"
            if name not in self.taken:
                return name

    def const(self, value: np.ndarray) -> str:
        """An initializer; a small one (an axis, a shape, a shift) made once and shared."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 16 else None
        if key in self.small:
            return self.small[key]
        name = self._name()
        self.inits.append(self.numpy_helper.from_array(value, name))
        if key is not None:
            self.small[key] = name
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self._name()
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def stream(self, values: np.ndarray, bits: int) -> str:
        """``values`` (integers < 2**bits; bits 1, 2, 4 or 8, so no value spans two bytes)
        packed into one stream, and the nodes that unpack it to int32, one per value. All
        the unpacking is on bytes: what the runtime folds stays the size of the data."""
        n = len(values)
        data = self.const(pack_bits(values, bits))
        if bits == 8:
            return self.node("Cast", [data], to=6)  # INT32
        col = self.node("Unsqueeze", [data, self.const(np.array([1], np.int64))])
        shifted = self.node("BitShift", [col, self.const(
            np.arange(0, 8, bits, dtype=np.uint8).reshape(1, -1))], direction="RIGHT")
        low = self.node("Mod", [shifted, self.const(np.array(1 << bits, np.uint8))])
        flat = self.node("Reshape", [low, self.const(np.array([-1], np.int64))])
        used = self.node("Slice", [flat, self.const(np.array([0], np.int64)),
                                   self.const(np.array([n], np.int64))])
        return self.node("Cast", [used], to=6)

    def split(self, of: str, lengths: list[int]) -> list[str]:
        """``of`` cut into consecutive pieces of ``lengths``: one Split node, so a runtime
        folding the graph reads ``of`` once, not once per piece."""
        if len(lengths) == 1:
            return [of]
        outs = [self._name() for _ in lengths]
        self.nodes.append(self.helper.make_node(
            "Split", [of, self.const(np.array(lengths, np.int64))], outs, axis=0))
        return outs

    def rebuild(self, packed: dict[str, Packed]) -> None:
        """Nodes computing every packed initializer, under its own name.

        All weights are laid end to end as one flat array; its nonzeros are listed in
        order, each as its gap from the one before (one stream, at the width that makes
        the list shortest: a gap too long for it is bridged by filler entries that store
        a zero, as Deep Compression's relative indices do) and its index into its own
        weight's codebook (one stream per index width). The graph adds the gaps up
        (CumSum), gathers each entry's value from its codebook, and scatters the values
        into a zero array: every operation is over the nonzeros, not the weights."""
        if not packed:
            return
        names = list(packed)
        sizes = [math.prod(packed[n].shape) for n in names]
        starts = np.cumsum([0] + sizes)
        where = np.concatenate([np.flatnonzero(packed[n].live) + starts[i]
                                for i, n in enumerate(names)])
        gap_bits = min(WIDTHS, key=lambda g: _entries(where, g) * (g + 8))
        positions = _with_fillers(where, gap_bits)
        owner = np.searchsorted(starts, positions, side="right") - 1
        values, streams = [], {}
        for b in sorted({packed[n].bits for n in names}):
            mine = [i for i, n in enumerate(names) if packed[n].bits == b]
            parts = [packed[names[i]].index[positions[owner == i] - starts[i]] for i in mine]
            streams[b] = (self.stream(np.concatenate(parts), b), mine, parts)
        chunks: dict[int, str] = {}
        for stream, mine, parts in streams.values():
            pieces = self.split(stream, [len(part) for part in parts])
            for i, piece in zip(mine, pieces, strict=True):
                chunks[i] = self.node("Gather", [self.const(packed[names[i]].codebook), piece])
        values = [chunks[i] for i in range(len(names))]
        gaps = np.diff(positions, prepend=-1) - 1  # stored: gap - 1, in [0, 2**bits)
        steps = self.node("Add", [self.stream(gaps, gap_bits), self.const(
            np.array(1, np.int32))])
        at = self.node("Cast", [self.node("Sub", [
            self.node("CumSum", [steps, self.const(np.array(0, np.int32))]),
            self.const(np.array(1, np.int32))])], to=7)  # INT64, as ScatterND wants
        flat = self.node("ScatterND", [
            self.node("ConstantOfShape", [self.const(np.array([starts[-1]], np.int64))],
                      value=self.numpy_helper.from_array(np.zeros(1, np.float32))),
            self.node("Unsqueeze", [at, self.const(np.array([1], np.int64))]),
            self.node("Concat", values, axis=0)])
        for name, piece in zip(names, self.split(flat, sizes), strict=True):
            p = packed[name]
            shaped = self.node("Reshape", [piece, self.const(np.array(p.shape, np.int64))],
                               out=None if p.scales is not None else name)
            if p.scales is not None:
                scales = self.const(p.scales.reshape((-1,) + (1,) * (len(p.shape) - 1)))
                self.node("Mul", [shaped, scales], out=name)


def _entries(where: np.ndarray, gap_bits: int) -> int:
    """Entries of a nonzero list at ``where`` with gaps of at most 2**gap_bits."""
    gaps = np.diff(where, prepend=-1)
    return int(np.ceil(gaps / (1 << gap_bits)).sum())


def _with_fillers(where: np.ndarray, gap_bits: int) -> np.ndarray:
    """``where`` with filler positions added so no gap is over 2**gap_bits."""
    top = 1 << gap_bits
    gaps = np.diff(where, prepend=-1)
    extra = np.ceil(gaps / top).astype(np.int64) - 1
    if not extra.any():
        return where
    before = np.repeat(where - gaps, extra)  # each filler: a whole step after the last
    step = np.concatenate([np.arange(1, k + 1) for k in extra if k]) * top
    return np.sort(np.concatenate([where, before + step]))
