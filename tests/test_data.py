import os
import pickle

import numpy as np
import pytest
import torch

from deepzip import DeepzipError
from deepzip.data import (
    CIFAR10_MEAN,
    IMAGENET_STD,
    BatchLoader,
    ImageSplit,
    augment_batch,
    load_cifar10,
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
