"""CIFAR ResNets (He et al. 2016), a model registry, and checkpoint loading.

The state-dict layout (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``,
``linear``) matches the one most public CIFAR ResNet checkpoints use, so a user's
existing checkpoint loads without renaming.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeepzipError

__all__ = [
    "CifarResNet",
    "ModelSpec",
    "available",
    "extract_state_dict",
    "get",
    "load_checkpoint",
    "load_model",
    "load_state_dict_strict",
    "pretrained",
    "save_checkpoint",
]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an option-A (parameter-free) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: subsample spatially and zero-pad the new channels; no parameters.
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n blocks with 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise DeepzipError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    f"resnet{d}": (lambda d=d, **kw: CifarResNet(depth=d, **kw)) for d in (20, 32, 44, 56, 110)
}


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_REGISTRY, key=lambda s: (len(s), s))


def get(name: str, num_classes: int = 10) -> nn.Module:
    """Build an untrained model by registry name.

    >>> model = get("resnet20")
    >>> sum(p.numel() for p in model.parameters())
    269722
    """
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise DeepzipError(
            f"unknown model {name!r}; available: {', '.join(available())}"
        ) from None
    return factory(num_classes=num_classes)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model besides its weights.

    ``mean``/``std`` are the input normalization the weights were trained with: it belongs
    to the model, because third-party checkpoints often used other constants.
    """

    arch: str = "resnet20"
    num_classes: int = 10
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

    def build(self) -> nn.Module:
        return get(self.arch, self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        try:
            return cls(arch=str(d["arch"]), num_classes=int(d["num_classes"]),
                       mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                       std=tuple(float(v) for v in d["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise DeepzipError(f"invalid model spec in checkpoint: {e}") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state_dict in a loaded checkpoint and strip DataParallel's ``module.`` prefix.

    Accepts a raw state_dict or a dict holding one under ``state_dict`` or ``model``.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise DeepzipError("checkpoint holds no state_dict (expected a mapping of tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; on mismatch, one error naming the offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def brief(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {brief(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {brief(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {brief(shapes)}")
        raise DeepzipError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)


def _torch_load(path: str | os.PathLike[str]) -> Any:
    if not os.path.isfile(path):
        raise DeepzipError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or hostile file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepzipError(f"cannot read checkpoint {path}: {first}") from None


def load_checkpoint(
    path: str | os.PathLike[str], spec: ModelSpec | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Load a checkpoint file into a model, safely (``weights_only=True``).

    The model's spec comes from ``spec`` if given, else from deepzip metadata in the
    file, else the default ResNet-20 with CIFAR normalization.

    >>> model, spec = load_checkpoint("resnet20.th", ModelSpec(arch="resnet20"))  # doctest: +SKIP
    """
    obj = _torch_load(path)
    if spec is None:
        meta = obj.get("deepzip") if isinstance(obj, Mapping) else None
        spec = ModelSpec.from_dict(meta) if isinstance(meta, Mapping) else ModelSpec()
    model = spec.build()
    load_state_dict_strict(model, extract_state_dict(obj))
    return model.eval(), spec


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str],
                    **extra: Any) -> None:
    """Write ``{"state_dict", "deepzip": spec}`` atomically (temp file, then rename)."""
    from .atomic import atomic_torch_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "deepzip": spec.to_dict(), **extra}, path)


_PRETRAINED = {"resnet20": "resnet20_cifar10.pt"}


def pretrained(name: str = "resnet20") -> tuple[nn.Module, ModelSpec]:
    """The baseline that ships with deepzip, trained on CIFAR-10 (see ``weights/*.json``).

    >>> model, spec = pretrained("resnet20")  # doctest: +SKIP
    """
    if name not in _PRETRAINED:
        raise DeepzipError(
            f"no pretrained weights for {name!r}; shipped: {', '.join(_PRETRAINED)}"
        )
    ref = resources.files("deepzip") / "weights" / _PRETRAINED[name]
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise DeepzipError(f"pretrained weights for {name!r} are missing from the install")
        return load_checkpoint(path)


def load_model(name_or_path: str, spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec]:
    """A checkpoint file, or the name of a model deepzip ships (a file of that name wins).

    >>> model, spec = load_model("resnet20")  # doctest: +SKIP
    """
    if name_or_path in _PRETRAINED and not os.path.exists(name_or_path):
        return pretrained(name_or_path)
    return load_checkpoint(name_or_path, spec)
