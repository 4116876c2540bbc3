"""What deepzip compresses in a model, and the state it leaves there.

A :class:`Target` is one prunable, shareable parameter: by default the floating
parameters of two or more dimensions of Conv, Linear, Embedding, attention and
RNN/LSTM/GRU layers, and with ``include`` patterns any other. Pruning leaves a
:class:`Mask` parametrization (``original * mask``, a bool mask), weight sharing a
:class:`SharedWeight` one (``codebook[indices] * mask``); both keep the model a standard
module (``torch.nn.utils.parametrize``). The format writer reads them here without
importing training.

A tensor tied under several names (a language model's embedding and output layer) is
one target, named after its first owner: its mask and codebook go on every owner, so it
is pruned and shared once, stays tied, is stored once in a ``.dzip`` and re-tied on load.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as tprune

from .errors import DeepzipError

__all__ = ["DEFAULT_LAYERS", "Mask", "SharedWeight", "Target", "bake_", "codebooks",
           "dequantize_", "install", "is_pruned", "join_name", "masks", "prunable",
           "pruned_attrs", "restore_masks_", "set_mask", "shared_parameters", "underlying"]


DEFAULT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding,
                  nn.EmbeddingBag, nn.MultiheadAttention, nn.RNNBase)


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable, shareable parameter: ``module.attr`` of the layer named ``layer``.

    ``name`` is the layer's name for its ``weight`` (``conv1``, ``layer1.0.conv2``) and
    ``layer.attr`` otherwise (``lstm.weight_hh_l0``, ``attn.in_proj_weight``).
    """

    layer: str
    module: nn.Module
    attr: str
    also: tuple[tuple[nn.Module, str], ...] = ()  # the same tensor's other owners (tied)

    @property
    def owners(self) -> tuple[tuple[nn.Module, str], ...]:
        """Every (module, attribute) holding this tensor: a mask or a codebook goes on
        all of them, so tied weights stay tied."""
        return ((self.module, self.attr), *self.also)

    @property
    def name(self) -> str:
        return self.layer if self.attr == "weight" else join_name(self.layer, self.attr)

    @property
    def key(self) -> str:
        """The parameter's key in the plain model's state_dict."""
        return join_name(self.layer, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        """The effective tensor: masked or codebook-shared if pruned or quantized."""
        return getattr(self.module, self.attr)

    def matches(self, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in patterns
                   for n in {self.name, self.layer, self.key})


def join_name(owner: str, attr: str) -> str:
    return f"{owner}.{attr}" if owner else attr


def _params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(logical name, underlying parameter) of a module's own parameters: a pruned one is
    listed under its name (not ``X_orig``), a parametrized one by its original."""
    out = []
    for n, p in module.named_parameters(recurse=False):
        if n.endswith("_orig") and hasattr(module, f"{n[:-5]}_mask"):
            n = n[:-5]
        out.append((n, p))
    if hasattr(module, "parametrizations"):
        out += [(n, plist.original) for n, plist in module.parametrizations.items()]
    return out


def prunable(model: nn.Module, include: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None) -> list[Target]:
    """The parameters that pruning and sharing act on, in model order.

    Default: the 2+-dimensional floating parameters of Conv, Linear, Bilinear, Embedding,
    MultiheadAttention and RNN/LSTM/GRU layers (never BatchNorm or biases). With
    ``include`` glob patterns (over layer and parameter names), any such parameter of any
    module that matches; ``exclude`` removes matches. A pattern that matches no parameter
    at all is an error that lists the names, so a typo never silently prunes everything.
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    found = []
    for layer, m in model.named_modules():
        if ".parametrizations." in f".{layer}.":
            continue  # a mask's or codebook's own modules: their weight is the layer's
        for attr, p in _params(m):
            if p.is_floating_point() and p.dim() >= 2:
                owners.setdefault(id(p), []).append((m, attr))
                found.append((layer, m, attr, id(p)))
    every: list[Target] = []
    for layer, m, attr, key in found:  # a tied tensor once, under its first name
        first, *rest = owners[key]
        if first == (m, attr):
            every.append(Target(layer, m, attr, tuple(rest)))
    for kind, patterns in (("include", include or []), ("exclude", exclude or [])):
        for pat in patterns:
            if pat != "*" and not any(t.matches([pat]) for t in every):
                names = ", ".join(t.name for t in every[:40]) + (
                    f" (+{len(every) - 40} more)" if len(every) > 40 else "")
                raise DeepzipError(f"{kind} pattern {pat!r} matches no prunable parameter; "
                                   f"they are: {names or '(none)'}")
    if include:
        chosen = [t for t in every if t.matches(include)]
    else:
        chosen = [t for t in every if isinstance(t.module, DEFAULT_LAYERS)]
    return [t for t in chosen if not t.matches(exclude or [])]


class Mask(nn.Module):
    """Parametrization ``weight = original * mask``, the mask kept as bool.

    A quarter of the weights' bytes beside them, and the masked weight computed where it
    is used, never kept: ``torch.nn.utils.prune`` holds an fp32 mask and the computed
    weight as well, three copies of every weight. The pruned entries of ``original`` are
    zero too (:func:`set_mask`), and stay zero through training: their gradient is zero,
    and so is what momentum and weight decay make of it."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, original, 0)  # ``* mask`` would cast it to floats


def _mask_of(module: nn.Module, attr: str) -> Mask | None:
    plists = getattr(module, "parametrizations", {})
    return plists[attr][0] if attr in plists and isinstance(plists[attr][0], Mask) else None


def _torch_pruned(module: nn.Module) -> list[str]:
    """Parameters a user pruned with ``torch.nn.utils.prune`` (``X_orig * X_mask``)."""
    return [h._tensor_name for h in module._forward_pre_hooks.values()
            if isinstance(h, tprune.BasePruningMethod)
            and hasattr(module, f"{h._tensor_name}_mask")]


def is_pruned(module: nn.Module, attr: str | None = None) -> bool:
    """Does ``module`` carry a pruning mask (on ``attr``, or on any parameter)?"""
    names = pruned_attrs(module)
    return bool(names) if attr is None else attr in names


def pruned_attrs(module: nn.Module) -> list[str]:
    """The masked parameters of ``module``: deepzip's masks and ``torch.nn.utils.prune``'s."""
    ours = [a for a in getattr(module, "parametrizations", {}) if _mask_of(module, a)]
    return ours + _torch_pruned(module)


def underlying(t: Target) -> torch.Tensor:
    """The stored tensor under a target (under its mask, if pruned), to update in place;
    under a mask it holds the same values as the masked weight (its pruned entries are
    zero), so reading it computes nothing."""
    if _mask_of(t.module, t.attr) is not None:
        return t.module.parametrizations[t.attr].original
    if hasattr(t.module, "parametrizations") and t.attr in t.module.parametrizations:
        raise DeepzipError(f"{t.name} is shared (quantized): prune before sharing")
    return getattr(t.module, t.attr)


def set_mask(t: Target, mask: torch.Tensor) -> torch.Tensor:
    """Install or tighten a target's mask (one :class:`Mask` on every owner of a tied
    tensor); pruned weights are also zeroed underneath. Returns the mask now in place."""
    current = _mask_of(t.module, t.attr)
    if current is None:
        user = [(m, a) for m, a in t.owners if a in _torch_pruned(m)]
        for m, a in user:
            tprune.remove(m, a)  # a user's own torch.nn.utils.prune mask, made zeros
        w = getattr(t.module, t.attr)
        keep = mask.to(w.device, torch.bool)
        if user:  # and those zeros stay pruned
            keep &= w.detach() != 0
        current = Mask(keep)
        install(t, current)
    else:
        current.mask.logical_and_(mask.to(current.mask.device, torch.bool))
    with torch.no_grad():
        underlying(t).masked_fill_(~current.mask, 0)  # mul_ would cast the mask to floats
    return current.mask


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current masks (bool) of the pruned parameters, by target name."""
    out = {}
    for layer, m in model.named_modules():
        for a in getattr(m, "parametrizations", {}):
            if (found := _mask_of(m, a)) is not None:
                out.setdefault(Target(layer, m, a).name, found.mask)
    return out


def _unparametrize(module: nn.Module, attr: str, computed: bool = True) -> None:
    """``parametrize.remove_parametrizations`` on a class of the module's own: a deep copy
    of a parametrized module shares its class with the original, and removing the copy's
    parametrization would remove the original's property too. ``computed``: the tensor
    left is the parametrization's output, not its original."""
    cls = type(module)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=computed)


def bake_(model: nn.Module) -> nn.Module:
    """Make masks permanent: plain parameters with exact zeros, no hooks."""
    for _, m in model.named_modules():
        for a in pruned_attrs(m):
            if (mask := _mask_of(m, a)) is not None:
                original = m.parametrizations[a].original
                with torch.no_grad():
                    original.masked_fill_(~mask.mask, 0)  # in place: no second copy
                _unparametrize(m, a, computed=False)
            else:
                tprune.remove(m, a)
    return model


def restore_masks_(model: nn.Module, include: list[str] | None = None,
                   exclude: list[str] | None = None) -> dict[str, float]:
    """Re-attach masks to a baked model from its zeros, so retraining keeps them."""
    out = {}
    for t in prunable(model, include, exclude):
        mask = t.weight.detach() != 0
        if not bool(mask.all()):
            set_mask(t, mask)
            out[t.name] = 1 - int(mask.count_nonzero()) / mask.numel()
    return out


class SharedWeight(nn.Module):
    """Parametrization ``weight = codebook[indices] * mask`` (indices and mask fixed).

    Indices are kept as uint8 (at most 256 centroids) and the mask as bool: a shared
    layer costs two bytes per weight beside its latent fp32 weights, not twelve."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
                 bits: int) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.clone())
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("mask", mask.bool())
        self.bits = bits

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        if self.codebook.numel() == 0:
            return torch.zeros(self.mask.shape, dtype=self.codebook.dtype,
                               device=self.mask.device)
        return self.codebook[self.indices.int()].mul_(self.mask)  # no third copy

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore
                              missing_keys, unexpected_keys, error_msgs) -> None:
        """A saved state (a resumed checkpoint) whose indices point past its codebook is
        an error of the load, not an IndexError in the first forward pass."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        book, idx = state_dict.get(prefix + "codebook"), state_dict.get(prefix + "indices")
        if isinstance(book, torch.Tensor) and isinstance(idx, torch.Tensor) and idx.numel() \
                and (int(idx.max()) >= max(1, book.numel()) or int(idx.min()) < 0):
            error_msgs.append(f"{prefix}indices: index {int(idx.max())} with a "
                              f"{book.numel()}-entry codebook")


def install(t: Target, parametrization: nn.Module) -> None:
    """One parametrization on every owner of the target's tensor (tied weights share
    one codebook, so they stay tied)."""
    for m, a in t.owners:
        parametrize.register_parametrization(m, a, parametrization, unsafe=True)


def codebooks(model: nn.Module) -> dict[str, SharedWeight]:
    """The weight-sharing parametrization of each quantized parameter, by target name."""
    return {name: cb for name, (_, cb) in shared_parameters(model).items()}


def shared_parameters(model: nn.Module) -> dict[str, tuple[str, SharedWeight]]:
    """target name -> (the codebook's parameter name in the model, its SharedWeight)."""
    out = {}
    for layer, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            if isinstance(plist[0], SharedWeight):
                prefix = f"{layer}." if layer else ""
                out[Target(layer, m, attr).name] = (
                    f"{prefix}parametrizations.{attr}.0.codebook", plist[0])
    return out


def dequantize_(model: nn.Module) -> nn.Module:
    """Make shared weights plain parameters holding ``codebook[indices] * mask`` (needed
    before the model's ``state_dict`` loads into a plain, unquantized model)."""
    owners = [(m, attr) for _, m in model.named_modules() if parametrize.is_parametrized(m)
              for attr, plist in m.parametrizations.items() if isinstance(plist[0], SharedWeight)]
    for m, attr in owners:
        _unparametrize(m, attr)
    return model
