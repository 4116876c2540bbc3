"""Checkpoints as people have them: the model spec, finding and aligning a state_dict,
strict loading with a helpful error, and safe reading and writing of ``.pt`` files.

Nothing here knows the ``.dzip`` format; :mod:`deepzip.loading` opens every kind of
file through one function. ``torch.load`` always runs with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .atomic import atomic_torch_save, open_regular
from .errors import DeepzipError
from .models import available, get, is_registered
from .normalization import check_normalization

__all__ = ["ModelSpec", "align_state_dict", "extract_state_dict", "fit_state_dict", "guess_arch",
           "is_safetensors", "load_checkpoint", "load_state_dict_strict", "read_safetensors",
           "require", "save_checkpoint"]


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
_MAX_WRAPPERS = 8  # prefix-stripping rounds: DDP in compile in EMA is three


def align_state_dict(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """``state`` renamed and completed to fit a model whose state_dict is ``own``.

    Wrapper prefixes are stripped (also nested, ``module._orig_mod.``); BatchNorm state
    saved before PyTorch 0.4.1 lacks ``num_batches_tracked``, which is filled with 0 (it
    only matters for momentum=None, and then as a count that starts again).
    """
    state = dict(state)
    changed = True
    for _ in range(_MAX_WRAPPERS):  # deeper nesting is no real file's: not renamed
        if not changed or set(state) == set(own):
            break
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
    model.load_state_dict(fit_state_dict(model, state))


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """``state`` renamed and completed for ``model`` (:func:`align_state_dict`), or the
    error of :func:`load_state_dict_strict`. Reads only keys and shapes, so ``state`` may
    be meta tensors: a reader checks a file before decoding it."""
    own = model.state_dict()
    state = align_state_dict(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def brief(keys: list[str]) -> str:
            shown = [k if len(k) <= 80 else f"{k[:38]}...{k[-38:]}" for k in keys[:5]]
            return ", ".join(shown) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
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
    return state


class _SkipFills(TorchFunctionMode):
    """Initializers' in-place fills skipped on meta tensors, which hold no values: on the
    meta device they run through PyTorch's Python decompositions and made building
    ResNet-20 there cost 3-4x building it for real. Modes are per thread."""

    FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "erfinv_", "mul_",
                       "add_", "sub_", "div_", "clamp_", "exponential_", "bernoulli_",
                       "random_", "trunc_normal_", "orthogonal_", "fill_diagonal_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in self.FILLS and args and \
                isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Modules built inside have meta tensors (shapes, no memory) and skip their
    initializers' fills: a file's or a guess's architecture, checked before anything real
    is allocated for it."""
    with torch.device("meta"), _SkipFills():
        yield


def guess_arch(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures (with the classes the file has) whose keys and shapes the
    file fits exactly; built on the meta device, so no memory is spent on weights."""
    fits = []
    head = [v for k, v in state.items() if v.dim() == 2]
    classes = head[-1].shape[0] if head else 10
    shapes = _shapes(state)
    for name in available():
        try:
            with meta_build():
                own = get(name, classes).state_dict()
        except Exception:  # noqa: BLE001 - a user's factory may not build on meta; skip it
            continue
        if _shapes(own) != shapes:  # a cheap test first: a renaming keeps the shapes
            continue
        aligned = align_state_dict(state, own)
        if set(aligned) == set(own) and all(aligned[k].shape == v.shape for k, v in own.items()):
            fits.append(name if classes == 10 else f"{name} (num_classes {classes})")
    return fits


def _shapes(state: Mapping[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The shapes of a state_dict's tensors, sorted, leaving out BatchNorm's step count
    (old files lack it and :func:`align_state_dict` fills it in)."""
    return sorted(tuple(v.shape) for k, v in state.items()
                  if not k.endswith("num_batches_tracked"))


def _torch_load(path: str | os.PathLike[str]) -> Any:
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
        meta = recorded_spec(obj)
        recorded = ModelSpec.from_dict(meta) if isinstance(meta, Mapping) else None
        spec = compose_spec(recorded, default, override)
    model = build_recorded(spec, path) if model is None else model
    load_state_dict_strict(model, extract_state_dict(obj))
    return model.eval(), spec


def plain_state_dict(state: Mapping[str, torch.Tensor], spec: ModelSpec | None
                     ) -> OrderedDict[str, torch.Tensor]:
    """``state`` as the plain ``state_dict`` torch writes (``model.load_state_dict(
    torch.load(path))`` takes it as it is), the spec riding in its ``_metadata``, which
    ``load_state_dict`` passes to modules and they ignore: nothing gets in the way."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    if spec is not None:
        meta = OrderedDict([("", {"deepzip": spec.to_dict()})])
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def recorded_spec(obj: Any) -> Any:
    """The deepzip spec a loaded checkpoint carries: ``{"state_dict", "deepzip"}`` (what
    :func:`save_checkpoint` writes) or a plain state_dict's ``_metadata`` (what
    ``deepzip decode`` writes); None without one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("deepzip"), Mapping):
        return obj["deepzip"]
    root = getattr(obj, "_metadata", None)
    root = root.get("") if isinstance(root, Mapping) else None
    return root.get("deepzip") if isinstance(root, Mapping) else None


def build_recorded(spec: ModelSpec, path: Any) -> nn.Module:
    """The model a file's spec names, from the registry only: a name a file records is
    never imported."""
    if not is_registered(spec.arch):
        raise DeepzipError(f"{path} records architecture {spec.arch!r}, which is not "
                           "registered here: pass --arch NAME or --arch package.module:Factory")
    return spec.build()


def compose_spec(recorded: ModelSpec | None, default: ModelSpec | None,
             override: Mapping[str, Any]) -> ModelSpec:
    spec = recorded or default or ModelSpec()
    changes = {k: v for k, v in override.items() if v is not None}
    return dataclasses.replace(spec, **changes) if changes else spec


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str],
                    **extra: Any) -> None:
    """Write ``{"state_dict", "deepzip": spec}`` atomically (temp file, then rename)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "deepzip": spec.to_dict(), **extra}, path)


def require(module: str) -> Any:
    """Import one package of the export extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeepzipError(f"{module} is not installed: pip install \"deepzip[export]\" "
                           "(onnx, onnxscript, onnxruntime, safetensors)") from None


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """A ``.safetensors`` file as ``to_safetensors`` writes it (any other too): the dense
    state_dict, sparse tensors rebuilt, and the model spec its metadata records (a
    :class:`~deepzip.checkpoint.ModelSpec`, or None). Opening it runs no code."""

    st = require("safetensors")
    with open_regular(path, "safetensors file"):
        pass  # a regular file, or one line
    try:
        with st.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - the reader's many failure types
        raise DeepzipError(f"cannot read {path} as safetensors: {str(e)[:200]}") from None
    try:
        sparse = json.loads(meta.get("deepzip.sparse", "{}"))
        spec = ModelSpec.from_dict(json.loads(meta["deepzip.spec"])) \
            if "deepzip.spec" in meta else None
        for name, shape in sparse.items():
            idx, vals = tensors.pop(f"{name}.indices"), tensors.pop(f"{name}.values")
            dense = torch.zeros(math.prod(shape), dtype=vals.dtype)
            dense[idx.long()] = vals
            tensors[name] = dense.view(shape)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise DeepzipError(f"{path}: bad deepzip metadata ({str(e)[:100]})") from None
    return tensors, spec


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Does the file start as safetensors does (an 8-byte header size, then ``{``)?"""

    try:
        with open_regular(path) as f:
            head = f.read(9)
    except (OSError, DeepzipError):
        return False
    return len(head) == 9 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") < (100 << 20)
