import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepzip import DeepzipError
from deepzip.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_STD,
    BatchLoader,
    ImageSplit,
    augment_batch,
    load_cifar10,
    load_mnist,
    parse_idx,
    parse_normalize,
    resolve_data_root,
)


def test_parse_normalize():
    assert parse_normalize("cifar")[0] == CIFAR10_MEAN
    assert parse_normalize("ImageNet")[1] == IMAGENET_STD
    assert parse_normalize("0.5,0.5,0.5/0.2,0.2,0.2") == ((0.5,) * 3, (0.2,) * 3)
    assert parse_normalize("mnist") == ((0.1307,), (0.3081,))
    assert parse_normalize("0.5/0.25") == ((0.5,), (0.25,))  # one grey channel
    for bad in ["nope", "1,2/3", "0.5,0.5,0.5/0,1,1", "a,b,c/d,e,f", "0.5/nan", "inf/1",
                "1,1,1,1,1/1,1,1,1,1"]:
        with pytest.raises(DeepzipError):
            parse_normalize(bad)


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPZIP_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("DEEPZIP_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_root(None) == tmp_path / "cache" / "deepzip" / "data"


def test_missing_data_names_path_and_download(tmp_path):
    with pytest.raises(DeepzipError, match=r"cifar-10-batches-py.*--download"):
        load_cifar10(tmp_path, train=False)


def _write_batch(folder, obj):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(obj, f, protocol=2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("obj,match", [
    ({b"data": Evil(), b"labels": [0]}, "forbidden"),
    ({b"data": np.zeros((10000, 3072), np.float32), b"labels": [0] * 10000}, "uint8"),
    ({b"data": np.zeros((10000, 3072), np.uint8), b"labels": [11] * 10000}, "0..9"),
    ({b"data": np.zeros((10000, 3072), np.uint8), b"labels": [0] * 9999}, "integers"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 5}, "expected 10000"),
    ({b"labels": [0]}, "missing"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0, 1], [2]]}, "integers"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [[[[[[[[0]]]]]]]]}, "integers"),
    ({b"data": np.zeros((20000, 3072), np.uint8), b"labels": [0] * 20000}, "N <= 10000"),
    ([1, 2, 3], "not a dict"),
])
def test_bad_batches_rejected(tmp_path, obj, match):
    _write_batch(tmp_path / "cifar-10-batches-py", obj)
    with pytest.raises(DeepzipError, match=match):
        load_cifar10(tmp_path, train=False)


def test_real_test_split(cifar_test):
    assert cifar_test.images.shape == (10000, 3, 32, 32)
    assert cifar_test.images.dtype == torch.uint8
    assert torch.bincount(cifar_test.labels).tolist() == [1000] * 10
    mean = cifar_test.images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=0.01)


def test_augment_is_a_padded_crop_or_its_mirror():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54  # about half are flipped


def test_loader_batches_and_normalizes():
    images = torch.full((10, 3, 32, 32), 255, dtype=torch.uint8)
    split = ImageSplit(images, torch.arange(10))
    ev = BatchLoader(split, 4, mean=(0.5,) * 3, std=(0.5,) * 3)
    batches = list(ev)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.allclose(batches[0][0], torch.ones(4, 3, 32, 32))
    tr = BatchLoader(split, 4, train=True, seed=1)
    assert len(tr) == 2 and sum(len(y) for _, y in tr) == 8
    seen = torch.cat([y for _, y in BatchLoader(split, 5, train=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(10))  # a permutation, no repeats


MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def _idx(dims, body: bytes, magic=None) -> bytes:
    head = (magic if magic is not None else 0x0800 | len(dims)).to_bytes(4, "big")
    return head + b"".join(d.to_bytes(4, "big") for d in dims) + body


def test_idx_parser_checks_every_size():
    arr = parse_idx(_idx([2, 2, 2], bytes(range(8))), 3)
    assert arr.shape == (2, 2, 2) and arr[1, 1, 1] == 7
    for data, match in [(_idx([2, 2, 2], bytes(7)), "holds 7 bytes"),
                        (_idx([2, 2, 2], bytes(9)), "holds 9 bytes"),
                        (_idx([2 ** 31, 2 ** 31, 4], b""), "header says"),
                        (_idx([2, 2, 2], bytes(8), magic=0x0D03), "bad IDX magic"),
                        (b"\x00\x00", "too short")]:
        with pytest.raises(DeepzipError, match=match):
            parse_idx(data, 3)


def test_real_mnist_splits():
    if not MNIST_RAW.is_dir():
        pytest.skip("MNIST not in ../shared/data")
    test = load_mnist(MNIST_RAW.parents[1], train=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist()[:2] == [980, 1135]
    assert len(load_mnist(MNIST_RAW.parents[1], train=True)) == 60000


def test_mnist_substitutes_and_bombs_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with pytest.raises(DeepzipError, match="--download"):
        load_mnist(tmp_path, train=False)
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx([1, 28, 28], bytes(784)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx([1], b"\x03"))
    with pytest.raises(DeepzipError, match="md5"):  # well formed, but not the official data
        load_mnist(tmp_path, train=False)
    (raw / "t10k-images-idx3-ubyte").unlink()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:  # 100 MB of zeros, 100 KB
        for _ in range(100):
            f.write(bytes(1 << 20))
    with pytest.raises(DeepzipError, match="more than any MNIST file"):
        load_mnist(tmp_path, train=False)


def test_mnist_download_checks_unpacked_md5(tmp_path, monkeypatch):
    """--download through a stand-in for the network: the shared copies' .gz files."""
    if not MNIST_RAW.is_dir():
        pytest.skip("MNIST not in ../shared/data")
    import deepzip.data as data

    def fetch(url, dest):
        name = url.rsplit("/", 1)[1]
        if url.startswith(data.MNIST_MIRRORS[0]):
            dest.write_bytes(gzip.compress(b"not mnist"))  # a broken first mirror
        else:
            shutil.copyfile(MNIST_RAW / name, dest)

    monkeypatch.setattr(data, "_fetch", fetch)
    split = load_mnist(tmp_path, train=False, download=True)
    assert len(split) == 10000
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == sorted(
        f"{n}.gz" for n in data.MNIST_FILES)  # nothing else left behind


def test_grey_loader_crops_without_mirroring():
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = images.view(2, 1, 28, 28)
    split = ImageSplit(images, torch.tensor([0, 1]))
    loader = BatchLoader(split, 2, train=True, mean=(0.0,), std=(1 / 255,), pad=2,
                         flip=False, seed=3)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2)).float()
    for _ in range(10):
        x, y = next(iter(loader))
        for img, label in zip(x, y, strict=True):
            crops = [padded[label, :, i:i + 28, j:j + 28] for i in range(5) for j in range(5)]
            assert any(torch.allclose(img, c) for c in crops)  # a shifted original
    with pytest.raises(DeepzipError, match="channel"):
        BatchLoader(split, 2, mean=CIFAR10_MEAN, std=CIFAR10_STD)
