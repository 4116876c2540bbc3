"""deepzip: Deep Compression (pruning, trained weight sharing, Huffman coding) for PyTorch."""

from .errors import DeepzipError
from .models import (
    ModelSpec,
    load_checkpoint,
    load_model,
    pretrained,
    register_model,
    save_checkpoint,
)
from .pipeline import compress, verify
from .task import Accuracy, FunctionMetric, MeanAbsoluteError, MeanSquaredError, Metric, Task
from .train import TrainConfig, evaluate, fit

__version__ = "0.2.0"

__all__ = [
    "Accuracy",
    "DeepzipError",
    "FunctionMetric",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "ModelSpec",
    "Task",
    "TrainConfig",
    "compress",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_model",
    "pretrained",
    "register_model",
    "save_checkpoint",
    "verify",
]
