"""Models: CIFAR ResNets (He et al. 2016), Deep Compression's LeNets, a public registry
for the user's own, and checkpoint loading that takes files as people have them.

The ResNets' state-dict layout (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/...``,
``linear``) matches the one most public CIFAR ResNet checkpoints use, so a user's
existing checkpoint loads without renaming.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pickle
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
    "LeNet300",
    "LeNet5",
    "ModelSpec",
    "available",
    "extract_state_dict",
    "get",
    "load_checkpoint",
    "load_model",
    "load_state_dict_strict",
    "pretrained",
    "register_model",
    "resolve_arch",
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
        from .task import load_entry_point

        factory = load_entry_point(name, "--arch")
        if not callable(factory):
            raise DeepzipError(f"--arch {name!r} is not callable")
        register_model(name, factory)
    elif name.lower() not in _REGISTRY:
        raise DeepzipError(f"unknown model {name!r}; available: {', '.join(available())}, "
                           "or package.module:Factory")
    return name


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


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model besides its weights.

    ``mean``/``std`` are the input normalization the weights were trained with, one value
    per input channel: it belongs to the model, because third-party checkpoints often used
    other constants. ``arch`` names a registered factory (see :func:`register_model`).
    """

    arch: str = "resnet20"
    num_classes: int | None = 10
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    task: str | None = None  # the task it was trained for (the CLI's default --task)

    def __post_init__(self) -> None:
        from .data import check_normalization

        if not isinstance(self.arch, str) or not 0 < len(self.arch) <= 200:
            raise DeepzipError("model spec: arch must be a name of 1 to 200 characters")
        if self.num_classes is not None and not (
                isinstance(self.num_classes, int) and 1 <= self.num_classes <= 1_000_000):
            raise DeepzipError(f"model spec: num_classes must be 1..1000000, got "
                               f"{self.num_classes!r}")
        if self.mean or self.std:  # empty: the task's loaders normalize (or need none)
            check_normalization(self.mean, self.std)

    def build(self) -> nn.Module:
        return get(self.arch, self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std),
                **({"task": self.task} if self.task else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        try:
            nc = d["num_classes"]
            if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int)):
                raise TypeError(f"num_classes {nc!r} is not an integer")
            mean, std = d["mean"], d["std"]
            if not isinstance(mean, list) or not isinstance(std, list) or len(mean) > 4 \
                    or len(std) > 4:
                raise TypeError("mean and std must be short lists")
            task = d.get("task")
            if task is not None and (not isinstance(task, str) or len(task) > 200):
                raise TypeError("task must be a short name")
            if not isinstance(d["arch"], str):
                raise TypeError("arch must be a name")
            return cls(arch=d["arch"], num_classes=nc, mean=tuple(_finite(v) for v in mean),
                       std=tuple(_finite(v) for v in std), task=task)
        except (KeyError, TypeError, ValueError, DeepzipError) as e:
            raise DeepzipError(f"invalid model spec: {e}") from None


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    return float(v)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state_dict in a loaded checkpoint.

    Accepts a raw state_dict or a dict holding one under ``state_dict``, ``model``,
    ``model_state_dict``, ``net`` or ``state`` (the wrappers of the common training
    scripts). Prefixes are sorted out against the model in :func:`load_state_dict_strict`.
    """
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise DeepzipError("checkpoint holds no state_dict (expected a mapping of tensors)")
    return dict(obj)


_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "state")
# DataParallel/DDP, torch.compile, Lightning (the LightningModule's attribute is usually
# ``model``), EMA wrappers: stripped while every key has one and the model's keys do not.
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


def align_state_dict(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """``state`` renamed and completed to fit a model whose state_dict is ``own``.

    Wrapper prefixes are stripped (also nested, ``module._orig_mod.``); BatchNorm state
    saved before PyTorch 0.4.1 lacks ``num_batches_tracked``, which is filled with 0 (it
    only matters for momentum=None, and then as a count that starts again).
    """
    state = dict(state)
    changed = True
    while changed and set(state) != set(own):
        changed = False
        for p in _PREFIXES:
            if state and all(k.startswith(p) for k in state) and not all(
                    k.startswith(p) for k in own):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    for k, v in own.items():
        if k.endswith(".num_batches_tracked") and k not in state and \
                f"{k.rpartition('.')[0]}.running_mean" in state:
            state[k] = torch.zeros_like(v)
    return state


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; on mismatch, one error naming the offending keys and,
    when a registered architecture fits the file, that architecture (``--arch resnet32``)."""
    own = model.state_dict()
    state = align_state_dict(state, own)
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
        fits = guess_arch(state)
        hint = f"; it fits {' or '.join(f'--arch {a}' for a in fits)}" if fits else ""
        raise DeepzipError(f"checkpoint does not fit {type(model).__name__}: "
                           + "; ".join(parts) + hint)
    model.load_state_dict(state)


def guess_arch(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures (with the classes the file has) whose keys and shapes the
    file fits exactly; built on the meta device, so no memory is spent on weights."""
    fits = []
    head = [v for k, v in state.items() if v.dim() == 2]
    classes = head[-1].shape[0] if head else 10
    for name in available():
        try:
            with torch.device("meta"):
                own = get(name, classes).state_dict()
        except Exception:  # noqa: BLE001 - a user's factory may not build on meta; skip it
            continue
        aligned = align_state_dict(state, own)
        if set(aligned) == set(own) and all(aligned[k].shape == v.shape for k, v in own.items()):
            fits.append(name if classes == 10 else f"{name} (num_classes {classes})")
    return fits


def _torch_load(path: str | os.PathLike[str]) -> Any:
    from .atomic import open_regular

    with open_regular(path, "checkpoint file") as f:
        head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive or a pickle
            raise DeepzipError(f"{path} is neither a PyTorch checkpoint nor a .dzip file")
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DeepzipError(
                f"cannot read checkpoint {path}: it holds Python objects other than tensors "
                "and plain containers, which deepzip does not unpickle (they could run "
                "code); save model.state_dict() instead") from None
        except Exception as e:  # torch raises many types for a bad or hostile file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeepzipError(f"cannot read checkpoint {path}: {first}") from None


def load_checkpoint(
    path: str | os.PathLike[str], spec: ModelSpec | None = None, *,
    model: nn.Module | None = None, default: ModelSpec | None = None, **override: Any,
) -> tuple[nn.Module, ModelSpec]:
    """Load a checkpoint file into a model, safely (``weights_only=True``).

    The model's spec is ``spec`` if given; else the deepzip metadata in the file (or
    ``default``, or ResNet-20 with CIFAR normalization, when it has none) with the
    ``override`` fields (``arch``, ``mean``, ``std``) that are not None replaced.
    ``model``: an instance to fill instead of building one from the spec (any
    architecture, registered or not).

    >>> model, spec = load_checkpoint("resnet20.th", ModelSpec(arch="resnet20"))  # doctest: +SKIP
    """
    obj = _torch_load(path)
    if spec is None:
        meta = obj.get("deepzip") if isinstance(obj, Mapping) else None
        recorded = ModelSpec.from_dict(meta) if isinstance(meta, Mapping) else None
        spec = _compose(recorded, default, override)
    model = _build(spec, path) if model is None else model
    load_state_dict_strict(model, extract_state_dict(obj))
    return model.eval(), spec


def _build(spec: ModelSpec, path: Any) -> nn.Module:
    """The model a file's spec names, from the registry only: a name a file records is
    never imported."""
    if spec.arch.lower() not in _REGISTRY:
        raise DeepzipError(f"{path} records architecture {spec.arch!r}, which is not "
                           "registered here: pass --arch NAME or --arch package.module:Factory")
    return spec.build()


def _compose(recorded: ModelSpec | None, default: ModelSpec | None,
             override: Mapping[str, Any]) -> ModelSpec:
    spec = recorded or default or ModelSpec()
    changes = {k: v for k, v in override.items() if v is not None}
    return dataclasses.replace(spec, **changes) if changes else spec


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str],
                    **extra: Any) -> None:
    """Write ``{"state_dict", "deepzip": spec}`` atomically (temp file, then rename)."""
    from .atomic import atomic_torch_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "deepzip": spec.to_dict(), **extra}, path)


_PRETRAINED = {"resnet20": "resnet20_cifar10.pt", "lenet300": "lenet300_mnist.pt",
               "lenet5": "lenet5_mnist.pt"}


def pretrained(name: str = "resnet20") -> tuple[nn.Module, ModelSpec]:
    """A baseline that ships with deepzip: ResNet-20 on CIFAR-10, LeNet-300-100 and LeNet-5
    on MNIST (how each was trained: ``weights/*.json``).

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


def load_model(name_or_path: str, spec: ModelSpec | None = None, *,
               model: nn.Module | None = None, default: ModelSpec | None = None,
               **override: Any) -> tuple[nn.Module, ModelSpec]:
    """A checkpoint file, a ``.dzip`` file, or the name of a model deepzip ships (a file
    of that name wins). ``spec``, ``default`` and ``override`` (``arch``, ``mean``,
    ``std``) work as in :func:`load_checkpoint`; ``model`` is an instance to fill.

    >>> model, spec = load_model("resnet20")  # doctest: +SKIP
    """
    name = str(name_or_path)
    if not os.path.exists(name):
        if name in _PRETRAINED:
            model, spec = pretrained(name)
            changes = {k: v for k, v in override.items() if k != "arch" and v is not None}
            return model, dataclasses.replace(spec, **changes) if changes else spec
        if name.lower() in _REGISTRY:
            raise DeepzipError(
                f"no weights ship for {name!r} (shipped: {', '.join(_PRETRAINED)}); train "
                f"them with 'deepzip train --model {name} --out runs/{name}' and pass "
                f"runs/{name}/model.pt, or pass your own checkpoint with --arch {name}")
    packed = is_dzip(name)
    if packed or _is_safetensors(name):
        from .dzip import load_state
        from .export import read_safetensors

        state, recorded = load_state(name) if packed else read_safetensors(name)
        spec = spec or _compose(recorded, default, override)
        model = _build(spec, name) if model is None else model
        load_state_dict_strict(model, state)
        return model.eval(), spec
    return load_checkpoint(name, spec, model=model, default=default, **override)


def _is_safetensors(path: str) -> bool:
    from .export import is_safetensors

    return is_safetensors(path)


def is_dzip(path: str | os.PathLike[str]) -> bool:
    """Does the file start with the ``.dzip`` magic bytes?"""
    from .atomic import open_regular
    from .dzip import MAGIC

    try:
        with open_regular(path) as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, DeepzipError):
        return False
