"""Generators of hostile inputs for deepzip's readers, and the harness that feeds them.

Shared by ``tests/test_fuzz.py`` (fixed seeds, small budgets, in every CI run) and
``bench/fuzz.py`` (10,000+ inputs per reader). Each generator is structure-aware: it
mutates what the reader parses (header fields with the checksums recomputed, pickled
objects built from allowed pieces, IDX sizes, recipe leaves), so the inputs get past the
first check and reach the code behind it. The harness counts outcomes: accepted, refused
with the reader's own error, or anything else (a defect); and measures the peak memory
each input allocated (tracemalloc sees NumPy's buffers, where decoding allocates) against
a bound proportional to what the input legitimately declares.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import math
import pickle
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepzip.dzip import pack_header, unpack_header

HOSTILE = [0, 1, -1, 2, 255, 256, 2 ** 31 - 1, 2 ** 31, 2 ** 40, 2 ** 63, 10 ** 30, -(2 ** 31),
           0.5, -0.0, 1e-300, 1e30, float("nan"), float("inf"), -float("inf"), "", "x",
           "float64", "float16", "object", "raw", "dense", "sparse", "bn", "alias", "int64",
           "os:system", "this:s", "pdb:set_trace", "tempfile:mkdtemp", "../../victim",
           "a\0b", "/etc/passwd", "A" * 5000, None, True, False, [], [1], [0, 10 ** 12], [-5, 3],
           [[1, 2], [3]], {}, {"a": 1}, {"float16": 1}]


def pick(rng: random.Random, extra: list | None = None) -> Any:
    """A hostile value: a copy, so a later mutation inside it never changes the pool."""
    return copy.deepcopy(rng.choice(HOSTILE + (extra or [])))


def deep(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


@dataclass
class Outcome:
    """What a batch of hostile inputs did."""

    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    unexpected: list[str] = field(default_factory=list)
    over_bound: list[str] = field(default_factory=list)
    peak_ratio: float = 0.0  # largest peak / bound seen

    def line(self, what: str) -> str:
        return (f"{what}: {self.inputs:,} inputs, {self.accepted:,} accepted, "
                f"{self.refused:,} refused with the reader's error, "
                f"{len(self.unexpected)} unexpected exceptions, {len(self.over_bound)} "
                f"allocations over the bound (largest peak {self.peak_ratio:.3f} of it)")


def feed(outcome: Outcome, label: str, call: Callable[[], Any], expected: type[BaseException],
         bound: Callable[[Any], int]) -> None:
    """Run ``call`` once under tracemalloc; classify the result; check peak <= bound(result)
    (result is None when the input was refused)."""
    outcome.inputs += 1
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = None
    try:
        result = call()
        outcome.accepted += 1
    except expected:
        outcome.refused += 1
    except Exception as e:  # noqa: BLE001 - the point: anything else is a defect
        outcome.unexpected.append(f"{label}: {type(e).__name__}: {str(e)[:120]}")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    limit = bound(result)
    outcome.peak_ratio = max(outcome.peak_ratio, peak / limit)
    if peak > limit:
        outcome.over_bound.append(f"{label}: peak {peak:,} > bound {limit:,}")


# ---------------------------------------------------------------- .dzip files
_PRE = struct.Struct("<8sHHIII")
_ENTRY_KEYS = ["name", "shape", "dtype", "encoding", "store", "clusters", "codebook_dtype",
               "entries", "gap_bits", "index_nbits", "gap_nbits", "eps", "of", "parts"]
_STORE_NAMES = ["float16", "float32", "int2", "int8", "int9", "uint8", "bool"]
_PART_NAMES = ["data", "codebook", "index_lengths", "indices", "gap_lengths", "gaps", "zzz"]
_SPEC_KEYS = ["arch", "num_classes", "mean", "std", "task"]


def split_dzip(data: bytes) -> tuple[tuple, dict[str, Any], bytes]:
    pre = _PRE.unpack_from(data)
    hlen = pre[3]
    header = json.loads(unpack_header(data[_PRE.size:_PRE.size + hlen], pre[1]))
    return pre, header, data[_PRE.size + hlen:]


def join_dzip(pre: tuple, header: Any, body: bytes, *, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    hdr = pack_header(text, pre[1])
    return _PRE.pack(pre[0], pre[1], pre[2], len(hdr), zlib.crc32(hdr),
                     zlib.crc32(body)) + hdr + body


def _neighbour(v: Any, rng: random.Random) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return rng.choice([v - 1, v + 1, 0, v * 2, v * 256, -v, v + 2 ** 31])
    return pick(rng)


def mutate_dzip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One hostile variant of a valid file: header fields changed and the checksums
    recomputed, sometimes the data bytes too (so the Huffman decoder sees them)."""
    pre, header, body = split_dzip(data)
    header = copy.deepcopy(header)
    tensors = header["tensors"]
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["field", "field", "number", "part", "part", "spec", "structure",
                           "data"])
        e = rng.choice(tensors) if tensors else {}
        if kind == "field" and isinstance(e, dict):
            key = rng.choice(_ENTRY_KEYS)
            if rng.random() < 0.2:
                e.pop(key, None)
            else:
                e[key] = pick(rng, _STORE_NAMES if key == "store" else None)
        elif kind == "number" and isinstance(e, dict):
            key = rng.choice([k for k, v in e.items() if isinstance(v, (int, list))] or ["x"])
            if isinstance(e.get(key), list) and e[key]:
                i = rng.randrange(len(e[key]))
                e[key][i] = _neighbour(e[key][i], rng)
            else:
                e[key] = _neighbour(e.get(key, 0), rng)
        elif kind == "part" and isinstance(e, dict):
            name = rng.choice(_PART_NAMES)  # version 4 derives parts: listing any is wrong
            parts = e.setdefault("parts", {})
            if not isinstance(parts, dict):
                parts = e["parts"] = {}
            parts[name] = rng.choice(
                [pick(rng), [rng.randrange(len(body) + 2), rng.randrange(64)],
                 [0, len(body) + rng.randrange(1, 10)], [len(body), 0]])
        elif kind == "spec":
            if not isinstance(header.get("model"), dict) or rng.random() < 0.2:
                header["model"] = pick(rng)
            else:
                header["model"][rng.choice(_SPEC_KEYS)] = pick(
                    rng, [[0.5], [0.0] * 3, [float("nan")] * 3, 10 ** 7, "resnet110",
                          "lenet5", "os:system"])
        elif kind == "structure":
            how = rng.choice(["dup", "drop", "swap", "tensors", "deep", "top", "extra"])
            if how == "dup" and tensors:
                tensors.append(copy.deepcopy(rng.choice(tensors)))
            elif how == "drop" and tensors:
                tensors.pop(rng.randrange(len(tensors)))
            elif how == "swap" and len(tensors) > 1:
                a, b = rng.sample(range(len(tensors)), 2)
                tensors[a], tensors[b] = tensors[b], tensors[a]
            elif how == "tensors":
                header["tensors"] = pick(rng)
            elif how == "deep":
                done.append("deep")
                return join_dzip(pre, None, body, raw_header=(
                    b'{"tensors": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")), "deep"
            elif how == "top":
                header = pick(rng)
                break
            else:
                tensors.append({"name": "extra", "shape": [rng.choice([1, 2 ** 30])] * 2,
                                "dtype": "float32", "encoding": "raw", "store": "float32",
                                "parts": {"data": [0, len(body)]}})
        elif kind == "data" and body:
            b = bytearray(body)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            body = bytes(b)
        done.append(kind)
    return join_dzip(pre, header, body), "+".join(done)


def fuzz_dzip(files: list[tuple[bytes, int, Any]], n: int, seed: int, tmp: Path,
              warmup: int = 30) -> Outcome:
    """``files``: (valid file bytes, bytes of its legitimate model, a model factory to
    load into, or None). Every variant goes through load_state, load and inspect. The
    first ``warmup`` variants (of another seed) run unmeasured and uncounted: they import
    what the error paths import once per process (torch builds models on the meta device
    to name the architecture a file fits), which is not the input's doing."""
    from deepzip.dzip import DeepzipFormatError
    from deepzip.dzip_torch import info, load, load_state

    if warmup:
        import torch

        from deepzip.checkpoint import guess_arch

        guess_arch({"w": torch.zeros(2, 2)})  # imports torch's meta-device machinery once
        fuzz_dzip(files, warmup, seed + 10_000, tmp, warmup=0)
    rng = random.Random(seed)
    out = Outcome()
    path = tmp / "fuzz.dzip"
    for i in range(n):
        data, model_bytes, make = files[i % len(files)]
        variant, label = mutate_dzip(data, rng)
        path.write_bytes(variant)

        def bound(result: Any, model_bytes: int = model_bytes, size: int = len(variant)) -> int:
            decoded = 0
            if isinstance(result, tuple):  # load_state: (state, spec)
                decoded = sum(t.numel() * t.element_size() for t in result[0].values())
            return 16 * (model_bytes + decoded + size) + (16 << 20)

        target = make() if make is not None else None
        # Every other small file is also read with no model to check it against: then a
        # file may declare up to 2,048 values per byte it holds (a filler entry covers
        # 256 zeros), which the bound follows through the decoded size.
        check = target if i % 2 or len(variant) >= 4096 else None
        feed(out, f"#{i} {label} load_state", lambda check=check: load_state(path, check),
             DeepzipFormatError, bound)
        feed(out, f"#{i} {label} load", lambda target=target: load(path, target),
             DeepzipFormatError, lambda _r, b=bound: b(None))
        feed(out, f"#{i} {label} inspect", lambda target=target: info(path, target),
             DeepzipFormatError, lambda _r, b=bound: b(None))
    return out


# ---------------------------------------------------------------- CIFAR batches
class _Reduce:
    """Pickles as ``fn(*args)``: how a hostile batch is assembled from allowed pieces."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def _strided(rows: int, stride: int) -> Any:
    """numpy.ndarray(shape, dtype, buffer, offset, strides): a huge view of a few bytes."""
    return _Reduce(np.ndarray, ((rows, 3072), np.dtype(np.uint8), b"\x07" * 64, 0,
                                (stride, 0)))


def cifar_variant(rng: random.Random) -> tuple[bytes, str]:
    n = rng.choice([1, 3, 10])
    data: Any = np.zeros((n, 3072), np.uint8)
    labels: Any = [rng.randrange(10) for _ in range(n)]
    keys = [b"data", b"labels"]
    kind = rng.choice(["data", "labels", "keys", "bytes", "bytes", "strided"])
    if kind == "data":
        data = rng.choice([np.zeros((n, 3073), np.uint8), np.zeros((n, 3072), np.float64),
                           np.zeros((n, 3, 32, 32), np.uint8), np.zeros(0, np.uint8),
                           np.zeros((n, 3072), np.uint8)[:, ::2], "x", [1, 2], None,
                           np.zeros((20_000, 3072), np.uint8)[:1], 5, deep(50)])
    elif kind == "labels":
        labels = rng.choice([[1] * (n + 1), [True] * n, [1.5] * n, ["1"] * n, [10 ** 30] * n,
                             [-1] * n, deep(300), [[1, 2]] * n, [[1], 2] * n, "0123",
                             np.zeros(n, np.float32), np.zeros((n, 2), np.int64), None, {}])
    elif kind == "keys":
        keys = rng.choice([["data", "labels"], [b"data"], [b"labels"], [1, 2],
                           [b"data", b"labels", b"extra"]])
    elif kind == "strided":
        data = _strided(rng.choice([10, 10_000, 2_000_000]), rng.choice([0, 1, 3072]))
    obj: Any = dict(zip(keys, [data, labels, 1], strict=False))
    blob = pickle.dumps(obj, protocol=2)
    if kind == "bytes":
        b = bytearray(blob)
        for _ in range(rng.randrange(1, 6)):
            op = rng.random()
            i = rng.randrange(len(b))
            if op < 0.6:
                b[i] = rng.randrange(256)
            elif op < 0.8:
                del b[i:]
            else:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        blob = bytes(b)
    return blob, kind


def fuzz_cifar(n: int, seed: int, tmp: Path) -> Outcome:
    from deepzip.data import _read_batch
    from deepzip.errors import DeepzipError

    rng = random.Random(seed)
    out = Outcome()
    path = tmp / "test_batch"
    for i in range(n):
        blob, label = cifar_variant(rng)
        path.write_bytes(blob)
        size = len(blob)
        feed(out, f"#{i} {label}", lambda: _read_batch(path), DeepzipError,
             lambda _r, size=size: 16 * size + (4 << 20))
    return out


# ---------------------------------------------------------------- MNIST IDX files
def idx(dims: list[int], body: bytes, magic: int | None = None) -> bytes:
    head = (magic if magic is not None else 0x0800 | len(dims)).to_bytes(4, "big")
    return head + b"".join(d.to_bytes(4, "big", signed=False) for d in dims) + body


def mnist_variant(rng: random.Random) -> tuple[bytes, int, str]:
    ndim = rng.choice([1, 3])
    dims = [rng.choice([1, 2, 5])] + ([28, 28] if ndim == 3 else [])
    body = bytes(math.prod(dims))
    kind = rng.choice(["dims", "magic", "truncate", "extend", "gzip"])
    if kind == "dims":
        i = rng.randrange(ndim)
        dims[i] = rng.choice([0, 2 ** 32 - 1, 2 ** 31, 60_000, dims[i] + 1])
    data = idx(dims, body, rng.choice([0x0803, 0x0801, 0x0D03, 0, 0xFFFFFFFF])
               if kind == "magic" else None)
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "extend":
        data += bytes(rng.randrange(1, 100))
    elif kind == "gzip":
        data = gzip.compress(data)[:rng.choice([None, 10, 20])]
    return data, ndim, kind


def fuzz_mnist(n: int, seed: int, tmp: Path) -> Outcome:
    from deepzip.data import _read_idx_bytes, parse_idx
    from deepzip.errors import DeepzipError

    rng = random.Random(seed)
    out = Outcome()
    name = "t10k-images-idx3-ubyte"
    for i in range(n):
        data, ndim, label = mnist_variant(rng)
        size = len(data)
        for p in tmp.glob(f"{name}*"):
            p.unlink()
        (tmp / (name + (".gz" if label == "gzip" else ""))).write_bytes(data)

        def call(ndim: int = ndim) -> Any:
            raw = _read_idx_bytes(tmp, name)
            return parse_idx(raw, ndim)

        feed(out, f"#{i} {label}", call, DeepzipError,
             lambda _r, size=size: 16 * size + (4 << 20))
    return out


# ---------------------------------------------------------------- recipes
def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, (*path, k))] + [path]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaves(v, (*path, i))] + [path]
    return [path]


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


def recipe_variant(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    import yaml

    kind = rng.choice(["leaf", "leaf", "leaf", "key", "text", "anchors", "deep"])
    obj = copy.deepcopy(base)
    if kind in ("leaf", "key"):
        for _ in range(rng.choice([1, 2])):
            path = rng.choice(_leaves(obj))
            value = pick(rng, [10 ** 5000, [0.5, float("nan")], deep(40), "fast",
                               {"lr": "fast"}, {"batch_size": 1.5}])
            if kind == "key" and path and isinstance(value, str):
                node = obj
                for k in path[:-1]:
                    node = node[k]
                if isinstance(node, dict):
                    node[value[:20]] = 1
                continue
            obj = _set(obj, path, value)
    if kind == "anchors":
        text = (b"name: bomb\nprune:\n  schedule: none\n  train:\n    extra:\n"
                b"      a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                b"      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                b"      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n")
        return text, kind
    if kind == "deep":
        return ("prune: " + "[" * rng.choice([40, 5000]) + "]").encode(), kind
    try:
        text = yaml.safe_dump(obj, sort_keys=False).encode()
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. a 5,000-digit number
        text = b"name: huge\nseed: " + b"9" * 5000 + b"\n"
    if kind == "text":
        b = bytearray(text)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        text = bytes(b)
    return text, kind


def fuzz_recipes(bases: list[dict[str, Any]], n: int, seed: int, tmp: Path) -> Outcome:
    from deepzip.errors import DeepzipError
    from deepzip.recipe import load_recipe

    rng = random.Random(seed)
    out = Outcome()
    path = tmp / "recipe.yaml"
    for i in range(n):
        text, label = recipe_variant(bases[i % len(bases)], rng)
        path.write_bytes(text)

        def call() -> Any:
            r = load_recipe(path)
            for section in (r.prune.train, r.quantize.train if r.quantize else {}):
                r.train_config(section, epochs=1)  # what a run does with them next
            r.check_code(False)  # a run without --allow-code
            runs = Path("runs").resolve()
            if Path("runs", r.name).resolve().parent != runs:
                raise AssertionError(f"run folder runs/{r.name!r} escapes runs/")
            return r

        size = len(text)
        feed(out, f"#{i} {label}", call, DeepzipError,
             lambda _r, size=size: 64 * size + (8 << 20))
    return out


def dzip_bases(tmp: Path) -> list[tuple[bytes, int, Any]]:
    """Valid small files of every layout: sparse and dense shared layers with a registered
    spec (LeNet-300-100), folded BatchNorm (ResNet-20, no spec), kernel-layout layers with
    int8 codebooks (ResNet-20 with most kernels empty), tied weights (alias)."""
    import torch
    from torch import nn

    from deepzip.checkpoint import ModelSpec
    from deepzip.dzip_torch import save, state_dict_bytes
    from deepzip.models import get
    from deepzip.prune import PruneConfig, prune_
    from deepzip.quantize import QuantizeConfig, quantize_

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(20, 8)
            self.decoder = nn.Linear(8, 20)
            self.decoder.weight = self.embedding.weight

    def empty_kernels(model: nn.Module) -> None:  # 80% of each conv's kernels: kernel layout
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    m.weight[torch.rand(m.weight.shape[:2]) < 0.8] = 0

    torch.manual_seed(0)
    out = []
    for make, sparsity, spec, raw, book in [
            (lambda: get("lenet300"), 0.95, ModelSpec(arch="lenet300"), "float16", "float32"),
            (lambda: get("resnet20"), 0.5, None, "int5", "float32"),
            (lambda: get("resnet20"), "kernels", None, "int8", "int8"),
            (Tied, None, None, "float16", "float32")]:
        model = make().eval()
        if sparsity == "kernels":
            empty_kernels(model)
            quantize_(model, QuantizeConfig(bits=4))
        elif sparsity is not None:
            prune_(model, PruneConfig("global", sparsity))
            quantize_(model, QuantizeConfig(bits=4))
        path = tmp / "base.dzip"
        save(model, path, spec=spec, raw_dtype=raw, codebook_dtype=book)
        out.append((path.read_bytes(), state_dict_bytes(make()),
                    None if spec is not None else make))
    return out


# ---------------------------------------------------------------- recorded specs
PROBE = "deepzip_fuzz_probe"  # a module on the path whose import leaves a marker file
CODE_NAMES = ["this:s", "pdb:set_trace", "antigravity:x", f"{PROBE}:make", f"{PROBE}.sub:Net",
              "tempfile:mkdtemp", "os:system", "deepzip.cli:main", "resnet20:x", "../../x:y",
              "a\0b", "x" * 300, "mnist:"]
SENTINELS = ("this", "pdb", "antigravity", PROBE)  # none of them is imported by deepzip


def spec_variant(rng: random.Random) -> dict[str, Any]:
    """A recorded model spec whose arch and task are hostile (entry points above all)."""
    spec: dict[str, Any] = {"arch": "lenet300", "num_classes": 10, "mean": [0.1307],
                            "std": [0.3081]}
    for key in rng.sample(["arch", "task", "task", "num_classes", "mean"], rng.randrange(1, 3)):
        spec[key] = rng.choice(CODE_NAMES) if rng.random() < 0.7 else pick(rng, CODE_NAMES)
    return spec


def fuzz_specs(n: int, seed: int, tmp: Path) -> Outcome:
    """Checkpoints and .dzip files recording hostile specs, opened as every command opens
    them (the model, then the task the CLI would pick): nothing they name may be imported.
    The named modules are ones deepzip never imports (``this``, ``pdb``, a probe module on
    the path that leaves a marker file): an import shows in ``sys.modules`` or as the
    marker."""
    import argparse
    import sys

    import torch

    from deepzip.dzip_torch import save
    from deepzip.models import get

    rng = random.Random(seed)
    out = Outcome()
    torch.manual_seed(0)
    model = get("lenet300")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save(model, tmp / "plain.dzip")
    pre, header, body = split_dzip((tmp / "plain.dzip").read_bytes())
    args = argparse.Namespace(task=None, data_dir=str(tmp), download=False, subset=None,
                              device="cpu")
    marker = tmp / "PROBE-IMPORTED"
    code = tmp / "code"
    code.mkdir(exist_ok=True)
    (code / f"{PROBE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n")
    sys.path.insert(0, str(code))
    already = {m for m in SENTINELS if m in sys.modules}  # pytest imports pdb itself
    try:
        for i in range(n):
            _one_spec(i, rng, out, args, tmp, state, (pre, header, body))
            imported = [m for m in SENTINELS if m in sys.modules and m not in already] + (
                [PROBE] if marker.exists() else [])
            if imported:
                out.unexpected.append(f"#{i} imported {imported}")
                break
    finally:
        sys.path.remove(str(code))
    return out


def _one_spec(i: int, rng: random.Random, out: Outcome, args: Any, tmp: Path,
              state: dict[str, Any], parts: tuple) -> None:
    import torch

    from deepzip.cli import _task
    from deepzip.errors import DeepzipError
    from deepzip.loading import load_model as open_model

    pre, header, body = parts
    spec = spec_variant(rng)
    if i % 2:
        path = tmp / "spec.pt"
        torch.save({"state_dict": state, "deepzip": spec}, path)
    else:
        path = tmp / "spec.dzip"
        path.write_bytes(join_dzip(pre, {**header, "model": spec}, body))

    def call(path: Path = path) -> Any:
        _, sp = open_model(str(path))
        return _task(args, sp.task)  # cifar10/mnist: the data is missing -> refused

    # the bound: a mismatched checkpoint lists the architectures it would fit (on meta)
    feed(out, f"#{i} {json.dumps(spec)[:80]}", call, DeepzipError, lambda _r: 256 << 20)


# ---------------------------------------------------------------- output paths
OUTPUT_KINDS = {  # kind -> refused (True) or written (False); "unknown-ext" depends
    "new": False, "file": False, "null": False, "link-to-file": False,
    "dangling-link": False, "dir": True, "fifo": True, "device": True,
    "link-to-fifo": True, "link-to-dir": True, "nul": True, "under-a-file": True,
    "unknown-ext": None}
FOLDER_KINDS = {  # an output folder (--out): a directory or a link to one is written into
    "new": False, "dir": False, "link-to-dir": False, "file": True, "null": True,
    "link-to-file": True, "dangling-link": True, "fifo": True, "device": True,
    "link-to-fifo": True, "nul": True, "under-a-file": True}


def output_variant(kind: str, path: Path) -> tuple[str, Callable[[], Any]]:
    """Make ``path`` into ``kind`` of output; return the name to pass and a snapshot
    function of what must not change (a refused thing, the null device, a link's
    target), to compare after the command."""
    import os
    import stat

    other = path.with_name(path.name + ".target")
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind in ("device", "null"):
        node = "/dev/zero" if kind == "device" else os.devnull
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.stat(node).st_rdev)
        except PermissionError:  # not root: a link to the system's node instead
            path.symlink_to(node)
    elif kind == "file":
        path.write_bytes(b"old")
    elif kind.startswith("link-to-"):
        {"fifo": lambda: os.mkfifo(other), "dir": other.mkdir,
         "file": lambda: other.write_bytes(b"someone's")}[kind[8:]]()
        path.symlink_to(other)
    elif kind == "dangling-link":
        path.symlink_to(other)
    elif kind == "under-a-file":
        path.write_bytes(b"a file")
        path = path / "out"
    elif kind == "unknown-ext":
        path = path.with_suffix(".xyz")
    name = str(path) + "\0x" if kind == "nul" else str(path)

    def one(p: Path) -> tuple:
        try:
            st = os.lstat(p)
        except OSError:
            return ()
        body = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        return (stat.S_IFMT(st.st_mode), st.st_rdev, body)

    def snapshot() -> tuple:
        kept = OUTPUT_KINDS[kind] or kind == "null"
        return one(path) if kept else (), one(other)
    return name, snapshot


@contextlib.contextmanager
def deadline(seconds: int) -> Any:
    """Fail (AssertionError) instead of hanging: a FIFO opened for writing blocks until
    a reader comes."""
    import signal

    def boom(*_a: Any) -> None:
        raise AssertionError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fuzz_outputs(commands: dict[str, tuple[str, Callable[[str], list[str]]]], tmp: Path
                 ) -> Outcome:
    """Every command that writes, against every kind of output path (``commands``: a
    command's name -> (its output's suffix, "/" for an output folder, and its argv for an
    output path)). A refused kind must end in one line and exit 2 with the thing left as
    it was; a written kind in exit 0, with a link's target and the null device untouched.
    Anything else (a traceback, a hang, a replaced device or FIFO, a written link target,
    a temp file left) is unexpected. A plot's unknown extension is refused; any other
    command writes it. An output folder may be a directory or a link to one, nothing
    else."""
    import io

    from deepzip.cli import main

    out = Outcome()
    for i, (command, (suffix, argv)) in enumerate(commands.items()):
        for kind, refused in (FOLDER_KINDS if suffix == "/" else OUTPUT_KINDS).items():
            if refused is None:
                refused = suffix == ".png"
            folder = tmp / f"out{i}-{kind}"
            folder.mkdir()
            name, snapshot = output_variant(kind, folder / f"o{suffix.strip('/')}")
            before = snapshot()
            err = io.StringIO()
            out.inputs += 1
            try:
                with deadline(60), contextlib.redirect_stderr(err), \
                        contextlib.redirect_stdout(io.StringIO()):
                    rc = main(argv(name))
            except BaseException as e:  # noqa: BLE001 - the point: anything is a defect
                out.unexpected.append(f"{command} -> {kind}: {type(e).__name__}: {e}")
                continue
            text = err.getvalue()
            wrong = [] if rc == (2 if refused else 0) else [f"exit {rc}"]
            if refused and (text.count("\n") != 1 or "Traceback" in text):
                wrong.append(f"stderr {text[:100]!r}")
            if snapshot() != before:
                wrong.append("what was there changed")
            if list(folder.rglob(".*.tmp")):
                wrong.append("a temp file left")
            if wrong:
                out.unexpected.append(f"{command} -> {kind}: {'; '.join(wrong)}")
            elif refused:
                out.refused += 1
            else:
                out.accepted += 1
    return out


def output_commands(tmp: Path, data_dir: Path | None = None
                    ) -> dict[str, tuple[str, Callable[[str], list[str]]]]:
    """The commands that write what the user names, with inputs made here: encode -o,
    decode -o (.pt and, with the export extra, .safetensors), summary --plot, pareto -o;
    with MNIST in ``data_dir`` also the output folders of train, prune, quantize and
    sensitivity (--out, on 64 images) and, with the export extra, export -o."""
    import importlib.util

    import torch

    from deepzip import dzip_torch
    from deepzip.checkpoint import ModelSpec, save_checkpoint
    from deepzip.models import get

    spec = ModelSpec(arch="lenet300", task="mnist", mean=(0.1307,), std=(0.3081,))
    torch.manual_seed(0)
    model = get("lenet300")
    save_checkpoint(model, spec, tmp / "m.pt")
    dzip_torch.save(model, tmp / "m.dzip", spec=spec)
    (tmp / "run").mkdir()
    (tmp / "run" / "report.json").write_text(json.dumps({"summary": {
        "real_ratio": 10.0, "recipe": "x", "baseline_score": 0.9, "decoded_score": 0.89,
        "file_bytes": 100, "sparsity": 0.5, "formula_ratio": 12.0}}))
    m, d = str(tmp / "m.pt"), str(tmp / "m.dzip")
    commands: dict[str, tuple[str, Callable[[str], list[str]]]] = {
        "encode -o": (".dzip", lambda o: ["encode", m, "-o", o]),
        "decode -o": (".pt", lambda o: ["decode", d, "-o", o]),
        "summary --plot": (".png", lambda o: ["summary", m, "--plot", o]),
        "pareto -o": (".png", lambda o: ["pareto", str(tmp / "run"), "-o", o]),
    }
    if importlib.util.find_spec("safetensors"):
        commands["decode -o .safetensors"] = (".safetensors",
                                              lambda o: ["decode", d, "-o", o])
    if data_dir is None:
        return commands
    small = ["--subset", "64", "--data-dir", str(data_dir)]
    commands.update({
        "train --out": ("/", lambda o: ["train", "--model", "lenet300", "--task", "mnist",
                                        "--epochs", "1", "--batch-size", "32", "--out", o,
                                        *small]),
        "prune --out": ("/", lambda o: ["prune", m, "--q", "0.5", "--out", o, *small]),
        "quantize --out": ("/", lambda o: ["quantize", m, "--bits", "2", "--out", o,
                                           *small]),
        "sensitivity --out": ("/", lambda o: ["sensitivity", m, "--levels", "0.5", "--out",
                                              o, *small])})
    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime"):
        commands["export -o"] = (".onnx", lambda o: ["export", m, "-o", o, *small])
    return commands
