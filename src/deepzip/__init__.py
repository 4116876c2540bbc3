"""deepzip: Deep Compression (pruning, trained weight sharing, Huffman coding) for PyTorch.

Names are imported on first use (PEP 562), so ``import deepzip.dzip`` and
:func:`deepzip.dzip.read_arrays` work on a machine without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DeepzipError, DeepzipFormatError

__version__ = "0.2.0"  # the one place: pyproject.toml reads it

_WHERE = {
    "ModelSpec": "models", "load_checkpoint": "models", "load_model": "models",
    "pretrained": "models", "register_model": "models", "save_checkpoint": "models",
    "Compressed": "pipeline", "compress": "pipeline", "verify": "pipeline",
    "save": "dzip_torch", "load": "dzip_torch",  # safetensors' and torchao's spelling
    "Accuracy": "task", "FunctionMetric": "task", "MeanAbsoluteError": "task",
    "MeanSquaredError": "task", "Metric": "task", "Perplexity": "task", "Task": "task",
    "TrainConfig": "train", "evaluate": "train", "fit": "train",
}
_MODULES = {"atomic", "cli", "data", "dzip", "dzip_torch", "errors", "huffman", "models",
            "pipeline", "prune", "quantize", "recipe", "report", "task", "train"}

if TYPE_CHECKING:
    from .dzip_torch import load, save
    from .models import (
        ModelSpec,
        load_checkpoint,
        load_model,
        pretrained,
        register_model,
        save_checkpoint,
    )
    from .pipeline import Compressed, compress, verify
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
    "Accuracy",
    "DeepzipError",
    "DeepzipFormatError",
    "FunctionMetric",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "ModelSpec",
    "Perplexity",
    "Task",
    "TrainConfig",
    "Compressed",
    "compress",
    "evaluate",
    "fit",
    "load",
    "load_checkpoint",
    "load_model",
    "pretrained",
    "register_model",
    "save",
    "save_checkpoint",
    "verify",
]
