"""One opener for every model file deepzip takes: a PyTorch checkpoint, a ``.dzip``
file, a safetensors file, or the name of a model that ships with deepzip.

The CLI, the pipeline and the Python API all open models through :func:`load_model`,
so a file means the same thing everywhere. Every opener returns ``(model, spec)``.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from torch import nn

from .atomic import open_regular
from .checkpoint import (
    ModelSpec,
    build_recorded,
    compose_spec,
    is_safetensors,
    load_checkpoint,
    load_state_dict_strict,
    read_safetensors,
)
from .dzip import MAGIC
from .dzip_torch import load_state
from .errors import DeepzipError
from .models import is_registered, resolve_arch
from .normalization import parse_normalize

if TYPE_CHECKING:
    from .task import Task

__all__ = ["PRETRAINED", "is_dzip", "load_model", "pretrained"]

# the baselines that ship with deepzip: name -> file under deepzip/weights/
PRETRAINED = {"resnet20": "resnet20_cifar10.pt", "lenet300": "lenet300_mnist.pt",
               "lenet5": "lenet5_mnist.pt"}


def pretrained(name: str = "resnet20") -> tuple[nn.Module, ModelSpec]:
    """A baseline that ships with deepzip: ResNet-20 on CIFAR-10, LeNet-300-100 and LeNet-5
    on MNIST (how each was trained: ``weights/*.json``).

    >>> model, spec = pretrained("resnet20")
    """
    if name not in PRETRAINED:
        raise DeepzipError(
            f"no pretrained weights for {name!r}; shipped: {', '.join(PRETRAINED)}"
        )
    ref = resources.files("deepzip") / "weights" / PRETRAINED[name]
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise DeepzipError(f"pretrained weights for {name!r} are missing from the install")
        return load_checkpoint(path)


def load_model(name_or_path: str | os.PathLike[str], spec: ModelSpec | None = None, *,
               model: nn.Module | None = None, arch: str | None = None,
               normalize: str | None = None, task: Task | None = None,
               default: ModelSpec | None = None, **override: Any) -> tuple[nn.Module, ModelSpec]:
    """Open a checkpoint, ``.dzip`` or safetensors file, or a shipped model's name (a file
    of that name wins), in eval mode, with the spec it records.

    ``spec`` replaces what the file records. ``arch`` (a registered name, or
    ``package.module:Factory``, which is imported: the caller's choice) and ``normalize``
    (``cifar``, ``imagenet``, ``mnist`` or ``M,.../S,...``) replace the file's; a file that
    records nothing is taken as ``task``'s model (its normalization), else ``default``,
    else ResNet-20 on CIFAR-10. ``override`` replaces other spec fields (``mean``,
    ``std``). ``model``: an instance to fill instead of building one.

    >>> model, spec = load_model("resnet20")
    >>> model, spec = load_model("their.th", arch="resnet20",  # doctest: +SKIP
    ...                          normalize="imagenet")
    """
    if normalize:  # fail on a bad flag before any file is read
        override["mean"], override["std"] = parse_normalize(normalize)
    if arch:
        override["arch"] = resolve_arch(arch)
    if task is not None and default is None:
        mean, std = task.normalization or ((), ())
        default = ModelSpec(mean=mean, std=std, task=task.name,
                            num_classes=10 if task.normalization else None)
    name = str(name_or_path)
    if not os.path.exists(name):
        if name in PRETRAINED:
            model, spec = pretrained(name)
            changes = {k: v for k, v in override.items() if k != "arch" and v is not None}
            return model, dataclasses.replace(spec, **changes) if changes else spec
        if is_registered(name):
            raise DeepzipError(
                f"no weights ship for {name!r} (shipped: {', '.join(PRETRAINED)}); train "
                f"them with 'deepzip train --model {name} --out runs/{name}' and pass "
                f"runs/{name}/model.pt, or pass your own checkpoint with --arch {name}")
    packed = is_dzip(name)
    if packed or is_safetensors(name):
        state, recorded = load_state(name) if packed else read_safetensors(name)
        spec = spec or compose_spec(recorded, default, override)
        model = build_recorded(spec, name) if model is None else model
        load_state_dict_strict(model, state)
        return model.eval(), spec
    return load_checkpoint(name, spec, model=model, default=default, **override)


def is_dzip(path: str | os.PathLike[str]) -> bool:
    """Does the file start with the ``.dzip`` magic bytes?"""
    try:
        with open_regular(path) as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, DeepzipError):
        return False
