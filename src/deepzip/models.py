"""Architectures: CIFAR ResNets (He et al. 2016), Deep Compression's LeNets, and the
registry that builds a model by name, the user's own included.

The ResNets' state-dict layout (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/...``,
``linear``) matches the one most public CIFAR ResNet checkpoints use, so a user's
existing checkpoint loads without renaming.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .deprecated import moved
from .entrypoints import load_entry_point
from .errors import DeepzipError

__all__ = ["CifarResNet", "LeNet300", "LeNet5", "arch_name", "available", "get",
           "is_registered", "register_model", "resolve_arch"]

# moved in 0.3: checkpoints to deepzip.checkpoint, opening any model file to deepzip.loading
__getattr__ = moved(__name__, {
    **{n: f"deepzip.checkpoint:{n}" for n in ("ModelSpec", "extract_state_dict",
                                              "load_checkpoint", "load_state_dict_strict",
                                              "save_checkpoint")},
    **{n: f"deepzip.loading:{n}" for n in ("load_model", "pretrained", "is_dzip")}})


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


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; Deep Compression's Table 1): 784-300-100-10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (Deep Compression's Table 1): conv 20@5x5, max-pool, conv 50@5x5,
    max-pool, fc 500 + ReLU, fc 10; 431,080 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": (lambda d=d, **kw: CifarResNet(depth=d, **kw)) for d in (20, 32, 44, 56, 110)},
    "lenet300": LeNet300,
    "lenet5": LeNet5,
}


def register_model(name: str, factory: Callable[..., nn.Module], *,
                   overwrite: bool = False) -> None:
    """Make ``factory`` buildable by name: in ``ModelSpec(arch=name)``, ``--arch``, recipes'
    ``arch:`` and ``.dzip`` files, which record the name and rebuild the model from it.

    The factory is called with ``num_classes=`` when it accepts that argument.

    >>> register_model("mynet", MyNet)  # doctest: +SKIP
    >>> model, spec = load_checkpoint("mynet.pt", ModelSpec(arch="mynet"))  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name or not callable(factory):
        raise DeepzipError("register_model needs a name and a callable factory")
    if name.lower() in _REGISTRY and not overwrite and _REGISTRY[name.lower()] is not factory:
        raise DeepzipError(f"model name {name!r} is taken; pass overwrite=True to replace it")
    _REGISTRY[name.lower()] = factory


def resolve_arch(name: str) -> str:
    """An architecture the user named: a registered name, or ``package.module:Factory``,
    which is imported and registered under that name. Names read from files never come
    here: a file cannot make deepzip import code."""
    if ":" in name and name.lower() not in _REGISTRY:
        factory = load_entry_point(name, "--arch")
        if not callable(factory):
            raise DeepzipError(f"--arch {name!r} is not callable")
        register_model(name, factory)
    elif name.lower() not in _REGISTRY:
        raise DeepzipError(f"unknown model {name!r}; available: {', '.join(available())}, "
                           "or package.module:Factory")
    return name


def is_registered(name: str) -> bool:
    """Can :func:`get` build ``name`` without importing anything?"""
    return name.lower() in _REGISTRY


def available() -> list[str]:
    """Names accepted by :func:`get`, in the order they were registered."""
    return list(_REGISTRY)


def get(name: str, num_classes: int | None = 10) -> nn.Module:
    """Build an untrained model by registry name (``num_classes`` if the factory takes it).

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
    kwargs = {"num_classes": num_classes} if num_classes is not None and _accepts(
        factory, "num_classes") else {}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise DeepzipError(f"model factory {name!r} returned {type(model).__name__}, "
                           "not an nn.Module")
    return model


def _accepts(fn: Callable[..., Any], arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def arch_name(model: nn.Module) -> str:
    """How a file records an unregistered model's class: ``module:QualName`` (which
    ``--arch`` can import again), or the bare class name for one defined in a script."""
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return cls.__qualname__
    return f"{cls.__module__}:{cls.__qualname__}"
