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
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path, atomic_write
from .errors import DeepzipError

__all__ = ["OPSET", "compare_onnx", "require", "to_onnx", "to_safetensors"]

OPSET = 18


def require(module: str) -> Any:
    """Import one package of the export extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeepzipError(f"{module} is not installed: pip install \"deepzip[export]\" "
                           "(onnx, onnxscript, onnxruntime, safetensors)") from None


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], *,
            opset: int = OPSET) -> None:
    """Export ``model`` (eval mode, fp32) to ONNX with a dynamic batch dimension, write it
    atomically and check it with ``onnx.checker``.

    >>> model = deepzip.dzip.load("model.dzip")  # doctest: +SKIP
    >>> to_onnx(model, torch.randn(1, 3, 32, 32), "m.onnx")  # doctest: +SKIP
    """
    onnx = require("onnx")
    require("onnxscript")  # the dynamo exporter translates through it
    import tempfile
    import warnings

    model = model.float().eval().cpu()
    example = example[:2].float().cpu().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (example,), out, opset_version=opset, dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                  external_data=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - the exporter's many failure types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DeepzipError(f"ONNX export failed: {type(e).__name__}: {first[:200]}"
                                   ) from None
        proto = onnx.load(out)
        onnx.checker.check_model(proto, full_check=True)
        with open(out, "rb") as src, atomic_write(path) as dst:
            dst.write(src.read())


def compare_onnx(model: nn.Module, path: str | os.PathLike[str],
                 batches: Iterable[tuple[torch.Tensor, Any]]) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and the model with PyTorch on ``batches``:
    the largest absolute output difference and, for class scores, how many argmax
    predictions agree."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = model.float().eval().cpu()
    diff, same, n = 0.0, 0, 0
    with torch.inference_mode():
        for x, _ in batches:
            x = x.float().cpu().contiguous()
            ref = model(x).numpy()
            got = session.run(None, {name: x.numpy()})[0]
            diff = max(diff, float(np.abs(ref - got).max()))
            if ref.ndim == 2:
                same += int((ref.argmax(1) == got.argmax(1)).sum())
            n += len(x)
    return {"examples": n, "max_abs_diff": diff, "same_predictions": same}


def to_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str], *,
                   sparse: bool = False, metadata: dict[str, str] | None = None) -> dict:
    """Write a state_dict as ``.safetensors`` (atomically). Tensors that share memory
    (tied weights) are written once each under their own name, as the format requires.

    With ``sparse``, a floating tensor of 2+ dimensions that is more than half zeros is
    written as ``NAME.indices`` (int64 positions in the flattened tensor) and
    ``NAME.values``; the header's metadata ``deepzip.sparse`` maps each such NAME to its
    shape, so a reader can rebuild it. Returns ``{"dense": [...], "sparse": [...]}``.
    """
    st = require("safetensors.torch")
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    seen: set[int] = set()
    for k, t in state.items():
        t = t.detach().cpu()
        if sparse and t.is_floating_point() and t.dim() >= 2 and \
                int(torch.count_nonzero(t)) * 2 < t.numel():
            flat = t.flatten()
            idx = torch.nonzero(flat).flatten()
            out[f"{k}.indices"], out[f"{k}.values"] = idx, flat[idx].contiguous()
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
