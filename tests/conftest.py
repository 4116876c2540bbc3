"""Shared fixtures. Real-data tests read ../shared/data (CI has it) in small slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepzip.data import FOLDER, load_cifar10

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / FOLDER).is_dir():
        pytest.skip(f"CIFAR-10 not at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def cifar_train(data_root):
    return load_cifar10(data_root, train=True)


@pytest.fixture(scope="session")
def cifar_test(data_root):
    return load_cifar10(data_root, train=False)
