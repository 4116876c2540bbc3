"""Image data sets held in memory as uint8, with batch augmentation: CIFAR-10 (python
layout) and MNIST (IDX files), both in the folder layout torchvision uses.

Why not torchvision's dataset + DataLoader: per-image PIL transforms in Python cost more
than a ResNet-20 training step on a small CPU. Here the whole set is one uint8 tensor and
random-crop/flip run on whole batches as tensor ops (see ``bench/train_throughput.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import read_gzip_limited, read_limited
from .errors import DeepzipError
from .normalization import (  # re-exported: deepzip.data's names before 0.5
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    check_normalization,
    parse_normalize,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "BatchLoader",
    "ImageSplit",
    "apply_augmentation",
    "augment_batch",
    "draw_augmentation",
    "download_cifar10",
    "load_cifar10",
    "load_mnist",
    "parse_normalize",
    "resolve_data_root",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
ENV_VAR = "DEEPZIP_DATA"
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir``, else ``$DEEPZIP_DATA``, else the per-user cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "deepzip" / "data"


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what a CIFAR batch needs: numpy arrays and builtin containers."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


_MAX_BATCH_BYTES = 160 << 20  # a CIFAR-10 batch is 31 MB (123 MB if saved as float32)
_BATCH_IMAGES = 10_000


_PROTOCOL_5 = {"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"}


def _check_opcodes(blob: bytes) -> None:
    """Walk the pickle's opcodes before running it: every counted length must fit in the
    file (the unpickler allocates a stated length before reading it) and protocol 5's
    out-of-band buffers, which no CIFAR batch uses, are refused."""
    import pickletools

    for op, _, _ in pickletools.genops(blob):
        if op.name in _PROTOCOL_5:
            raise pickle.UnpicklingError(f"opcode {op.name} has no place in a CIFAR batch")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: read with a size limit, unpickled with only numpy arrays
    and plain containers allowed, and checked for structure before anything is copied
    (a pickle of allowed pieces can still describe a huge strided array or a deep list)."""
    blob = read_limited(path, _MAX_BATCH_BYTES, "CIFAR-10 batch")
    try:
        _check_opcodes(blob)
        raw = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - no code can run (find_class); any failure is bad data
        raise DeepzipError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: "
                           f"{str(e)[:80]})") from None
    if not isinstance(raw, dict):
        raise DeepzipError(f"{path}: not a CIFAR-10 batch (top level is not a dict)")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "data" not in d or "labels" not in d:
        raise DeepzipError(f"{path}: missing 'data' or 'labels'")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or not 0 < data.shape[0] <= _BATCH_IMAGES \
            or not data.flags.c_contiguous:
        raise DeepzipError(f"{path}: 'data' must be contiguous uint8 of shape (N, 3072), "
                           f"N <= {_BATCH_IMAGES}")
    if isinstance(labels, list):
        if len(labels) != data.shape[0] or not all(type(v) is int for v in labels):
            raise DeepzipError(f"{path}: 'labels' must be N integers")
        if not all(0 <= v <= 9 for v in labels):
            raise DeepzipError(f"{path}: labels outside 0..9")
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.shape != (data.shape[0],) \
            or labels.dtype.kind not in "iu":
        raise DeepzipError(f"{path}: 'labels' must be N integers")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DeepzipError(f"{path}: labels outside 0..9")
    return data, labels


@dataclass
class ImageSplit:
    """One split in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, n: int) -> ImageSplit:
        """The first ``n`` images (for quick tests and smoke runs)."""
        return ImageSplit(self.images[:n], self.labels[:n])

    def split(self, held_out: int, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
        """(the rest, ``held_out`` images drawn by ``seed``), each in the original order:
        a validation set, the same for every run."""
        keep, out = held_out_indices(len(self), held_out, seed)
        return (ImageSplit(self.images[keep], self.labels[keep]),
                ImageSplit(self.images[out], self.labels[out]))


def held_out_indices(n: int, held_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): the indices of ``n`` examples split by a fixed seed, each sorted."""
    if not 0 < held_out < n:
        raise DeepzipError(f"cannot hold out {held_out} of {n} examples for validation; "
                           "--validation N (a recipe's validation: N) sets how many")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held_out:].sort().values, order[:held_out].sort().values


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (any failure is one DeepzipError)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise DeepzipError(f"download of {url} failed: {e}") from None


def download_cifar10(root: Path) -> None:
    """Fetch the official tarball, verify its md5, unpack into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tgz = Path(tmp) / "cifar-10-python.tar.gz"
        _fetch(CIFAR10_URL, tgz)
        md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
        if md5 != CIFAR10_TGZ_MD5:
            raise DeepzipError(f"downloaded archive has md5 {md5}, expected {CIFAR10_TGZ_MD5}")
        with tarfile.open(tgz) as t:
            t.extractall(tmp, filter="data")
        shutil.move(str(Path(tmp) / FOLDER), str(root / FOLDER))


def load_cifar10(
    root: str | os.PathLike[str] | None = None, train: bool = True, download: bool = False
) -> ImageSplit:
    """Load one split of CIFAR-10 from ``root/cifar-10-batches-py`` (the torchvision layout).

    >>> test = load_cifar10("../shared/data", train=False)  # doctest: +SKIP
    >>> test.images.shape  # doctest: +SKIP
    torch.Size([10000, 3, 32, 32])
    """
    base = resolve_data_root(root)
    folder = base / FOLDER
    files = _TRAIN_FILES if train else _TEST_FILES
    if not all((folder / f).is_file() for f in files):
        if not download:
            raise DeepzipError(
                f"CIFAR-10 not found at {folder}; pass --data-dir DIR (the folder holding "
                f"{FOLDER}/) or --download"
            )
        download_cifar10(base)
    parts = [_read_batch(folder / f) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    expected = 50000 if train else 10000
    if len(labels) != expected:
        raise DeepzipError(f"{folder}: expected {expected} images, found {len(labels)}")
    images = torch.from_numpy(data).view(-1, 3, 32, 32)
    return ImageSplit(images, torch.from_numpy(labels.astype(np.int64)))


# ---------------------------------------------------------------- MNIST
MNIST_FOLDER = "MNIST/raw"
# The official files' md5 *after* gunzip: copies re-gzipped elsewhere differ as .gz only.
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")
_MAX_IDX_BYTES = 64 << 20  # the largest MNIST file is 47,040,016 bytes unpacked


def _read_idx_bytes(folder: Path, name: str) -> bytes | None:
    """The unpacked bytes of ``name`` or ``name.gz`` (None if neither exists), read with a
    size limit so a hostile gzip cannot fill memory."""
    if (folder / name).exists():
        return read_limited(folder / name, _MAX_IDX_BYTES, "MNIST file")
    if (folder / f"{name}.gz").exists():
        return read_gzip_limited(folder / f"{name}.gz", _MAX_IDX_BYTES, "MNIST file")
    return None


def parse_idx(data: bytes, ndim: int, where: str = "IDX file") -> np.ndarray:
    """An unsigned-byte IDX array (LeCun's format: magic 0x0000 08 NDIM, big-endian u32
    sizes, then the bytes), every size checked against the data before it is used."""
    if len(data) < 4 + 4 * ndim:
        raise DeepzipError(f"{where}: too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 | ndim:
        raise DeepzipError(f"{where}: bad IDX magic {magic:#010x}, expected "
                           f"{0x0800 | ndim:#010x} (unsigned bytes, {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = len(data) - 4 - 4 * ndim
    if math.prod(dims) != body:
        raise DeepzipError(f"{where}: header says {'x'.join(map(str, dims))} but holds "
                           f"{body} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def download_mnist(root: Path) -> None:
    """Fetch the four .gz files (first mirror that works) into ``root/MNIST/raw``; each
    file's unpacked md5 is checked before it is kept."""
    folder = root / MNIST_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_FILES.items():
        if _read_idx_bytes(folder, name) is not None:
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                gz = Path(tmp) / f"{name}.gz"
                try:
                    _fetch(mirror + f"{name}.gz", gz)
                    got = hashlib.md5(gzip.decompress(gz.read_bytes())).hexdigest()
                except (DeepzipError, OSError, EOFError, zlib.error) as e:
                    errors.append(str(e))
                    continue
                if got != md5:
                    errors.append(f"{mirror}{name}.gz unpacks to md5 {got}, expected {md5}")
                    continue
                os.replace(gz, folder / f"{name}.gz")
                break
        else:
            raise DeepzipError(f"could not download {name}: " + "; ".join(errors))


def load_mnist(root: str | os.PathLike[str] | None = None, train: bool = True,
               download: bool = False) -> ImageSplit:
    """Load one split of MNIST from ``root/MNIST/raw/*-ubyte[.gz]`` (torchvision's layout).

    The unpacked bytes must have the official files' md5, so a damaged or substituted
    file is an error, not a silently different benchmark.

    >>> test = load_mnist("../shared/data", train=False)  # doctest: +SKIP
    >>> test.images.shape  # doctest: +SKIP
    torch.Size([10000, 1, 28, 28])
    """
    base = resolve_data_root(root)
    folder = base / MNIST_FOLDER
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    raw = [_read_idx_bytes(folder, n) for n in names]
    if any(r is None for r in raw):
        if not download:
            raise DeepzipError(f"MNIST not found at {folder}; pass --data-dir DIR (the folder "
                               f"holding {MNIST_FOLDER}/) or --download")
        download_mnist(base)
        raw = [_read_idx_bytes(folder, n) for n in names]
    for name, data in zip(names, raw, strict=True):
        md5 = hashlib.md5(data).hexdigest()
        if md5 != MNIST_FILES[name]:
            raise DeepzipError(f"{folder / name}: md5 {md5} of the unpacked bytes is not the "
                               f"official file's ({MNIST_FILES[name]})")
    images = parse_idx(raw[0], 3, names[0])
    labels = parse_idx(raw[1], 1, names[1])
    return ImageSplit(torch.from_numpy(images.copy()).unsqueeze(1),
                      torch.from_numpy(labels.astype(np.int64)))


def draw_augmentation(b: int, generator: torch.Generator, pad: int = 4
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (row offset, column offset, flip) for ``b`` images, from ``generator``."""
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return oy, ox, flip


def apply_augmentation(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                       flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each image of a padded batch at its offset, mirrored where ``flip``: one gather
    for the whole (B, C, H, W) batch, no per-image Python."""
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = oy.to(dev) + torch.arange(h, device=dev)  # (B, H)
    cols = ox.to(dev) + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, per image."""
    return apply_augmentation(x, *draw_augmentation(len(x), generator, pad), pad=pad)


class BatchLoader:
    """Iterates normalized float batches from an in-memory uint8 split.

    Shuffling and augmentation draw from a seeded generator, so a run is reproducible and
    ``state_dict()`` lets an interrupted run resume with the same stream.

    Under torch.distributed (``torchrun``), a training loader shards each global batch of
    ``batch_size * world_size`` images: every rank draws the same permutation and
    augmentation parameters and keeps its own slice, so the ranks together see exactly
    what one process with the global batch would.

    Training augmentation is a random crop of the image zero-padded by ``pad`` pixels and,
    with ``flip``, a random horizontal mirror (right for CIFAR, wrong for digits).
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int = 128,
        *,
        train: bool = False,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise DeepzipError(f"batch size must be >= 1, got {batch_size}")
        dist_on = train and torch.distributed.is_available() and \
            torch.distributed.is_initialized()
        self.world_size = world_size or (torch.distributed.get_world_size() if dist_on else 1)
        self.rank = rank if rank is not None else (
            torch.distributed.get_rank() if dist_on else 0)
        if not 0 <= self.rank < self.world_size:
            raise DeepzipError(f"rank {self.rank} outside world size {self.world_size}")
        self.augment, self.pad, self.flip = augment and pad >= 0, pad, flip
        check_normalization(tuple(mean), tuple(std))
        if len(mean) != split.images.shape[1]:
            raise DeepzipError(f"normalization has {len(mean)} channel(s), the images "
                               f"{split.images.shape[1]}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.channels_last = channels_last
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(std, device=self.device).view(shape) * 255
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.labels.numel()
        if self.train:  # drop the last partial batch: BatchNorm dislikes tiny batches
            return n // (self.batch_size * self.world_size)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.numel()
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        step = self.batch_size * (self.world_size if self.train else 1)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(len(self)):
            idx = order[i * step:(i + 1) * step]
            if self.train:
                draws = (draw_augmentation(len(idx), self.generator, self.pad)
                         if self.augment else None)
                idx = idx[mine]
            x = self.images[idx]
            if self.train and draws is not None:
                oy, ox, flip = (d[mine] for d in draws)
                x = apply_augmentation(x, oy, ox, flip & self.flip, pad=self.pad)
            x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
