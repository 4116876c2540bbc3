"""deepzip: Deep Compression (pruning, trained weight sharing, Huffman coding) for PyTorch.

Names are imported on first use (PEP 562), so ``import deepzip.dzip`` and
:func:`deepzip.dzip.read_arrays` work on a machine without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DeepzipError, DeepzipFormatError
from .version import __version__

_WHERE = {
    "ModelSpec": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "load_model": "loading", "pretrained": "loading", "register_model": "models",
    "Compressed": "api", "compress": "api", "verify": "stages",
    "save": "dzip_torch", "load": "dzip_torch", "info": "dzip_torch",
    "PruneConfig": "prune", "prune_": "prune", "QuantizeConfig": "quantize",
    "quantize_": "quantize",
    "Accuracy": "task", "FunctionMetric": "task", "MeanAbsoluteError": "task",
    "MeanSquaredError": "task", "Metric": "task", "Perplexity": "task", "Task": "task",
    "TrainConfig": "train", "evaluate": "train", "fit": "train",
    "Recipe": "recipe", "load_recipe": "recipe", "Budget": "budget",
}
_MODULES = {"api", "atomic", "budget", "checkpoint", "checks", "cli", "codecs", "context", "data",
            "decide", "dzip", "dzip_torch", "errors", "export", "huffman", "kmeans", "loading",
            "models", "normalization", "obs", "onnx_pack", "pipeline", "prune", "qat", "quantize",
            "recipe", "render", "report", "runfolder", "sharing", "sparsity", "stages",
            "targets", "task", "train"}

if TYPE_CHECKING:
    from .api import Compressed, compress
    from .budget import Budget
    from .checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from .dzip_torch import info, load, save
    from .loading import load_model, pretrained
    from .models import register_model
    from .prune import PruneConfig, prune_
    from .quantize import QuantizeConfig, quantize_
    from .recipe import Recipe, load_recipe
    from .stages import verify
    from .task import (
        Accuracy,
        FunctionMetric,
        MeanAbsoluteError,
        MeanSquaredError,
        Metric,
        Perplexity,
        Task,
    )
    from .train import TrainConfig, evaluate, fit


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "Accuracy",
    "Budget",
    "DeepzipError",
    "DeepzipFormatError",
    "FunctionMetric",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "ModelSpec",
    "Perplexity",
    "PruneConfig",
    "QuantizeConfig",
    "Recipe",
    "Task",
    "TrainConfig",
    "Compressed",
    "compress",
    "evaluate",
    "fit",
    "info",
    "load",
    "load_checkpoint",
    "load_model",
    "load_recipe",
    "pretrained",
    "prune_",
    "quantize_",
    "register_model",
    "save",
    "save_checkpoint",
    "verify",
]
