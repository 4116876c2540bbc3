"""From a ``.dzip`` to deployment: ONNX and safetensors.

Both need the optional extra (``pip install "deepzip[export]"``: onnx, onnxscript,
onnxruntime, safetensors); without it, each function says which package is missing and
how to install it. The core install never needs them.

- :func:`to_onnx` exports the decoded model with ``torch.onnx.export`` (the dynamo
  exporter, opset 18 by default, a dynamic batch dimension), checks the graph with ONNX's
  checker and, where onnxruntime is installed, compares its outputs with PyTorch's.
- :func:`to_safetensors` writes the decoded weights in the format the Hugging Face
  ecosystem loads without pickle; ``sparse=True`` keeps each mostly-zero tensor as the
  flat indices and values of its nonzeros, for runtimes that use sparsity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path, atomic_write
from .checkpoint import require
from .errors import DeepzipError
from .onnx_pack import PackReport, pack_initializers

__all__ = ["OPSET", "compare_onnx", "require", "to_onnx", "to_safetensors"]

OPSET = 18


class Normalized(nn.Module):
    """``model`` behind its input normalization: takes images scaled to [0, 1], as a
    deployment has them, so the graph scores what deepzip reports."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], *,
            opset: int = OPSET, mean: Sequence[float] = (), std: Sequence[float] = (),
            metadata: dict[str, str] | None = None, packed: bool = True,
            dynamic_axes: Sequence[int] = (0,)) -> PackReport | None:
    """Export ``model`` (eval mode, fp32) to ONNX with a dynamic batch dimension, write it
    atomically and check it with ``onnx.checker``. The PyTorch exporter's per-node
    provenance (``metadata_props``: module classes, fx nodes, scopes) is left out.

    With ``mean``/``std`` the normalization is inside the graph: its input is images
    scaled to [0, 1] (``example`` too). ``metadata`` goes into the file's
    ``metadata_props`` (deepzip writes mean, std, the input it expects, task, version).
    ``packed``: shared weights stay compressed in the graph, a codebook and packed indices
    that standard operators rebuild when the session starts (:mod:`deepzip.onnx_pack`);
    returns what was packed. ``packed=False`` writes every weight as fp32.
    ``dynamic_axes``: the input's axes that may take any size (the batch; a language
    model's sequence too: ``(0, 1)``); the others are fixed at the example's.

    >>> model = deepzip.load("model.dzip")  # doctest: +SKIP
    >>> to_onnx(model, torch.rand(1, 3, 32, 32), "m.onnx", mean=MEAN, std=STD)  # doctest: +SKIP
    """
    onnx = require("onnx")
    require("onnxscript")  # the dynamo exporter translates through it
    import tempfile
    import warnings

    model = model.float().eval().cpu()
    if mean:
        model = Normalized(model, mean, std)
    if any(not 0 <= a < example.dim() for a in dynamic_axes):
        raise DeepzipError(f"dynamic axes {list(dynamic_axes)}: the input has {example.dim()} "
                           f"axes (shape {list(example.shape)})")
    example = example[:2].cpu().contiguous()
    example = example.float() if example.is_floating_point() else example
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dims = {a: torch.export.Dim("batch" if a == 0 else f"axis{a}", min=1)
                        for a in dynamic_axes}
                torch.onnx.export(model, (example,), out, opset_version=opset, dynamo=True,
                                  dynamic_shapes=(dims,), external_data=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - the exporter's many failure types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DeepzipError(f"ONNX export failed: {type(e).__name__}: {first[:200]}"
                                   ) from None
        proto = onnx.load(out)
        for output in proto.graph.output:  # an output axis the exporter kept at the
            dims = output.type.tensor_type.shape.dim  # example's size, where the input's
            for a in dynamic_axes:  # same axis is dynamic (a language model's sequence)
                if 0 < a < len(dims) and a < example.dim() and \
                        dims[a].dim_value == example.shape[a]:
                    dims[a].dim_param = f"axis{a}"
        for node in proto.graph.node:  # the exporter's provenance (class, fx node, scope
            del node.metadata_props[:]  # names): half of a small model's file, for debugging
        report = None
        if packed:
            report = pack_initializers(proto, {k: v.detach().numpy() for k, v in
                                               model.state_dict().items()})
            metadata = {**(metadata or {}), "deepzip.packed_weights": str(len(report.packed))}
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto, full_check=True)
        with atomic_write(path) as dst:
            dst.write(proto.SerializeToString())
    return report


def compare_onnx(model: nn.Module, path: str | os.PathLike[str],
                 batches: Iterable[tuple[torch.Tensor, Any]]) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and ``model`` with PyTorch on the same
    ``batches`` (fed to both as they are): the largest absolute output difference and,
    for class scores, how many argmax predictions agree and how many are right, per
    example or per scored token (a language model's, padding left out; ``examples``
    counts what was scored)."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    from .task import IGNORE_INDEX, class_scores

    model = model.float().eval().cpu()
    diff, same, right, n = 0.0, 0, 0, 0
    with torch.inference_mode():
        for x, y in batches:
            x = x.cpu().contiguous()
            x = x.float() if x.is_floating_point() else x
            ref = model(x)
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            diff = max(diff, float((ref - got).abs().max()))
            y = torch.as_tensor(y)
            if y.dtype.is_floating_point:  # a regression target: nothing to predict
                n += len(x)
                continue
            (a, t), (b, _) = class_scores(ref, y), class_scores(got, y)  # per token too
            live = t != IGNORE_INDEX
            same += int(((a.argmax(1) == b.argmax(1)) & live).sum())
            right += int(((b.argmax(1) == t) & live).sum())
            n += int(live.sum())
    return {"examples": n, "max_abs_diff": diff, "same_predictions": same,
            "onnx_correct": right}


def to_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str], *,
                   sparse: bool = False, metadata: dict[str, str] | None = None) -> dict:
    """Write a state_dict as ``.safetensors`` (atomically). Tensors that share memory
    (tied weights) are written once each under their own name, as the format requires.

    With ``sparse``, a floating tensor of 2+ dimensions that is smaller so is written as
    ``NAME.indices`` (positions in the flattened tensor, in the smallest integer type
    that holds them) and ``NAME.values``; others stay dense; the header's metadata
    ``deepzip.sparse`` maps each such NAME to its shape, so a reader can rebuild it.
    Returns ``{"dense": [...], "sparse": [...]}``.
    """
    st = require("safetensors.torch")
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    seen: set[int] = set()
    for k, t in state.items():
        t = t.detach().cpu()
        index = _index_dtype(t.numel())
        if sparse and t.is_floating_point() and t.dim() >= 2 and int(torch.count_nonzero(
                t)) * (index.itemsize + t.element_size()) < t.numel() * t.element_size():
            flat = t.flatten()
            idx = torch.nonzero(flat).flatten()
            out[f"{k}.indices"], out[f"{k}.values"] = idx.to(index), flat[idx].contiguous()
            shapes[k] = list(t.shape)
        else:  # a copy only where the storage is already written (tied tensors)
            ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
            out[k] = t.clone().contiguous() if ptr in seen else t.contiguous()
            seen.add(ptr)
    meta = dict(metadata or {})
    if shapes:
        meta["deepzip.sparse"] = json.dumps(shapes)
    with atomic_path(path) as tmp:  # written straight to the file: no copy in memory
        st.save_file(out, str(tmp), metadata=meta or None)
    return {"dense": [k for k in state if k not in shapes], "sparse": list(shapes)}


def _index_dtype(numel: int) -> torch.dtype:
    return next(d for d in (torch.int16, torch.int32, torch.int64)
                if numel - 1 <= torch.iinfo(d).max)


