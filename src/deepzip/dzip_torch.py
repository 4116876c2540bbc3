"""The PyTorch side of the ``.dzip`` format: models and state_dicts in and out.

:mod:`deepzip.dzip` holds the format itself (NumPy and bitarray only); this module turns
models into what it stores (pruning masks and shared weights folded in, BatchNorm folded,
tied weights found) and decoded arrays back into tensors and models. ``save`` and ``load``
are ``deepzip.save`` and ``deepzip.load``.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import ModelSpec, fit_state_dict, meta_build
from .codecs import (
    BOOK_DTYPES,
    FLOAT_STORES,
    MAX_CLUSTERS,
    RAW_DTYPES,
    RAW_INTS,
    book_round,
    encode_indexed,
    encode_shared,
    folded_batchnorm,
    grid_encode,
    grid_params,
    grid_round,
    grid_too_coarse,
    nonzero_huffman_bits,
)
from .deprecated import moved
from .dzip import (
    BN_KEYS,
    PART_KIND,
    PARTS,
    VERSION,
    check_arrays,
    iter_arrays,
    read_container,
    write_file,
)
from .errors import DeepzipError, DeepzipFormatError
from .targets import SharedWeight, bake_, codebooks, is_pruned, join_name

__all__ = ["FileInfo", "TensorSize", "info", "load", "load_state", "precision_changes",
           "round_to_file_precision_",
           "save", "state_dict_bytes"]

__getattr__ = moved(__name__, {"inspect": "deepzip.dzip_torch:info"})  # shadowed a stdlib name
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def _plain_state(model: nn.Module, copy: bool = True, lazy: bool = False
                 ) -> dict[str, Any]:
    """State dict as the plain model would have it: pruning masks and weight sharing
    (parametrizations; a user's ``torch.nn.utils.prune`` masks too) folded into ``weight``.

    Reads the effective weights instead of baking a deep copy, which would hold a second
    copy of the model. Keys come
    in a canonical order (by module, then name), so a model gives the same file whether
    it was pruned in this process or loaded from a checkpoint (PyTorch re-registers a
    pruned parameter last). ``copy=False``: the tensors as they are (meta ones too).
    ``lazy``: a shared weight as a function computing it, so a writer holds one layer's
    weights at a time, not a second copy of the model (implies ``copy=False``).
    """
    modules = dict(model.named_modules())
    position = {name: i for i, name in enumerate(modules)}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if ".parametrizations." in f".{key}":
            head, _, rest = key.partition("parametrizations.")
            mod = head.rstrip(".")
            attr, _, tail = rest.partition(".")
            if tail == "original":
                out[join_name(mod, attr)] = functools.partial(getattr, modules[mod], attr) \
                    if lazy else getattr(modules[mod], attr)
            continue
        if leaf.endswith(("_orig", "_mask")) and is_pruned(modules[owner], leaf[:-5]):
            if leaf.endswith("_orig"):
                out[join_name(owner, leaf[:-5])] = getattr(modules[owner], leaf[:-5])
            continue
        out[key] = t
    ordered = sorted(out.items(), key=lambda kv: (position.get(kv[0].rpartition(".")[0], -1),
                                                  kv[0]))
    if not copy or lazy:
        return dict(ordered)
    return {k: v.detach().cpu().contiguous() for k, v in ordered}


def _is_shared(w: torch.Tensor, book: torch.Tensor | None = None) -> bool:
    """A floating tensor of 2+ dimensions with at most 256 distinct nonzero values: stored
    shared (the codebook is exactly those values, so this is lossless). ``book``: the
    codebook a weight-sharing parametrization computed it from, so its values need not
    be counted (nor checked one by one: they are the codebook's); a sample with more
    distinct values than that settles most raw tensors without sorting all of them."""
    if not (w.is_floating_point() and w.dim() >= 2 and w.numel()):
        return False
    if book is not None:
        return bool(torch.isfinite(book).all())
    if not bool(torch.isfinite(w).all()):
        return False
    sample = w.flatten()[:4096]
    if torch.unique(sample[sample != 0]).numel() > MAX_CLUSTERS:
        return False
    return torch.unique(w[w != 0]).numel() <= MAX_CLUSTERS


def _codebook_keys(model: nn.Module) -> dict[str, nn.Module]:
    """The weights a sharing parametrization computes from a codebook of at most 256
    values (:class:`deepzip.quantize.SharedWeight` and its training form): key -> the
    parametrization."""
    out = {}
    for layer, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                book = getattr(plist[0], "codebook", None)
                if len(plist) == 1 and isinstance(book, torch.Tensor) and \
                        book.numel() <= MAX_CLUSTERS:
                    out[join_name(layer, attr)] = plist[0]
    return out


def _indexed(p: nn.Module | None) -> bool:
    """A :class:`SharedWeight` whose file entry can be written from its indices and mask
    alone (a finite floating codebook, a weight of 2+ dimensions)."""
    return type(p) is SharedWeight and p.codebook.is_floating_point() and \
        p.mask.dim() >= 2 and p.mask.numel() > 0 and bool(torch.isfinite(p.codebook).all())


def _aliases(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Keys that name a tensor already stored under an earlier one of ``keys`` (tied
    weights, buffers sharing storage): alias -> first key. A pruned or shared weight is
    known by its underlying parameter (and its parametrization), so a tied tensor that
    was pruned or shared is still stored once."""
    own = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    first: dict[tuple, str] = {}
    out = {}
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        m = modules.get(owner)
        if m is not None and parametrize.is_parametrized(m, leaf):
            plist = m.parametrizations[leaf]
            ident: tuple = ("shared", id(plist.original), *map(id, plist))
        elif m is not None and is_pruned(m, leaf):
            ident = ("pruned", id(getattr(m, f"{leaf}_orig")))
        elif (t := own.get(key)) is not None:
            ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) \
                if t.numel() else (id(t),)
        else:
            continue
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise DeepzipError(f"cannot store tensors of dtype {t.dtype}")
    return name


def _raw_store(t: torch.Tensor, raw_dtype: str) -> str:
    """How a tensor stored as it is (not shared) is kept: ``raw_dtype`` where it can hold
    the values, else float32 (fp16 would overflow; a grid's ends do not fit fp16); a
    grid too coarse for most of the values (:func:`grid_too_coarse`) gives way to float16."""
    if not t.is_floating_point():
        return _dtype_name(t)
    x = t.detach().float()
    if raw_dtype in RAW_INTS:
        values = x.cpu().numpy()
        if grid_params(values, RAW_INTS[raw_dtype]) is None:
            return "float32"
        if grid_too_coarse(values, RAW_INTS[raw_dtype]):
            return _raw_store(t, "float16")
    if raw_dtype == "float16" and torch.isfinite(x).all() and \
            not torch.isfinite(x.to(torch.float16)).all():
        return "float32"
    return raw_dtype


def _bn_store(scale: torch.Tensor, shift: torch.Tensor, raw_dtype: str) -> str:
    """One store for a folded BatchNorm's scale and shift (one entry holds both): where
    either cannot take ``raw_dtype``, float16 if it holds both, else float32."""
    if {_raw_store(scale, raw_dtype), _raw_store(shift, raw_dtype)} == {raw_dtype}:
        return raw_dtype
    return max(_raw_store(scale, "float16"), _raw_store(shift, "float16"))  # float32 wins


def _stored(t: torch.Tensor, store: str) -> bytes:
    """The bytes of one tensor (or one BatchNorm group) in ``store``."""
    if store in RAW_INTS:
        data = grid_encode(t.detach().float().cpu().numpy(), RAW_INTS[store])
        assert data is not None, "_raw_store chose a grid that cannot hold the tensor"
        return data
    conv = t.to(_DTYPES[store]) if t.is_floating_point() else t
    return conv.detach().cpu().numpy().astype(FLOAT_STORES[store]).tobytes()


def _batchnorms(model: nn.Module) -> dict[str, float]:
    """BatchNorm layers that can be folded (affine, with running statistics): name -> eps."""
    return {name: m.eps for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
            and m.track_running_stats}


def _folded_var(like: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.full_like(like, 1 - eps)


def _bn_affine(state: dict[str, torch.Tensor], prefix: str, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode is ``x * scale + shift``: (scale, shift) of one layer.

    A layer folded before (mean 0, variance 1 - eps) is taken as it is, so folding twice
    changes nothing and a folded in-memory model matches its file bit for bit.
    """
    w, b, mean, var = (state[f"{prefix}.{k}"].float() for k in BN_KEYS[:4])
    if torch.all(mean == 0) and torch.equal(var, _folded_var(var, eps)):
        return w, b
    scale = w / torch.sqrt(var + eps)
    return scale, b - mean * scale


def _bn_state(prefix: str, scale: torch.Tensor, shift: torch.Tensor, eps: float
              ) -> dict[str, torch.Tensor]:
    """The BatchNorm state that computes ``x * scale + shift`` in eval mode."""
    arrays = folded_batchnorm(scale.detach().cpu().float().numpy(),
                              shift.detach().cpu().float().numpy(), eps)
    return {f"{prefix}.{k}": torch.from_numpy(v) for k, v in arrays.items()}


def round_to_file_precision_(model: nn.Module, raw_dtype: str = "float16",
                             codebook_dtype: str = "float32",
                             fold_batchnorm: bool = True) -> nn.Module:
    """Change ``model`` in place exactly as :func:`save` will store it, so the in-memory
    model and the decoded file give bit-identical outputs: bakes pruning masks, folds
    BatchNorm (if asked), rounds to the storage dtypes."""
    _check_dtypes(raw_dtype, codebook_dtype)
    bake_(model)
    state = _plain_state(model)
    shared = {k for k, t in state.items() if _is_shared(t)}
    own = model.state_dict(keep_vars=True)
    folded, stores = set(), {}
    with torch.no_grad():
        if fold_batchnorm:
            for prefix, eps in _batchnorms(model).items():
                scale, shift = _bn_affine(state, prefix, eps)
                for key, value in _bn_state(prefix, scale, shift, eps).items():
                    own[key].copy_(value)
                folded.update(f"{prefix}.{k}" for k in BN_KEYS[2:])  # rebuilt, not stored
                store = _bn_store(scale, shift, raw_dtype)
                stores.update({f"{prefix}.weight": store, f"{prefix}.bias": store})
        for cb in codebooks(model).values():
            used = torch.unique(cb.indices[cb.mask]).long()
            cb.codebook[used] = _round_shared(cb.codebook[used], codebook_dtype)
        for key, t in own.items():
            if "parametrizations." in key or not t.is_floating_point() or key in folded:
                continue  # quantized layers: their codebooks were rounded above
            if key in shared:
                t.copy_(_round_shared(t, codebook_dtype))
            else:
                t.copy_(_round(t, stores.get(key) or _raw_store(t, raw_dtype)))
    return model


def precision_changes(model: nn.Module, raw_dtype: str = "float16",
                      codebook_dtype: str = "float32", fold_batchnorm: bool = True) -> list[str]:
    """Names of the tensors that :func:`save` would store changed (rounded to float16,
    BatchNorm folded): empty when the file decodes to exactly this model."""
    import copy

    rounded = round_to_file_precision_(copy.deepcopy(model), raw_dtype, codebook_dtype,
                                       fold_batchnorm)
    before, after = _plain_state(model), _plain_state(rounded)
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def _round(t: torch.Tensor, store: str) -> torch.Tensor:
    """``t`` as ``store`` keeps it, in ``t``'s dtype."""
    if store in RAW_INTS:
        x = grid_round(t.detach().float().cpu().numpy(), RAW_INTS[store])
        assert x is not None, "_raw_store chose a grid that cannot hold the tensor"
        return torch.from_numpy(x).to(t.dtype)
    return t.to(_DTYPES[store]).to(t.dtype)


def _round_shared(t: torch.Tensor, store: str) -> torch.Tensor:
    """Shared weights (or a codebook) as a ``store`` codebook keeps their distinct nonzero
    values; zeros stay zeros."""
    x = t.detach().float().cpu()
    nz = x != 0
    book, inverse = torch.unique(x[nz], return_inverse=True)
    out = torch.zeros_like(x)
    out[nz] = torch.from_numpy(book_round(book.numpy(), store))[inverse]
    return out.to(t.dtype).to(t.device)


def _check_dtypes(raw_dtype: str, codebook_dtype: str) -> None:
    if raw_dtype not in RAW_DTYPES:
        raise DeepzipError(f"raw dtype must be one of {', '.join(RAW_DTYPES)}, got "
                           f"{raw_dtype!r}")
    if codebook_dtype not in BOOK_DTYPES:
        raise DeepzipError(f"codebook dtype must be one of {', '.join(BOOK_DTYPES)}, got "
                           f"{codebook_dtype!r}")


def _encode_bn(state: dict[str, Any], prefix: str, eps: float, shape: list[int],
               raw_dtype: str) -> tuple[dict[str, Any], dict[str, bytes], dict[str, Any]]:
    """A BatchNorm layer as the per-channel ``scale, shift`` it computes in eval mode."""
    scale, shift = _bn_affine(state, prefix, eps)
    store = _bn_store(scale, shift, raw_dtype)
    entry = {"name": prefix, "shape": shape, "dtype": "float32", "encoding": "bn",
             "eps": eps, "store": store}
    return (entry, {"data": _stored(scale, store) + _stored(shift, store)},
            {"nonzero": int(torch.count_nonzero(scale))})


def _encode_dense(t: torch.Tensor, book: torch.Tensor | None, raw_dtype: str,
                  codebook_dtype: str
                  ) -> tuple[dict[str, Any], dict[str, bytes], dict[str, Any]]:
    """One computed tensor: shared (few distinct values) or raw; its entry, parts, info."""
    if _is_shared(t, book):
        w = t.float() if codebook_dtype == "float32" else \
            _round_shared(t.float(), codebook_dtype)  # float32 keeps every value
        enc = encode_shared(w.numpy(), codebook_dtype)
        return (dict(enc.meta), enc.parts,
                {"nonzero": enc.nonzero, "clusters": enc.meta["clusters"]})
    store = _raw_store(t, raw_dtype)
    return ({"encoding": "raw", "store": store}, {"data": _stored(t, store)},
            {"nonzero": int(torch.count_nonzero(t))})


def save(model: nn.Module, path: str | os.PathLike[str], *, spec: ModelSpec | None = None,
         raw_dtype: str = "float16", codebook_dtype: str = "float32",
         fold_batchnorm: bool = True) -> dict[str, Any]:
    """Write ``model`` as a ``.dzip`` file (atomically); return the per-tensor size report.

    Pruned (masked) and quantized (parametrized) models are baked first; the model
    itself is not changed. With ``fold_batchnorm``, each BatchNorm layer is stored as the
    per-channel ``scale, shift`` it computes in eval mode (half the numbers; the loaded
    model has running mean 0 and variance 1 - eps, the same function). Call
    :func:`round_to_file_precision_` first if the in-memory model must match the file bit
    for bit (fp16 BatchNorm, fp16 codebooks, folding). ``raw_dtype`` (BatchNorm, biases,
    unshared tensors): ``float16``, ``float32``, or ``int2`` .. ``int8``, that many bits per
    value on a uniform grid over each tensor's range (int8: half of float16's bytes).

    >>> report = save(model, "resnet20.dzip", spec=spec)
    >>> model = load("resnet20.dzip")
    """
    _check_dtypes(raw_dtype, codebook_dtype)
    state = _plain_state(model, lazy=True)  # shared weights computed one at a time below
    aliases = _aliases(model, list(state))
    known = _codebook_keys(model)
    bns = _batchnorms(model) if fold_batchnorm else {}
    owner = {f"{p}.{k}": p for p in bns for k in BN_KEYS}
    blobs: list[bytes] = []
    offset = 0
    tensors, report = [], []
    seen: dict[str, dict[str, Any]] = {}  # key -> its shape and dtype, for its aliases

    def add(entry: dict[str, Any], parts: dict[str, bytes], info: dict[str, Any]) -> None:
        nonlocal offset
        for pname in PARTS[entry["encoding"]]:  # back to back: the reader derives offsets
            blobs.append(parts[pname])
            offset += len(parts[pname])
        tensors.append(entry)
        report.append({"name": entry["name"], "shape": entry["shape"],
                       "params": math.prod(entry["shape"]), "encoding": entry["encoding"],
                       "bytes": sum(len(b) for b in parts.values()), **info})

    for key, lazy in state.items():
        if key in aliases and aliases[key] in seen and key not in owner:
            first = seen[aliases[key]]  # a tied tensor is never computed a second time
            tensors.append({"name": key, **first, "encoding": "alias", "of": aliases[key]})
            report.append({"name": key, "shape": first["shape"], "params": 0,
                           "encoding": "alias", "bytes": 0, "nonzero": 0, "of": aliases[key]})
            continue
        if key not in owner and _indexed(sw := known.get(key)):
            enc = encode_indexed(sw.codebook.detach().float().cpu().numpy(),
                                 sw.indices.cpu().numpy(), sw.mask.cpu().numpy(),
                                 codebook_dtype)
            seen[key] = {"shape": list(sw.mask.shape), "dtype": _dtype_name(sw.codebook)}
            entry = {"name": key, **seen[key], **enc.meta}
            add(entry, enc.parts, {"nonzero": enc.nonzero, "clusters": enc.meta["clusters"]})
            continue
        t = (lazy() if callable(lazy) else lazy).detach().cpu().contiguous()
        if t.is_floating_point() and bool(t.isnan().any()):
            raise DeepzipError(f"{key} holds NaN values: refusing to write a model that "
                               "cannot compute (did training diverge?)")
        seen[key] = {"shape": list(t.shape), "dtype": _dtype_name(t)}
        if key in owner and not key.endswith(".weight"):
            continue  # a folded BatchNorm is written once, at its weight
        if key in owner:
            prefix = owner[key]
            entry, parts, info = _encode_bn(state, prefix, bns[prefix], list(t.shape),
                                            raw_dtype)
        else:
            book = known.get(key)
            entry, parts, info = _encode_dense(t, book.codebook.detach() if book is not None
                                               else None, raw_dtype, codebook_dtype)
            entry = {"name": key, **seen[key], **entry}
        add(entry, parts, info)
        del t
    header = {"format": "deepzip", "version": VERSION,
              "model": spec.to_dict() if spec else None, "tensors": tensors}
    head = write_file(path, header, blobs)
    return {"tensors": report, "header_bytes": head, "file_bytes": head + offset}


def _plain_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The plain state_dict's keys and shapes, without copying (meta tensors too)."""
    return {k: list(v.shape) for k, v in _plain_state(model, copy=False).items()}


def _spec_of(header: dict[str, Any], where: str) -> ModelSpec | None:
    meta = header.get("model")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise DeepzipFormatError(f"{where}: bad model spec")
    try:
        return ModelSpec.from_dict(meta)
    except DeepzipError as e:
        raise DeepzipFormatError(f"{where}: {e}") from None


def _meta_model(spec: ModelSpec | None) -> nn.Module | None:
    """The recorded architecture built on the meta device (no memory for weights), to
    check a file's shapes before the real model or any tensor is allocated."""
    if spec is None:
        return None
    try:
        with meta_build():
            return spec.build()
    except Exception:  # noqa: BLE001 - not registered here, or a factory that needs memory
        return None


def _checked(path: str | os.PathLike[str], model: nn.Module | None
             ) -> tuple[dict[str, Any], memoryview, ModelSpec | None, dict[str, list[int]]]:
    """A file's header, data, spec and keys with shapes, every entry validated and its
    keys and shapes checked against ``model`` (or the architecture the file records,
    built without memory), so a damaged or hostile file is refused before anything is
    allocated for it."""
    header, data, _ = read_container(path)
    spec = _spec_of(header, str(path))
    target = model if model is not None else _meta_model(spec)
    expected = _plain_shapes(target) if target is not None else None
    return header, data, spec, check_arrays(header, len(data), expected, str(path))


def _tensors(piece: dict[str, tuple[Any, str]], seen: dict[int, tuple[Any, torch.Tensor]]
             ) -> dict[str, torch.Tensor]:
    """Decoded arrays as tensors of their declared dtypes; an alias shares its array, and
    shares the tensor too (``seen`` holds each array, so no id is reused while it
    is)."""
    out = {}
    for key, (arr, dtype) in piece.items():
        if id(arr) not in seen:
            seen[id(arr)] = arr, torch.from_numpy(arr).to(_DTYPES[dtype])
        out[key] = seen[id(arr)][1]
    return out


def load_state(path: str | os.PathLike[str], model: nn.Module | None = None
               ) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """Decode a ``.dzip`` file into a plain state_dict and its model spec (if recorded),
    checked first as :func:`load` checks it."""
    header, data, spec, _ = _checked(path, model)
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[Any, torch.Tensor]] = {}
    for piece in iter_arrays(header, data):
        state.update(_tensors(piece, seen))
    return state, spec


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model from a ``.dzip`` file, in eval mode.

    ``model``: an instance to fill (any architecture, no registration needed); without
    it, the architecture recorded in the file is built from deepzip's registry (after
    the file's shapes were checked against it). Tensors are decoded and loaded a batch at
    a time, so loading needs little memory beyond the model's own.
    """
    header, data, spec, shapes = _checked(path, model)
    if model is None:
        if spec is None:
            raise DeepzipFormatError(f"{path} records no architecture: pass "
                                     "model=YourModel()")
        try:
            model = spec.build()
        except DeepzipError:
            raise DeepzipFormatError(
                f"{path} records architecture {spec.arch!r}, which is not registered here: "
                "pass the model to fill (--arch NAME or package.module:Factory)") from None
    _fill(model, header, data, shapes, path)
    return model.eval()


def _fitted(model: nn.Module, state: dict[str, torch.Tensor], path: Any
            ) -> dict[str, torch.Tensor]:
    """:func:`fit_state_dict`, its error a format error of the file."""
    try:
        return fit_state_dict(model, state)
    except DeepzipError as e:
        raise DeepzipFormatError(f"{path}: {e}") from None


_FILL_BATCH = 1 << 26  # bytes of decoded tensors loaded into the model at a time


def _fill(model: nn.Module, header: dict[str, Any], data: memoryview,
          shapes: dict[str, list[int]], path: Any) -> None:
    """Load the file's tensors into ``model`` a batch at a time. The keys and shapes are
    checked whole first (a file that lacks keys the model needs is a format error of
    that file), so each batch loads with ``strict=False`` and the model's own loading
    hooks still run; where no hook can see it, a shared weight is decoded straight into
    the model's tensor (no copy, no pages touched twice). A stream that proves corrupt
    while decoding leaves the model partly filled."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    fitted = _fitted(model, meta, path)
    name = {id(v): k for k, v in fitted.items()}  # the file's key -> the model's
    batch = {k: v for k, v in fitted.items() if not v.is_meta}  # what fitting filled in
    own = _writable(model)
    direct: set[str] = set()

    def into(key: str) -> Any:
        t = own.get(name[id(meta[key])])
        if t is None:
            return None
        direct.add(key)
        return t.numpy()

    size, seen = 0, {}
    with torch.no_grad():
        for piece in iter_arrays(header, data, into):
            for key, t in _tensors(piece, seen).items():
                if key not in direct:
                    batch[name[id(meta[key])]] = t
                    size += t.numel() * t.element_size()
            if size >= _FILL_BATCH:
                model.load_state_dict(batch, strict=False)
                batch, size, seen = {}, 0, {}
        model.load_state_dict(batch, strict=False)


def _writable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's float32 CPU tensors that loading may write in place, by state_dict
    key: none where a module customizes loading (a load hook anywhere, or its own
    ``_load_from_state_dict``), since that code must see the values."""
    modules = dict(model.named_modules(remove_duplicate=False))
    if any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
           for m in modules.values()):
        return {}
    out = {}
    for prefix, m in modules.items():
        if type(m)._load_from_state_dict is not nn.Module._load_from_state_dict:
            continue
        for n, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None and t.dtype == torch.float32 and t.device.type == "cpu" \
                    and t.is_contiguous() and n not in m._non_persistent_buffers_set:
                out[join_name(prefix, n)] = t.detach()
    return out


@dataclass(frozen=True)
class TensorSize:
    """One tensor of a ``.dzip`` file: its stored bytes and, for a shared weight, its
    clusters, index bits and the Huffman bits its nonzeros' indices average."""

    name: str
    shape: list[int]
    params: int
    encoding: str
    bytes: int
    nonzero: int
    clusters: int | None = None
    bits: int | None = None
    huffman_avg: float | None = None
    gap_bits: int | str | None = None

    @property
    def shared(self) -> bool:
        return self.clusters is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a run's state, ``inspect --json``): a shared weight's fields only
        where it has them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class FileInfo:
    """What :func:`info` reads off a ``.dzip`` file: per tensor and in total, both ratios.
    ``real_ratio`` is the fp32 ``state_dict`` as ``torch.save`` writes it over the file;
    ``formula_ratio`` the indices-only ratio (shared weights' index bits alone)."""

    model: Any
    tensors: list[TensorSize]
    header_bytes: int
    bytes_by_kind: dict[str, int]
    file_bytes: int
    state_dict_bytes: int
    params: int
    real_ratio: float
    shared_weights: int
    shared_nonzero: int
    huffman_avg: float
    formula_ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: what a run's state and ``deepzip inspect --json`` hold."""
        return {**asdict(self), "tensors": [t.to_dict() for t in self.tensors]}

    def __getitem__(self, key: str) -> Any:
        """``info(path)["real_ratio"]`` as before 0.5, with a warning, for one release."""
        import warnings

        warnings.warn(f"deepzip.info(...)[{key!r}] is deprecated: use .{key} (info returns "
                      "a FileInfo since 0.5; .to_dict() for the old dict)", DeprecationWarning,
                      stacklevel=2)
        return self.to_dict()[key]


def info(path: str | os.PathLike[str], model: nn.Module | None = None) -> FileInfo:
    """Per-tensor and total sizes of a ``.dzip`` file, both ways, and ``bytes_by_kind``.

    ``formula``: the indices-only ratio, 32 bits x weights / sum(nonzero x Huffman bits
    of the nonzeros' cluster indices), over shared weights only (positions, codebooks and
    all else left out: the formula courses on Deep Compression use). ``real``: bytes of the fp32
    ``state_dict`` written by ``torch.save`` over bytes of this file; the one we lead with.
    """
    header, data, head = read_container(path)
    state, spec = load_state(path, model)
    rows, weights, coded_bits = [], 0, 0.0
    where = dict.fromkeys(("header", "positions", "values", "codebooks", "unshared weights",
                           "BatchNorm", "biases", "other"), 0)
    where["header"] = head
    for e in header["tensors"]:
        if e["encoding"] == "alias":
            rows.append({"name": e["name"], "shape": e["shape"], "params": 0,
                         "encoding": f"alias of {e['of']}", "bytes": 0, "nonzero": 0})
            continue
        t = state[e["name"] + ".weight" if e["encoding"] == "bn" else e["name"]]
        nbytes = 0
        for pname, (_, length) in e["parts"].items():
            where[PART_KIND.get(pname) or _raw_kind(e)] += length
            nbytes += length
        row = {"name": e["name"], "shape": e["shape"],
               "params": t.numel() * (2 if e["encoding"] == "bn" else 1),  # bn: scale, shift
               "encoding": e["encoding"], "bytes": nbytes,
               "nonzero": int(torch.count_nonzero(t))}
        if e["encoding"] in ("dense", "sparse", "kernel"):
            k = e["clusters"]
            hbits = nonzero_huffman_bits(t.float().numpy().ravel())
            row.update(clusters=k, bits=max(1, math.ceil(math.log2(max(k, 1)))),
                       huffman_avg=hbits / row["nonzero"] if row["nonzero"] else 0.0,
                       gap_bits=e.get("gap_bits", ""))
            weights += t.numel()
            coded_bits += hbits
        rows.append(row)
    if model is None and spec is not None:
        try:
            model = spec.build()
        except DeepzipError:  # an architecture not registered here: sizes from the file
            model = None
    if model is not None:
        model.load_state_dict(_fitted(model, state, path))
        fp32 = state_dict_bytes(model)
        params = sum(p.numel() for p in model.parameters())
    else:  # the same definition from the decoded tensors (tied ones are one object)
        params = sum(r["params"] for r in rows)
        fp32 = state_dict_bytes(state)
    shared = [r for r in rows if "clusters" in r]
    nonzero = sum(r["nonzero"] for r in shared)
    return FileInfo(
        model=header.get("model"), tensors=[TensorSize(**r) for r in rows], header_bytes=head,
        bytes_by_kind=where, file_bytes=head + len(data), state_dict_bytes=fp32, params=params,
        real_ratio=fp32 / (head + len(data)), shared_weights=weights, shared_nonzero=nonzero,
        huffman_avg=coded_bits / nonzero if nonzero else 0.0,
        formula_ratio=32 * weights / coded_bits if coded_bits else None)


def _raw_kind(entry: dict[str, Any]) -> str:
    """What a tensor stored as it is holds: a folded BatchNorm, a weight left unshared (an
    excluded embedding or layer), a bias, or other (norms' scales, buffers)."""
    if entry["encoding"] == "bn":
        return "BatchNorm"
    if len(entry["shape"]) >= 2:
        return "unshared weights"
    return "biases" if entry["name"].endswith("bias") else "other"



def state_dict_bytes(source: nn.Module | dict[str, torch.Tensor]) -> int:
    """The one denominator of every ratio deepzip prints ("real", "x smaller"): the bytes
    ``torch.save`` writes for the model's plain ``state_dict`` with every float tensor
    as fp32 and a tied tensor once, from a model or from a file's decoded tensors (tied
    ones the same object). A user's own checkpoint can differ: it may hold an optimizer,
    another dtype, or a pickled module."""
    if isinstance(source, nn.Module):
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in _plain_state(source).items()}
        for alias, key in _aliases(source, list(state)).items():
            state[alias] = state[key]  # a tied tensor: torch.save writes shared storage once
    else:
        once: dict[int, torch.Tensor] = {}
        state = {k: once.setdefault(id(v), v.float() if v.is_floating_point() else v)
                 for k, v in source.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()
