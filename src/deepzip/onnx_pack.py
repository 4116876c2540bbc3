"""Weights that stay compressed inside an ONNX graph, rebuilt by standard operators.

A shared weight has at most 256 distinct values, so the graph stores what the ``.dzip``
stores before its entropy coding: per weight a codebook (fp32), and per nonzero its index
into it and its gap from the nonzero before, a byte each (Deep Compression's relative
indices). A dozen standard operators (Cast, CumSum, Gather, ScatterElements, Split) and a
Reshape per weight rebuild the fp32 tensors; all their inputs are constants, so
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

__all__ = ["Packed", "PackReport", "pack_initializers", "pack_weight", "row_scales"]

MAX_CODEBOOK = 256
MIN_ELEMENTS = 256  # smaller tensors (biases, norms) stay as they are


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
    def live(self) -> np.ndarray:
        return self.index != len(self.codebook) - 1

    @property
    def nbytes(self) -> int:
        """About what it adds to the file: codebook, scales, and per nonzero its index
        and its gap, a byte each."""
        return (self.codebook.nbytes + 2 * int(self.live.sum())
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
    if len(book) > MAX_CODEBOOK:  # 256 values and no zero: an index would not fit a byte
        return None
    index = np.full(flat.shape, len(book) - 1, dtype=np.int64)
    index[live] = np.searchsorted(book[:-1], flat[live])
    packed = Packed(exported.shape, book, index, scales)
    if packed.nbytes >= exported.nbytes * 0.9 or not np.array_equal(
            _canonical(packed.decode()).view(np.uint32), _canonical(exported).view(np.uint32)):
        return None
    return packed


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

    All the gaps are one byte stream and all the indices another, and the codebooks one
    table, so a runtime folds about a dozen nodes and a Reshape per weight when the
    session starts (:meth:`_Builder.rebuild`)."""
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

    def rebuild(self, packed: dict[str, Packed]) -> None:
        """Nodes computing every packed initializer, under its own name.

        All weights are laid end to end as one flat array; its nonzeros are listed in
        order, each as its gap from the one before (a byte: a longer gap is bridged by
        filler entries that store a zero, as Deep Compression's relative indices do) and
        its index into its own weight's codebook (a byte). The codebooks are one table:
        each entry's index is moved by its weight's offset in it (a step at each weight's
        first entry, summed). The graph adds the gaps up (CumSum), gathers the values and
        scatters them into a zero array, then cuts and shapes each weight. Bytes, not
        narrower bit fields: a runtime folds every node once when the session starts, and
        the nodes, more than their data, are what that costs (about a dozen, and two per
        weight)."""
        if not packed:
            return
        names = list(packed)
        sizes = [math.prod(packed[n].shape) for n in names]
        starts = np.cumsum([0] + sizes)
        where = np.concatenate([np.flatnonzero(packed[n].live) + starts[i]
                                for i, n in enumerate(names)])
        positions = _with_fillers(where, 8)
        owner = np.searchsorted(starts, positions, side="right") - 1
        index = np.concatenate([packed[n].index[positions[owner == i] - starts[i]]
                                for i, n in enumerate(names)])
        books = [packed[n].codebook for n in names]
        offset = np.cumsum([0] + [len(b) for b in books[:-1]])
        first = np.searchsorted(owner, np.arange(len(names)))  # each weight's first entry
        held = np.flatnonzero(np.bincount(owner, minlength=len(names)))
        steps = np.diff(offset[held], prepend=0)  # the offset rises at each first entry
        count = len(positions)
        moved = self.node("CumSum", [self.node("ScatterElements", [
            self.zeros(count, np.int32), self.const(first[held].astype(np.int32)),
            self.const(steps.astype(np.int32))]), self.const(np.array(0, np.int32))])
        values = self.node("Gather", [self.const(np.concatenate(books)), self.node(
            "Add", [self.node("Cast", [self.const(index.astype(np.uint8))], to=6), moved])])
        gaps = np.diff(positions, prepend=-1) - 1  # stored: gap - 1, a byte
        one = self.const(np.array(1, np.int32))
        at = self.node("Sub", [self.node("CumSum", [self.node("Add", [self.node(
            "Cast", [self.const(gaps.astype(np.uint8))], to=6), one]),
            self.const(np.array(0, np.int32))]), one])
        flat = self.node("ScatterElements", [self.zeros(int(starts[-1]), np.float32), at,
                                             values])
        for name, piece in zip(names, self.split(flat, sizes), strict=True):
            p = packed[name]
            shaped = self.node("Reshape", [piece, self.const(np.array(p.shape, np.int64))],
                               out=None if p.scales is not None else name)
            if p.scales is not None:
                scales = self.const(p.scales.reshape((-1,) + (1,) * (len(p.shape) - 1)))
                self.node("Mul", [shaped, scales], out=name)

    def zeros(self, n: int, dtype: type) -> str:
        """A node making ``n`` zeros of ``dtype`` (stored as their count, not as zeros)."""
        return self.node("ConstantOfShape", [self.const(np.array([n], np.int64))],
                         value=self.numpy_helper.from_array(np.zeros(1, dtype)))

    def split(self, of: str, lengths: list[int]) -> list[str]:
        """``of`` cut into consecutive pieces of ``lengths``: one Split node, so a runtime
        folding the graph reads ``of`` once, not once per piece."""
        if len(lengths) == 1:
            return [of]
        outs = [self._name() for _ in lengths]
        self.nodes.append(self.helper.make_node(
            "Split", [of, self.const(np.array(lengths, np.int64))], outs, axis=0))
        return outs


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
