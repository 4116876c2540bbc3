"""deepzip: Deep Compression (pruning, trained weight sharing, Huffman coding) for PyTorch."""

from .errors import DeepzipError
from .models import ModelSpec, load_checkpoint, load_model, pretrained, save_checkpoint
from .train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "DeepzipError",
    "ModelSpec",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_model",
    "pretrained",
    "save_checkpoint",
]
